"""cocotb testbench: the XNOR-popcount systolic array (:class:`hw.array.XnorArray`) against PyTorch.

The toplevel is ``tests.test_cocotb_array.ArrayHarness``: the array with flat ports ``i_weights``,
``i_activations``, ``i_first``, ``i_last``, ``i_valid``, ``i_ready``, ``o_valid``, ``o_row`` and
``o_counts__<c>``. Parameters (see :func:`sim.runner.parameters`): ``rows``, ``cols``, ``lane``,
``max_depth`` (the build), ``seed`` and ``tiles`` (tiles per random test). Run it with
``tests/test_cocotb_array.py``, or by hand::

    python -m sim.runner tests.test_cocotb_array:ArrayHarness sim.tb_array \\
        -p rows=3 -p cols=5 -p lane=8 -p max_depth=96 -t seed=1 -t tiles=24

Every tile is a random +1/-1 weight block ``W`` (rows x K) and activation block ``A``
(K x cols), packed into the array's beats with :func:`sw.packing.pack_weights` and
:func:`sw.packing.pack_activations` (so a K that is not a multiple of ``lane`` is padded the way
the device's memories are: weights with 0 bits, activations with 1 bits). The reference is
``(W @ A + K) / 2`` computed by torch in int64.

Every test drives and watches the array cycle by cycle (inputs set after the falling edge,
everything sampled in the read-only phase that follows) and checks, on every cycle:

* ``i_ready`` exactly as documented: low only while a ``last`` beat is offered less than
  ``rows`` cycles after the previous accepted ``last`` beat;
* every output beat: ``o_row`` counts 0 .. rows-1 on consecutive cycles, the counts equal the
  torch reference of the tile, and row 0 appears exactly ``rows + cols + 2`` cycles after the
  tile's ``last`` beat was accepted (the documented latency);
* no output beat other than the expected ones, including for a while after the last tile.

The speed of the simulation is written to ``speed.json`` in the build directory.
"""

import dataclasses
import random
import time

import cocotb
import torch
from cocotb.clock import Clock
from cocotb.triggers import FallingEdge, ReadOnly, with_timeout

from sim.runner import parameters
from sim.tb_uart import record_speed
from sw.packing import pack_activations, pack_weights

PERIOD_NS = 10


@dataclasses.dataclass
class Tile:
    """One tile: its lane-words as the array takes them and the expected counts."""
    K: int
    weights: list       # k_words words of rows * lane bits
    activations: list   # k_words words of cols * lane bits
    expected: list      # rows lists of cols counts

    @property
    def words(self):
        return len(self.weights)


def make_tile(W, A):
    """The tile of +1/-1 tensors ``W`` (rows x K) and ``A`` (K x cols)."""
    p = parameters()
    K = W.shape[1]
    expected = (W.to(torch.int64) @ A.to(torch.int64) + K) // 2
    return Tile(K=K, weights=pack_weights(W, p["rows"], p["lane"]),
                activations=pack_activations(A, p["cols"], p["lane"]),
                expected=expected.tolist())


def random_tile(generator, K):
    p = parameters()
    W = torch.randint(0, 2, (p["rows"], K), generator=generator) * 2 - 1
    A = torch.randint(0, 2, (K, p["cols"]), generator=generator) * 2 - 1
    return make_tile(W, A)


def random_depth(rng, low_words=1, high_words=None):
    """A random K in ``low_words .. high_words`` lane-words, often not a multiple of lane."""
    p = parameters()
    high_words = min(high_words or p["max_depth"] // p["lane"], p["max_depth"] // p["lane"])
    words = rng.randint(low_words, high_words)
    if rng.random() < 0.3:
        return words * p["lane"]                    # a whole number of words
    return rng.randint((words - 1) * p["lane"] + 1, words * p["lane"])


async def setup(dut):
    """Start the clock and reset the array, so that a test starts from an empty pipeline even
    after a test that failed with tiles in flight."""
    Clock(dut.clk, PERIOD_NS, unit="ns").start()
    dut.rst.value = 1
    dut.i_valid.value = 0
    dut.i_first.value = 0
    dut.i_last.value = 0
    dut.i_weights.value = 0
    dut.i_activations.value = 0
    for _ in range(2):
        await FallingEdge(dut.clk)
    dut.rst.value = 0
    await FallingEdge(dut.clk)


@dataclasses.dataclass
class StreamStats:
    cycles: int = 0         # from the first cycle to the last expected output beat
    accepted: int = 0       # beats accepted
    stalls: int = 0         # cycles with i_valid high and i_ready low
    gaps: int = 0           # cycles with i_valid low before the last beat was accepted
    last_accepted: list = dataclasses.field(default_factory=list)   # cycle of each tile's last


async def _stream(dut, tiles, rng, gap_probability, max_gap, quiet_cycles):
    p = parameters()
    rows, cols = p["rows"], p["cols"]
    latency = rows + cols + 2
    counts_ports = [getattr(dut, f"o_counts__{c}") for c in range(cols)]
    beats = [(tile.weights[k], tile.activations[k], k == 0, k == tile.words - 1, index)
             for index, tile in enumerate(tiles) for k in range(tile.words)]
    stats = StreamStats()
    next_beat, presenting, idle = 0, False, 0
    previous_last = None
    out_tile, out_row = 0, 0
    cycle, finished = 0, None
    while finished is None or cycle < finished + quiet_cycles:
        await FallingEdge(dut.clk)
        cycle += 1
        if not presenting and next_beat < len(beats):
            if idle:
                idle -= 1
            elif rng.random() < gap_probability:
                idle = rng.randint(1, max_gap) - 1
            else:
                weights, activations, first, last, _ = beats[next_beat]
                dut.i_weights.value = weights
                dut.i_activations.value = activations
                dut.i_first.value = int(first)
                dut.i_last.value = int(last)
                presenting = True
        dut.i_valid.value = int(presenting)
        await ReadOnly()

        if presenting:
            last, index = beats[next_beat][3], beats[next_beat][4]
            ready = int(dut.i_ready.value)
            expected_ready = (not last or previous_last is None
                              or cycle - previous_last >= rows)
            since = ("no last beat accepted before" if previous_last is None else
                     f"{cycle - previous_last} cycles after the previous last beat was accepted")
            assert ready == expected_ready, (
                f"cycle {cycle}: i_ready is {ready} for {'the last' if last else 'a'} beat of "
                f"tile {index}, {since}; expected {int(expected_ready)}")
            if ready:
                stats.accepted += 1
                next_beat += 1
                presenting = False
                if last:
                    previous_last = cycle
                    stats.last_accepted.append(cycle)
            else:
                stats.stalls += 1
        elif next_beat < len(beats):
            stats.gaps += 1

        if int(dut.o_valid.value):
            row = int(dut.o_row.value)
            assert out_tile < len(tiles), (
                f"cycle {cycle}: unexpected output beat (row {row}) after all {len(tiles)} "
                f"tiles were delivered")
            assert out_tile < len(stats.last_accepted), (
                f"cycle {cycle}: output beat (row {row}) for tile {out_tile} before its last "
                f"beat was accepted")
            assert row == out_row, (
                f"cycle {cycle}: tile {out_tile}: o_row is {row}, expected {out_row}")
            due = stats.last_accepted[out_tile] + latency + row
            assert cycle == due, (
                f"tile {out_tile} row {row} came out at cycle {cycle}, expected {due} "
                f"(rows + cols + 2 = {latency} cycles after the last beat was accepted at "
                f"cycle {stats.last_accepted[out_tile]}, plus the row)")
            counts = [int(port.value) for port in counts_ports]
            tile = tiles[out_tile]
            assert counts == tile.expected[row], (
                f"tile {out_tile} (K={tile.K}, {tile.words} words) row {row}: counts "
                f"{counts}, torch reference {tile.expected[row]}")
            out_row += 1
            if out_row == rows:
                out_tile, out_row = out_tile + 1, 0
                if out_tile == len(tiles):
                    finished = stats.cycles = cycle
        elif out_row:
            raise AssertionError(f"cycle {cycle}: tile {out_tile} stopped after {out_row} of "
                                 f"{rows} rows")
        if finished is None and next_beat == len(beats):
            assert cycle <= previous_last + latency + rows, (
                f"cycle {cycle}: only {out_tile} of {len(tiles)} tiles came out")
    await FallingEdge(dut.clk)
    dut.i_valid.value = 0
    return stats


async def stream(dut, tiles, rng, *, gap_probability=0.0, max_gap=1, quiet_cycles=None):
    """Stream ``tiles`` through the array and check everything that comes out (see the
    module docstring); return a :class:`StreamStats`.

    Before each beat, with probability ``gap_probability``, ``i_valid`` stays low for 1 ..
    ``max_gap`` cycles. After the last expected result the array is watched for
    ``quiet_cycles`` more cycles (default: long enough for any stray tile to come out).
    """
    p = parameters()
    rows, cols = p["rows"], p["cols"]
    quiet_cycles = quiet_cycles or 2 * (rows + cols + 2) + rows
    words = sum(max(tile.words, rows) for tile in tiles)
    limit = (words * (1 + max_gap) + len(tiles) * rows + quiet_cycles + 100) * 4
    return await with_timeout(
        _stream(dut, tiles, rng, gap_probability, max_gap, quiet_cycles),
        limit * PERIOD_NS, "ns")


def seeds(offset):
    """A Python and a torch generator, seeded from the ``seed`` parameter and ``offset``."""
    seed = parameters()["seed"] * 1000 + offset
    return random.Random(seed), torch.Generator().manual_seed(seed)


@cocotb.test()
async def full_rate_latency(dut):
    """Tiles of at least ``rows`` words offered back to back are taken one word per cycle with
    ``i_ready`` never low, the results match torch and every row 0 comes out exactly
    ``rows + cols + 2`` cycles after its tile's last beat was accepted."""
    await setup(dut)
    p = parameters()
    rng, generator = seeds(1)
    rows, lane = p["rows"], p["lane"]
    tiles = [random_tile(generator, random_depth(rng, low_words=rows,
                                                 high_words=max(rows, 3 * rows)))
             for _ in range(p["tiles"])]
    wall = time.perf_counter()
    stats = await stream(dut, tiles, rng)
    record_speed("array_full_rate", stats.cycles, time.perf_counter() - wall)
    words = sum(tile.words for tile in tiles)
    assert stats.stalls == 0, f"{stats.stalls} stall cycles at full rate"
    assert stats.last_accepted[-1] == words, (
        f"the {words} words were not taken one per cycle: the last went in at cycle "
        f"{stats.last_accepted[-1]}")
    assert stats.cycles == words + rows + p["cols"] + 2 + rows - 1, stats
    assert any(tile.K % lane for tile in tiles), "no K that is not a multiple of lane"


@cocotb.test()
async def random_gaps(dut):
    """Random K (1 .. max_depth, mostly not a multiple of lane) and random idle cycles before
    beats: every count matches torch, with the documented ready rule and latency."""
    await setup(dut)
    p = parameters()
    rng, generator = seeds(2)
    tiles = [random_tile(generator, random_depth(rng, high_words=rng.choice((2, 2 * p["rows"]))))
             for _ in range(p["tiles"])]
    tiles.append(random_tile(generator, random_depth(rng)))     # up to max_depth
    wall = time.perf_counter()
    stats = await stream(dut, tiles, rng, gap_probability=0.3, max_gap=4)
    record_speed("array_random_gaps", stats.cycles, time.perf_counter() - wall)
    assert stats.gaps > 0, "no idle cycle was inserted"


@cocotb.test()
async def short_tiles_throttled(dut):
    """Tiles shorter than ``rows`` words (one-word tiles among them) offered back to back:
    ``i_ready`` throttles each ``last`` beat to ``rows`` cycles after the previous one, and
    every tile's results still come out, correct and on time."""
    await setup(dut)
    p = parameters()
    rng, generator = seeds(3)
    rows, lane = p["rows"], p["lane"]
    tiles = [random_tile(generator, rng.randint(1, lane * max(1, rows - 1)))
             for _ in range(p["tiles"])]
    tiles += [random_tile(generator, rng.randint(1, lane)) for _ in range(4)]   # one word each
    stats = await stream(dut, tiles, rng)
    assert all(tile.words < rows for tile in tiles)
    assert stats.stalls > 0, "short tiles were never throttled"
    spacing = [b - a for a, b in zip(stats.last_accepted, stats.last_accepted[1:])]
    assert set(spacing) == {rows}, f"last beats accepted {spacing} cycles apart"


@cocotb.test()
async def mixed_lengths_with_gaps(dut):
    """Long and short tiles interleaved, including one-word tiles, with rare long idle
    periods: results match torch, with the ready rule and latency."""
    await setup(dut)
    p = parameters()
    rng, generator = seeds(4)
    rows = p["rows"]
    tiles = []
    for _ in range(p["tiles"]):
        kind = rng.randrange(3)
        if kind == 0:
            K = rng.randint(1, p["lane"])                               # one word
        elif kind == 1:
            K = random_depth(rng, high_words=max(1, rows - 1))          # shorter than rows
        else:
            K = random_depth(rng, low_words=rows, high_words=2 * rows + 1)
        tiles.append(random_tile(generator, K))
    await stream(dut, tiles, rng, gap_probability=0.05, max_gap=3 * rows)


@cocotb.test()
async def extreme_counts(dut):
    """K = max_depth with every sign agreeing (count max_depth, the top bit of the counter),
    every sign disagreeing (0), alternating agreement, and K = 1 of both kinds."""
    await setup(dut)
    p = parameters()
    rows, cols, depth = p["rows"], p["cols"], p["max_depth"]
    rng, generator = seeds(5)
    ones = torch.ones((rows, depth), dtype=torch.int64)
    agree = make_tile(ones, torch.ones((depth, cols), dtype=torch.int64))
    disagree = make_tile(-ones, torch.ones((depth, cols), dtype=torch.int64))
    signs = torch.tensor([1, -1]).repeat(depth // 2 + 1)[:depth]
    alternate = make_tile(ones, signs.reshape(depth, 1).repeat(1, cols))
    both_negative = make_tile(-torch.ones((rows, 1), dtype=torch.int64),
                              -torch.ones((1, cols), dtype=torch.int64))
    one_bit = random_tile(generator, 1)
    tiles = [agree, disagree, alternate, both_negative, one_bit]
    assert agree.expected[0][0] == depth and disagree.expected[0][0] == 0
    assert alternate.expected[0][0] == (depth + 1) // 2 and both_negative.expected[0][0] == 1
    await stream(dut, tiles, rng, gap_probability=0.1, max_gap=2)
