"""Fixed-point formats: int8 weights, integer requantization and BatchNorm -> sign thresholds.

Rounding rule (the only one): a real multiplier ``m`` is stored as an integer ``mul`` and a
``shift`` with ``m ~ mul / 2**shift``, and an accumulator ``v`` (with the bias already added) is
requantized by **round half up**::

    y = (v + (1 << (shift - 1))) >> shift        # shift >= 1, arithmetic (floor) shift
    y = v                                        # shift == 0

then saturated to ``[0, 2**bits - 1]`` after a ReLU, else ``[-2**(bits-1), 2**(bits-1) - 1]``.
Real-valued parameters are rounded to integers with :func:`round_half_up` too.
"""

import numpy as np

__all__ = [
    "MAX_SHIFT", "MUL_BITS", "WEIGHT_BITS", "integer_range", "quantize_weights",
    "requant_params", "round_half_up", "scale_from_max", "thresholds",
]

#: Signed width of the per-channel multipliers (``|mul| < 2**(MUL_BITS - 1)``).
MUL_BITS = 16
#: Largest right shift.
MAX_SHIFT = 40
#: Signed width of fixed-point weights.
WEIGHT_BITS = 8


def round_half_up(x):
    """``floor(x + 0.5)`` as int64: the project's rounding rule applied to real numbers."""
    return np.floor(np.asarray(x, dtype=np.float64) + 0.5).astype(np.int64)


def integer_range(bits, relu):
    """``(low, high)`` that a requantized value saturates to."""
    if relu:
        return 0, (1 << bits) - 1
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def scale_from_max(max_abs, bits, relu):
    """Per-channel step so that ``max_abs`` maps to the largest code of the format."""
    high = integer_range(bits, relu)[1]
    max_abs = np.asarray(max_abs, dtype=np.float64)
    return np.where(max_abs > 0, max_abs, 1.0) / high


def quantize_weights(weight):
    """Per-output-channel symmetric int8: ``(q, scale)`` with ``weight[o] ~ q[o] * scale[o]``."""
    w = np.asarray(weight, dtype=np.float64)
    high = (1 << (WEIGHT_BITS - 1)) - 1
    max_abs = np.abs(w.reshape(w.shape[0], -1)).max(axis=1)
    scale = np.where(max_abs > 0, max_abs, 1.0) / high
    q = np.clip(round_half_up(w / scale.reshape(-1, *([1] * (w.ndim - 1)))), -high, high)
    return q.astype(np.int8 if WEIGHT_BITS <= 8 else np.int16), scale


def requant_params(mul, bias, residual=None):
    """Integer requantization of real per-channel ``y = acc * mul + bias [+ res * residual]``.

    Returns a dict of int64 arrays ``mul``, ``shift``, ``bias`` (``bias`` already scaled by
    ``2**shift``) and ``res_mul`` when ``residual`` is given. The shift of each channel is the
    largest (at most :data:`MAX_SHIFT`) that keeps every multiplier of the channel within
    :data:`MUL_BITS` signed bits.
    """
    mul = np.asarray(mul, dtype=np.float64)
    largest = np.abs(mul)
    if residual is not None:
        residual = np.asarray(residual, dtype=np.float64)
        largest = np.maximum(largest, np.abs(residual))
    limit = (1 << (MUL_BITS - 1)) - 1
    with np.errstate(divide="ignore"):
        shift = np.where(largest > 0, np.floor(np.log2(limit / np.where(largest > 0, largest,
                                                                          1.0))), MAX_SHIFT)
    shift = np.clip(shift, 0, MAX_SHIFT).astype(np.int64)
    factor = np.ldexp(1.0, shift)
    out = {"mul": round_half_up(mul * factor), "shift": shift,
           "bias": round_half_up(np.asarray(bias, dtype=np.float64) * factor)}
    if residual is not None:
        out["res_mul"] = round_half_up(residual * factor)
    for name in ("mul", "res_mul"):
        if name in out and np.abs(out[name]).max(initial=0) > limit + 1:
            raise ValueError(f"a requantization multiplier does not fit {MUL_BITS} bits "
                             f"(real multiplier {largest.max():.3g})")
    return out


def thresholds(a, b, scale):
    """Fold ``sign(a * (stored * scale) + b)`` (``sign(0) = +1``) into integer compares.

    Returns ``(threshold, direction)`` per channel: direction +1 gives ``bit = stored >=
    threshold``, -1 gives ``bit = stored <= threshold``, 0 a constant ``bit = threshold`` (0 or
    1), where ``a * scale`` is 0 (a BatchNorm gamma of 0).
    """
    a = np.asarray(a, dtype=np.float64) * np.asarray(scale, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    safe = np.where(a != 0, a, 1.0)
    bound = np.clip(-b / safe, -2.0 ** 40, 2.0 ** 40)
    direction = np.sign(a).astype(np.int64)
    threshold = np.where(a > 0, np.ceil(bound), np.floor(bound)).astype(np.int64)
    threshold = np.where(a == 0, (b >= 0).astype(np.int64), threshold)
    return threshold, direction
