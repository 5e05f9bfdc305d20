"""amaranth.sim tests of the XNOR-popcount systolic array against a Python model."""

import random

import numpy as np
import pytest
from amaranth.sim import Simulator

from hw.array import XnorArray, plane_popcount, popcount
from sw import packing


def word_count(w, a, lane, planes=False):
    """One word's count: the popcount of xnor(w, a), or in bit-plane mode the sum over the
    eight groups of lane / 8 bits of 2**group times the group's popcount."""
    agree = ~(w ^ a) & ((1 << lane) - 1)
    if not planes:
        return agree.bit_count()
    g = lane // 8
    return sum(((agree >> (b * g)) & ((1 << g) - 1)).bit_count() << b for b in range(8))


def reference_tile(weights, activations, lane, planes=False):
    """Counts of one tile: weights[r][k], activations[c][k] are lists of lane-words (ints)."""
    return [[sum(word_count(w, a, lane, planes) for w, a in zip(weights[r], activations[c]))
             for c in range(len(activations))] for r in range(len(weights))]


def random_tiles(rng, rows, cols, lane, count, max_words):
    tiles = []
    for _ in range(count):
        words = rng.randint(1, max_words)
        weights = [[rng.getrandbits(lane) for _ in range(words)] for _ in range(rows)]
        activations = [[rng.getrandbits(lane) for _ in range(words)] for _ in range(cols)]
        tiles.append((weights, activations))
    return tiles


def run_array(rows, cols, lane, tiles, gap_probability=0.0, seed=0, max_depth=None,
              planes=None):
    """Stream ``tiles`` through an array and return (results per tile, cycles, stalls).

    ``planes``: one bit-plane mode flag per tile (default all 0). The producer waits for a
    tile's results before it sends a tile of another mode (the array's contract)."""
    max_depth = max_depth or lane * max(len(t[0][0]) for t in tiles)
    planes = planes or [False] * len(tiles)
    dut = XnorArray(rows, cols, lane, max_depth)
    rng = random.Random(seed)
    results = []
    stats = {"cycles": 0, "stalls": 0}

    async def producer(ctx):
        for index, (weights, activations) in enumerate(tiles):
            if index and planes[index] != planes[index - 1]:
                while len(results) < index:
                    await ctx.tick()
            ctx.set(dut.i.payload.planes, planes[index])
            words = len(weights[0])
            for k in range(words):
                while rng.random() < gap_probability:
                    ctx.set(dut.i.valid, 0)
                    await ctx.tick()
                ctx.set(dut.i.payload.weights,
                        sum(weights[r][k] << (r * lane) for r in range(rows)))
                ctx.set(dut.i.payload.activations,
                        sum(activations[c][k] << (c * lane) for c in range(cols)))
                ctx.set(dut.i.payload.first, k == 0)
                ctx.set(dut.i.payload.last, k == words - 1)
                ctx.set(dut.i.valid, 1)
                await ctx.tick().until(dut.i.ready)
                ctx.set(dut.i.valid, 0)
        ctx.set(dut.i.valid, 0)

    async def consumer(ctx):
        cycle = 0
        tile = []
        while len(results) < len(tiles):
            await ctx.tick()
            cycle += 1
            if ctx.get(dut.i.valid) and not ctx.get(dut.i.ready):
                stats["stalls"] += 1
            if ctx.get(dut.o.valid):
                row = ctx.get(dut.o.payload.row)
                assert row == len(tile), f"cycle {cycle}: row {row}, expected {len(tile)}"
                tile.append([ctx.get(dut.o.payload.counts[c]) for c in range(cols)])
                if len(tile) == rows:
                    results.append(tile)
                    tile = []
            assert cycle < 100_000, "array produced no results"
        stats["cycles"] = cycle

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(producer)
    sim.add_testbench(consumer)
    sim.run()
    return results, stats


def check(rows, cols, lane, tiles, results, planes=None):
    assert len(results) == len(tiles)
    planes = planes or [False] * len(tiles)
    for t, ((weights, activations), got) in enumerate(zip(tiles, results)):
        expected = reference_tile(weights, activations, lane, planes[t])
        for r in range(rows):
            for c in range(cols):
                assert got[r][c] == expected[r][c], (
                    f"tile {t} ({len(weights[0])} words) PE ({r}, {c}): "
                    f"expected {expected[r][c]}, got {got[r][c]}")


@pytest.mark.parametrize("rows,cols,lane", [(1, 1, 1), (2, 3, 8), (4, 4, 32), (3, 2, 5),
                                            (5, 1, 7), (1, 6, 16)])
@pytest.mark.parametrize("gaps", [0.0, 0.3])
def test_random_tiles(rows, cols, lane, gaps):
    rng = random.Random(rows * 1000 + cols * 10 + lane)
    tiles = random_tiles(rng, rows, cols, lane, count=12, max_words=2 * rows + 3)
    results, _ = run_array(rows, cols, lane, tiles, gap_probability=gaps, seed=lane)
    check(rows, cols, lane, tiles, results)


def test_edge_values():
    """All-agree, all-disagree and one-word tiles hit the extremes of the counts."""
    rows, cols, lane, words = 2, 2, 8, 3
    ones = (1 << lane) - 1
    tiles = [
        ([[ones] * words] * rows, [[ones] * words] * cols),      # every bit agrees: 24
        ([[0] * words] * rows, [[ones] * words] * cols),         # none agrees: 0
        ([[0] * words] * rows, [[0] * words] * cols),            # -1 * -1 agrees too: 24
        ([[0x5A]] * rows, [[0xA5]] * cols),                      # single-word tile
    ]
    results, _ = run_array(rows, cols, lane, tiles, max_depth=lane * words)
    check(rows, cols, lane, tiles, results)
    assert results[0][0][0] == lane * words and results[1][0][0] == 0


def test_full_rate_without_stalls():
    """Tiles of at least `rows` words stream back to back with `ready` never low."""
    rows, cols, lane = 4, 3, 8
    rng = random.Random(7)
    tiles = [random_tiles(rng, rows, cols, lane, 1, rows)[0] for _ in range(6)]
    tiles = [(w, a) for w, a in tiles if len(w[0]) >= rows] or tiles[:1]
    tiles = [([row + [0] * (rows - len(row)) for row in w],
              [col + [0] * (rows - len(col)) for col in a]) for w, a in tiles]
    results, stats = run_array(rows, cols, lane, tiles)
    check(rows, cols, lane, tiles, results)
    assert stats["stalls"] == 0


def test_short_tiles_are_throttled_not_lost():
    """One-word tiles on a 4-row array must wait for the result chain, and all arrive."""
    rows, cols, lane = 4, 2, 4
    rng = random.Random(3)
    tiles = random_tiles(rng, rows, cols, lane, count=10, max_words=1)
    results, stats = run_array(rows, cols, lane, tiles)
    check(rows, cols, lane, tiles, results)
    assert stats["stalls"] > 0


def test_popcount_expression():
    from amaranth import Module, Signal
    m = Module()
    value = Signal(13)
    count = Signal(4)
    m.d.comb += count.eq(popcount(value))
    sim = Simulator(m)

    async def tb(ctx):
        for x in [0, 1, 0x1FFF, 0x1555, 0x0AAA] + [random.Random(1).getrandbits(13)]:
            ctx.set(value, x)
            assert ctx.get(count) == x.bit_count(), f"popcount({x:#x})"

    sim.add_testbench(tb)
    sim.run()


@pytest.mark.parametrize("rows,cols,lane", [(2, 3, 8), (3, 2, 16), (4, 4, 32)])
def test_bitplane_random_tiles(rows, cols, lane):
    """Bit-plane mode: each word adds sum_b 2**b * popcount of its group b (seeded random)."""
    rng = random.Random(100 + lane)
    tiles = random_tiles(rng, rows, cols, lane, count=8, max_words=rows + 3)
    max_depth = 255 * (lane // 8) * (rows + 3)          # the largest count fits
    results, _ = run_array(rows, cols, lane, tiles, gap_probability=0.2, seed=lane,
                           max_depth=max_depth, planes=[True] * len(tiles))
    check(rows, cols, lane, tiles, results, planes=[True] * len(tiles))


def test_bitplane_edges_and_mode_changes():
    """All-agree and all-disagree words, one group at a time, and tiles alternating between
    the modes (each after the previous tile's results: the array's contract)."""
    rows, cols, lane = 2, 2, 16
    ones = (1 << lane) - 1
    group = [0x3 << (2 * b) for b in range(8)]                # each plane group of g = 2 bits
    tiles = [
        ([[ones] * 3] * rows, [[ones] * 3] * cols),           # everything agrees: 3 * 255 * 2
        ([[0] * 3] * rows, [[ones] * 3] * cols),              # nothing agrees: 0
        ([[0] * 2] * rows, [[0] * 2] * cols),                 # -1 * -1 agrees: 2 * 510
        ([group[:2]] * rows, [[ones, ones]] * cols),          # planes 0 and 1: 2 + 4
        ([[group[7]]] * rows, [[ones]] * cols),               # plane 7 alone: 2 * 128
        ([[0x5A5A]] * rows, [[0xA5A5]] * cols),               # single word, nothing agrees
    ]
    modes = [True, True, False, True, True, False]
    results, _ = run_array(rows, cols, lane, tiles, max_depth=255 * 2 * 3, planes=modes)
    check(rows, cols, lane, tiles, results, planes=modes)
    assert [results[t][0][0] for t in range(len(tiles))] == [1530, 0, 32, 6, 256, 0]


@pytest.mark.parametrize("lane", [8, 16, 32])
def test_bitplane_counts_are_dot_products_plus_255_negatives(lane):
    """Pixels packed by sw.packing.pack_bitplanes against +-1 weights packed by
    bitplane_weight_bits: every count is dot(w, x) + 255 * n_neg(w), for channel counts 1..g,
    g + 1 and several words, with the extreme pixels 0 and 255 among random ones."""
    g = lane // 8
    rows, cols = 2, 3
    rng = np.random.default_rng(lane)
    tiles, expected = [], []
    for channels in sorted({1, g // 2 + 1, g, g + 1, 3 * g - 1}):
        x = rng.integers(0, 256, (cols, channels))
        x[0, :] = 255
        x[1, 0] = 0
        w = rng.choice([-1, 1], (rows, channels))
        w[0, :] = -1
        activations = [packing.pack_bitplanes(x[c].reshape(channels, 1, 1), lane)
                       for c in range(cols)]
        bits = packing.bitplane_weight_bits(w.reshape(rows, channels, 1, 1), lane)
        words = bits.shape[1] // lane
        weights = [[int(sum(int(bits[r, k * lane + i]) << i for i in range(lane)))
                    for k in range(words)] for r in range(rows)]
        tiles.append((weights, activations))
        expected.append((w @ x.T + 255 * (w < 0).sum(axis=1)[:, None]).tolist())
    results, _ = run_array(rows, cols, lane, tiles, max_depth=255 * 3 * g,
                           planes=[True] * len(tiles))
    assert results == expected


def test_planes_are_ignored_without_whole_plane_groups():
    """A lane that is not a multiple of 8 has no bit-plane mode: the counts stay popcounts."""
    rng = random.Random(5)
    tiles = random_tiles(rng, 2, 2, 5, count=4, max_words=3)
    results, _ = run_array(2, 2, 5, tiles, planes=[True] * len(tiles))
    check(2, 2, 5, tiles, results)
    assert not XnorArray(2, 2, 5, 15).supports_planes and XnorArray(2, 2, 16, 32).supports_planes


def test_plane_popcount_expression():
    from amaranth import Module, Signal
    m = Module()
    value, mode = Signal(24), Signal()
    count = Signal(16)
    m.d.comb += count.eq(plane_popcount(value, mode))
    sim = Simulator(m)
    rng = random.Random(2)

    async def tb(ctx):
        for x in [0, 0xFFFFFF, 0x800000, 0x000007, 0xE00000, 0x555555] + \
                [rng.getrandbits(24) for _ in range(20)]:
            for planes in (0, 1):
                ctx.set(value, x)
                ctx.set(mode, planes)
                # word_count counts the agreements of xnor(w, a): w = x, a = all ones.
                assert ctx.get(count) == word_count(x, 0xFFFFFF, 24, planes), (x, planes)

    sim.add_testbench(tb)
    sim.run()
    with pytest.raises(ValueError, match="not 8 bit-plane groups"):
        plane_popcount(Signal(12), mode)


@pytest.mark.filterwarnings("ignore::amaranth.hdl.UnusedElaboratable")
@pytest.mark.parametrize("kwargs,message", [
    ({"rows": 0, "cols": 1, "lane": 1, "max_depth": 1}, "rows must be a positive integer, not 0"),
    ({"rows": 1, "cols": 1, "lane": 2.5, "max_depth": 4}, "lane must be a positive integer, not 2.5"),
])
def test_bad_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        XnorArray(**kwargs)
