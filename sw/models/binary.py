"""Binary layers under the project's numeric contract (``/work/shared/DESIGN.md``).

The contract follows the MeliusNet authors' reference code (BMXNet-v2):

* Binary values are +1/-1 and ``sign(0) = +1`` (bit 1 = +1, bit 0 = -1 on the hardware).
* Training uses the clipped straight-through estimator: the gradient of ``sign(x)`` is the
  incoming gradient where ``|x| <= threshold`` and 0 elsewhere; the threshold is
  :data:`DEFAULT_THRESHOLD` (1.3, as in all MeliusNet runs) unless a layer is given another one.
* Binary convolutions pad with **-1**, applied after binarization (a padded position is a 0 bit).
* A binary convolution or linear layer outputs the **xnor-popcount count** ``(dot + N) / 2``, the
  number of positions where input and weight signs agree: an integer in ``0..N`` with
  ``N = in_channels / groups * kernel_height * kernel_width`` (``in_features`` for a linear layer).
  The count is an affine map of the dot product, so a following BatchNorm makes training with it
  equivalent to training with the dot product.
* No scaling factors.

Every binary layer exposes its weights' signs (:meth:`BinaryConv2d.weight_signs`) and bits
(:meth:`BinaryConv2d.weight_bits`) for the compiler.
"""

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DEFAULT_THRESHOLD", "BinaryConv2d", "BinaryLinear", "ChannelShuffle", "Sign", "sign",
    "sign_ste",
]

#: Gradient-cancelling threshold of the clipped straight-through estimator.
DEFAULT_THRESHOLD = 1.3


def _check_positive_int(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise TypeError(f"{name} must be a positive integer, not {value!r}")


def _check_threshold(threshold):
    if threshold is not None and (isinstance(threshold, bool)
                                  or not isinstance(threshold, (int, float))
                                  or not threshold > 0):
        raise ValueError(f"threshold must be a positive number or None, not {threshold!r}")


def sign(x):
    """Deterministic sign with ``sign(0) = +1``: +1.0 where ``x >= 0``, else -1.0 (no gradient)."""
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


class _SignSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, threshold):
        ctx.threshold = threshold
        if threshold is not None:
            ctx.save_for_backward(x)
        return sign(x)

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.threshold is None:
            return grad_output, None
        (x,) = ctx.saved_tensors
        return grad_output * (x.abs() <= ctx.threshold).to(grad_output.dtype), None


def sign_ste(x, threshold=DEFAULT_THRESHOLD):
    """``sign(x)`` with the clipped straight-through estimator.

    Parameters
    ----------
    x : torch.Tensor
        Real values.
    threshold : float or None
        The gradient passes where ``|x| <= threshold``; ``None`` passes it everywhere (the plain
        straight-through estimator).
    """
    return _SignSTE.apply(x, threshold)


class Sign(nn.Module):
    """Binarizes its input to +1/-1 (:func:`sign_ste`); a separate module so that a compiler
    sees ``BatchNorm -> Sign`` and folds the pair into a per-channel threshold compare.

    Parameters
    ----------
    threshold : float or None
        Threshold of the clipped straight-through estimator (default 1.3).
    """

    def __init__(self, threshold=DEFAULT_THRESHOLD):
        super().__init__()
        _check_threshold(threshold)
        self.threshold = threshold

    def forward(self, x):
        return sign_ste(x, self.threshold)

    def extra_repr(self):
        return f"threshold={self.threshold}"


def _exact_integer(x):
    # Sums of +1/-1 are exact in float32 below 2**24, but a convolution algorithm (e.g. a
    # transform-based one) may round; snap to the integer the hardware computes, keeping the
    # gradient of the identity.
    return x + (x.round() - x).detach()


class _BinaryWeights(nn.Module):
    """Shared part of binary layers: a latent real weight binarized with the clipped STE."""

    def binary_weight(self):
        """The weight's signs as a float tensor of +1/-1 with the straight-through gradient."""
        return sign_ste(self.weight, self.threshold)

    @torch.no_grad()
    def weight_signs(self):
        """The weight's signs as an ``int8`` tensor of +1/-1 (``sign(0) = +1``)."""
        return torch.where(self.weight >= 0, 1, -1).to(torch.int8)

    @torch.no_grad()
    def weight_bits(self):
        """The weight's bits as a ``bool`` tensor (True = bit 1 = +1)."""
        return self.weight >= 0

    def reset_parameters(self):
        # He-normal, as in the MeliusNet authors' runs.
        nn.init.kaiming_normal_(self.weight, mode="fan_in", nonlinearity="relu")


class BinaryConv2d(_BinaryWeights):
    """Binary 2-D convolution that outputs xnor-popcount counts.

    ``count = (dot(sign(x_patch), sign(w)) + N) / 2`` with ``N = fan_in``, where ``x_patch`` is
    padded with -1 after binarization. Outputs are exact integers in ``0..N`` (as floats).

    Parameters
    ----------
    in_channels, out_channels : int
        Channel counts; both must be divisible by ``groups``.
    kernel_size : int
        Square kernel size.
    stride, padding : int
        As in :class:`torch.nn.Conv2d`; padding positions hold -1.
    groups : int
        Grouped convolution.
    threshold : float or None
        Threshold of the clipped straight-through estimator of both input and weight signs.
    binarize_input : bool
        Binarize the input with :func:`sign_ste`. ``False`` when a :class:`Sign` module precedes
        the layer: the input must then already be +1/-1.

    Members
    -------
    weight : Parameter (out_channels, in_channels / groups, kernel_size, kernel_size)
        Latent real weights; only their signs are used.
    fan_in : int
        ``N``, the number of positions in each count.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, groups=1, *,
                 threshold=DEFAULT_THRESHOLD, binarize_input=True):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                            ("kernel_size", kernel_size), ("stride", stride),
                            ("groups", groups)):
            _check_positive_int(name, value)
        if not isinstance(padding, int) or isinstance(padding, bool) or padding < 0:
            raise TypeError(f"padding must be a non-negative integer, not {padding!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) "
                             f"must be divisible by groups ({groups})")
        _check_threshold(threshold)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.groups = groups
        self.threshold = threshold
        self.binarize_input = binarize_input
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels // groups, kernel_size, kernel_size))
        self.reset_parameters()

    @property
    def fan_in(self):
        return self.in_channels // self.groups * self.kernel_size * self.kernel_size

    def forward(self, x):
        if self.binarize_input:
            x = sign_ste(x, self.threshold)
        if self.padding:
            x = F.pad(x, (self.padding,) * 4, value=-1.0)
        dot = F.conv2d(x, self.binary_weight(), stride=self.stride, groups=self.groups)
        return (_exact_integer(dot) + self.fan_in) * 0.5

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, groups={self.groups}, "
                f"threshold={self.threshold}, binarize_input={self.binarize_input}")


class BinaryLinear(_BinaryWeights):
    """Binary fully connected layer that outputs xnor-popcount counts in ``0..in_features``.

    Parameters
    ----------
    in_features, out_features : int
        Sizes.
    threshold : float or None
        Threshold of the clipped straight-through estimator of both input and weight signs.
    binarize_input : bool
        Binarize the input (``False``: it must already be +1/-1).
    """

    def __init__(self, in_features, out_features, *, threshold=DEFAULT_THRESHOLD,
                 binarize_input=True):
        super().__init__()
        _check_positive_int("in_features", in_features)
        _check_positive_int("out_features", out_features)
        _check_threshold(threshold)
        self.in_features = in_features
        self.out_features = out_features
        self.threshold = threshold
        self.binarize_input = binarize_input
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.reset_parameters()

    @property
    def fan_in(self):
        return self.in_features

    def forward(self, x):
        if self.binarize_input:
            x = sign_ste(x, self.threshold)
        dot = F.linear(x, self.binary_weight())
        return (_exact_integer(dot) + self.fan_in) * 0.5

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"threshold={self.threshold}, binarize_input={self.binarize_input}")


class ChannelShuffle(nn.Module):
    """ShuffleNet channel shuffle: channel ``g * (C / groups) + i`` moves to ``i * groups + g``.

    Parameters
    ----------
    groups : int
        Number of groups; the channel count must be divisible by it.
    """

    def __init__(self, groups):
        super().__init__()
        _check_positive_int("groups", groups)
        self.groups = groups

    def forward(self, x):
        n, c, h, w = x.shape
        if c % self.groups:
            raise ValueError(f"channel count ({c}) must be divisible by groups ({self.groups})")
        return x.reshape(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(
            n, c, h, w)

    def extra_repr(self):
        return f"groups={self.groups}"
