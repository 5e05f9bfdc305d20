"""Networks for the performance benchmarks, with random weights (cycle counts do not depend on
the weights' values).

* :func:`meliusnet_program`: the registry's ``meliusnet-small`` for 28x28 grey images
  (Fashion-MNIST's shape), randomly initialized, BatchNorm statistics from random images,
  compiled by :func:`sw.compile.compile_model` like any trained model.
* :func:`cnv_w1a1_program`: FINN's CNV-W1A1 topology written directly as a layer program:
  32x32x3 8-bit pixels; 3x3 convs (no padding) 64, 64, 2x2 max pool, 128, 128, pool, 256, 256;
  fully connected 512, 512, 10. Binary weights throughout; binary activations after the first
  layer (each layer's counts go through a per-channel threshold). The first layer multiplies
  raw 8-bit pixels by +-1 weights on the fixed-point unit; max pools run on the counts before
  the threshold, which equals pooling the bits when every threshold direction is +1.
"""

import numpy as np
import torch
from torch import nn

from sw.compile import compile_model
from sw.compile.ir import Op, Program, Slice, TensorSpec

__all__ = ["cnv_w1a1_program", "meliusnet_program"]


@torch.no_grad()
def meliusnet_program(config, seed=0, size=28):
    """The compiled ``meliusnet-small`` program (random weights) and its raw test images."""
    from sw.models import build_model
    torch.manual_seed(seed)
    model = build_model("meliusnet-small", num_classes=10, in_channels=1, input_size=size)
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            c = module.num_features
            module.weight.copy_(0.5 + torch.rand(c, generator=generator))
            module.bias.copy_(torch.rand(c, generator=generator) - 0.5)
            module.momentum = None
            module.reset_running_stats()
    raw = torch.randint(0, 256, (64, 1, size, size), generator=generator)
    normalized = (raw.to(torch.float32) - 72.9) / 90.0
    model.train()
    model(normalized)
    model.eval()
    artifact = compile_model(model, config, calibration=normalized,
                             preprocessing={"mean": [72.9], "std": [90.0],
                                            "pixel_range": [0, 255]},
                             class_names=[str(i) for i in range(10)])
    return artifact.program, raw[:8].numpy()


#: (output channels, kernel) of CNV's binary convs after the first, and pools after which.
_CNV_CONVS = [(64, 3), (128, 3), (128, 3), (256, 3), (256, 3)]
_CNV_POOL_AFTER = {0, 2}          # indices into _CNV_CONVS (conv2 and conv4 of the network)
_CNV_FC = [512, 512, 10]


def cnv_w1a1_program(seed=0):
    """CNV-W1A1 as a :class:`~sw.compile.ir.Program` with random weights and thresholds near
    the middle of each count's range, and raw test images ``(8, 3, 32, 32)``."""
    rng = np.random.default_rng(seed)
    tensors, ops = {}, []

    def tensor(name, shape, kind, bits, signed=False):
        tensors[name] = TensorSpec(name, tuple(shape), kind, bits, None, signed)
        return Slice(name, 0, shape[0])

    def threshold(name, src, channels, hw, middle):
        out = tensor(name, (channels, hw, hw), "bits", 1)
        thr = rng.integers(int(middle * 0.9), int(middle * 1.1) + 1, channels)
        ops.append(Op("threshold", name, [src], out, params={
            "threshold": thr.astype(np.int64), "direction": np.ones(channels, np.int64)}))
        return out

    image = tensor("image", (3, 32, 32), "int", 8)
    x = tensor("input", (3, 32, 32), "int", 8)
    ops.append(Op("input", "input", [image], x, attrs={"shift": 0},
                  params={"zero": np.zeros(3, np.int64)}))
    # First layer: 8-bit pixels times +-1 weights on the fixed-point unit.
    c1 = tensor("conv1", (64, 30, 30), "int", 14, signed=True)
    weight = rng.choice(np.array([-1, 1], np.int8), size=(64, 3, 3, 3))
    ops.append(Op("conv", "conv1", [x], c1,
                  attrs={"kernel": 3, "stride": 1, "padding": 0, "groups": 1, "relu": 0,
                         "bits": 14},
                  params={"weight": weight, "mul": np.ones(64, np.int64),
                          "bias": np.zeros(64, np.int64), "shift": np.zeros(64, np.int64)}))
    bits = threshold("conv1.act", c1, 64, 30, 0)
    channels, hw = 64, 30
    for index, (out_c, k) in enumerate(_CNV_CONVS):
        name = f"conv{index + 2}"
        hw -= k - 1
        counts = tensor(name, (out_c, hw, hw), "int", 12)
        ops.append(Op("bconv", name, [bits], counts,
                      attrs={"kernel": k, "stride": 1, "padding": 0},
                      params={"weight_bits": rng.integers(0, 2, (out_c, channels * k * k))
                              .astype(bool)}))
        if index in _CNV_POOL_AFTER:
            hw //= 2
            pooled = tensor(f"{name}.pool", (out_c, hw, hw), "int", 12)
            ops.append(Op("maxpool", f"{name}.pool", [counts], pooled,
                          attrs={"kernel": 2, "stride": 2, "padding": 0}))
            counts = pooled
        bits = threshold(f"{name}.act", counts, out_c, hw, channels * k * k / 2)
        channels = out_c
    for index, out_c in enumerate(_CNV_FC):
        name = f"fc{index + 1}"
        last = index == len(_CNV_FC) - 1
        counts = tensor("logits" if last else name, (out_c, 1, 1), "int", 12)
        ops.append(Op("bconv", name, [bits], counts,
                      attrs={"kernel": 1, "stride": 1, "padding": 0},
                      params={"weight_bits": rng.integers(0, 2, (out_c, channels))
                              .astype(bool)}))
        if not last:
            bits = threshold(f"{name}.act", counts, out_c, 1, channels / 2)
        channels = out_c
    program = Program(tensors, ops, "image", "logits")
    images = rng.integers(0, 256, (8, 3, 32, 32))
    return program, images
