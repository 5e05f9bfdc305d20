"""amaranth.sim tests of the window generator: its words, fed to a model of the XNOR array,
give the golden model's ``bconv`` counts exactly."""

import random

import pytest
from amaranth import Elaboratable, Module
from amaranth.lib import memory
from amaranth.sim import Simulator
from bitmaps import golden_bconv, pack_map

from hw.conv_window import ConvWindow
from sw import packing


def pack_weights(weight_bits, c_total, kernel, lane):
    """Per output channel, the K words in the documented order (0 bits for c >= C)."""
    words = (c_total + lane - 1) // lane
    kk = kernel * kernel
    packed = []
    for row in weight_bits:
        ws = []
        for pos in range(kk):
            for cw in range(words):
                word = 0
                for b in range(lane):
                    c = cw * lane + b
                    if c < c_total:
                        word |= int(row[c * kk + pos]) << b
                ws.append(word)
        packed.append(ws)
    return packed


def test_sw_packing_matches_the_documented_order():
    """sw.packing.conv_window_weight_bits + pack_weights give the words written out above."""
    rng = random.Random(7)
    for c_total, kernel, lane, out_c, rows in [(5, 3, 4, 3, 2), (8, 1, 8, 4, 4), (13, 3, 8, 5, 3)]:
        bits = [[rng.randint(0, 1) for _ in range(c_total * kernel * kernel)]
                for _ in range(out_c)]
        expected = pack_weights(bits, c_total, kernel, lane)
        reordered = packing.conv_window_weight_bits(bits, c_total, kernel, lane)
        words = packing.pack_weights(reordered, rows, lane, encoding="bit")
        k_words = len(expected[0])
        for o in range(out_c):
            mt, r = divmod(o, rows)
            for kw in range(k_words):
                got = words[mt * k_words + kw] >> (r * lane) & ((1 << lane) - 1)
                assert got == expected[o][kw], f"o={o} kw={kw}"


class Harness(Elaboratable):
    """The window with a memory of ``len(init)`` words (at least ``dut.depth``) on its read
    ports."""

    def __init__(self, dut, init):
        self.dut = dut
        self.init = init

    def elaborate(self, platform):
        m = Module()
        m.submodules.dut = dut = self.dut
        depth = max(dut.depth, len(self.init))
        m.submodules.mem = mem = memory.Memory(shape=dut.lane, depth=depth, init=self.init)
        for c in range(dut.cols):
            port = mem.read_port(domain="sync")
            m.d.comb += [port.addr.eq(dut.rd[c].addr), port.en.eq(dut.rd[c].en),
                         dut.rd[c].data.eq(port.data)]
        return m


def run_pass(dut, init, config, stall, seed, passes=1):
    """Start ``passes`` passes one after the other; return the accepted beats of each pass
    (a list when ``passes > 1``) and the cycles (from start) the last one took."""
    runs = []
    stats = {}

    async def bench(ctx):
        rng = random.Random(seed)
        # First a different config (as the previous op's), then the pass's: a new config
        # needs SETUP_CYCLES cycles before the first start.
        decoy = {"base": 5, "height": dut.max_height, "width": dut.max_width,
                 "channels": dut.max_channel_words * dut.lane,
                 "channel_words": dut.max_channel_words, "kernel": 3, "stride": 2, "padding": 1,
                 "pool": int(dut.pool_capable and not config.get("pool", 0))}
        config.setdefault("base", 0)
        config.setdefault("pool", 0)
        for settings in (decoy, config):
            for name, value in settings.items():
                ctx.set(getattr(dut.config, name), value)
            await ctx.tick().repeat(dut.SETUP_CYCLES)
        for _ in range(passes):
            beats = []
            ctx.set(dut.start, 1)
            await ctx.tick()
            ctx.set(dut.start, 0)
            cycles = 0
            while True:
                ready = rng.random() >= stall
                ctx.set(dut.o.ready, ready)
                *_, valid, act, first, last, busy = await ctx.tick().sample(
                    dut.o.valid, dut.o.payload.activations, dut.o.payload.first,
                    dut.o.payload.last, dut.busy)
                cycles += 1
                if valid and ready:
                    beats.append((int(act), int(first), int(last)))
                if not busy and not valid and cycles > 2:
                    break
                assert cycles < 100000
            stats["cycles"] = cycles
            runs.append(beats)
            for _ in range(4):                               # nothing more after the pass
                assert not ctx.get(dut.o.valid)
                await ctx.tick()

    sim = Simulator(Harness(dut, init))
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()
    return (runs if passes > 1 else runs[0]), stats


def array_counts(beats, weights, cols, lane, n_pixels):
    """Model of XnorArray: per tile (first..last), per column, popcount(xnor) over K."""
    mask = (1 << lane) - 1
    k_words = len(weights[0])
    counts = {}
    tile = []
    tiles = 0
    for act, first, last in beats:
        assert bool(first) == (not tile)
        tile.append(act)
        if last:
            assert len(tile) == k_words
            for c in range(cols):
                n = tiles * cols + c
                if n >= n_pixels:
                    continue
                for o, ws in enumerate(weights):
                    counts[(o, n)] = sum(
                        (~(w ^ (a >> (c * lane))) & mask).bit_count()
                        for w, a in zip(ws, tile))
            tiles += 1
            tile = []
    assert not tile
    return counts, tiles


CASES = [
    # (kernel, stride, padding, cols, lane, C, H, W)
    (3, 1, 1, 4, 8, 11, 5, 7),
    (3, 2, 1, 3, 8, 13, 7, 5),
    (1, 1, 0, 4, 4, 6, 3, 5),
    (1, 2, 0, 2, 4, 7, 5, 7),
    (3, 1, 0, 5, 4, 5, 5, 3),
    (3, 2, 0, 4, 8, 8, 7, 7),
    (3, 1, 1, 8, 4, 3, 1, 3),        # more columns than output pixels per row
    (3, 2, 1, 4, 4, 5, 5, 1),        # one output pixel per row: every column wraps
    (1, 1, 0, 3, 8, 20, 4, 1),
]


def check_layer(rng, kernel, stride, padding, cols, lane, c_total, h, w, stall=0.4):
    out_channels = rng.randint(1, 5)
    bits = [[[rng.randint(0, 1) for _ in range(w)] for _ in range(h)] for _ in range(c_total)]
    weight_bits = [[rng.randint(0, 1) for _ in range(c_total * kernel * kernel)]
                   for _ in range(out_channels)]
    expected = golden_bconv(bits, weight_bits, kernel, stride, padding)
    _, oh, ow = expected.shape

    words = (c_total + lane - 1) // lane
    # The map at a random base, after words of random bits the window must not read.
    base = rng.randint(0, 40)
    dut = ConvWindow(cols, lane, max_width=8, max_height=8, max_channel_words=words + 1,
                     addr_width=10)
    init = [rng.getrandbits(lane) for _ in range(base)] + pack_map(bits, lane, rng)
    config = {"base": base, "height": h, "width": w, "channels": c_total, "channel_words": words,
              "kernel": kernel, "stride": stride, "padding": padding}
    beats, _ = run_pass(dut, init, config, stall=stall, seed=rng.randint(0, 1 << 30))
    counts, tiles = array_counts(beats, pack_weights(weight_bits, c_total, kernel, lane),
                                 cols, lane, oh * ow)
    assert tiles == -(-oh * ow // cols)
    for o in range(out_channels):
        for n in range(oh * ow):
            assert counts[(o, n)] == int(expected[o, n // ow, n % ow]), (o, n)


@pytest.mark.parametrize("kernel,stride,padding,cols,lane,c_total,h,w", CASES)
def test_counts_match_golden_bconv(kernel, stride, padding, cols, lane, c_total, h, w):
    rng = random.Random(kernel * 1000 + stride * 100 + padding * 10 + cols + c_total)
    check_layer(rng, kernel, stride, padding, cols, lane, c_total, h, w)


@pytest.mark.parametrize("kernel,stride,padding", [(3, 1, 1), (3, 2, 1), (1, 1, 0), (1, 2, 0)])
def test_random_layers(kernel, stride, padding):
    """Seeded random odd-sized maps, C not a multiple of lane, random backpressure."""
    rng = random.Random(kernel * 10 + stride)
    for _ in range(6):
        lane = rng.choice([2, 4, 8])
        c_total = rng.randint(1, 3 * lane)
        if c_total % lane == 0:
            c_total += 1
        h, w = rng.choice([1, 3, 5, 7]), rng.choice([1, 3, 5, 7])
        if kernel == 3 and padding == 0:
            h, w = max(h, 3), max(w, 3)
        check_layer(rng, kernel, stride, padding, rng.randint(1, 6), lane, c_total, h, w,
                    stall=rng.choice([0.0, 0.3, 0.7]))


def test_full_rate():
    """With ready always high: one beat per cycle, no gaps between tiles."""
    rng = random.Random(5)
    c_total, h, w, lane, cols = 9, 5, 5, 4, 4
    bits = [[[rng.randint(0, 1) for _ in range(w)] for _ in range(h)] for _ in range(c_total)]
    dut = ConvWindow(cols, lane, max_width=5, max_height=5, max_channel_words=3)
    config = {"height": h, "width": w, "channels": c_total, "channel_words": 3,
              "kernel": 3, "stride": 1, "padding": 1}
    beats, stats = run_pass(dut, pack_map(bits, lane, rng), config, stall=0.0, seed=0)
    expected = -(-25 // cols) * 9 * 3
    assert len(beats) == expected
    # Valid from the second sampled edge after start on, every cycle, then the loop's stop
    # cycle.
    assert stats["cycles"] == expected + 2


def test_passes_repeat():
    """A second start (as for the next row tile of the weights) replays the same words."""
    rng = random.Random(9)
    c_total, h, w, lane, cols = 5, 3, 5, 4, 3
    bits = [[[rng.randint(0, 1) for _ in range(w)] for _ in range(h)] for _ in range(c_total)]
    dut = ConvWindow(cols, lane, max_width=5, max_height=3, max_channel_words=2)
    config = {"height": h, "width": w, "channels": c_total, "channel_words": 2,
              "kernel": 3, "stride": 2, "padding": 1}
    runs, _ = run_pass(dut, pack_map(bits, lane, rng), config, stall=0.5, seed=3, passes=3)
    assert len(runs[0]) == 2 * 9 * 2
    assert runs[0] == runs[1] == runs[2]


def pool_order(n, cols, pw):
    """The conv pixel ``(y, x)`` that traversal index ``n`` of a pool-mode pass visits: tile
    ``t = n // cols``, column ``c``: pixel ``c % 4`` of pooling window ``t * cols // 4 + c // 4``
    (windows in raster order over ``(OH // 2, OW // 2)``)."""
    t, c = divmod(n, cols)
    py, px = divmod(t * (cols // 4) + c // 4, pw)
    dy, dx = divmod(c % 4, 2)
    return 2 * py + dy, 2 * px + dx


# (kernel, stride, padding, cols, lane, C, H, W): odd conv outputs (floor pooling), stride 2,
# windows per tile 1 and 2 (cols 4 and 8), one window per row, a last partial tile.
POOL_CASES = [
    (3, 1, 1, 4, 8, 11, 7, 5),
    (3, 1, 0, 4, 4, 5, 9, 8),
    (3, 2, 1, 4, 8, 13, 9, 7),
    (1, 1, 0, 8, 4, 6, 5, 7),
    (3, 1, 1, 8, 4, 3, 6, 3),
    (1, 2, 0, 8, 4, 7, 7, 9),
]


@pytest.mark.parametrize("kernel,stride,padding,cols,lane,c_total,h,w", POOL_CASES)
def test_pool_order(kernel, stride, padding, cols, lane, c_total, h, w):
    """With ``pool`` the window visits the conv pixels that a 2x2 stride-2 pool (floor) reads,
    four per pooling window, windows in raster order; each count is the golden count."""
    rng = random.Random(kernel * 100 + cols * 10 + h)
    out_channels = rng.randint(1, 4)
    bits = [[[rng.randint(0, 1) for _ in range(w)] for _ in range(h)] for _ in range(c_total)]
    weight_bits = [[rng.randint(0, 1) for _ in range(c_total * kernel * kernel)]
                   for _ in range(out_channels)]
    expected = golden_bconv(bits, weight_bits, kernel, stride, padding)
    _, oh, ow = expected.shape
    ph, pw = oh // 2, ow // 2
    words = (c_total + lane - 1) // lane
    base = rng.randint(0, 40)
    dut = ConvWindow(cols, lane, max_width=9, max_height=9, max_channel_words=words + 1,
                     addr_width=10)
    init = [rng.getrandbits(lane) for _ in range(base)] + pack_map(bits, lane, rng)
    config = {"base": base, "height": h, "width": w, "channels": c_total, "channel_words": words,
              "kernel": kernel, "stride": stride, "padding": padding, "pool": 1}
    beats, _ = run_pass(dut, init, config, stall=0.3, seed=rng.randint(0, 1 << 30))
    n_pixels = 4 * ph * pw
    counts, tiles = array_counts(beats, pack_weights(weight_bits, c_total, kernel, lane),
                                 cols, lane, n_pixels)
    assert tiles == -(-n_pixels // cols)
    for o in range(out_channels):
        for n in range(n_pixels):
            y, x = pool_order(n, cols, pw)
            assert counts[(o, n)] == int(expected[o, y, x]), (o, n, y, x)


def test_bad_parameters():
    with pytest.raises(ValueError, match="must be a positive integer"):
        ConvWindow(0, 8, 4, 4, 1)


def test_converts_to_rtlil():
    from amaranth.back import rtlil
    assert "module" in rtlil.convert(ConvWindow(8, 32, 32, 32, 8))
