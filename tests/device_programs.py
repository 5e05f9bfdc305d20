"""Seeded random single-op layer programs for the device tests: each exercises one op kind
(with a random shape and random parameters) behind an ``input`` op, and its output tensor is the
program's logits, so the whole output is compared with the golden model."""

import numpy as np

from sw.compile.ir import Op, Program, Slice, TensorSpec

__all__ = ["KINDS", "single_op_program"]

KINDS = ("conv", "requant", "threshold-bconv", "maxpool", "gap", "shuffle", "combine",
         "bconv-add")


class _Builder:
    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)
        self.tensors, self.ops = {}, []

    def tensor(self, name, shape, kind="int", bits=16, signed=True):
        self.tensors[name] = TensorSpec(name, tuple(int(s) for s in shape), kind, bits, None,
                                        signed)
        return Slice(name, 0, int(shape[0]))

    def op(self, kind, name, inputs, output, mode="write", attrs=None, params=None):
        self.ops.append(Op(kind, name, list(inputs), output, mode, attrs or {}, params or {}))
        return output

    def requant_params(self, channels, shift_high=12):
        rng = self.rng
        return {"mul": rng.integers(-3000, 3000, channels), "bias": rng.integers(-5000, 5000,
                                                                                  channels),
                "shift": rng.integers(0, shift_high, channels)}

    def thresholds(self, channels, low, high):
        rng = self.rng
        direction = rng.choice([-1, 1, 1, 0], channels)
        # Direction 0 is a constant bit: its threshold is the bit (0 or 1).
        threshold = np.where(direction == 0, rng.integers(0, 2, channels),
                             rng.integers(low, high + 1, channels))
        return {"threshold": threshold, "direction": direction}


def single_op_program(kind, seed):
    """``(program, raw images (2, C, H, W))`` for op kind ``kind`` (one of :data:`KINDS`)."""
    b = _Builder(seed)
    rng = b.rng
    c = int(rng.integers(1, 6))
    h, w = int(rng.integers(3, 9)), int(rng.integers(3, 9))
    image = b.tensor("image", (c, h, w), bits=8, signed=False)
    x = b.tensor("input", (c, h, w), bits=12)
    b.op("input", "input", [image], x, attrs={"shift": int(rng.integers(0, 3))},
         params={"zero": rng.integers(0, 60, c)})
    if kind == "conv":
        k = int(rng.choice([k for k in (1, 3, 5) if k <= min(h, w)]))
        stride, pad = int(rng.integers(1, 3)), int(rng.integers(0, k // 2 + 1))
        groups = int(rng.choice([g for g in (1, 2, 3) if c % g == 0]))
        out_c = groups * int(rng.integers(1, 4))
        oh, ow = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
        relu, bits = int(rng.integers(0, 2)), int(rng.choice([8, 12]))
        out = b.tensor("logits", (out_c, oh, ow), bits=bits, signed=not relu)
        b.op("conv", "conv", [x], out,
             attrs={"kernel": k, "stride": stride, "padding": pad, "groups": groups,
                    "relu": relu, "bits": bits},
             params={"weight": rng.integers(-127, 128, (out_c, c // groups, k, k)),
                     **b.requant_params(out_c)})
    elif kind == "requant":
        relu = int(rng.integers(0, 2))
        out = b.tensor("logits", (c, h, w), bits=8, signed=not relu)
        b.op("requant", "requant", [x], out, attrs={"relu": relu, "bits": 8},
             params=b.requant_params(c))
    elif kind in ("threshold-bconv", "bconv-add"):
        bits_c = int(rng.integers(1, 70))
        # A conv widens the channels first so that the bit tensor spans several words.
        wide = b.tensor("wide", (bits_c, h, w), bits=12)
        b.op("conv", "widen", [x], wide,
             attrs={"kernel": 1, "stride": 1, "padding": 0, "groups": 1, "relu": 0,
                    "bits": 12},
             params={"weight": rng.integers(-127, 128, (bits_c, c, 1, 1)),
                     **b.requant_params(bits_c, shift_high=6)})
        bits = b.tensor("bits", (bits_c, h, w), kind="bits", bits=1, signed=False)
        b.op("threshold", "threshold", [wide], bits, params=b.thresholds(bits_c, -300, 300))
        k = int(rng.choice([1, 3]))
        stride, pad = int(rng.integers(1, 3)), int(rng.integers(0, 2))
        oh, ow = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
        out_c = int(rng.integers(1, 11))
        extra = 3 if kind == "bconv-add" else 0
        out = b.tensor("logits", (out_c + extra, oh, ow), bits=14)
        weight = rng.integers(0, 2, (out_c, bits_c * k * k)).astype(bool)
        attrs = {"kernel": k, "stride": stride, "padding": pad}
        if kind == "bconv-add":
            # Write every channel, overwrite a slice (DenseBlock concatenation), then add a
            # conv into an overlapping slice (ImprovementBlock).
            b.op("bconv", "bconv.init", [bits], out, attrs=attrs, params={
                "weight_bits": rng.integers(0, 2, (out_c + extra, bits_c * k * k))
                .astype(bool)})
            b.op("bconv", "bconv", [bits], Slice("logits", 0, out_c), attrs=attrs,
                 params={"weight_bits": weight})
            b.op("bconv", "bconv.add", [bits], Slice("logits", extra, out_c + extra),
                 mode="add", attrs=attrs,
                 params={"weight_bits": rng.integers(0, 2, (out_c, bits_c * k * k))
                         .astype(bool)})
        else:
            b.op("bconv", "bconv", [bits], out, attrs=attrs, params={"weight_bits": weight})
    elif kind == "maxpool":
        k = int(rng.choice([2, 3]))
        stride = int(rng.integers(1, 3))
        pad = int(rng.integers(0, 2)) if k == 3 else 0
        oh, ow = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
        out = b.tensor("logits", (c, oh, ow), bits=12)
        b.op("maxpool", "maxpool", [x], out, attrs={"kernel": k, "stride": stride,
                                                   "padding": pad})
    elif kind == "gap":
        out = b.tensor("logits", (c, 1, 1), bits=20)
        b.op("gap", "gap", [x], out)
    elif kind == "shuffle":
        groups = int(rng.choice([g for g in (1, 2, 3, 4, 5) if c % g == 0]))
        out = b.tensor("logits", (c, h, w), bits=12)
        b.op("shuffle", "shuffle", [x], out, attrs={"groups": groups})
    elif kind == "combine":
        m_bases, n_bases = int(rng.integers(1, 4)), int(rng.integers(1, 4))
        oc = int(rng.integers(1, 5))
        counts = b.tensor("counts", (n_bases * m_bases * oc, h, w), bits=12)
        wide = m_bases * oc
        # Fill the counts tensor from the image with a 1x1 conv (any integers will do).
        b.op("conv", "fill", [x], counts,
             attrs={"kernel": 1, "stride": 1, "padding": 0, "groups": 1, "relu": 1,
                    "bits": 10},
             params={"weight": rng.integers(-127, 128, (n_bases * wide, c, 1, 1)),
                     **b.requant_params(n_bases * wide, shift_high=6)})
        residual = b.tensor("residual", (oc, h, w), bits=8)
        b.op("conv", "residual", [x], residual,
             attrs={"kernel": 1, "stride": 1, "padding": 0, "groups": 1, "relu": 0,
                    "bits": 8},
             params={"weight": rng.integers(-127, 128, (oc, c, 1, 1)),
                     **b.requant_params(oc, shift_high=8)})
        out = b.tensor("logits", (oc, h, w), bits=8)
        inputs = [Slice("counts", n * wide, (n + 1) * wide) for n in range(n_bases)]
        b.op("combine", "combine", inputs + [residual], out,
             attrs={"M": m_bases, "N": n_bases, "relu": 0, "bits": 8, "residual": 1},
             params={"coef": rng.integers(-127, 128, (n_bases, m_bases)),
                     "res_mul": rng.integers(-3000, 3000, oc), **b.requant_params(oc)})
    else:
        raise ValueError(f"unknown kind {kind!r}")
    program = Program(b.tensors, b.ops, "image", "logits")
    images = rng.integers(0, 256, (2, c, h, w))
    return program, images
