"""Compile a model or a training checkpoint into an :class:`~.artifact.Artifact`."""

import numpy as np
import torch

from .artifact import Artifact
from .lower import lower
from .plan import check_hardware, layer_stats, plan_memory

__all__ = ["CALIBRATION_IMAGES", "compile_checkpoint", "compile_model"]

#: Training images the calibration pass of :func:`compile_checkpoint` runs.
CALIBRATION_IMAGES = 1024


def compile_model(model, config, *, calibration, preprocessing, class_names, act_bits=8):
    """Compile ``model`` for a device of :class:`~hw.config.DeviceConfig` ``config``.

    Parameters
    ----------
    calibration : torch.Tensor
        Normalized images ``(B, C, H, W)`` that set the fixed-point ranges.
    preprocessing : dict
        ``mean``, ``std`` (per channel, raw pixel units) and ``pixel_range``.
    class_names : sequence of str
    act_bits : int
        Width of fixed-point feature maps.

    Raises
    ------
    CompileError
        The model cannot be compiled, or a layer does not fit ``config`` (the message names
        the layer and the resource).
    """
    program = lower(model, calibration, preprocessing, act_bits=act_bits)
    total = check_hardware(program, config)
    offsets, _ = plan_memory(program)
    stats = layer_stats(program, config)
    _, channels, size, _ = calibration.shape
    hardware = {
        "rows": config.rows, "cols": config.cols, "lane": config.lane,
        "max_depth": max((s.k_bits for s in stats), default=0),
        "activation_bytes": total,
        "weight_bytes": max((s.weight_bytes for s in stats), default=0),
    }
    pre = {"mean": [float(v) for v in preprocessing["mean"]],
           "std": [float(v) for v in preprocessing["std"]],
           "pixel_range": [int(v) for v in preprocessing["pixel_range"]],
           "input_size": int(size), "in_channels": int(channels), "layout": "NCHW"}
    return Artifact(program, hardware, pre, [str(n) for n in class_names],
                    {name: list(v) for name, v in offsets.items()})


def compile_checkpoint(checkpoint, config, *, calibration_images=CALIBRATION_IMAGES, seed=0,
                       act_bits=8):
    """Compile a :mod:`sw.train` checkpoint (a path or a loaded dict), calibrating on
    ``calibration_images`` training images drawn with ``seed``.

    Returns ``(artifact, model)``: the model is the float model, in eval mode.
    """
    from sw import data, train
    if not isinstance(checkpoint, dict):
        checkpoint = train.load_checkpoint(checkpoint)
    model = train.build_model_from_checkpoint(checkpoint)
    info = checkpoint["dataset"]
    dataset = data.load_dataset(info["name"], "train")
    rng = np.random.default_rng(seed)
    count = min(calibration_images, len(dataset))
    indices = np.sort(rng.choice(len(dataset), count, replace=False))
    images, _ = dataset.__getitems__(indices.tolist())
    with torch.no_grad():
        artifact = compile_model(model, config, calibration=images, preprocessing=info,
                                 class_names=info["class_names"], act_bits=act_bits)
    return artifact, model
