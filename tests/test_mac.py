"""amaranth.sim tests of the MAC array against the golden model's fixed-point conv accumulators."""

import random

import numpy as np
import pytest
import torch
from amaranth.sim import Simulator

from hw.mac import MacArray, accumulator_width
from sw.compile import golden
from sw.compile.ir import Op, Program, Slice, TensorSpec


def signed_range(width):
    return -(1 << (width - 1)), (1 << (width - 1)) - 1


def golden_acc(weights, acts):
    """The golden model's accumulators of a 1x1 fixed-point ``conv`` of a 1x1 map.

    ``weights``: ``lanes`` lists of ``K`` ints; ``acts``: ``K`` ints. The conv's requantization
    is the identity (``mul`` 1, ``bias`` 0, ``shift`` 0, 63-bit saturation), so its output is
    the accumulator. The ``input`` op (shift 0, zero 0) passes the activations through."""
    lanes, k = len(weights), len(acts)
    tensors = {
        "image": TensorSpec("image", (k, 1, 1), "int", 64, signed=True),
        "x": TensorSpec("x", (k, 1, 1), "int", 64, signed=True),
        "acc": TensorSpec("acc", (lanes, 1, 1), "int", 64, signed=True),
    }
    ops = [
        Op("input", "input", [Slice("image", 0, k)], Slice("x", 0, k), attrs={"shift": 0},
           params={"zero": np.zeros(k, dtype=np.int64)}),
        Op("conv", "conv", [Slice("x", 0, k)], Slice("acc", 0, lanes),
           attrs={"kernel": 1, "stride": 1, "padding": 0, "groups": 1, "relu": False,
                  "bits": 63},
           params={"weight": np.array(weights, dtype=np.int64).reshape(lanes, k, 1, 1),
                   "mul": np.ones(lanes, dtype=np.int64),
                   "bias": np.zeros(lanes, dtype=np.int64),
                   "shift": np.zeros(lanes, dtype=np.int64)}),
    ]
    program = Program(tensors, ops, "image", "acc")
    images = torch.tensor(acts, dtype=torch.int64).view(1, k, 1, 1)
    return golden.run(program, images).flatten().tolist()


def expected(dots):
    """Golden accumulators per dot product, cross-checked against plain Python sums."""
    out = []
    for weights, acts in dots:
        want = golden_acc(weights, acts)
        assert want == [sum(w * a for w, a in zip(row, acts)) for row in weights]
        out.append(want)
    return out


def extreme_dots(dut, length):
    """Full-length dot products at the corners of the operand ranges (largest magnitudes)."""
    w_lo, w_hi = signed_range(dut.weight_width)
    a_lo, a_hi = signed_range(dut.act_width)
    corners = [(w_lo, a_lo), (w_hi, a_hi), (w_lo, a_hi), (w_hi, a_lo)]
    dots = []
    for n in range(len(corners)):
        # Lane l takes corner (n + l) % 4 of the weights; the activation is shared.
        act = corners[n][1]
        weights = []
        for lane in range(dut.lanes):
            w = corners[(n + lane) % len(corners)][0]
            weights.append([w] * length)
        dots.append((weights, [act] * length))
    return dots


def random_dots(rng, dut, count):
    w_lo, w_hi = signed_range(dut.weight_width)
    a_lo, a_hi = signed_range(dut.act_width)
    dots = []
    for _ in range(count):
        k = rng.choice([1, 1, 2, dut.max_terms, rng.randint(1, dut.max_terms)])
        acts = [rng.choice([a_lo, a_hi, 0, rng.randint(0, 255), rng.randint(a_lo, a_hi)])
                for _ in range(k)]
        weights = [[rng.choice([w_lo, w_hi, rng.randint(w_lo, w_hi)]) for _ in range(k)]
                   for _ in range(dut.lanes)]
        dots.append((weights, acts))
    return dots


def run_mac(dut, dots, gap_probability=0.0, stall_probability=0.0, seed=0, output_edges=None,
            stall_runs=False):
    """Stream ``dots`` (one beat per term); return (outputs, clock edges the beats went in at).

    ``stall_runs``: hold ``o.ready`` low for long random runs (tens of cycles) instead of
    independent random cycles."""
    rng = random.Random(seed)
    outputs, accepted = [], []
    output_edges = [] if output_edges is None else output_edges
    # Generous: every beat and result stalled 40 cycles; a lost result fails fast.
    edge_limit = 100 * (sum(len(acts) for _, acts in dots) + len(dots)) + 1000

    async def producer(ctx):
        edge = 0
        for weights, acts in dots:
            for k, act in enumerate(acts):
                while rng.random() < gap_probability:
                    ctx.set(dut.i.valid, 0)
                    await ctx.tick()
                    edge += 1
                ctx.set(dut.i.payload.activation, act)
                for lane in range(dut.lanes):
                    ctx.set(dut.i.payload.weights[lane], weights[lane][k])
                ctx.set(dut.i.payload.first, k == 0)
                ctx.set(dut.i.payload.last, k == len(acts) - 1)
                ctx.set(dut.i.valid, 1)
                while True:
                    _, _, ready = await ctx.tick().sample(dut.i.ready)
                    edge += 1
                    if ready:
                        accepted.append(edge)
                        break
        ctx.set(dut.i.valid, 0)

    async def consumer(ctx):
        edge = 0
        stall = 0
        while len(outputs) < len(dots):
            if stall_runs:
                if stall == 0 and rng.random() < stall_probability:
                    stall = rng.randint(1, 40)
                ready = stall == 0
                stall = max(stall - 1, 0)
            else:
                ready = rng.random() >= stall_probability
            ctx.set(dut.o.ready, ready)
            _, _, ready, valid, payload = await ctx.tick().sample(
                dut.o.ready, dut.o.valid, dut.o.payload)
            edge += 1
            if ready and valid:
                output_edges.append(edge)
                outputs.append([payload.acc[lane] for lane in range(dut.lanes)])
            assert edge < edge_limit, "the MAC array lost a result"
        # Nothing more comes out.
        ctx.set(dut.o.ready, 1)
        for _ in range(dut.LATENCY + 2):
            assert not ctx.get(dut.o.valid)
            await ctx.tick()

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(producer)
    sim.add_testbench(consumer)
    sim.run()
    return outputs, accepted


def test_accumulator_width():
    # 13-bit activations x int8 weights: the extreme sum is max_terms * 128 * 4096.
    for terms in (1, 2, 3, 9, 576, 2304, 4608):
        width = accumulator_width(8, 13, terms)
        lo, hi = signed_range(width)
        extremes = (terms * -128 * -4096, terms * -128 * 4095, terms * 127 * -4096)
        assert all(lo <= v <= hi for v in extremes)
        lo, hi = signed_range(width - 1)
        assert not all(lo <= v <= hi for v in extremes)
    assert accumulator_width(8, 8, 1) == 16  # -128 * -128 = 2**14 needs 16 signed bits
    assert MacArray(4, max_terms=4608).acc_width == 33
    assert MacArray(4, act_width=9, max_terms=4608).acc_width == 29


@pytest.mark.parametrize("lanes, act_width, max_terms, gaps, stalls, runs, seed", [
    (4, 13, 40, 0.3, 0.3, False, 0),
    (3, 9, 17, 0.0, 0.7, False, 1),
    (2, 13, 64, 0.5, 0.1, True, 2),
    (1, 9, 5, 0.2, 0.5, True, 3),
    (5, 13, 9, 0.0, 0.0, False, 4),
])
def test_random(lanes, act_width, max_terms, gaps, stalls, runs, seed):
    rng = random.Random(seed)
    dut = MacArray(lanes, act_width=act_width, max_terms=max_terms)
    dots = extreme_dots(dut, max_terms) + random_dots(rng, dut, 60)
    rng.shuffle(dots)
    want = expected(dots)
    got, _ = run_mac(dut, dots, gaps, stalls, seed, stall_runs=runs)
    assert len(got) == len(want)
    for n, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"dot product {n} (length {len(dots[n][1])}): got {g}, expected {w}"


def test_extremes_at_a_real_size():
    """Full-length extreme dot products at the default widths and a real conv's size
    (256 channels x 3 x 3): the exact width, no overflow."""
    dut = MacArray(4, max_terms=2304)
    assert dut.acc_width == accumulator_width(8, 13, 2304) == 32
    dots = extreme_dots(dut, dut.max_terms)
    want = expected(dots)
    lo, hi = signed_range(dut.acc_width - 1)
    assert any(not lo <= v <= hi for row in want for v in row)  # one bit fewer would overflow
    got, _ = run_mac(dut, dots, 0.05, 0.05, 5)
    assert got == want


def test_latency_and_throughput():
    dut = MacArray(3, max_terms=8)
    rng = random.Random(6)
    # Single-term dot products: one result per cycle.
    dots = [([[rng.randint(-128, 127)] for _ in range(3)], [rng.randint(-4096, 4095)])
            for _ in range(40)]
    edges = []
    got, accepted = run_mac(dut, dots, output_edges=edges)
    assert got == expected(dots)
    # One beat per cycle in, one per cycle out, LATENCY edges apart.
    assert accepted == list(range(accepted[0], accepted[0] + len(dots)))
    assert edges == [a + MacArray.LATENCY for a in accepted]


def test_long_backpressure():
    """Results held back for long runs: multi-term dot products keep accumulating, the input
    stops only when a finished sum meets a full output register; nothing lost or doubled."""
    dut = MacArray(2, max_terms=12)
    rng = random.Random(7)
    dots = random_dots(rng, dut, 80)
    got, _ = run_mac(dut, dots, 0.0, 0.2, 7, stall_runs=True)
    assert got == expected(dots)


def test_bad_parameters():
    with pytest.raises(ValueError):
        MacArray(0)
    with pytest.raises(ValueError):
        MacArray(4, act_width=0)
    with pytest.raises(ValueError):
        MacArray(4, max_terms=0)
    with pytest.raises(ValueError):
        MacArray(4, acc_width=32, max_terms=4608)  # needs 33
    assert MacArray(4, acc_width=40, max_terms=4608).acc_width == 40
