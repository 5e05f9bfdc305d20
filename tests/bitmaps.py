"""Bit maps for the binary conv tests: the golden model's ``bconv`` of a ``(C, H, W)`` bit map,
and the map's BITS words in the layout of :mod:`hw.conv_window`."""

import types

import torch

from sw.compile import golden

__all__ = ["golden_bconv", "pack_map"]


def golden_bconv(bits, weight_bits, kernel, stride, padding):
    """The golden ``bconv`` counts ``(O, OH, OW)`` of ``bits`` (``(C, H, W)`` of 0/1) with
    ``weight_bits`` (``(O, C * k * k)`` of 0/1)."""
    op = types.SimpleNamespace(kind="bconv", name="b",
                               attrs={"kernel": kernel, "stride": stride, "padding": padding},
                               params={"weight_bits": weight_bits})
    return golden.execute_op(op, [torch.as_tensor(bits, dtype=torch.int64).unsqueeze(0)])[0]


def pack_map(bits, lane, rng):
    """BITS words of a ``(C, H, W)`` bit map, pixel major (``(y * W + x) * cw + c // lane``);
    the tail bits of each pixel's last word (channels ``>= C``) are random: they are
    don't-care."""
    c_total, h, w = len(bits), len(bits[0]), len(bits[0][0])
    words = -(-c_total // lane)
    out = []
    for y in range(h):
        for x in range(w):
            for cw in range(words):
                word = 0
                for b in range(lane):
                    c = cw * lane + b
                    word |= (bits[c][y][x] if c < c_total else rng.randint(0, 1)) << b
                out.append(word)
    return out
