"""Seeded random single-op layer programs for the device tests: each exercises one op kind
(with a random shape and random parameters) behind an ``input`` op, and its output tensor is the
program's logits, so the whole output is compared with the golden model."""

import numpy as np

from sw.compile.ir import Op, Program, Slice, TensorSpec

__all__ = ["KINDS", "cnv_like_program", "fused_program", "single_op_program"]

KINDS = ("conv", "requant", "threshold-bconv", "maxpool", "gap", "shuffle", "combine",
         "bconv-add", "requant-maxpool")


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
    elif kind == "requant-maxpool":
        # A requant that only a max pool reads (MeliusNet's transitions): with every mul >= 0
        # (three seeds in four) the pool requantizes its maxima instead (codegen).
        relu = int(rng.integers(0, 2))
        params = b.requant_params(c)
        if rng.random() < 0.75:
            params["mul"] = np.abs(params["mul"])
        y = b.tensor("y", (c, h, w), bits=8, signed=not relu)
        b.op("requant", "requant", [x], y, attrs={"relu": relu, "bits": 8}, params=params)
        k = int(rng.choice([2, 3]))
        stride = int(rng.integers(1, 3))
        pad = int(rng.integers(0, 2)) if k == 3 else 0
        oh, ow = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
        out = b.tensor("logits", (c, oh, ow), bits=8, signed=not relu)
        b.op("maxpool", "maxpool", [y], out, attrs={"kernel": k, "stride": stride,
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


def cnv_like_program(seed, *, channels=3, pad=0, stride=1, shift=0, zero=False, out1=8,
                     weights="sign", consumer="threshold", image_bits=8, groups=1,
                     pool_readers=1):
    """``(program, raw images (4, C, S, S))``: CNV-W1A1 in miniature, its first layer
    possibly running on the array as bit-planes (sw.compile.codegen).

    ``image`` (8-bit, ``channels``) -> ``input`` (``shift``, zero 0 unless ``zero``) ->
    ``conv1`` (3x3, ``out1`` channels, +-1 weights unless ``weights="int8"``, ``pad``,
    ``stride``, ``groups``, random requantization: negative multipliers, saturation, ReLU) ->
    ``conv1.act`` threshold (all three directions) -> ``conv2`` bconv 3x3 -> 2x2 max pool ->
    threshold -> ``conv3`` bconv 3x3 to one pixel -> threshold -> ``fc`` bconv 1x1 = the
    logits (10 counts). ``consumer="maxpool"`` pools conv1's output (3x3, stride 1, padding
    1) before its threshold (then conv1 cannot run as bit-planes). The image size ``S`` is
    chosen so that conv1 makes 8x8. The images are random, with one all-0 and one all-255
    (the largest pixel) image. ``pool_readers=2`` adds a second threshold of conv2's pooled
    counts (its bits unused), so that conv2 cannot run straight to bits.
    """
    b = _Builder(seed)
    rng = b.rng
    size = 8 - 2 * pad + 2 if stride == 1 else 2 * 8 - 2 * pad + 1
    image = b.tensor("image", (channels, size, size), bits=image_bits, signed=False)
    x = b.tensor("input", (channels, size, size), bits=image_bits + shift + 1)
    b.op("input", "input", [image], x, attrs={"shift": shift},
         params={"zero": rng.integers(1, 60, channels) if zero else np.zeros(channels,
                                                                              np.int64)})
    if weights == "sign":
        weight = rng.choice([-1, 1], (out1, channels // groups, 3, 3))
    else:
        weight = rng.integers(-127, 128, (out1, channels // groups, 3, 3))
    relu = int(rng.integers(0, 2))
    c1 = b.tensor("conv1", (out1, 8, 8), bits=8, signed=not relu)
    p = {"mul": rng.integers(-300, 300, out1), "bias": rng.integers(-20000, 20000, out1),
         "shift": rng.integers(0, 8, out1)}
    b.op("conv", "conv1", [x], c1,
         attrs={"kernel": 3, "stride": stride, "padding": pad, "groups": groups,
                "relu": relu, "bits": 8}, params={"weight": weight, **p})
    low, high = (0, 255) if relu else (-128, 127)
    side = 8
    if consumer == "maxpool":
        pooled = b.tensor("conv1.pool", (out1, side, side), bits=8, signed=not relu)
        b.op("maxpool", "conv1.pool", [c1], pooled,
             attrs={"kernel": 3, "stride": 1, "padding": 1})
        c1 = pooled
    bits = b.tensor("conv1.act", (out1, side, side), kind="bits", bits=1, signed=False)
    b.op("threshold", "conv1.act", [c1], bits, params=b.thresholds(out1, low, high))
    channels_in, layers = out1, [("conv2", 16, 3), ("conv3", 12, 3), ("fc", 10, 1)]
    for name, out_c, k in layers:
        side -= k - 1
        last = name == "fc"
        counts = b.tensor("logits" if last else name, (out_c, side, side), bits=12)
        b.op("bconv", name, [bits], counts, attrs={"kernel": k, "stride": 1, "padding": 0},
             params={"weight_bits": rng.integers(0, 2, (out_c, channels_in * k * k))
                     .astype(bool)})
        if name == "conv2":
            side //= 2
            pooled = b.tensor("conv2.pool", (out_c, side, side), bits=12)
            b.op("maxpool", "conv2.pool", [counts], pooled,
                 attrs={"kernel": 2, "stride": 2, "padding": 0})
            counts = pooled
        if not last:
            fan_in = channels_in * k * k
            bits = b.tensor(f"{name}.act", (out_c, side, side), kind="bits", bits=1,
                            signed=False)
            b.op("threshold", f"{name}.act", [counts], bits,
                 params={"threshold": rng.integers(fan_in // 3, 2 * fan_in // 3 + 1, out_c),
                         "direction": np.ones(out_c, np.int64)})
            if name == "conv2" and pool_readers > 1:
                copy = b.tensor("conv2.copy", (out_c, side, side), kind="bits", bits=1,
                                signed=False)
                b.op("threshold", "conv2.copy", [counts], copy,
                     params={"threshold": np.full(out_c, fan_in // 2),
                             "direction": np.ones(out_c, np.int64)})
        channels_in = out_c
    program = Program(b.tensors, b.ops, "image", "logits")
    top = (1 << image_bits) - 1
    images = rng.integers(0, top + 1, (4, channels, size, size))
    images[2], images[3] = 0, top
    return program, images


def fused_program(seed, *, layers=3, pool=0.6, size=None, max_channels=40):
    """``(program, raw images (3, C, S, S))``: binary convs whose counts a threshold reads,
    directly or through a 2x2 stride-2 max pool (the pattern the code generator runs straight
    to bits), with seeded random shapes: kernel 1 or 3, stride 1 or 2, padding 0 or 1, odd
    maps (a pool of an odd map drops the last row and column), channel counts up to
    ``max_channels`` (not multiples of the array or the lane), thresholds of all three
    directions near the middle of the counts and at their extremes.

    ``image`` -> ``input`` -> 1x1 int8 ``conv0`` -> ``act0`` threshold -> ``layers`` x
    (``convN`` bconv -> [``convN.pool``] -> ``actN`` threshold) -> ``fc`` bconv 1x1 = the
    logits (counts of a whole map, so every pixel of the last bits is checked).
    """
    b = _Builder(seed)
    rng = b.rng
    c = int(rng.integers(1, 4))
    side = size or int(rng.integers(7, 12))
    image = b.tensor("image", (c, side, side), bits=8, signed=False)
    x = b.tensor("input", (c, side, side), bits=12)
    b.op("input", "input", [image], x, attrs={"shift": 0}, params={"zero": rng.integers(0, 60,
                                                                                       c)})
    channels = int(rng.integers(1, max_channels + 1))
    wide = b.tensor("conv0", (channels, side, side), bits=12)
    b.op("conv", "conv0", [x], wide,
         attrs={"kernel": 1, "stride": 1, "padding": 0, "groups": 1, "relu": 0, "bits": 12},
         params={"weight": rng.integers(-127, 128, (channels, c, 1, 1)),
                 **b.requant_params(channels, shift_high=6)})
    bits = b.tensor("act0", (channels, side, side), kind="bits", bits=1, signed=False)
    b.op("threshold", "act0", [wide], bits, params=b.thresholds(channels, -300, 300))
    for index in range(1, layers + 1):
        k = int(rng.choice([1, 3]))
        pad = int(rng.integers(0, 2)) if k == 3 else 0
        stride = int(rng.choice([1, 1, 2]))
        if (side + 2 * pad - k) // stride + 1 < 2:
            stride = 1
        if (side + 2 * pad - k) // stride + 1 < 2:
            k, pad = 1, 0
        oh = (side + 2 * pad - k) // stride + 1
        out_c = int(rng.integers(1, max_channels + 1))
        name = f"conv{index}"
        counts = b.tensor(name, (out_c, oh, oh), bits=12)
        b.op("bconv", name, [bits], counts, attrs={"kernel": k, "stride": stride,
                                                    "padding": pad},
             params={"weight_bits": rng.integers(0, 2, (out_c, channels * k * k))
                     .astype(bool)})
        side = oh
        if oh >= 2 and rng.random() < pool:
            side = oh // 2
            pooled = b.tensor(f"{name}.pool", (out_c, side, side), bits=12)
            b.op("maxpool", f"{name}.pool", [counts], pooled,
                 attrs={"kernel": 2, "stride": 2, "padding": 0})
            counts = pooled
        n = channels * k * k
        params = b.thresholds(out_c, n // 2 - 3, n // 2 + 3)
        extremes = rng.integers(0, out_c, 2)
        params["threshold"][extremes[0]] = int(rng.choice([0, n]))
        params["direction"][extremes[0]] = int(rng.choice([-1, 1]))
        params["threshold"][extremes[1]] = int(rng.choice([-1, n + 1]))
        params["direction"][extremes[1]] = int(rng.choice([-1, 1]))
        bits = b.tensor(f"act{index}", (out_c, side, side), kind="bits", bits=1, signed=False)
        b.op("threshold", f"act{index}", [counts], bits, params=params)
        channels = out_c
    out = b.tensor("logits", (10, side, side), bits=14)
    b.op("bconv", "fc", [bits], out, attrs={"kernel": 1, "stride": 1, "padding": 0},
         params={"weight_bits": rng.integers(0, 2, (10, channels)).astype(bool)})
    program = Program(b.tensors, b.ops, "image", "logits")
    images = rng.integers(0, 256, (3, c, side_of(program, "image"), side_of(program, "image")))
    images[2] = 255
    return program, images


def side_of(program, tensor):
    return program.tensors[tensor].shape[-1]
