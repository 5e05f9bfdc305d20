"""amaranth.sim tests of the pooling units against the golden model's maxpool and gap ops."""

import random
import types

import pytest
import torch
import torch.nn.functional as F
from amaranth.sim import Simulator

from hw.pool import GlobalSum, MaxPool
from sw.compile import golden


def golden_op(kind, x, **attrs):
    op = types.SimpleNamespace(kind=kind, name="p", attrs=attrs, params={})
    return golden.execute_op(op, [torch.as_tensor(x, dtype=torch.int64).unsqueeze(0)])[0]


def value_range(width, is_signed):
    if is_signed:
        return -(1 << (width - 1)), (1 << (width - 1)) - 1
    return 0, (1 << width) - 1


def random_map(rng, lanes, h, w, width, is_signed):
    lo, hi = value_range(width, is_signed)
    mode = rng.random()
    def value():
        if mode < 0.2:
            return lo                                        # all at the minimum: padding ties
        if rng.random() < 0.3:
            return rng.choice([lo, hi, lo + 1, hi - 1])
        return rng.randint(lo, hi)
    return [[[value() for _ in range(w)] for _ in range(h)] for _ in range(lanes)]


def pixels(x):
    lanes, h, w = len(x), len(x[0]), len(x[0][0])
    return [[x[ch][r][c] for ch in range(lanes)] for r in range(h) for c in range(w)]


def run_stream(dut, jobs, gap=0.0, stall=0.0, seed=0):
    """``jobs``: ``(config dict, [beats], expected output count)``; one config after the other
    (waiting for ``busy`` low in between). Returns output beats and accept/present cycles."""
    rng = random.Random(seed)
    total = sum(n for _, _, n in jobs)
    outputs, stats = [], {"accepted": [], "presented": []}
    is_pool = isinstance(dut, MaxPool)

    async def producer(ctx):
        cycle = 0
        for config, beats, _ in jobs:
            while ctx.get(dut.busy):
                await ctx.tick()
            for name, value in config.items():
                ctx.set(getattr(dut.config, name), value)
            for values in beats:
                while rng.random() < gap:
                    ctx.set(dut.i.valid, 0)
                    await ctx.tick()
                    cycle += 1
                for lane, v in enumerate(values):
                    ctx.set(dut.i.payload.values[lane], v)
                ctx.set(dut.i.valid, 1)
                while True:
                    *_, ready = await ctx.tick().sample(dut.i.ready)
                    cycle += 1
                    if ready:
                        stats["accepted"].append(cycle)
                        break
            ctx.set(dut.i.valid, 0)
            await ctx.tick()
            await ctx.tick()

    async def consumer(ctx):
        ready_rng = random.Random(seed + 1)
        cycle = 0
        payload = dut.o.payload.values if is_pool else dut.o.payload.sums
        while len(outputs) < total:
            ready = ready_rng.random() >= stall
            ctx.set(dut.o.ready, ready)
            if is_pool:
                *_, valid, values, last = await ctx.tick().sample(
                    dut.o.valid, payload, dut.o.payload.last)
            else:
                *_, valid, values = await ctx.tick().sample(dut.o.valid, payload)
                last = None
            if valid:
                stats["presented"].append(cycle)
            cycle += 1
            if valid and ready:
                outputs.append(([int(values[k]) for k in range(dut.lanes)], last))
            assert cycle < 50 * (total + 10) + 20 * sum(len(b) for _, b, _ in jobs)
        ctx.set(dut.o.ready, 0)
        for _ in range(8):                                   # nothing duplicated
            assert not ctx.get(dut.o.valid)
            await ctx.tick()

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(producer)
    sim.add_testbench(consumer)
    sim.run()
    return outputs, stats


def maxpool_job(rng, lanes, width, is_signed, h, w, kernel, stride, padding, frames=1):
    beats, expected = [], []
    for _ in range(frames):
        x = random_map(rng, lanes, h, w, width, is_signed)
        y = golden_op("maxpool", x, kernel=kernel, stride=stride, padding=padding)
        _, oh, ow = y.shape
        beats += pixels(x)
        expected += [([int(v) for v in y[:, r, c]], int(r == oh - 1 and c == ow - 1))
                     for r in range(oh) for c in range(ow)]
    config = {"height": h, "width": w, "kernel": kernel, "stride": stride, "padding": padding}
    return (config, beats, len(expected)), expected


GEOMETRIES = [(k, s, p) for k in (2, 3) for s in (1, 2) for p in (0, 1)]


@pytest.mark.parametrize("lanes,width,is_signed", [(2, 8, True), (3, 5, False), (1, 1, False)])
def test_maxpool_random(lanes, width, is_signed):
    rng = random.Random(lanes * 100 + width + is_signed)
    dut = MaxPool(lanes, width, is_signed, max_width=9, max_height=9)
    jobs, expected = [], []
    for kernel, stride, padding in GEOMETRIES:
        for _ in range(2):
            h = rng.randint(max(1, kernel - 2 * padding), 7)
            w = rng.randint(max(1, kernel - 2 * padding), 9)
            job, exp = maxpool_job(rng, lanes, width, is_signed, h, w, kernel, stride, padding,
                                   frames=2)
            jobs.append(job)
            expected += exp
    outputs, _ = run_stream(dut, jobs, gap=0.3, stall=0.4, seed=width)
    assert outputs == expected


@pytest.mark.parametrize("kernel,stride,padding", GEOMETRIES)
def test_maxpool_edges_of_sizes(kernel, stride, padding):
    """Smallest maps, odd and even sizes up to max_width (floor as in golden), no gaps."""
    rng = random.Random(kernel * 10 + stride * 3 + padding)
    dut = MaxPool(2, 6, True, max_width=8, max_height=6)
    smallest = max(1, kernel - 2 * padding)
    jobs, expected = [], []
    for h, w in [(smallest, smallest), (smallest, 8), (6, smallest), (5, 7), (6, 8)]:
        job, exp = maxpool_job(rng, 2, 6, True, h, w, kernel, stride, padding)
        jobs.append(job)
        expected += exp
    outputs, _ = run_stream(dut, jobs, stall=0.2, seed=kernel)
    assert outputs == expected


def test_full_rate_and_latency():
    """k 2 s 2 p 0 with ready high: a beat every cycle; an output is presented on the cycle
    after its completing beat's acceptance (two registers, as hw.threshold's unit)."""
    rng = random.Random(7)
    dut = MaxPool(4, 8, False, max_width=16, max_height=16)
    job, expected = maxpool_job(rng, 4, 8, False, 6, 8, 2, 2, 0, frames=3)
    outputs, stats = run_stream(dut, [job])
    assert outputs == expected
    accepted = stats["accepted"]
    assert accepted == list(range(1, len(accepted) + 1))
    # Beats completing a window: odd row, odd column of each 6 x 8 frame.
    completing = [a + 1 for k, a in enumerate(accepted) if (k % 48) // 8 % 2 and k % 8 % 2]
    assert stats["presented"] == completing


def test_golden_matches_torch_max_pool():
    rng = random.Random(3)
    for kernel, stride, padding in GEOMETRIES:
        x = random_map(rng, 3, 7, 6, 8, True)
        y = golden_op("maxpool", x, kernel=kernel, stride=stride, padding=padding)
        t = F.max_pool2d(torch.tensor([x], dtype=torch.float64), kernel, stride, padding)[0]
        assert torch.equal(y, t.to(torch.int64))


@pytest.mark.parametrize("lanes,width,is_signed", [(3, 8, True), (2, 4, False)])
def test_global_sum(lanes, width, is_signed):
    rng = random.Random(width)
    dut = GlobalSum(lanes, width, is_signed, max_pixels=49)
    jobs, expected = [], []
    for h, w in [(1, 1), (7, 7), (3, 5), (7, 7), (2, 1)]:
        beats, n = [], 0
        for _ in range(2):
            x = random_map(rng, lanes, h, w, width, is_signed)
            if n == 0 and (h, w) == (7, 7):                 # extremes: the widest sums
                x = [[[value_range(width, is_signed)[ch % 2]] * w] * h for ch in range(lanes)]
            y = golden_op("gap", x)
            beats += pixels(x)
            expected.append(([int(v) for v in y[:, 0, 0]], None))
            n += 1
        jobs.append(({"pixels": h * w}, beats, n))
    outputs, _ = run_stream(dut, jobs, gap=0.3, stall=0.5, seed=1)
    assert outputs == expected


@pytest.mark.parametrize("cls,kwargs", [
    (MaxPool, {"lanes": 0, "value_width": 8, "signed": True, "max_width": 4, "max_height": 4}),
    (GlobalSum, {"lanes": 2, "value_width": 8, "signed": True, "max_pixels": 0}),
])
def test_bad_parameters(cls, kwargs):
    with pytest.raises(ValueError, match="must be a positive integer"):
        cls(**kwargs)


def test_converts_to_rtlil():
    from amaranth.back import rtlil
    assert "module" in rtlil.convert(MaxPool(4, 8, True, 56, 56))
    assert "module" in rtlil.convert(GlobalSum(4, 8, True, 49))
