"""amaranth.sim tests of the fixed-point unit: every fixed-point op kind of the layer program,
mapped to a FixedUnit config the way the compiler maps it, gives golden.execute_op's output
exactly, in exactly the documented number of cycles, and writes nothing else; with one lane
and with several (stride 1 rows computed in runs of pixels, partial runs at row ends, padding
at both row ends, stride 2 on half the lanes, THRESHOLD over the lanes or one pixel at a
time)."""

import random
import types

import numpy as np
import pytest
import torch
from amaranth import Elaboratable, Module, signed, unsigned
from amaranth.lib import data, memory
from amaranth.sim import Simulator

from hw.fixed_unit import FixedUnit
from hw.int_memory import IntMemory
from hw.isa import struct_layout as fields_layout
from sw import isa
from sw.compile import golden

torch.set_num_threads(1)


def wrap(value, width):
    """``value`` truncated to a signed ``width``-bit integer."""
    value &= (1 << width) - 1
    return value - (1 << width) if value >> (width - 1) else value


class Harness(Elaboratable):
    """The unit with INTS, COEFS and PARAMS read ports on memories (latency 1, as the core's).
    Writes are recorded by the testbench.

    INTS is the core's banked :class:`hw.int_memory.IntMemory` (``ints="banked"``, runs do not
    wrap around its end), or (``ints="wrap"``) one memory with a read and a write port per
    lane at ``(address + lane) % depth``: runs wrap around, as the unit's addresses do."""

    def __init__(self, dut, ints="banked"):
        self.dut = dut
        self.lanes = dut.lanes
        self.int_depth = 1 << dut.int_addr_width
        if ints == "banked":
            self.ints = IntMemory(depth=self.int_depth, width=dut.element_width,
                                  banks=dut.lanes)
        elif ints == "wrap":
            self.ints = memory.Memory(shape=signed(dut.element_width), depth=self.int_depth,
                                      init=[])
        else:
            raise ValueError(ints)
        # COEFS as the core has it: banked, a run of `channels` coefficients per read.
        self.coefs = IntMemory(depth=1 << dut.coef_addr_width, width=8, banks=dut.channels)
        self.params = memory.Memory(shape=unsigned(isa.PARAM.width),
                                    depth=1 << dut.param_addr_width, init=[])

    def set_int(self, ctx, address, value):
        if isinstance(self.ints, IntMemory):
            cells, row = self.ints.element(address)
            ctx.set(cells[row], value)
        else:
            ctx.set(self.ints.data[address], value)

    def elaborate(self, platform):
        m = Module()
        m.submodules.dut = dut = self.dut
        m.submodules.ints, m.submodules.coefs, m.submodules.params = (
            self.ints, self.coefs, self.params)
        port = self.params.read_port(transparent_for=())
        m.d.comb += [
            port.addr.eq(dut.param_rd_addr), port.en.eq(dut.param_rd_en),
            dut.param_rd_data.eq(port.data),
            self.coefs.rd_addr.eq(dut.coef_rd_addr), self.coefs.rd_en.eq(dut.coef_rd_en),
            dut.coef_rd_data.eq(self.coefs.rd_data), self.coefs.wr_en.eq(0),
        ]
        if isinstance(self.ints, IntMemory):
            ints = self.ints
            m.d.comb += [
                ints.rd_addr.eq(dut.int_rd_addr), ints.rd_en.eq(dut.int_rd_en),
                dut.int_rd_data.eq(ints.rd_data),
                ints.wr_addr.eq(dut.int_wr_addr), ints.wr_en.eq(dut.int_wr_en),
                ints.wr_mask.eq(dut.int_wr_mask), ints.wr_data.eq(dut.int_wr_data),
            ]
        else:
            # Address arithmetic modulo depth = 2**int_addr_width: plain truncation.
            for i in range(self.lanes):
                rd = self.ints.read_port(transparent_for=())
                wr = self.ints.write_port()
                m.d.comb += [
                    rd.addr.eq(dut.int_rd_addr + i), rd.en.eq(dut.int_rd_en),
                    dut.int_rd_data[i].eq(rd.data),
                    wr.addr.eq(dut.int_wr_addr + i), wr.data.eq(dut.int_wr_data[i]),
                    wr.en.eq(dut.int_wr_en & dut.int_wr_mask[i]),
                ]
        return m


# ---- The compiler's mapping of an op to a FixedUnit config (test side) -------------------

def out_size(size, kernel, stride, pad):
    return (size + 2 * pad - kernel) // stride + 1


def lower(op, inputs, dut, rng, *, in_base=3, param_base=2, coef_base=5):
    """Map a golden ``op`` on ``inputs`` (``(C, H, W)`` int64 tensors) to a FixedUnit job.

    Returns ``(config, ints, coefs, params, words, issue)``: the config dict,
    ``{address: value}`` images of INTS and COEFS, ``{address: packed PARAM}``, the
    ``{address: value}`` INTS elements (or BITS words, post THRESHOLD) the op must write, and
    ``T``, the cycles the unit issues terms and residual slots in (:func:`cycles`).
    """
    a, p = op.attrs, op.params
    ew, lane = dut.element_width, dut.lane
    kind = op.kind
    x = inputs[0]
    c_in, h, w = x.shape
    plane = h * w
    ints, coefs = {}, {}
    base = in_base
    bases = []
    for t in inputs:                     # inputs lie one after the other
        bases.append(base)
        for i, v in enumerate(t.flatten().tolist()):
            ints[base + i] = v
        base += t.numel()
    expected = golden.execute_op(op, [t.unsqueeze(0) for t in inputs])[0]
    oc, oh, ow = expected.shape
    out_base = base + rng.randint(0, 3)
    cfg = {"reduce": isa.Reduce.SUM, "multiply": 0, "post": isa.Post.NONE, "relu": 0,
           "bits": ew, "residual": 0, "in_h": h, "in_w": w, "kernel_h": 1, "kernel_w": 1,
           "stride": 1, "pad": 0, "terms_c": 1, "term_stride": plane, "out_channels": oc,
           "out_h": oh, "out_w": ow, "out_base": out_base, "out_plane": oh * ow,
           "out_words": 0, "coef_base": coef_base, "coef_ostride": 0,
           "param_base": param_base, "res_base": 0, "parallel": 0}
    # Fields an op does not use get random values: the unit must ignore them.
    params = [{"in_offset": bases[0] + o * plane, "mul": rng.randint(-2**17, 2**17 - 1),
               "res_mul": rng.randint(-2**17, 2**17 - 1), "shift": rng.randint(0, 40),
               "bias": rng.randint(-2**47, 2**47 - 1),
               "threshold": rng.randint(-2**31, 2**31 - 1), "direction": rng.randint(-1, 1)}
              for o in range(oc)]

    def requant(relu, bits):
        cfg.update(post=isa.Post.REQUANT, relu=relu, bits=bits)
        for o in range(oc):
            params[o].update(mul=int(p["mul"][o]), bias=int(p["bias"][o]),
                             shift=int(p["shift"][o]))

    if kind == "input":
        cfg.update(post=isa.Post.REQUANT, relu=0, bits=ew)
        for o in range(oc):
            params[o].update(mul=1 << a["shift"], bias=-int(p["zero"][o]), shift=0)
    elif kind == "conv":
        k, g = a["kernel"], a["groups"]
        tc = c_in // g
        cfg.update(multiply=1, kernel_h=k, kernel_w=k, stride=a["stride"], pad=a["padding"],
                   terms_c=tc, coef_ostride=tc * k * k)
        requant(a["relu"], a["bits"])
        for o in range(oc):
            params[o]["in_offset"] = bases[0] + (o // (oc // g)) * tc * plane
        weight = np.asarray(p["weight"]).reshape(oc, -1)
        together, xb = dut.channels, dut.parallel_x_bits
        if (isa.parallel_ok(cfg, together) and (g == 1 or (oc // g) % together == 0)
                and all(-(1 << (xb - 1)) <= v < 1 << (xb - 1) for v in x.flatten().tolist())):
            # The channels of a group of `together` share in_offset; coefficients in
            # channel-group order (sw.isa: a term's coefficients are one run).
            terms = weight.shape[1]
            cfg.update(parallel=1, coef_ostride=together * terms)
            for o in range(oc):
                for t in range(terms):
                    coefs[coef_base + o // together * together * terms + t * together
                          + o % together] = int(weight[o, t])
        else:
            for i, v in enumerate(weight.flatten().tolist()):
                coefs[coef_base + i] = int(v)
    elif kind == "requant":
        requant(a["relu"], a["bits"])
    elif kind == "threshold":
        out_base = cfg["out_base"] = rng.randint(0, 5)      # a BITS word address
        cfg.update(post=isa.Post.THRESHOLD, out_words=-(-oc // lane))
        for o in range(oc):
            params[o].update(threshold=int(p["threshold"][o]), direction=int(p["direction"][o]))
    elif kind == "maxpool":
        k = a["kernel"]
        cfg.update(reduce=isa.Reduce.MAX, kernel_h=k, kernel_w=k, stride=a["stride"],
                   pad=a["padding"])
    elif kind == "gap":
        cfg.update(kernel_h=h, kernel_w=w)
    elif kind == "shuffle":
        g = a["groups"]
        for o in range(oc):
            params[o]["in_offset"] = bases[0] + ((o % g) * (c_in // g) + o // g) * plane
    elif kind == "combine":
        n_, m_ = a["N"], a["M"]
        cfg.update(multiply=1, terms_c=n_ * m_, term_stride=oc * plane,
                   residual=a["residual"])
        requant(a["relu"], a["bits"])
        for o in range(oc):
            if a["residual"]:
                params[o]["res_mul"] = int(p["res_mul"][o])
        if a["residual"]:
            cfg["res_base"] = bases[-1]
        for i, v in enumerate(np.asarray(p["coef"]).flatten().tolist()):
            coefs[coef_base + i] = int(v)
    else:
        raise ValueError(kind)

    packed = {param_base + o: isa.PARAM.pack(**params[o]) for o in range(oc)}
    expected = expected.tolist()
    words = {}
    if kind == "threshold":
        # The golden model gives the threshold itself for direction 0 (the compiler emits 0
        # or 1 there); the ISA defines the bit as threshold != 0.
        out_words = cfg["out_words"]
        for pix in range(oh * ow):
            for o in range(oc):
                bit = int(expected[o][pix // ow][pix % ow] != 0)
                addr = out_base + pix * out_words + o // lane
                words[addr] = words.get(addr, 0) | bit << (o % lane)
    else:
        for o in range(oc):
            for pix in range(oh * ow):
                words[out_base + o * oh * ow + pix] = wrap(expected[o][pix // ow][pix % ow], ew)
    return cfg, ints, coefs, packed, words, cycles(cfg, dut.lanes, lane, dut.requant_pipes,
                                                    dut.channels)


def cycles(cfg, lanes, lane, pipes, channels):
    """The issue cycles of an op (``busy`` is high for them plus LATENCY): the docstring's
    formula, written independently of the unit's counters."""
    threshold = cfg["post"] == isa.Post.THRESHOLD
    # THRESHOLD uses the lanes when each BITS word (the last is the smallest) takes at least
    # `lanes` channels; the words of the last group then leave a queue one per cycle.
    smallest_word = cfg["out_channels"] - (cfg["out_words"] - 1) * lane
    if cfg["stride"] == 1 and (not threshold or smallest_word >= lanes):
        step = lanes
    elif cfg["stride"] == 2 and not threshold:
        step = max(lanes // 2, 1)       # every second element of a run
    else:
        step = 1
    groups = -(-cfg["out_w"] // step)
    e = (cfg["terms_c"] * cfg["kernel_h"] * cfg["kernel_w"]
         + cfg["residual"] * (cfg["post"] == isa.Post.REQUANT))
    queue_tail = (cfg["out_w"] - 1) % step if threshold else 0
    together = channels if cfg["parallel"] else 1
    elements = cfg["out_h"] * groups * -(-cfg["out_channels"] // together)
    if cfg["post"] == isa.Post.REQUANT:
        # The step's accumulators (of each channel computed together) pass `pipes` at a time
        # through the requantizers; each element but the last takes at least that many
        # slots, and the write follows the last element's passes.
        passes = max(step // pipes, 1) * together
        slots = max(e, passes)
        return (elements - 1) * slots + e + passes
    return elements * e + queue_tail


def run_jobs(dut, jobs, seed, int_memory="banked"):
    """Run ``jobs`` (from :func:`lower`) back to back on one simulated unit, each started in
    the cycle ``busy`` of the previous one falls; check outputs, cycles and stray writes."""
    harness = Harness(dut, int_memory)
    ew = dut.element_width

    async def bench(ctx):
        rng = random.Random(seed)
        for name, (cfg, ints, coefs, params, words, issue) in jobs:
            for image, mem in ((ints, harness.ints), (coefs, harness.coefs),
                               (params, harness.params), (words, None)):
                threshold = cfg["post"] == isa.Post.THRESHOLD
                depth = mem.depth if mem else 1 << (dut.bits_addr_width if threshold
                                                    else dut.int_addr_width)
                assert all(0 <= a < depth for a in image), f"{name}: the test's images overflow"
            # Unused memory holds random values, which the unit must never use.
            for addr in range(harness.int_depth):
                harness.set_int(ctx, addr, ints.get(addr, rng.randint(-(1 << (ew - 1)),
                                                                      (1 << (ew - 1)) - 1)))
            for addr in range(harness.coefs.depth):
                cells, row = harness.coefs.element(addr)
                ctx.set(cells[row], coefs.get(addr, rng.randint(-128, 127)))
            for addr in range(harness.params.depth):
                ctx.set(harness.params.data[addr],
                        params.get(addr, rng.getrandbits(isa.PARAM.width)))
            for field, value in cfg.items():
                ctx.set(getattr(dut.config, field), int(value))
            ctx.set(dut.start, 1)
            await ctx.tick()
            ctx.set(dut.start, 0)
            int_writes, bits_writes = {}, {}
            cycles = 0
            while ctx.get(dut.busy):
                cycles += 1
                # start must be ignored while busy (a restart would change the cycles).
                ctx.set(dut.start, rng.random() < 0.3)
                assert cycles <= issue + dut.LATENCY, f"{name}: busy for too long"
                writes = []
                if ctx.get(dut.int_wr_en):
                    # A run: element i at int_wr_addr + i where mask bit i is set.
                    base, mask = ctx.get(dut.int_wr_addr), ctx.get(dut.int_wr_mask)
                    assert mask, f"{name}: cycle {cycles}: a write with an empty mask"
                    writes += [(int_writes, (base + i) % harness.int_depth,
                                ctx.get(dut.int_wr_data[i]))
                               for i in range(dut.lanes) if mask >> i & 1]
                if ctx.get(dut.bits_wr_en):
                    writes.append((bits_writes, ctx.get(dut.bits_wr_addr),
                                   ctx.get(dut.bits_wr_data)))
                for log, a, value in writes:
                    assert a not in log, f"{name}: cycle {cycles}: address {a} written twice"
                    log[a] = value
                await ctx.tick()
            ctx.set(dut.start, 0)
            assert cycles == issue + dut.LATENCY, (
                f"{name}: busy for {cycles} cycles, expected {issue} + {dut.LATENCY}")
            # The host's timing model (code generation's per-op figures) agrees.
            assert cycles == isa.fixed_cycles(dut.lanes, dut.lane, cfg, dut.requant_pipes,
                                              dut.channels), name
            assert not ctx.get(dut.int_wr_en) and not ctx.get(dut.bits_wr_en), (
                f"{name}: write after busy fell")
            threshold = cfg["post"] == isa.Post.THRESHOLD
            got, other = (bits_writes, int_writes) if threshold else (int_writes, bits_writes)
            assert not other, f"{name}: writes to the wrong memory: {other}"
            assert set(got) == set(words), (
                f"{name}: wrote addresses {sorted(set(got) ^ set(words))[:8]} wrongly "
                f"(missing or extra)")
            for addr in sorted(words):
                assert got[addr] == words[addr], (
                    f"{name}: address {addr}: expected {words[addr]}, got {got[addr]}")

    sim = Simulator(harness)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()


# ---- Random and edge-case ops -------------------------------------------------------------

def rand_tensor(rng, shape, low, high, extremes=0.2):
    """Random ints in [low, high], a fraction of them at the extremes."""
    values = [rng.choice((low, high)) if rng.random() < extremes else rng.randint(low, high)
              for _ in range(int(np.prod(shape)))]
    return torch.tensor(values, dtype=torch.int64).reshape(shape)


def rand_requant(rng, channels, ew, *, extreme=False):
    """Per-channel requant parameters: random, or (extreme) the field limits and shift 0/40."""
    if extreme:
        mul = [rng.choice((-2**17, 2**17 - 1, -1, 1, 0)) for _ in range(channels)]
        shift = [rng.choice((0, 40)) for _ in range(channels)]
        bias = [rng.choice((-2**47, 2**47 - 1, 0, rng.randint(-2**47, 2**47 - 1)))
                for _ in range(channels)]
    else:
        shift = [rng.choice((0, rng.randint(1, 40), rng.randint(8, 30)))
                 for _ in range(channels)]
        mul = [rng.randint(-2**17, 2**17 - 1) for _ in range(channels)]
        bias = [rng.randint(-(2**min(ew + 10 + s, 47)), 2**min(ew + 10 + s, 47) - 1)
                if rng.random() < 0.7
                else rng.randint(-2**47, 2**47 - 1) for s in shift]
    return {"mul": np.array(mul), "bias": np.array(bias), "shift": np.array(shift)}


def make_op(kind, attrs=None, params=None):
    return types.SimpleNamespace(kind=kind, name=kind, attrs=dict(attrs or {}),
                                 params=dict(params or {}))


def fit_requant(rng, op, inputs):
    """Choose each channel's shift and bias so that its outputs fall mostly inside the output
    range (random params mostly saturate, which would hide rounding errors), some just outside,
    with rounding at every shift: shift ~ bit length of max |acc * mul + res * res_mul| minus
    the output bits, bias of the output's magnitude."""
    attrs, params = dict(op.attrs), op.params
    channels = len(params["mul"])
    params.update(shift=np.zeros(channels, dtype=np.int64),
                  bias=np.zeros(channels, dtype=np.int64))
    op.attrs.update(relu=0, bits=62)
    v = golden.execute_op(op, [t.unsqueeze(0) for t in inputs])[0]
    op.attrs.update(attrs)
    bits = attrs["bits"]
    for c in range(channels):
        top = int(v[c].abs().max())
        shift = min(max(top.bit_length() - bits + 1 + rng.choice((-1, 0, 0, 1)), 0), 40)
        limit = min(1 << (shift + bits - 1), (1 << 47) - 1)
        params["shift"][c] = shift
        params["bias"][c] = rng.randint(-limit, limit)


def conv_job(rng, ew, *, cin, o, h, w, k, stride, pad, groups, extreme=False, x_bits=None):
    """A conv of random weights and requantization on inputs of ``x_bits`` signed bits
    (default ``ew``)."""
    x_bits = x_bits or ew
    x = rand_tensor(rng, (cin, h, w), -(1 << (x_bits - 1)), (1 << (x_bits - 1)) - 1)
    weight = rand_tensor(rng, (o, cin // groups, k, k), -128, 127, extremes=0.3)
    params = rand_requant(rng, o, ew, extreme=extreme)
    params["weight"] = weight.numpy()
    bits = rng.randint(1, ew)
    op = make_op("conv", {"kernel": k, "stride": stride, "padding": pad, "groups": groups,
                          "relu": rng.randint(0, 1), "bits": bits}, params)
    if not extreme:
        fit_requant(rng, op, [x])
    return op, [x]


def ops_for(rng, ew, lane):
    """``(name, op, inputs)`` of every kind: seeded random shapes plus edge cases."""
    top, bottom = (1 << (ew - 1)) - 1, -(1 << (ew - 1))
    ops = []
    # input: 8-bit pixels, (x << shift) - zero.
    for c, h, w in ((3, 2, 3), (1, 1, 1)):
        shift = min(4, ew - 9) if ew > 9 else 0
        ops.append(("input", make_op("input", {"shift": shift}, {
            "zero": np.array([rng.randint(0, 2**(ew - 3)) for _ in range(c)])}),
            [rand_tensor(rng, (c, h, w), 0, 255)]))
    # conv: odd sizes, 1x1 maps, groups, stride 2, pad up to 3 with a 7x7 kernel; rows of
    # stride 1 convs that are not a multiple of the lanes, or shorter, with padding at both
    # row ends.
    for cin, o, h, w, k, stride, pad, groups in (
            (3, 2, 5, 4, 7, 2, 3, 1),
            (2, 2, 3, 9, 7, 1, 3, 1),
            (3, 2, 3, 6, 3, 1, 1, 1),
            (2, 3, 2, 5, 3, 1, 1, 1),
            (1, 2, 3, 11, 3, 2, 1, 1),
            (4, 4, 3, 3, 3, 1, 1, 2),
            (2, lane + 3, 3, 1, 3, 2, 1, 1),
            (1, 1, 1, 1, 1, 1, 0, 1),
            (2, 3, 1, 1, 3, 1, 1, 1),
            (6, 3, 2, 3, 1, 1, 0, 3),
            (2, 2, 4, 3, 2, 2, 0, 1),
            # stride 2 over long rows: half the lanes, every second element of a run
            (2, 3, 3, 17, 3, 2, 1, 1),
            (1, 2, 3, 15, 7, 2, 3, 1),
            (2, 2, 2, 16, 2, 2, 0, 1),
            # more output channels: several channel groups (parallel units), a partial last
            # group, groups of exactly the channels at once, terms equal to the channels
            (3, 7, 3, 5, 3, 1, 1, 1),
            (4, 8, 2, 9, 3, 1, 1, 2),
            (2, 6, 3, 11, 3, 2, 1, 1),
            (4, 5, 2, 10, 1, 1, 0, 1),
            (2, 9, 1, 3, 1, 1, 0, 1)):
        ops.append((f"conv{k}x{k}s{stride}p{pad}g{groups}",
                    *conv_job(rng, ew, cin=cin, o=o, h=h, w=w, k=k, stride=stride, pad=pad,
                              groups=groups)))
    ops.append(("conv extreme", *conv_job(rng, ew, cin=2, o=5, h=3, w=2, k=3, stride=1, pad=2,
                                          groups=1, extreme=True)))
    # requant: saturation at both ends, relu, negative mul, shift 0 and 40.
    for c, h, w, extreme in ((5, 2, 3, False), (lane + 2, 1, 2, True), (3, 3, 1, True),
                             (lane + 1, 2, 1, False)):
        params = rand_requant(rng, c, ew, extreme=extreme)
        op = make_op("requant", {"relu": rng.randint(0, 1), "bits": rng.randint(1, ew)},
                     params)
        x = rand_tensor(rng, (c, h, w), bottom, top)
        if not extreme:
            fit_requant(rng, op, [x])
        ops.append((f"requant{c}", op, [x]))
    for relu in (0, 1):
        # Every value saturates (huge +-bias), then a relu/bits = ew case of the value range.
        c = 4
        params = {"mul": np.array([1, -1, 2**17 - 1, -2**17]),
                  "bias": np.array([2**47 - 1, -2**47, 0, 0]), "shift": np.array([0, 0, 40, 0])}
        ops.append((f"requant saturate relu={relu}",
                    make_op("requant", {"relu": relu, "bits": ew - relu}, params),
                    [rand_tensor(rng, (c, 2, 2), bottom, top, extremes=0.5)]))
    # threshold: directions +1/-1/0, thresholds at the value and field extremes.
    # Rows of 7 and 9 with every word full (lanes at once where lanes <= lane, the last
    # group's words leaving the queue), and with a last word of lane / 2 channels.
    for c, h, w in ((lane + 3, 2, 2), (lane, 1, 1), (2 * lane + 1, 1, 3), (3, 3, 3),
                    (2 * lane, 2, 7), (lane + lane // 2, 1, 9)):
        thr = [rng.choice((top, bottom, top + 1, bottom - 1, 0, 1, -2**31, 2**31 - 1,
                           rng.randint(bottom, top))) for _ in range(c)]
        direction = [rng.choice((-1, 0, 1)) for _ in range(c)]
        x = rand_tensor(rng, (c, h, w), bottom, top, extremes=0.3)
        for i in range(c):              # hit equality too
            x[i, 0, 0] = max(bottom, min(top, thr[i]))
        ops.append((f"threshold{c}", make_op("threshold", params={
            "threshold": np.array(thr), "direction": np.array(direction)}), [x]))
    # maxpool: padding never wins (all-negative inputs), stride 2, kernel 3.
    for c, h, w, k, stride, pad in ((2, 5, 4, 3, 2, 1), (3, 3, 3, 2, 1, 0), (1, 1, 1, 3, 2, 1),
                                    (2, 2, 3, 3, 1, 1), (1, 4, 5, 2, 3, 1), (2, 2, 7, 3, 1, 1),
                                    (1, 3, 10, 2, 1, 0)):
        x = rand_tensor(rng, (c, h, w), bottom, -1 if c == 2 else top)
        ops.append((f"maxpool{k}s{stride}p{pad}",
                    make_op("maxpool", {"kernel": k, "stride": stride, "padding": pad}), [x]))
    # gap: sums of a whole map (values small enough that the sum fits element_width).
    for c, h, w in ((3, 3, 2), (lane + 1, 1, 1)):
        limit = (1 << (ew - 1)) // (h * w) - 1
        ops.append((f"gap{c}", make_op("gap"), [rand_tensor(rng, (c, h, w), -limit, limit)]))
    # shuffle
    for c, g in ((6, 2), (6, 3), (4 * (lane // 2 + 1), 4)):
        ops.append((f"shuffle{c}/{g}", make_op("shuffle", {"groups": g}),
                    [rand_tensor(rng, (c, 2, 1), bottom, top)]))
    # combine: N count tensors of M * oc channels, with and without the residual.
    for n_, m_, oc, h, w, residual in ((2, 3, 2, 2, 2, 1), (3, 1, 3, 1, 3, 0),
                                       (1, 2, lane + 1, 1, 1, 1), (2, 2, 2, 2, 6, 1)):
        fan_in = 50
        counts = [rand_tensor(rng, (m_ * oc, h, w), 0, fan_in) for _ in range(n_)]
        res = [rand_tensor(rng, (oc, h, w), bottom, top)] if residual else []
        params = rand_requant(rng, oc, ew, extreme=residual and oc > lane)
        params["coef"] = rand_tensor(rng, (n_, m_), -128, 127, extremes=0.3).numpy()
        params["res_mul"] = np.array([rng.randint(-2**17, 2**17 - 1) for _ in range(oc)])
        op = make_op("combine", {"M": m_, "N": n_, "residual": residual,
                                 "relu": rng.randint(0, 1), "bits": rng.randint(2, ew)}, params)
        if not (residual and oc > lane):
            fit_requant(rng, op, counts + res)
        ops.append((f"combine N{n_} M{m_} res{residual}", op, counts + res))
    return ops


def random_ops(rng, ew, lane, count):
    """``count`` ops of random kinds and shapes (small enough for the test's memories)."""
    top, bottom = (1 << (ew - 1)) - 1, -(1 << (ew - 1))
    ops = []
    for _ in range(count):
        kind = rng.choice(("conv", "conv", "maxpool", "requant", "threshold", "combine",
                           "shuffle", "gap"))
        k, stride = rng.randint(1, 3), rng.randint(1, 3)
        # Maps with many channels are smaller, so that every op fits 1024 INTS elements.
        side = {"conv": 6, "maxpool": 6, "combine": 2}.get(kind, 3)
        # Rows up to 10 pixels: some longer than 4 lanes, some longer than 8.
        wide = kind in ("conv", "maxpool", "requant", "shuffle", "threshold")
        h, w = rng.randint(1, side), rng.randint(1, side + 4 * wide)
        name = f"random {kind}"
        if kind == "conv":
            g = rng.randint(1, 3)
            pad = rng.randint(max(0, (k - min(h, w) + 1) // 2), k)
            op, inputs = conv_job(rng, ew, cin=g * rng.randint(1, 2), o=g * rng.randint(1, 3),
                                  h=h, w=w, k=k, stride=stride, pad=pad, groups=g)
        elif kind == "maxpool":
            # pad < k: every window holds a real pixel (an all-padding window is undefined).
            pad = rng.randint(max(0, (k - min(h, w) + 1) // 2), k - 1) if k > min(h, w) \
                else rng.randint(0, k - 1)
            op = make_op(kind, {"kernel": k, "stride": stride, "padding": pad})
            inputs = [rand_tensor(rng, (rng.randint(1, 4), h, w), bottom, top)]
        elif kind == "requant":
            c = rng.randint(1, 2 * lane + 1)
            op = make_op(kind, {"relu": rng.randint(0, 1), "bits": rng.randint(1, ew)},
                         rand_requant(rng, c, ew))
            inputs = [rand_tensor(rng, (c, h, w), bottom, top)]
            fit_requant(rng, op, inputs)
        elif kind == "threshold":
            c = rng.randint(1, 2 * lane + 1)
            x = rand_tensor(rng, (c, h, w), bottom, top)
            thr = [int(x[i].flatten()[rng.randrange(h * w)]) + rng.randint(-1, 1)
                   for i in range(c)]
            op = make_op(kind, params={"threshold": np.array(thr), "direction": np.array(
                [rng.choice((-1, 1, 1, -1, 0)) for _ in range(c)])})
            inputs = [x]
        elif kind == "combine":
            n_, m_, oc = rng.randint(1, 3), rng.randint(1, 3), rng.randint(1, 2 * lane)
            residual = rng.randint(0, 1)
            counts = [rand_tensor(rng, (m_ * oc, h, w), 0, 200) for _ in range(n_)]
            res = [rand_tensor(rng, (oc, h, w), bottom, top)] if residual else []
            params = rand_requant(rng, oc, ew)
            params["coef"] = rand_tensor(rng, (n_, m_), -128, 127).numpy()
            params["res_mul"] = np.array([rng.randint(-2**17, 2**17 - 1) for _ in range(oc)])
            op = make_op(kind, {"M": m_, "N": n_, "residual": residual,
                                "relu": rng.randint(0, 1), "bits": rng.randint(1, ew)}, params)
            inputs = counts + res
            fit_requant(rng, op, inputs)
        elif kind == "shuffle":
            g = rng.randint(1, 4)
            op = make_op(kind, {"groups": g})
            inputs = [rand_tensor(rng, (g * rng.randint(1, 4), h, w), bottom, top)]
        else:
            limit = (1 << (ew - 1)) // (h * w) - 1
            op = make_op(kind)
            inputs = [rand_tensor(rng, (rng.randint(1, 2 * lane), h, w), -limit, limit)]
        ops.append((name, op, inputs))
    return ops


@pytest.mark.parametrize("element_width, lane, int_addr_width, seed, lanes, pipes, channels", [
    (24, 8, 10, 1, 1, None, 1),
    (24, 8, 10, 1, 4, None, 1),
    (10, 3, 10, 2, 1, None, 1),    # narrow elements (more saturation), lane not a power of two
    (10, 3, 10, 2, 4, None, 1),
    (24, 8, 10, 3, 8, None, 1),
    (24, 8, 10, 4, 4, 1, 1),       # one requantizer: four passes
    (24, 8, 10, 5, 8, 8, 1),       # one requantizer per lane: one pass
    # Several output channels at once (parallel convs): as the ULX3S default (18-bit
    # elements, 8 lanes, 4 requantizers, 4 channels), one lane, and 24-bit elements whose
    # small-valued convs run parallel (the extra channels multiply 18 bits of x).
    (18, 8, 10, 6, 8, None, 4),
    (12, 4, 10, 7, 1, None, 2),
    (16, 8, 10, 8, 4, 1, 2),
    (24, 8, 10, 9, 2, None, 4),
])
def test_ops_match_golden(element_width, lane, int_addr_width, seed, lanes, pipes, channels):
    dut = FixedUnit(element_width=element_width, lane=lane, int_addr_width=int_addr_width,
                    bits_addr_width=7, coef_addr_width=10, param_addr_width=5, max_terms=147,
                    lanes=lanes, requant_pipes=pipes, channels=channels)
    rng = random.Random(seed)
    jobs = []
    # (Fewer random ops with several channels: their own parallel convs follow.)
    for name, op, inputs in (ops_for(rng, element_width, lane)
                             + random_ops(rng, element_width, lane, 60 if channels == 1 else 20)):
        jobs.append((name, lower(op, inputs, dut, rng,
                                 param_base=rng.randint(0, 5), coef_base=rng.randint(0, 30),
                                 in_base=rng.randint(0, 20))))
    if channels > 1:
        # Convs whose inputs fit the extra channels' multipliers (their extremes included).
        for i in range(12):
            groups = rng.choice((1, 1, 2))
            cin = groups * rng.randint(1, 3)
            op, inputs = conv_job(rng, element_width, cin=cin,
                                  o=groups * channels * rng.randint(1, 2) - rng.randint(0, 1)
                                  * (groups == 1), h=rng.randint(1, 3), w=rng.randint(1, 11),
                                  k=3, stride=rng.randint(1, 2), pad=1, groups=groups,
                                  x_bits=dut.parallel_x_bits)
            jobs.append((f"parallel conv {i}", lower(op, inputs, dut, rng,
                                                     coef_base=rng.randint(0, 30))))
        parallel = sum(job[0]["parallel"] for _, job in jobs)
        assert parallel >= 12, f"only {parallel} of the ops run parallel"
    run_jobs(dut, jobs, seed)


@pytest.mark.parametrize("lanes", [1, 4])
def test_accumulator_never_overflows(lanes):
    """max_terms terms of the largest product magnitude, 2**(ew + 6), either sign."""
    ew, k, cin = 24, 3, 2
    dut = FixedUnit(element_width=ew, lane=4, int_addr_width=7, bits_addr_width=4,
                    coef_addr_width=6, param_addr_width=3, max_terms=cin * k * k, lanes=lanes)
    rng = random.Random(9)
    jobs = []
    for x_value in (-(1 << (ew - 1)), (1 << (ew - 1)) - 1):
        x = torch.full((cin, k, k), x_value, dtype=torch.int64)
        params = {"weight": np.full((2, cin, k, k), -128), "mul": np.array([1, -2**17]),
                  "bias": np.array([0, 0]), "shift": np.array([0, 0])}
        op = make_op("conv", {"kernel": k, "stride": 1, "padding": 0, "groups": 1, "relu": 0,
                              "bits": ew}, params)
        fit_requant(rng, op, [x])
        # Requantized (shift about 35) so the output depends on the sum's top bits.
        jobs.append((f"conv x={x_value}", lower(op, [x], dut, rng)))
    run_jobs(dut, jobs, 9)


@pytest.mark.parametrize("lanes", [1, 4])
def test_addresses_wrap_around_the_memory(lanes):
    """An input at the top of INTS and an output wrapping past its end: addresses are modulo
    the memory size, as the docstring promises (with a memory whose runs wrap too)."""
    dut = FixedUnit(element_width=12, lane=4, int_addr_width=6, bits_addr_width=4,
                    coef_addr_width=6, param_addr_width=3, max_terms=18, lanes=lanes)
    rng = random.Random(5)
    op, inputs = conv_job(rng, 12, cin=2, o=3, h=3, w=3, k=3, stride=1, pad=1, groups=1)
    cfg, ints, coefs, params, words, issue = lower(op, inputs, dut, rng, in_base=40,
                                                   coef_base=30, param_base=6)
    mask = (1 << 6) - 1
    ints = {a & mask: v for a, v in ints.items()}
    coefs = {a & mask: v for a, v in coefs.items()}
    params = {a & 7: v for a, v in params.items()}
    words = {a & mask: v for a, v in words.items()}
    cfg["out_base"] &= mask
    assert max(ints) < 64 and len(words) == 27 and len(ints) == 18
    assert not set(words) & set(ints)
    run_jobs(dut, [("wrap", (cfg, ints, coefs, params, words, issue))], 5, "wrap")


@pytest.mark.parametrize("lanes", [4, 8])
def test_padded_rows_at_address_zero(lanes):
    """Inputs at INTS address 0 with left padding: the first lanes' columns lie below address
    0, which the banked IntMemory (no wrap-around) cannot read, so the unit must start the run
    at the row's first element."""
    dut = FixedUnit(element_width=16, lane=8, int_addr_width=9, bits_addr_width=4,
                    coef_addr_width=9, param_addr_width=3, max_terms=98, lanes=lanes)
    rng = random.Random(11)
    jobs = []
    for cin, h, w, k, pad in ((2, 3, 9, 7, 3), (1, 2, 10, 3, 1), (2, 3, 3, 7, 3)):
        op, inputs = conv_job(rng, 16, cin=cin, o=2, h=h, w=w, k=k, stride=1, pad=pad,
                              groups=1)
        jobs.append((f"conv{k}x{k}p{pad} w{w}", lower(op, inputs, dut, rng, in_base=0)))
    x = rand_tensor(rng, (2, 3, 6), -2**15, 2**15 - 1)
    op = make_op("maxpool", {"kernel": 3, "stride": 1, "padding": 1})
    jobs.append(("maxpool3s1p1", lower(op, [x], dut, rng, in_base=0)))
    run_jobs(dut, jobs, 11)


def test_empty_op_does_nothing():
    dut = FixedUnit(element_width=8, lane=4, int_addr_width=4, bits_addr_width=4,
                    coef_addr_width=4, param_addr_width=2, max_terms=4)

    async def bench(ctx):
        ctx.set(dut.config.out_h, 2)
        ctx.set(dut.config.out_w, 0)
        ctx.set(dut.config.out_channels, 1)
        ctx.set(dut.start, 1)
        for cycle in range(6):
            await ctx.tick()
            assert not ctx.get(dut.busy) and not ctx.get(dut.int_wr_en), f"cycle {cycle}"

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()


def test_fields_layout_matches_bit_record():
    """A record packed by sw.isa reads back field by field through the hardware layout."""
    rng = random.Random(3)
    layout = fields_layout(isa.PARAM.fields)
    assert layout.size == isa.PARAM.width
    for _ in range(20):
        values = {name: rng.randint(*isa.PARAM.range(name)) for name in isa.PARAM.names}
        word = isa.PARAM.pack(**values)
        view = data.Const(layout, word)
        for name in isa.PARAM.names:
            assert getattr(view, name) == values[name], name
    assert fields_layout(isa.FIXED_FIELDS).size == sum(w for _, w, _ in isa.FIXED_FIELDS)
    with pytest.raises(ValueError, match="unique"):
        fields_layout([("a", 1, False), ("a", 2, True)])


@pytest.mark.parametrize("kwargs, message", [
    ({"element_width": 1}, r"element_width must be an integer in \[2, 63\], not 1"),
    ({"element_width": 64}, r"element_width must be an integer in \[2, 63\], not 64"),
    ({"lane": 0}, "lane must be a positive integer, not 0"),
    ({"lanes": 0}, "lanes must be a positive power of two, not 0"),
    ({"lanes": 3}, "lanes must be a positive power of two, not 3"),
    ({"lanes": True}, "lanes must be a positive power of two, not True"),
    ({"max_terms": 0}, "max_terms must be a positive integer, not 0"),
    ({"int_addr_width": "8"}, "int_addr_width must be a positive integer, not '8'"),
])
def test_bad_parameters(kwargs, message):
    args = {"lane": 8, "int_addr_width": 8, "bits_addr_width": 8, "coef_addr_width": 8,
            "param_addr_width": 8, "max_terms": 9}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        FixedUnit(**args)
