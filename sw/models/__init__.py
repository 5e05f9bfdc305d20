"""The PyTorch models the accelerator runs: binary layers, MeliusNet, ABC-Net and baselines.

Build a model by name::

    from sw.models import build_model, MODELS
    model = build_model("meliusnet-small", num_classes=10, in_channels=1, input_size=8)

:data:`MODELS` maps each name to a :class:`ModelSpec` (builder, description, reference inputs).
Every builder takes ``num_classes``, ``in_channels`` and ``input_size`` (square images) and its
own keyword options; an unknown option raises :class:`TypeError`. All models output logits of
shape ``(batch, num_classes)``; the returned module carries ``input_size``, ``in_channels``,
``num_classes`` and ``model_name`` attributes.

Parameter, size and operation counts: :func:`sw.models.summary.summary`;
``python -m sw.models.summary`` prints them for every registered model. See ``docs/models.md``.
"""

import dataclasses
from collections.abc import Callable
from functools import partial

from torch import nn

from .abcnet import ABCConv2d, ABCResNet, abcnet_resnet, abcnet_small
from .binary import DEFAULT_THRESHOLD, BinaryConv2d, BinaryLinear, Sign, sign, sign_ste
from .meliusnet import DenseBlock, ImprovementBlock, MeliusNet, meliusnet, meliusnet_small
from .plain import binary_plain_small, fp_plain_small, fp_small

__all__ = [
    "DEFAULT_THRESHOLD", "MODELS", "ABCConv2d", "ABCResNet", "BinaryConv2d", "BinaryLinear",
    "DenseBlock", "ImprovementBlock", "MeliusNet", "ModelSpec", "Sign", "build_model", "sign",
    "sign_ste",
]

#: ImageNet-sized reference input (what the papers count at).
IMAGENET_INPUTS = ({"num_classes": 1000, "in_channels": 3, "input_size": 224},)
#: Small-image reference inputs: Fashion-MNIST (28x28) and scikit-learn digits (8x8).
SMALL_INPUTS = ({"num_classes": 10, "in_channels": 1, "input_size": 28},
                {"num_classes": 10, "in_channels": 1, "input_size": 8})


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A registered model.

    Members
    -------
    builder : callable
        ``builder(*, num_classes, in_channels, input_size, **options) -> nn.Module``.
    description : str
        One line.
    reference_inputs : tuple of dict
        The ``num_classes``, ``in_channels``, ``input_size`` settings its figures are given at.
    """

    builder: Callable[..., nn.Module]
    description: str
    reference_inputs: tuple

    def __call__(self, **kwargs):
        return self.builder(**kwargs)


def _melius(variant, description):
    return ModelSpec(partial(meliusnet, variant), description, IMAGENET_INPUTS)


#: The registered models by name.
MODELS = {
    "meliusnet22": _melius("22", "MeliusNet22: blocks 4, 5, 4, 4"),
    "meliusnet29": _melius("29", "MeliusNet29: blocks 4, 6, 8, 6"),
    "meliusnet42": _melius("42", "MeliusNet42: blocks 5, 8, 14, 10"),
    "meliusnet59": _melius("59", "MeliusNet59: blocks 6, 12, 24, 12"),
    "meliusnetA": _melius("A", "MeliusNetA: blocks 4, 5, 5, 6, shuffled transitions, groups 4"),
    "meliusnetB": _melius("B", "MeliusNetB: blocks 4, 6, 8, 6, shuffled transitions, groups 2"),
    "meliusnetC": _melius("C", "MeliusNetC: blocks 3, 5, 10, 6, shuffled transitions, groups 4"),
    "meliusnet-small": ModelSpec(
        meliusnet_small, "MeliusNet for 28x28/8x8: blocks 2, 2, 2, 32 channels, growth 32",
        SMALL_INPUTS),
    "binary-plain-small": ModelSpec(
        binary_plain_small, "binary DenseNet, dense blocks 3, 4, 3: meliusnet-small's binary size",
        SMALL_INPUTS),
    "fp-small": ModelSpec(fp_small, "meliusnet-small with full-precision block convs",
                          SMALL_INPUTS),
    "fp-plain-small": ModelSpec(fp_plain_small, "binary-plain-small in full precision",
                                SMALL_INPUTS),
    "abcnet-resnet18": ModelSpec(partial(abcnet_resnet, 18),
                                 "ABC-Net ResNet-18 (options M, N; default 3, 3)",
                                 IMAGENET_INPUTS),
    "abcnet-resnet34": ModelSpec(partial(abcnet_resnet, 34),
                                 "ABC-Net ResNet-34 (options M, N; default 3, 3)",
                                 IMAGENET_INPUTS),
    "abcnet-small": ModelSpec(
        abcnet_small, "ABC-Net ResNet for 28x28/8x8: 3 stages of 1 block, 32-128 channels",
        SMALL_INPUTS),
}


def _check_count(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, not {value!r}")


def build_model(name, *, num_classes, in_channels, input_size, **options):
    """Build the registered model ``name`` for ``in_channels`` x ``input_size`` x
    ``input_size`` images and ``num_classes`` classes.

    Raises
    ------
    ValueError
        ``name`` is not registered, a count is not a positive integer, or the input is too
        small for the model.
    TypeError
        An option the model does not take.
    """
    if name not in MODELS:
        raise ValueError(f"model must be one of {', '.join(MODELS)}, not {name!r}")
    _check_count("num_classes", num_classes)
    _check_count("in_channels", in_channels)
    _check_count("input_size", input_size)
    model = MODELS[name].builder(num_classes=num_classes, in_channels=in_channels,
                                 input_size=input_size, **options)
    model.model_name = name
    model.num_classes = num_classes
    model.input_size = input_size
    model.in_channels = in_channels
    return model
