"""Baselines for the small MeliusNet: a plain binary DenseNet of equal binary size and the
full-precision counterparts of both.

* ``binary-plain-small``: dense blocks only (no ImprovementBlocks), stages of 3, 4, 3 blocks,
  transitions to 64 and 96 channels, 32 initial channels and growth 32. Its binary weights
  number exactly those of ``meliusnet-small`` (294,912 at any input size), with 10 binary convs
  against MeliusNet's 12, so the comparison is at equal binary model size, as in the MeliusNet
  paper's comparison with BinaryDenseNet.
* ``fp-small``: ``meliusnet-small`` with full-precision block convs (``BN -> ReLU -> conv``, zero
  padding) instead of ``BN -> sign -> binary conv``.
* ``fp-plain-small``: the same for ``binary-plain-small`` (a full-precision DenseNet).

All use the MeliusNet grouped stem with :func:`~.meliusnet.auto_stem_reduction` and the
MeliusNet transitions and head.
"""

from .meliusnet import build_meliusnet, meliusnet_small

__all__ = ["PLAIN_SMALL_SPEC", "binary_plain_small", "fp_plain_small", "fp_small"]

#: The plain binary DenseNet for small images.
PLAIN_SMALL_SPEC = {"blocks": (3, 4, 3), "transition_channels": (64, 96), "init_features": 32,
                    "growth_rate": 32}


def binary_plain_small(*, num_classes=10, in_channels=1, input_size=28, stem_reduction=None,
                       **options):
    """The plain binary DenseNet (:data:`PLAIN_SMALL_SPEC`, no ImprovementBlocks)."""
    kwargs = {**PLAIN_SMALL_SPEC, "improvement": False, **options}
    return build_meliusnet("binary-plain-small", input_size, stem_reduction,
                           num_classes=num_classes, in_channels=in_channels, **kwargs)


def fp_small(*, num_classes=10, in_channels=1, input_size=28, stem_reduction=None, **options):
    """``meliusnet-small`` with full-precision block convs."""
    return meliusnet_small(num_classes=num_classes, in_channels=in_channels,
                           input_size=input_size, stem_reduction=stem_reduction,
                           **{"binary": False, **options})


def fp_plain_small(*, num_classes=10, in_channels=1, input_size=28, stem_reduction=None,
                   **options):
    """``binary-plain-small`` with full-precision block convs (a full-precision DenseNet)."""
    return binary_plain_small(num_classes=num_classes, in_channels=in_channels,
                              input_size=input_size, stem_reduction=stem_reduction,
                              **{"binary": False, **options})
