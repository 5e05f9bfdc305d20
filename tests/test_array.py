"""amaranth.sim tests of the XNOR-popcount systolic array against a Python model."""

import random

import pytest
from amaranth.sim import Simulator

from hw.array import XnorArray, popcount


def reference_tile(weights, activations, lane):
    """Counts of one tile: weights[r][k], activations[c][k] are lists of lane-words (ints)."""
    mask = (1 << lane) - 1
    return [[sum((~(w ^ a) & mask).bit_count() for w, a in zip(weights[r], activations[c]))
             for c in range(len(activations))] for r in range(len(weights))]


def random_tiles(rng, rows, cols, lane, count, max_words):
    tiles = []
    for _ in range(count):
        words = rng.randint(1, max_words)
        weights = [[rng.getrandbits(lane) for _ in range(words)] for _ in range(rows)]
        activations = [[rng.getrandbits(lane) for _ in range(words)] for _ in range(cols)]
        tiles.append((weights, activations))
    return tiles


def run_array(rows, cols, lane, tiles, gap_probability=0.0, seed=0, max_depth=None):
    """Stream ``tiles`` through an array and return (results per tile, cycles, stalls)."""
    max_depth = max_depth or lane * max(len(t[0][0]) for t in tiles)
    dut = XnorArray(rows, cols, lane, max_depth)
    rng = random.Random(seed)
    results = []
    stats = {"cycles": 0, "stalls": 0}

    async def producer(ctx):
        for weights, activations in tiles:
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


def check(rows, cols, lane, tiles, results):
    assert len(results) == len(tiles)
    for t, ((weights, activations), got) in enumerate(zip(tiles, results)):
        expected = reference_tile(weights, activations, lane)
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


@pytest.mark.filterwarnings("ignore::amaranth.hdl.UnusedElaboratable")
@pytest.mark.parametrize("kwargs,message", [
    ({"rows": 0, "cols": 1, "lane": 1, "max_depth": 1}, "rows must be a positive integer, not 0"),
    ({"rows": 1, "cols": 1, "lane": 2.5, "max_depth": 4}, "lane must be a positive integer, not 2.5"),
])
def test_bad_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        XnorArray(**kwargs)
