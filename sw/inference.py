"""``sw.run_inference``: classify images with a compiled model on a board, a simulated board or
the golden model, with the same answer from each.

The model (an artifact file or :class:`~sw.compile.artifact.Artifact`) is loaded into a device
once and cached: later calls with the same model and device only send images. Images may be a
file path, a PIL image, a numpy array or a torch tensor, one image or a batch:

* arrays and tensors are **raw pixels** (integers within the artifact's ``pixel_range``),
  ``(C, H, W)`` or ``(H, W)`` for one grey image, or ``(N, C, H, W)`` for a batch;
* files and PIL images are converted to the model's channels (grey or RGB), resized to its
  input size if needed, and scaled from 0..255 to its ``pixel_range``.

On a device, a model whose weights do not fit on chip at once is streamed segment by segment,
each segment loaded once for all the images of a call
(:meth:`sw.runtime.Accelerator.infer_batch`): pass a batch rather than one image per call.

Anything else raises :class:`ImageError` (a ``ValueError``) that says what was expected.
"""

import dataclasses
import time
from pathlib import Path

import numpy as np

__all__ = ["GOLDEN", "ImageError", "Prediction", "clear_cache", "load_model",
           "prepare_images", "run_inference"]

#: The ``device`` that runs the golden model on the host.
GOLDEN = "golden"


class ImageError(ValueError):
    """An image of the wrong type, shape or value range for the model."""


@dataclasses.dataclass
class Prediction:
    """The answer for one image.

    Members
    -------
    index : int
        The predicted class (largest logit; the first on a tie).
    label : str
        Its name.
    logits : numpy.ndarray of int64
        The program's integer logits (identical on every device).
    probabilities : numpy.ndarray of float64
        Softmax of the real-valued logits (integer logits times their scale).
    device : str
        ``"golden"`` or the device's port.
    cycles : int or None
        Device clock cycles of the inference (None for the golden model).
    device_seconds : float or None
        ``cycles`` at the device's clock.
    seconds : float
        Wall time of this image on the host (transfers included); for a model whose weights
        are streamed (a batch shares each segment's load), the batch's time per image.
    labels : list of str
        Every class's name.
    """
    index: int
    label: str
    logits: np.ndarray
    probabilities: np.ndarray
    device: str
    cycles: int = None
    device_seconds: float = None
    seconds: float = 0.0
    labels: list = dataclasses.field(default=None, repr=False)

    def top(self, k=5):
        """``[(label, probability), ...]`` of the ``k`` most likely classes."""
        order = np.argsort(-self.probabilities, kind="stable")[:k]
        return [(self.labels[i], float(self.probabilities[i])) for i in order]


def load_model(model):
    """An :class:`~sw.compile.artifact.Artifact` from a path or an artifact."""
    from .compile.artifact import Artifact, load
    if isinstance(model, Artifact):
        return model
    if isinstance(model, (str, Path)):
        return load(model)
    raise TypeError(f"model must be an artifact file path or an Artifact, not "
                    f"{type(model).__name__}")


def _pil_to_raw(picture, pre):
    from PIL import Image
    channels, size = pre["in_channels"], pre["input_size"]
    picture = picture.convert("L" if channels == 1 else "RGB")
    if picture.size != (size, size):
        picture = picture.resize((size, size), Image.Resampling.BILINEAR)
    array = np.asarray(picture, dtype=np.float64)
    array = array[None] if channels == 1 else array.transpose(2, 0, 1)
    low, high = pre["pixel_range"]
    return np.floor(low + array * (high - low) / 255.0 + 0.5).astype(np.int64)


def prepare_images(images, preprocessing):
    """Raw integer pixels ``(N, C, H, W)`` for ``images`` (see the module documentation), and
    whether a single image was given."""
    pre = preprocessing
    shape = (pre["in_channels"], pre["input_size"], pre["input_size"])
    if isinstance(images, (str, Path)):
        path = Path(images)
        if not path.exists():
            raise ImageError(f"image file {str(path)!r} does not exist")
        from PIL import Image, UnidentifiedImageError
        try:
            with Image.open(path) as picture:
                return _pil_to_raw(picture, pre)[None], True
        except UnidentifiedImageError:
            raise ImageError(f"{str(path)!r} is not an image file PIL can read") from None
    if type(images).__module__.startswith("PIL."):
        return _pil_to_raw(images, pre)[None], True
    if isinstance(images, (list, tuple)):
        if not images:
            raise ImageError("no images given")
        prepared = [prepare_images(image, pre) for image in images]
        if not all(single for _, single in prepared):
            raise ImageError("a list must hold single images, not batches")
        return np.concatenate([array for array, _ in prepared]), False
    try:
        import torch
        if isinstance(images, torch.Tensor):
            images = images.detach().cpu().numpy()
    except ImportError:
        pass
    if not isinstance(images, np.ndarray):
        raise ImageError(f"an image must be a file path, a PIL image, a numpy array or a "
                         f"torch tensor, not {type(images).__name__}")
    array = images
    if array.dtype.kind not in "iuf" or array.dtype == bool:
        raise ImageError(f"image pixels must be numbers, not {array.dtype}")
    if array.dtype.kind == "f" and not np.array_equal(array, np.round(array)):
        raise ImageError("arrays and tensors must hold raw integer pixels (within "
                         f"{pre['pixel_range']}), not normalized values")
    single = array.ndim in (2, 3)
    if array.ndim == 2 and shape[0] == 1:
        array = array[None]
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[1:] != shape:
        expected = f"({', '.join(map(str, shape))})"
        raise ImageError(f"images must have shape {expected} or (N, {expected[1:]}, not "
                         f"{tuple(images.shape)}")
    low, high = pre["pixel_range"]
    if array.size and (array.min() < low or array.max() > high):
        raise ImageError(f"pixels must lie in the model's pixel range [{low}, {high}], not "
                         f"[{array.min()}, {array.max()}]")
    return array.astype(np.int64), single


# Loaded models: {(device key, id(artifact)): (artifact, device, accelerator)}.
_cache = {}


def clear_cache():
    """Close every cached device connection."""
    for _, device, _ in _cache.values():
        if device is not None and getattr(device, "_owned", False):
            device.close()
    _cache.clear()


def _accelerator(artifact, device, port, baud, timeout, time_scale, progress):
    from .driver import Device
    from .runtime import Accelerator
    if isinstance(device, Device):
        key = ("device", id(device))
        target = device
    else:
        key = (device, port)
        target = None
    entry = _cache.get((key, id(artifact)))
    if entry is not None and entry[0] is artifact:
        return entry[2]
    if target is None:
        for (other_key, _), (_, open_device, _) in _cache.items():
            if other_key == key:
                target = open_device       # reuse the connection, load the new model
                break
    if target is None:
        address = None if device == "board" and port is None else (port or device)
        target = Device.open(address, baud=baud, timeout=timeout,
                             time_scale=time_scale or 1.0)
        target._owned = True
    accelerator = Accelerator(target, artifact.program, progress=progress)
    _cache[(key, id(artifact))] = (artifact, target, accelerator)
    return accelerator


def _softmax(logits, scale):
    real = logits.astype(np.float64) * scale
    real -= real.max()
    e = np.exp(real)
    return e / e.sum()


def run_inference(images, model, device=GOLDEN, *, port=None, baud=3_000_000, timeout=2.0,
                  time_scale=None, progress=False):
    """Classify ``images`` with ``model`` on ``device``.

    Parameters
    ----------
    images : path, PIL image, numpy array, torch tensor, or a list of them
        One image or a batch (see the module documentation).
    model : path or :class:`~sw.compile.artifact.Artifact`
    device : str or :class:`sw.driver.Device`
        ``"golden"`` (the golden model on the host), ``"board"`` (a board's FTDI port, found
        automatically, or ``port``), a ``socket://HOST:PORT`` URL of a simulated board
        (``python -m sim.board``), a serial port name, or an open :class:`~sw.driver.Device`.
    port, baud, timeout, time_scale
        For ``device="board"``: the serial port (default: auto-detected) and the build's baud
        rate; the reply timeout in seconds and the factor for a simulation's slower time
        (see :class:`sw.driver.Device`).
    progress : bool
        Show progress bars (standard error) on a device: while the model is loaded, while
        streamed weights load and images run (:meth:`sw.runtime.Accelerator.infer_batch`),
        and over the images.

    Returns
    -------
    Prediction, or a list of them for a batch.

    Raises
    ------
    ImageError
        An image of the wrong type, shape or value range.
    sw.driver.CapacityError
        The model does not fit the device.
    sw.driver.DriverError
        From the device (timeouts, error codes, an incompatible device).
    """
    artifact = load_model(model)
    raw, single = prepare_images(images, artifact.preprocessing)
    program = artifact.program
    # A network that flattens its image before the first layer (a QONNX MLP) takes it as
    # (C*H*W, 1, 1): the same pixels in the same order.
    raw = raw.reshape(len(raw), *program.tensors[program.input].shape)
    scale = program.tensors[program.logits].scale
    scale = np.ones(1) if scale is None else np.asarray(scale, dtype=np.float64)
    labels = list(artifact.class_names)
    predictions = []
    if isinstance(device, str) and device == GOLDEN:
        import torch

        from .compile import golden
        for image in raw:
            started = time.perf_counter()
            logits = golden.run(program, torch.as_tensor(image[None]))[0].numpy()
            predictions.append(_prediction(logits, scale, labels, GOLDEN, None, None,
                                           time.perf_counter() - started))
    else:
        accelerator = _accelerator(artifact, device, port, baud, timeout, time_scale, progress)
        clock = accelerator.device.parameters["clock_hz"]
        name = device if isinstance(device, str) else "device"
        if len(accelerator.device_program.segments) == 1:
            # Weights stay on the device: one image at a time, each with its own wall time.
            batches = [[image] for image in raw]
        else:
            # Streamed weights: load each segment once for all the images
            # (Accelerator.infer_batch); each image gets the batch's mean wall time.
            batches = [raw]
        images_bar = None
        if progress and len(batches) > 1:
            from tqdm import tqdm
            images_bar = tqdm(total=len(raw), unit="image", desc=f"images on {name}",
                              leave=False)
        try:
            for batch in batches:
                started = time.perf_counter()
                # One image at a time: the images' bar is enough.
                results = accelerator.infer_batch(batch,
                                                  progress=progress and images_bar is None)
                seconds = (time.perf_counter() - started) / len(batch)
                predictions.extend(_prediction(result.logits, scale, labels, name,
                                               result.cycles, result.cycles / clock, seconds)
                                   for result in results)
                if images_bar is not None:
                    images_bar.update(len(batch))
        finally:
            if images_bar is not None:
                images_bar.close()
    return predictions[0] if single else predictions


def _prediction(logits, scale, labels, device, cycles, device_seconds, seconds):
    logits = np.asarray(logits, dtype=np.int64)
    index = int(np.argmax(logits))
    return Prediction(index, labels[index], logits, _softmax(logits, scale), device, cycles,
                      device_seconds, seconds, labels)
