"""ABC-Net (Lin, Zhao, Pan, 2017): convolutions with multiple binary weight and activation bases.

Weights: ``W ~ sum_m alpha_m B_m`` with ``B_m = sign(W - mean(W) + u_m std(W))`` (mean and
population standard deviation over the whole weight tensor), ``u_m = -1 + 2 (m - 1) / (M - 1)``
spread evenly over [-1, 1] (``u = 0`` when M is 1) and the alphas the least-squares solution of
``vec(W) ~ [vec(B_1) ... vec(B_M)] alpha``, recomputed from the latent weights at every forward
pass and treated as constants by the gradient; the gradient reaches ``W`` straight through the
signs (the paper's ``dc/dW = sum_m alpha_m dc/dB_m``).

Activations: ``x ~ sum_n beta_n A_n`` with ``A_n = sign(x + v_n - 0.5)`` (``sign(0) = +1``),
trainable shifts ``v_n`` and scales ``beta_n``; the gradient passes where ``0 <= x + v_n <= 1``.
The shifts start with thresholds ``0.5 - v_n`` spread evenly over [-1, 1] (0 when N is 1), the
scales at ``1 / N``.

Convolution: ``sum_m sum_n alpha_m beta_n Conv(B_m, A_n)``, M x N binary convolutions, each
padded with -1 after binarization. :meth:`ABCConv2d.base_counts` computes them as xnor-popcount
counts (what the XNOR array computes) and :meth:`ABCConv2d.combine` the weighted sum
(``dot = 2 count - K``); :meth:`ABCConv2d.forward` computes the same value as one real
convolution of the combined weights with the combined, padded activations (the convolution is
bilinear), which is M x N times cheaper to train.

ABC ResNets: the paper's ResNet-18 and -34 with every convolution but the first an ABC conv
(shortcut 1x1 convs included) and a full-precision classifier. The paper orders a block
``conv -> pool -> BN -> activation binarization``; the binarization lives in the next ABC conv,
so a basic block is ``conv1 -> bn1 -> conv2 -> bn2`` plus the shortcut.
"""

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from .binary import _check_positive_int, sign_ste
from .meliusnet import Head, auto_stem_reduction

__all__ = [
    "RESNET_SPECS", "SMALL_SPEC", "ABCBasicBlock", "ABCConv2d", "ABCResNet", "abcnet_resnet",
    "abcnet_small", "weight_shifts",
]


def weight_shifts(M):
    """The ``u_m`` of M weight bases: evenly spread over [-1, 1] (0 when M is 1)."""
    _check_positive_int("M", M)
    if M == 1:
        return torch.zeros(1)
    return torch.linspace(-1.0, 1.0, M)


class ABCConv2d(nn.Module):
    """Convolution with M binary weight bases and N binary activation bases.

    Parameters
    ----------
    in_channels, out_channels, kernel_size : int
        As in :class:`torch.nn.Conv2d` (square kernels, no groups, no bias).
    stride, padding : int
        Padding positions hold -1 in every activation base.
    M, N : int
        Numbers of weight and activation bases.

    Members
    -------
    weight : Parameter (out_channels, in_channels, kernel_size, kernel_size)
        Latent real weights.
    shifts : Parameter (N,)
        The ``v_n``.
    scales : Parameter (N,)
        The ``beta_n``.
    u : buffer (M,)
        The weight bases' shifts in standard deviations.
    fan_in : int
        ``K``, the number of positions in each count.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, *, M=3, N=3):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                            ("kernel_size", kernel_size), ("stride", stride), ("M", M),
                            ("N", N)):
            _check_positive_int(name, value)
        if not isinstance(padding, int) or isinstance(padding, bool) or padding < 0:
            raise TypeError(f"padding must be a non-negative integer, not {padding!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.M = M
        self.N = N
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size,
                                               kernel_size))
        self.register_buffer("u", weight_shifts(M), persistent=False)
        thresholds = weight_shifts(N)
        self.shifts = nn.Parameter(0.5 - thresholds)
        self.scales = nn.Parameter(torch.full((N,), 1.0 / N))
        nn.init.kaiming_normal_(self.weight, mode="fan_in", nonlinearity="relu")

    @property
    def fan_in(self):
        return self.in_channels * self.kernel_size * self.kernel_size

    def weight_bases(self):
        """``(B, alpha)``: the M bases as a +1/-1 tensor ``(M, *weight.shape)`` with the
        straight-through gradient, and their least-squares coefficients ``(M,)`` (no gradient).
        """
        w = self.weight
        mean = w.detach().mean()
        std = w.detach().std(unbiased=False)
        shifted = w.unsqueeze(0) - mean + self.u.view(-1, 1, 1, 1, 1) * std
        bases = sign_ste(shifted, None)
        with torch.no_grad():
            matrix = bases.reshape(self.M, -1).T
            # Normal equations through a pseudo-inverse: the minimum-norm least-squares
            # solution, also when two bases coincide (a rank-deficient system).
            gram = matrix.T @ matrix
            alpha = torch.linalg.pinv(gram) @ (matrix.T @ w.reshape(-1))
        return bases, alpha

    @torch.no_grad()
    def weight_signs(self):
        """The weight bases as an ``int8`` tensor ``(M, *weight.shape)`` of +1/-1."""
        return self.weight_bases()[0].to(torch.int8)

    def activation_bases(self, x):
        """The N activation bases of ``x`` as a +1/-1 tensor ``(N, *x.shape)``, padded with -1
        when the layer pads, with the straight-through gradient."""
        shifted = x.unsqueeze(0) + self.shifts.view(-1, 1, 1, 1, 1) - 0.5
        bases = sign_ste(shifted, 0.5)
        if self.padding:
            bases = F.pad(bases, (self.padding,) * 4, value=-1.0)
        return bases

    def forward(self, x):
        bases, alpha = self.weight_bases()
        weight = torch.tensordot(alpha, bases, dims=1)
        activation = torch.tensordot(self.scales, self.activation_bases(x), dims=1)
        return F.conv2d(activation, weight, stride=self.stride)

    def base_counts(self, x):
        """The M x N binary convolutions as xnor-popcount counts: a tensor
        ``(N, M, batch, out_channels, height, width)`` of integers in ``0..fan_in``."""
        bases, _ = self.weight_bases()
        activations = self.activation_bases(x)
        n, batch = activations.shape[:2]
        dot = F.conv2d(activations.flatten(0, 1), bases.flatten(0, 1), stride=self.stride)
        counts = (dot.round() + self.fan_in) * 0.5
        return counts.reshape(n, batch, self.M, self.out_channels,
                              *dot.shape[-2:]).transpose(1, 2)

    def combine(self, counts):
        """``sum_m sum_n alpha_m beta_n (2 count_mn - K)`` of :meth:`base_counts`' output."""
        _, alpha = self.weight_bases()
        coefficients = self.scales.view(-1, 1) * alpha.view(1, -1)
        return torch.tensordot(coefficients, 2 * counts - self.fan_in, dims=2)

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, M={self.M}, N={self.N}")


class ABCBasicBlock(nn.Module):
    """ResNet basic block of ABC convs: ``bn2(conv2(bn1(conv1(x)))) + shortcut(x)``.

    Members
    -------
    conv1, conv2 : ABCConv2d, 3x3
    bn1, bn2 : BatchNorm2d
    shortcut : Identity, or Sequential(conv: ABCConv2d 1x1 with the block's stride, bn)
    """

    def __init__(self, in_channels, out_channels, stride=1, *, M=3, N=3):
        super().__init__()
        self.conv1 = ABCConv2d(in_channels, out_channels, 3, stride, 1, M=M, N=N)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = ABCConv2d(out_channels, out_channels, 3, 1, 1, M=M, N=N)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(OrderedDict([
                ("conv", ABCConv2d(in_channels, out_channels, 1, stride, M=M, N=N)),
                ("bn", nn.BatchNorm2d(out_channels)),
            ]))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x):
        return self.bn2(self.conv2(self.bn1(self.conv1(x)))) + self.shortcut(x)


def _make_stem(in_channels, channels, stem_reduction):
    if stem_reduction == 4:
        return nn.Sequential(OrderedDict([
            ("conv", nn.Conv2d(in_channels, channels, 7, stride=2, padding=3, bias=False)),
            ("pool", nn.MaxPool2d(3, stride=2, padding=1)),
            ("bn", nn.BatchNorm2d(channels)),
        ]))
    if stem_reduction in (1, 2):
        return nn.Sequential(OrderedDict([
            ("conv", nn.Conv2d(in_channels, channels, 3, stride=stem_reduction, padding=1,
                               bias=False)),
            ("bn", nn.BatchNorm2d(channels)),
        ]))
    raise ValueError(f"stem_reduction must be 1, 2 or 4, not {stem_reduction!r}")


class ABCResNet(nn.Module):
    """ResNet of ABC basic blocks with a full-precision stem and classifier.

    Parameters
    ----------
    blocks : sequence of int
        Basic blocks per stage; every stage after the first starts with stride 2.
    widths : sequence of int
        Channels of each stage; the stem outputs ``widths[0]``.
    num_classes, in_channels : int
    stem_reduction : int
        4: conv 7x7/2, max-pool 3x3/2, BN (the ImageNet stem); 2 or 1: conv 3x3 with that
        stride, BN.
    M, N : int
        Weight and activation bases of every ABC conv.

    Members
    -------
    stem : Sequential (conv, [pool], bn)
    blocks : ModuleList of Sequential of ABCBasicBlock
    head : Head (bn, act, pool, flatten, fc)
    """

    def __init__(self, *, blocks, widths, num_classes, in_channels, stem_reduction=4, M=3, N=3):
        super().__init__()
        if len(blocks) != len(widths) or not blocks:
            raise ValueError(f"blocks and widths must have the same, non-zero length, not "
                             f"{blocks!r} and {widths!r}")
        self.M = M
        self.N = N
        self.stem = _make_stem(in_channels, widths[0], stem_reduction)
        self.blocks = nn.ModuleList()
        channels = widths[0]
        for stage, (count, width) in enumerate(zip(blocks, widths, strict=True)):
            layers = []
            for index in range(count):
                stride = 2 if stage > 0 and index == 0 else 1
                layers.append(ABCBasicBlock(channels, width, stride, M=M, N=N))
                channels = width
            self.blocks.append(nn.Sequential(*layers))
        self.head = Head(channels, num_classes)
        nn.init.kaiming_normal_(self.stem.conv.weight, mode="fan_in", nonlinearity="relu")

    def features(self, x):
        x = self.stem(x)
        for stage in self.blocks:
            x = stage(x)
        return x

    def forward(self, x):
        return self.head(self.features(x))


#: Basic blocks per stage of the paper's ResNets (widths 64, 128, 256, 512).
RESNET_SPECS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}

#: The small ABC ResNet for 28x28 and 8x8 images.
SMALL_SPEC = {"blocks": (1, 1, 1), "widths": (32, 64, 128)}


def _build(name, input_size, stem_reduction, **kwargs):
    if not isinstance(input_size, int) or input_size < 1:
        raise ValueError(f"input_size must be a positive integer, not {input_size!r}")
    if stem_reduction is None:
        stem_reduction = auto_stem_reduction(input_size)
    model = ABCResNet(stem_reduction=stem_reduction, **kwargs)
    model.input_size = input_size
    model.in_channels = kwargs["in_channels"]
    return model


def abcnet_resnet(depth, *, num_classes=1000, in_channels=3, input_size=224, M=3, N=3,
                  stem_reduction=None):
    """ABC ResNet-``depth`` (18 or 34). ``stem_reduction`` defaults to 4 (the ImageNet stem) for
    inputs of at least 64 pixels, 2 from 16 and 1 below."""
    if depth not in RESNET_SPECS:
        raise ValueError(f"depth must be one of {', '.join(map(str, RESNET_SPECS))}, "
                         f"not {depth!r}")
    return _build(f"abcnet-resnet{depth}", input_size, stem_reduction,
                  blocks=RESNET_SPECS[depth], widths=(64, 128, 256, 512),
                  num_classes=num_classes, in_channels=in_channels, M=M, N=N)


def abcnet_small(*, num_classes=10, in_channels=1, input_size=28, M=3, N=3, stem_reduction=None,
                 blocks=SMALL_SPEC["blocks"], widths=SMALL_SPEC["widths"]):
    """A small ABC ResNet for 28x28 and 8x8 images: a 3x3 stem (stride 2 from 16 pixels, else
    1) and one basic block in each of three stages of 32, 64, 128 channels."""
    return _build("abcnet-small", input_size, stem_reduction, blocks=tuple(blocks),
                  widths=tuple(widths), num_classes=num_classes, in_channels=in_channels,
                  M=M, N=N)
