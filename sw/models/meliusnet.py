"""MeliusNet (Bethge et al., 2020) as in the authors' reference code (BMXNet-v2).

Structure (named modules, in the order they run)::

    stem          grouped stem: conv 3x3 in->w (stride 2), BN, ReLU; conv 3x3 w->w groups 4, BN,
                  ReLU; conv 3x3 w->2w groups 8, BN, ReLU; max-pool 3x3/2 pad 1   (w = init / 2)
    blocks[i]     stage i: a Sequential of DenseBlock, ImprovementBlock, DenseBlock, ...
    transitions[i] after stage i (not after the last): BN, max-pool 2x2/2, ReLU,
                  [channel shuffle 16], full-precision 1x1 conv (groups 1, or 4/2/4 for A/B/C)
    head          BN, ReLU, global average pool, flatten, FC (with bias)

``DenseBlock``: ``x -> BN -> sign -> binary conv 3x3 (c -> growth) -> concat [x, new]``.
``ImprovementBlock``: ``x -> BN -> sign -> binary conv 3x3 (c -> growth)`` added into the last
``growth`` channels of ``x``. Binary convs output xnor-popcount counts (:mod:`.binary`); there is
no BN or activation after them inside a block.

The same class builds the plain binary DenseNet (``improvement=False``: dense blocks only) and the
full-precision counterparts (``binary=False``: ``BN -> ReLU -> conv`` with zero padding).

Small inputs. The reference stem divides the resolution by 4 (``stem_reduction=4``), which suits
224x224. For small images the stem keeps more resolution: ``stem_reduction=2`` (first conv stride
2, no max-pool) or ``1`` (stride 1, no max-pool, like the authors' "thumbnail" stem for CIFAR).
:func:`auto_stem_reduction` picks 4 for inputs of at least 64 pixels, 2 from 16 and 1 below.
"""

from collections import OrderedDict

import torch
from torch import nn

from .binary import DEFAULT_THRESHOLD, BinaryConv2d, ChannelShuffle, Sign

__all__ = [
    "MELIUSNET_SPECS", "SMALL_SPEC", "DenseBlock", "Head", "ImprovementBlock", "MeliusNet",
    "Transition", "auto_stem_reduction", "build_meliusnet", "feature_sizes", "make_stem",
    "meliusnet", "meliusnet_small",
]

#: The authors' variants: blocks per stage, transition output channels, transition conv groups.
#: Initial channels and growth rate are 64; the transition outputs are the reference code's
#: reduction rule (``round((c // r) / 32) * 32``) evaluated for each variant.
MELIUSNET_SPECS = {
    "22": ((4, 5, 4, 4), (160, 224, 256), 1),
    "29": ((4, 6, 8, 6), (128, 192, 256), 1),
    "42": ((5, 8, 14, 10), (160, 256, 416), 1),
    "59": ((6, 12, 24, 12), (192, 320, 544), 1),
    "A": ((4, 5, 5, 6), (160, 256, 288), 4),
    "B": ((4, 6, 8, 6), (160, 224, 320), 2),
    "C": ((3, 5, 10, 6), (128, 192, 288), 4),
}

#: Channel shuffle groups before a grouped transition conv (as in the reference code).
SHUFFLE_GROUPS = 16


def auto_stem_reduction(input_size):
    """Stem reduction for an input of ``input_size`` pixels: 4 (the reference stem) from 64
    pixels, 2 from 16, 1 below."""
    if input_size >= 64:
        return 4
    if input_size >= 16:
        return 2
    return 1


def _conv_out(size, stride):
    # 3x3 conv or 3x3 max-pool with padding 1.
    return (size - 1) // stride + 1


def feature_sizes(input_size, stem_reduction, num_stages):
    """Feature map sizes of each stage (the transitions' 2x2 max-pools floor odd sizes)."""
    size = input_size
    if stem_reduction >= 2:
        size = _conv_out(size, 2)
    if stem_reduction == 4:
        size = _conv_out(size, 2)
    sizes = [size]
    for _ in range(num_stages - 1):
        size //= 2
        sizes.append(size)
    return sizes


def make_stem(in_channels, out_channels, stem_reduction):
    """The grouped stem: 3x3 convs ``in -> out/2`` (stride 2 unless ``stem_reduction`` is 1),
    ``out/2 -> out/2`` (groups 4), ``out/2 -> out`` (groups 8), each followed by BN and ReLU,
    then a 3x3/2 max-pool when ``stem_reduction`` is 4."""
    if stem_reduction not in (1, 2, 4):
        raise ValueError(f"stem_reduction must be 1, 2 or 4, not {stem_reduction!r}")
    width = out_channels // 2
    if width % 8 or out_channels % 8:
        raise ValueError(f"stem channels must be a multiple of 16, not {out_channels!r}")
    stride = 1 if stem_reduction == 1 else 2
    layers = OrderedDict([
        ("conv1", nn.Conv2d(in_channels, width, 3, stride=stride, padding=1, bias=False)),
        ("bn1", nn.BatchNorm2d(width)),
        ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(width, width, 3, padding=1, groups=4, bias=False)),
        ("bn2", nn.BatchNorm2d(width)),
        ("relu2", nn.ReLU()),
        ("conv3", nn.Conv2d(width, out_channels, 3, padding=1, groups=8, bias=False)),
        ("bn3", nn.BatchNorm2d(out_channels)),
        ("relu3", nn.ReLU()),
    ])
    if stem_reduction == 4:
        layers["pool"] = nn.MaxPool2d(3, stride=2, padding=1)
    return nn.Sequential(layers)


def _conv_layers(in_channels, out_channels, binary, threshold):
    """``(act, conv)`` of a block: ``Sign`` and a binary conv, or ReLU and a real conv."""
    if binary:
        return (Sign(threshold),
                BinaryConv2d(in_channels, out_channels, 3, padding=1, threshold=threshold,
                             binarize_input=False))
    return nn.ReLU(), nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)


class DenseBlock(nn.Module):
    """``x -> bn -> act -> conv``, concatenated after ``x``: ``c -> c + growth_rate`` channels.

    Members
    -------
    bn : BatchNorm2d(in_channels)
    act : Sign (binary) or ReLU (full precision)
    conv : BinaryConv2d or Conv2d, 3x3, pad 1, ``in_channels -> growth_rate``
    """

    def __init__(self, in_channels, growth_rate, *, binary=True, threshold=DEFAULT_THRESHOLD):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = in_channels + growth_rate
        self.bn = nn.BatchNorm2d(in_channels)
        self.act, self.conv = _conv_layers(in_channels, growth_rate, binary, threshold)

    def forward(self, x):
        return torch.cat([x, self.conv(self.act(self.bn(x)))], dim=1)


class ImprovementBlock(nn.Module):
    """``x -> bn -> act -> conv``, added into the last ``growth_rate`` channels of ``x``.

    Members
    -------
    bn : BatchNorm2d(channels)
    act : Sign (binary) or ReLU (full precision)
    conv : BinaryConv2d or Conv2d, 3x3, pad 1, ``channels -> growth_rate``
    """

    def __init__(self, channels, growth_rate, *, binary=True, threshold=DEFAULT_THRESHOLD):
        super().__init__()
        if not growth_rate < channels:
            raise ValueError(f"growth_rate ({growth_rate}) must be less than channels "
                             f"({channels})")
        self.in_channels = self.out_channels = channels
        self.growth_rate = growth_rate
        self.bn = nn.BatchNorm2d(channels)
        self.act, self.conv = _conv_layers(channels, growth_rate, binary, threshold)

    def forward(self, x):
        keep = self.in_channels - self.growth_rate
        return torch.cat([x[:, :keep], x[:, keep:] + self.conv(self.act(self.bn(x)))], dim=1)


class Transition(nn.Module):
    """``bn -> pool (2x2/2 max) -> act (ReLU) -> [shuffle] -> conv (1x1, full precision)``.

    Members
    -------
    shuffle : ChannelShuffle or Identity
        Present (16 groups) when the conv is grouped.
    conv : Conv2d, 1x1, no bias, ``groups`` groups
    """

    def __init__(self, in_channels, out_channels, groups=1):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.bn = nn.BatchNorm2d(in_channels)
        self.pool = nn.MaxPool2d(2, stride=2)
        self.act = nn.ReLU()
        self.shuffle = ChannelShuffle(SHUFFLE_GROUPS) if groups > 1 else nn.Identity()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, groups=groups, bias=False)

    def forward(self, x):
        return self.conv(self.shuffle(self.act(self.pool(self.bn(x)))))


class Head(nn.Module):
    """``bn -> act (ReLU) -> pool (global average) -> flatten -> fc``."""

    def __init__(self, in_channels, num_classes):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x):
        return self.fc(self.flatten(self.pool(self.act(self.bn(x)))))


class MeliusNet(nn.Module):
    """MeliusNet / binary DenseNet: stem, stages of blocks with transitions between, head.

    Parameters
    ----------
    blocks : sequence of int
        Blocks per stage. A block is a DenseBlock followed by an ImprovementBlock (or a DenseBlock
        alone when ``improvement`` is false).
    transition_channels : sequence of int
        Output channels of the transition after each stage but the last.
    num_classes, in_channels : int
        Classifier outputs and image channels.
    init_features : int
        Channels out of the stem (64 in the paper).
    growth_rate : int
        Channels each DenseBlock adds and each ImprovementBlock refines (64 in the paper).
    transition_groups : int
        Groups of the transition convs (1; 4, 2, 4 for variants A, B, C, with a channel shuffle).
    stem_reduction : int
        4 (the reference stem), 2 or 1 (see the module documentation).
    improvement : bool
        Add an ImprovementBlock after every DenseBlock (MeliusNet) or not (binary DenseNet).
    binary : bool
        Binary block convs (sign, -1 padding, counts) or full-precision ones (ReLU, zero padding).
    threshold : float or None
        Threshold of the clipped straight-through estimator.

    Members
    -------
    stem : Sequential
    blocks : ModuleList of Sequential
    transitions : ModuleList of Transition
    head : Head
    """

    def __init__(self, *, blocks, transition_channels, num_classes, in_channels,
                 init_features=64, growth_rate=64, transition_groups=1, stem_reduction=4,
                 improvement=True, binary=True, threshold=DEFAULT_THRESHOLD):
        super().__init__()
        blocks = tuple(blocks)
        transition_channels = tuple(transition_channels)
        if not blocks or any(not isinstance(b, int) or b < 1 for b in blocks):
            raise ValueError(f"blocks must be a non-empty sequence of positive integers, "
                             f"not {blocks!r}")
        if len(transition_channels) != len(blocks) - 1:
            raise ValueError(f"transition_channels must have {len(blocks) - 1} entries (one "
                             f"per stage but the last), not {transition_channels!r}")
        self.stem = make_stem(in_channels, init_features, stem_reduction)
        self.blocks = nn.ModuleList()
        self.transitions = nn.ModuleList()
        channels = init_features
        for stage, count in enumerate(blocks):
            layers = []
            for _ in range(count):
                layers.append(DenseBlock(channels, growth_rate, binary=binary,
                                         threshold=threshold))
                channels += growth_rate
                if improvement:
                    layers.append(ImprovementBlock(channels, growth_rate, binary=binary,
                                                   threshold=threshold))
            self.blocks.append(nn.Sequential(*layers))
            if stage < len(blocks) - 1:
                out = transition_channels[stage]
                self.transitions.append(Transition(channels, out, transition_groups))
                channels = out
        self.head = Head(channels, num_classes)
        self.num_features = channels
        for module in self.modules():
            if type(module) is nn.Conv2d:
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")

    def features(self, x):
        """The feature map before the head."""
        x = self.stem(x)
        for stage, blocks in enumerate(self.blocks):
            x = blocks(x)
            if stage < len(self.transitions):
                x = self.transitions[stage](x)
        return x

    def forward(self, x):
        return self.head(self.features(x))


def meliusnet(variant, *, num_classes=1000, in_channels=3, input_size=224, stem_reduction=None,
              **options):
    """The authors' MeliusNet ``variant`` (a key of :data:`MELIUSNET_SPECS`).

    ``stem_reduction`` defaults to :func:`auto_stem_reduction` of ``input_size``; other
    ``options`` go to :class:`MeliusNet` (``threshold``, ``binary``, ...).
    """
    if variant not in MELIUSNET_SPECS:
        raise ValueError(f"variant must be one of {', '.join(MELIUSNET_SPECS)}, "
                         f"not {variant!r}")
    blocks, transition_channels, groups = MELIUSNET_SPECS[variant]
    return build_meliusnet(f"meliusnet{variant}", input_size, stem_reduction, blocks=blocks,
                           transition_channels=transition_channels, transition_groups=groups,
                           num_classes=num_classes, in_channels=in_channels, **options)


def build_meliusnet(name, input_size, stem_reduction=None, **kwargs):
    """A :class:`MeliusNet` for ``input_size`` pixels, checked to keep feature maps of at least
    1x1; ``name`` is for messages; ``kwargs`` go to :class:`MeliusNet`."""
    if not isinstance(input_size, int) or input_size < 1:
        raise ValueError(f"input_size must be a positive integer, not {input_size!r}")
    if stem_reduction is None:
        stem_reduction = auto_stem_reduction(input_size)
    sizes = feature_sizes(input_size, stem_reduction, len(kwargs["blocks"]))
    if sizes[-1] < 1:
        raise ValueError(f"input_size {input_size} is too small for {name} with stem_reduction "
                         f"{stem_reduction}: feature maps would be {sizes}")
    model = MeliusNet(stem_reduction=stem_reduction, **kwargs)
    model.input_size = input_size
    model.in_channels = kwargs["in_channels"]
    return model


#: The small MeliusNet for 28x28 and 8x8 images (see docs/models.md).
SMALL_SPEC = {"blocks": (2, 2, 2), "transition_channels": (64, 64), "init_features": 32,
              "growth_rate": 32}


def meliusnet_small(*, num_classes=10, in_channels=1, input_size=28, stem_reduction=None,
                    **options):
    """A MeliusNet for small images: :data:`SMALL_SPEC` (3 stages of 2 blocks, 32 initial
    channels, growth 32; transitions halve the channels, rounded to a multiple of 32, as in the
    reference rule) and the stem for ``input_size`` (:func:`auto_stem_reduction`)."""
    kwargs = {**SMALL_SPEC, **options}
    return build_meliusnet("meliusnet-small", input_size, stem_reduction,
                           num_classes=num_classes, in_channels=in_channels, **kwargs)
