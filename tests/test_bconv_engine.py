"""amaranth.sim tests of the binary conv engine: BITS and WEIGHTS memories in, INTS out, exact
against the golden model's ``bconv`` (write and add modes), with the documented cycle count."""

import random

import pytest
from amaranth import Elaboratable, Module
from amaranth.lib import memory
from amaranth.sim import Simulator
from bitmaps import golden_bconv, pack_map

from hw.bconv_engine import BconvEngine
from hw.config import DeviceConfig
from hw.int_memory import IntMemory
from sw import isa, packing

INT_DEPTH = 512
BITS_DEPTH = 256
ELEMENT_WIDTH = 16




def expected_cycles(k_words, rows, cols, m_tiles, out_plane):
    """The docstring's formula of :class:`BconvEngine` (the timing model of :mod:`sw.isa`)."""
    return isa.bconv_cycles(rows, cols, k_words, m_tiles, out_plane)


class Harness(Elaboratable):
    """The engine with its three memories, connected as the device core does: INTS has the
    power of two at least ``cols`` banks (``DeviceConfig.int_banks``); the engine's ``cols``-wide
    runs are its low elements (the rest masked off)."""

    def __init__(self, dut, bits_init, weights_init, ints_init, params_init=()):
        self.dut = dut
        self.bits_init = bits_init
        self.weights_init = weights_init
        self.params_init = list(params_init)
        self.bits = None
        banks = 1 << (dut.cols - 1).bit_length()
        self.ints = IntMemory(dut.int_depth, dut.element_width, banks, init=ints_init)

    def elaborate(self, platform):
        m = Module()
        dut = self.dut
        m.submodules.dut = dut
        m.submodules.ints = ints = self.ints
        m.submodules.bits = bits = memory.Memory(shape=dut.lane, depth=dut.bits_depth,
                                                 init=self.bits_init)
        self.bits = bits
        # The threshold mode's writes, one enable bit per group of `rows` bits.
        write = bits.write_port(granularity=dut.lane // dut.bits_groups)
        m.d.comb += [write.addr.eq(dut.bits_wr_addr), write.en.eq(dut.bits_wr_en),
                     write.data.eq(dut.bits_wr_data)]
        m.submodules.params = params = memory.Memory(
            shape=isa.PARAM.width, depth=dut.param_depth, init=self.params_init)
        port = params.read_port()
        m.d.comb += [port.addr.eq(dut.param_rd_addr), port.en.eq(dut.param_rd_en),
                     dut.param_rd_data.eq(port.data)]
        for c in range(dut.cols):
            port = bits.read_port()
            m.d.comb += [port.addr.eq(dut.rd[c].addr), port.en.eq(dut.rd[c].en),
                         dut.rd[c].data.eq(port.data)]
        m.submodules.weights = weights = memory.Memory(
            shape=dut.rows * dut.lane, depth=dut.device.weight_depth, init=self.weights_init)
        port = weights.read_port()
        m.d.comb += [port.addr.eq(dut.w_rd_addr), port.en.eq(dut.w_rd_en),
                     dut.w_rd_data.eq(port.data)]
        m.d.comb += [
            ints.rd_addr.eq(dut.int_rd_addr), ints.rd_en.eq(dut.int_rd_en),
            dut.int_rd_data.eq(ints.rd_data),
            ints.wr_addr.eq(dut.int_wr_addr), ints.wr_en.eq(dut.int_wr_en),
            ints.wr_mask.eq(dut.int_wr_mask), ints.wr_data.eq(dut.int_wr_data),
        ]
        return m


def make_layer(rng, rows, cols, lane, c_total, h, w, kernel, stride, padding, out_channels):
    """Random bits and weights, their golden counts, and the memory images of the op."""
    bits = [[[rng.randint(0, 1) for _ in range(w)] for _ in range(h)] for _ in range(c_total)]
    weight_bits = [[rng.randint(0, 1) for _ in range(c_total * kernel * kernel)]
                   for _ in range(out_channels)]
    counts = golden_bconv(bits, weight_bits, kernel, stride, padding)
    _, oh, ow = counts.shape
    channel_words = -(-c_total // lane)
    k_words = kernel * kernel * channel_words
    m_tiles = -(-out_channels // rows)
    weights = packing.pack_weights(
        packing.conv_window_weight_bits(weight_bits, c_total, kernel, lane), rows, lane,
        encoding="bit")
    assert len(weights) == m_tiles * k_words
    settings = {
        "channels": c_total, "in_h": h, "in_w": w, "channel_words": channel_words,
        "kernel": kernel, "stride": stride, "pad": padding, "k_words": k_words,
        "m_tiles": m_tiles, "out_channels": out_channels, "out_plane": oh * ow,
    }
    return counts.reshape(out_channels, oh * ow).tolist(), pack_map(bits, lane, rng), weights, \
        settings


def run_ops(dut, bits_init, weights_init, ints_init, ops, idle=0, params_init=()):
    """Run the ``ops`` (BCONV_FIELDS dicts) one after the other; return the final INTS and
    BITS contents and each op's cycles (from the cycle start is seen to the first cycle busy
    is low)."""
    harness = Harness(dut, bits_init, weights_init, ints_init, params_init)
    result = {"cycles": []}

    async def bench(ctx):
        for op in ops:
            for name in isa.BCONV_FIELDS:
                ctx.set(getattr(dut.config, name[0]), op.get(name[0], 0))
            # A threshold to bits: the FIXED half's settings (isa.BCONV_POST).
            threshold, pool = op.get("threshold", 0), op.get("pool", 0)
            ctx.set(dut.post.post, isa.Post.THRESHOLD if threshold else isa.Post.REQUANT)
            ctx.set(dut.post.reduce, isa.Reduce.MAX if pool else isa.Reduce.SUM)
            ctx.set(dut.post.out_base, op.get("bits_base", 0))
            ctx.set(dut.post.out_words, op.get("out_words", 0))
            ctx.set(dut.post.param_base, op.get("param_base", 0))
            for _ in range(idle):
                await ctx.tick()
            ctx.set(dut.start, 1)
            assert not ctx.get(dut.busy)
            await ctx.tick()
            ctx.set(dut.start, 0)
            cycles = 1
            while ctx.get(dut.busy):
                await ctx.tick()
                cycles += 1
                assert cycles < 20000, "the engine never finished"
            result["cycles"].append(cycles)
        # Nothing is written after busy falls.
        for _ in range(8):
            assert not ctx.get(harness.ints.wr_en)
            assert not ctx.get(dut.bits_wr_en)
            await ctx.tick()
        result["ints"] = []
        for a in range(dut.int_depth):
            bank, row = harness.ints.element(a)
            result["ints"].append(ctx.get(bank[row]))
        result["bits"] = [ctx.get(harness.bits.data[a]) for a in range(dut.bits_depth)]

    sim = Simulator(harness)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    return result


def check_layer(rng, rows, cols, lane, c_total, h, w, kernel, stride, padding, out_channels,
                modes=("write",)):
    """One layer run in each of ``modes`` in turn (same engine, back to back, no reset), with
    the INTS region of the output compared to golden and every other element untouched."""
    counts, bits_words, weight_words, settings = make_layer(
        rng, rows, cols, lane, c_total, h, w, kernel, stride, padding, out_channels)
    out_plane = settings["out_plane"]
    in_base = rng.randint(1, BITS_DEPTH - len(bits_words))
    weight_base = rng.randint(1, 8)
    region = out_channels * out_plane
    out_base = rng.randint(1, INT_DEPTH - region - 1)
    config = DeviceConfig(rows=rows, cols=cols, lane=lane, max_depth=1024, weight_depth=128)
    dut = BconvEngine(config, element_width=ELEMENT_WIDTH, int_depth=INT_DEPTH,
                      bits_depth=BITS_DEPTH)

    bits_init = [rng.getrandbits(lane) for _ in range(BITS_DEPTH)]
    bits_init[in_base:in_base + len(bits_words)] = bits_words
    weights_init = [rng.getrandbits(rows * lane) for _ in range(128)]
    weights_init[weight_base:weight_base + len(weight_words)] = weight_words
    # Old values small enough that several adds cannot overflow ELEMENT_WIDTH bits.
    ints_init = [rng.randint(-3000, 3000) for _ in range(INT_DEPTH)]

    ops, expected = [], list(ints_init)
    for mode in modes:
        ops.append(dict(settings, in_base=in_base, weight_base=weight_base, out_base=out_base,
                        add=int(mode == "add")))
        for o in range(out_channels):
            for n in range(out_plane):
                a = out_base + o * out_plane + n
                expected[a] = (expected[a] if mode == "add" else 0) + counts[o][n]
    result = run_ops(dut, bits_init, weights_init, ints_init, ops, idle=rng.randint(0, 3))

    for a, (got, want) in enumerate(zip(result["ints"], expected)):
        if out_base <= a < out_base + region:
            where = f"channel {(a - out_base) // out_plane}, pixel {(a - out_base) % out_plane}"
        else:
            where = "outside the output"
        assert got == want, f"INTS[{a}] ({where}): expected {want}, got {got}"
    want_cycles = expected_cycles(settings["k_words"], rows, cols, settings["m_tiles"],
                                  out_plane)
    assert result["cycles"] == [want_cycles] * len(modes), (result["cycles"], want_cycles)
    return settings


# (rows, cols, lane, C, H, W, kernel, stride, padding, out_channels)
CASES = [
    # 3x3 same conv, odd map, C not a multiple of lane, k_words > rows, O > rows and odd.
    (2, 4, 8, 11, 5, 7, 3, 1, 1, 5),
    # stride 2 with padding, k_words = 9 > rows, out_plane not a multiple of cols.
    (4, 2, 16, 5, 5, 7, 3, 2, 1, 6),
    # 1x1, k_words = 1 < rows (short tiles are throttled), O not a multiple of rows.
    (4, 2, 16, 7, 3, 5, 1, 1, 0, 7),
    # 1x1, 1 < k_words = 3 < rows: the last word of each tile stalls while the others flow.
    (4, 2, 8, 20, 3, 5, 1, 1, 0, 5),
    # A one-row array: every result beat is a whole tile.
    (1, 4, 8, 9, 3, 3, 3, 1, 1, 3),
    # 1x1 on a 1x1 map: a single pixel, one partly filled tile.
    (2, 4, 8, 3, 1, 1, 1, 1, 0, 3),
    # 1x1 stride 2, k_words = 2 = rows.
    (2, 4, 8, 13, 5, 7, 1, 2, 0, 2),
    # 3x3 valid conv (no padding), stride 2, O < rows.
    (4, 2, 16, 20, 7, 5, 3, 2, 0, 3),
    # cols = 3, not a power of two: INTS has 4 banks.
    (2, 3, 8, 10, 5, 5, 3, 1, 1, 5),
    # 3x3 valid conv, stride 1, a single row tile with O = rows.
    (2, 4, 8, 8, 5, 3, 3, 1, 0, 2),
]


@pytest.mark.parametrize("rows,cols,lane,c_total,h,w,kernel,stride,padding,out_channels", CASES)
def test_add_write_add_match_golden(rows, cols, lane, c_total, h, w, kernel, stride, padding,
                                    out_channels):
    """Add onto random old values, then write (the read port holds stale data from the add: a
    write must not use it), then add again: twice the counts."""
    rng = random.Random(rows * 10000 + c_total * 100 + h * 10 + kernel + stride)
    check_layer(rng, rows, cols, lane, c_total, h, w, kernel, stride, padding, out_channels,
                modes=("add", "write", "add"))


def test_add_into_existing_values():
    """Add mode alone: the old (random, also negative) values plus the counts."""
    rng = random.Random(11)
    check_layer(rng, 2, 4, 8, 9, 3, 5, 3, 1, 1, 3, modes=("add",))


def test_random_layers():
    rng = random.Random(2024)
    for _ in range(3):
        rows, cols, lane = rng.choice([(2, 4, 8), (4, 2, 16), (3, 2, 4)])
        kernel, stride, padding = rng.choice([(3, 1, 1), (3, 2, 1), (1, 1, 0), (1, 2, 0),
                                              (3, 1, 0)])
        h, w = rng.choice([1, 3, 5]), rng.choice([1, 3, 5])
        if kernel == 3 and padding == 0:
            h, w = max(h, 3), max(w, 3)
        check_layer(rng, rows, cols, lane, rng.randint(1, 2 * lane + 1), h, w, kernel, stride,
                    padding, rng.randint(1, 2 * rows + 1), modes=(rng.choice(["write", "add"]),))


@pytest.mark.parametrize("lane, channels, padding, stride", [(16, 3, 1, 1), (8, 2, 0, 2),
                                                            (32, 5, 1, 2)])
def test_bitplane_op_then_a_binary_op(lane, channels, padding, stride):
    """A BCONV with ``planes`` on an 8-bit image (sw.packing's bit-planes) counts
    ``dot(w, x) + 255 * n_neg(o)`` with zero padding; the same engine then runs an ordinary
    binary conv back to back (the array's mode changes between ops). Both exact, both in
    the documented cycles."""
    import numpy as np
    rng = random.Random(lane * 100 + channels)
    nrng = np.random.default_rng(lane + channels)
    rows, cols, h, w, out_c = 2, 4, 5, 4, 3
    image = nrng.integers(0, 256, (channels, h, w))
    image[:, 0, 0] = 255
    weight = nrng.choice([-1, 1], (out_c, channels, 3, 3))
    padded = np.pad(image, ((0, 0), (padding, padding), (padding, padding)))
    oh, ow = (h + 2 * padding - 3) // stride + 1, (w + 2 * padding - 3) // stride + 1
    counts = np.zeros((out_c, oh * ow), np.int64)
    for oy in range(oh):
        for ox in range(ow):
            window = padded[:, oy * stride:oy * stride + 3, ox * stride:ox * stride + 3]
            counts[:, oy * ow + ox] = (weight * window).sum(axis=(1, 2, 3)) \
                + 255 * (weight < 0).sum(axis=(1, 2, 3))
    cw = packing.bitplane_channel_words(channels, lane)
    plane_words = packing.pack_bitplanes(image, lane)
    plane_weights = packing.pack_weights(packing.bitplane_weight_bits(weight, lane), rows,
                                         lane, encoding="bit")
    m_tiles = -(-out_c // rows)
    plane_op = {"channels": cw * lane, "in_h": h, "in_w": w, "channel_words": cw, "kernel": 3,
                "stride": stride, "pad": padding, "k_words": 9 * cw, "m_tiles": m_tiles,
                "out_channels": out_c, "out_plane": oh * ow, "planes": 1, "in_base": 3,
                "weight_base": 2, "out_base": 5}
    binary, bits_words, weight_words, settings = make_layer(rng, rows, cols, lane, 9, 3, 5, 3,
                                                            1, 1, 4)
    binary_op = dict(settings, in_base=3 + len(plane_words),
                     weight_base=2 + len(plane_weights), out_base=5 + out_c * oh * ow)
    bits_init = [0] * BITS_DEPTH
    bits_init[3:3 + len(plane_words) + len(bits_words)] = plane_words + bits_words
    weights_init = [0] * 128
    weights_init[2:2 + len(plane_weights) + len(weight_words)] = plane_weights + weight_words
    config = DeviceConfig(rows=rows, cols=cols, lane=lane, max_depth=8192, weight_depth=128)
    dut = BconvEngine(config, element_width=ELEMENT_WIDTH, int_depth=INT_DEPTH,
                      bits_depth=BITS_DEPTH)
    result = run_ops(dut, bits_init, weights_init, [0] * INT_DEPTH, [plane_op, binary_op])
    got = result["ints"][5:5 + out_c * oh * ow]
    assert got == counts.reshape(-1).tolist()
    start = binary_op["out_base"]
    assert result["ints"][start:start + 4 * settings["out_plane"]] == \
        [v for row in binary for v in row]
    assert result["cycles"] == [
        expected_cycles(op["k_words"], rows, cols, op["m_tiles"], op["out_plane"])
        for op in (plane_op, binary_op)]


def test_cycle_formula_is_near_the_array_bound():
    """The formula's overhead over the array's work is a constant plus <= 2 per row tile."""
    for k_words, rows, cols, m_tiles, out_plane in [(9, 4, 4, 3, 49), (1, 4, 4, 2, 16),
                                                    (27, 8, 8, 8, 196)]:
        n_tiles = -(-out_plane // cols)
        work = m_tiles * n_tiles * max(k_words, rows)
        overhead = expected_cycles(k_words, rows, cols, m_tiles, out_plane) - work
        setup = isa.window_setup_cycles(cols)
        assert 0 < overhead <= setup + 2 * (m_tiles - 1) + 2 * rows + cols + 5


def test_config_layout_follows_the_isa():
    dut = BconvEngine(DeviceConfig(rows=2, cols=4, lane=8))
    assert dut.config_layout.size == sum(width for _, width, _ in isa.BCONV_FIELDS)
    offsets = isa.BitRecord(isa.BCONV_FIELDS).offsets()
    for name, field in dut.config_layout:
        assert (field.offset, field.width, field.shape.signed) == offsets[name]


def test_bad_parameters():
    config = DeviceConfig(rows=2, cols=4, lane=8, max_depth=4096)
    with pytest.raises(ValueError, match=r"element_width must exceed acc_width \(13\), not 13"):
        BconvEngine(config, element_width=13)
    with pytest.raises(ValueError, match="int_depth must be a positive integer, not 0"):
        BconvEngine(config, int_depth=0)


def test_converts_to_rtlil():
    from amaranth.back import rtlil
    assert "module" in rtlil.convert(BconvEngine(DeviceConfig(rows=4, cols=4, lane=32)))


# -- threshold mode: counts straight to bits ----------------------------------------------------

def threshold_bits(counts, thresholds, directions, pool):
    """``(O, pixels)`` bits of a FIXED THRESHOLD of the counts ``(O, OH, OW)``, after a 2x2
    stride-2 max pool (floor) with ``pool``."""
    import numpy as np
    counts = np.asarray(counts)
    if pool:
        o, oh, ow = counts.shape
        ph, pw = oh // 2, ow // 2
        counts = counts[:, :2 * ph, :2 * pw].reshape(o, ph, 2, pw, 2).max(axis=(2, 4))
    flat = counts.reshape(counts.shape[0], -1)
    t = np.asarray(thresholds)[:, None]
    d = np.asarray(directions)[:, None]
    return np.where(d == 0, t != 0, np.where(d > 0, flat >= t, flat <= t))


def check_threshold(rng, rows, cols, lane, c_total, h, w, kernel, stride, padding, out_channels,
                    pool, idle=0, then_ints=False):
    """One threshold op (and optionally a plain op after it on the same engine): the BITS
    words of the output equal a FIXED THRESHOLD's (bits of channels >= out_channels 0), every
    other BITS word and all of INTS untouched, in the documented cycles."""
    import numpy as np
    bits_map = [[[rng.randint(0, 1) for _ in range(w)] for _ in range(h)]
                for _ in range(c_total)]
    weight_bits = [[rng.randint(0, 1) for _ in range(c_total * kernel * kernel)]
                   for _ in range(out_channels)]
    counts = golden_bconv(bits_map, weight_bits, kernel, stride, padding)
    _, oh, ow = counts.shape
    n = c_total * kernel * kernel
    thresholds = [rng.randint(n // 2 - 2, n // 2 + 2) for _ in range(out_channels)]
    directions = [rng.choice([1, 1, -1, -1, 0]) for _ in range(out_channels)]
    for o in range(out_channels):
        if directions[o] == 0:
            thresholds[o] = rng.randint(0, 1)
    if out_channels > 1:                 # the extremes of the compare
        thresholds[0], directions[0] = int(counts[0].max()), 1
        thresholds[-1], directions[-1] = int(counts[-1].min()), -1
    expected_bits = threshold_bits(counts, thresholds, directions, pool)
    pixels = expected_bits.shape[1]
    out_words = -(-out_channels // lane)
    channel_words = -(-c_total // lane)
    k_words = kernel * kernel * channel_words
    weights = packing.pack_weights(
        packing.conv_window_weight_bits(weight_bits, c_total, kernel, lane), rows, lane,
        encoding="bit")
    in_words = pack_map(bits_map, lane, rng)
    in_base = rng.randint(0, 8)
    out_base = in_base + len(in_words) + rng.randint(0, 4)
    assert out_base + pixels * out_words <= BITS_DEPTH
    param_base = rng.randint(0, 8)
    params = [rng.getrandbits(isa.PARAM.width) for _ in range(64)]
    for o in range(out_channels):
        params[param_base + o] = isa.PARAM.pack(in_offset=rng.getrandbits(20),
                                                threshold=thresholds[o],
                                                direction=directions[o], bias=-5)
    op = {"channels": c_total, "in_h": h, "in_w": w, "channel_words": channel_words,
          "kernel": kernel, "stride": stride, "pad": padding, "k_words": k_words,
          "m_tiles": -(-out_channels // rows), "out_channels": out_channels,
          "out_plane": 4 * pixels if pool else pixels, "threshold": 1, "pool": int(pool),
          "out_words": out_words, "param_base": param_base, "in_base": in_base,
          "weight_base": 3, "bits_base": out_base, "out_base": rng.randint(0, 50)}
    config = DeviceConfig(rows=rows, cols=cols, lane=lane, max_depth=1024, weight_depth=128,
                          param_depth=64)
    dut = BconvEngine(config, element_width=ELEMENT_WIDTH, int_depth=INT_DEPTH,
                      bits_depth=BITS_DEPTH)
    bits_init = [rng.getrandbits(lane) for _ in range(BITS_DEPTH)]
    bits_init[in_base:in_base + len(in_words)] = in_words
    weights_init = [rng.getrandbits(rows * lane) for _ in range(128)]
    weights_init[3:3 + len(weights)] = weights
    ints_init = [rng.randint(-3000, 3000) for _ in range(INT_DEPTH)]
    ops = [op]
    if then_ints:
        # A plain op on the same engine afterwards: its counts go to INTS as before.
        ops.append(dict(op, threshold=0, pool=0, out_base=7, out_plane=oh * ow,
                        bits_base=rng.randint(0, 50)))
    result = run_ops(dut, bits_init, weights_init, ints_init, ops, idle=idle,
                     params_init=params)
    expected = list(bits_init)
    for p in range(pixels):
        for wd in range(out_words):
            word = 0
            for b in range(lane):
                c = wd * lane + b
                if c < out_channels and expected_bits[c, p]:
                    word |= 1 << b
            expected[out_base + p * out_words + wd] = word
    for a, (got, want) in enumerate(zip(result["bits"], expected)):
        assert got == want, f"BITS[{a}]: expected {want:#x}, got {got:#x}"
    want_ints = list(ints_init)
    if then_ints:
        flat = np.asarray(counts).reshape(out_channels, -1)
        for o in range(out_channels):
            for q in range(oh * ow):
                want_ints[7 + o * oh * ow + q] = int(flat[o, q])
    assert result["ints"] == want_ints
    want_cycles = [isa.bconv_cycles(rows, cols, k_words, op["m_tiles"], op["out_plane"], 1,
                                    int(pool))]
    if then_ints:
        want_cycles.append(expected_cycles(k_words, rows, cols, op["m_tiles"], oh * ow))
    assert result["cycles"] == want_cycles


# (rows, cols, lane, C, H, W, kernel, stride, padding, out_channels, pool)
THRESHOLD_CASES = [
    # Odd map, C and O not multiples of lane or rows, several row tiles per word.
    (2, 4, 8, 11, 5, 7, 3, 1, 1, 5, False),
    # Two BITS words per pixel (O > lane), a row tile per group of 4 bits.
    (4, 4, 8, 9, 3, 5, 3, 1, 1, 11, False),
    # A 7x7 conv output pooled 2x2 (floor: 3x3), m_tiles > 1.
    (2, 4, 8, 6, 7, 7, 3, 1, 1, 5, True),
    # Pool of a stride-2 conv, O = lane: a word of four row tiles.
    (2, 4, 8, 13, 9, 8, 3, 2, 1, 8, True),
    # Two pooling windows per tile (cols 8), an odd number of windows (last tile half used).
    (8, 8, 16, 5, 6, 5, 3, 1, 1, 12, True),
    # rows = lane: one row tile per word; 1x1 stride 1, k_words < rows.
    (8, 4, 8, 7, 3, 3, 1, 1, 0, 10, False),
    # cols 3 (no pool possible), rows 1.
    (1, 3, 4, 5, 3, 4, 3, 1, 0, 6, False),
]


@pytest.mark.parametrize("rows,cols,lane,c_total,h,w,kernel,stride,padding,out_channels,pool",
                         THRESHOLD_CASES)
def test_threshold_to_bits(rows, cols, lane, c_total, h, w, kernel, stride, padding,
                           out_channels, pool):
    rng = random.Random(rows * 1000 + cols * 100 + c_total * 10 + h + pool)
    check_threshold(rng, rows, cols, lane, c_total, h, w, kernel, stride, padding,
                    out_channels, pool, idle=rng.randint(0, 2), then_ints=True)


def test_threshold_random_layers():
    rng = random.Random(77)
    for _ in range(4):
        rows, cols, lane = rng.choice([(2, 4, 8), (4, 4, 16), (4, 8, 8), (1, 4, 4)])
        # The words of a tile leave one per cycle before the next tile's: at most rows
        # (sw.isa: bconv_bits_words(cols, pool) <= max(k_words, rows)).
        pool = rng.random() < 0.6 or cols > rows
        kernel, stride, padding = rng.choice([(3, 1, 1), (3, 2, 1), (1, 1, 0), (3, 1, 0)])
        h, w = rng.randint(4 if pool else 1, 7), rng.randint(4 if pool else 1, 7)
        if kernel == 3 and padding == 0:
            h, w = max(h, 5 if pool else 3), max(w, 5 if pool else 3)
        if pool and stride == 2:
            h, w = max(h, 6), max(w, 6)
        check_threshold(rng, rows, cols, lane, rng.randint(1, 2 * lane + 1), h, w, kernel,
                        stride, padding, rng.randint(1, 3 * rows + 1), pool)
