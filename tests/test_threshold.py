"""amaranth.sim tests of the threshold unit against the golden model's threshold operation."""

import random
import types

import numpy as np
import pytest
import torch
from amaranth.sim import Simulator

from hw.threshold import ThresholdUnit, encode_parameter
from sw.compile import golden
from sw.compile.quantize import thresholds


def golden_bits(x, threshold, direction):
    """The golden model's ``threshold`` op on ``x`` (``channels x n`` ints): bits ``channels x n``."""
    op = types.SimpleNamespace(kind="threshold", name="t", attrs={},
                               params={"threshold": threshold, "direction": direction})
    x = torch.as_tensor(x, dtype=torch.int64).view(1, len(threshold), 1, -1)
    return golden.execute_op(op, [x])[0, :, 0].tolist()


def value_range(width, is_signed):
    if is_signed:
        return -(1 << (width - 1)), (1 << (width - 1)) - 1
    return 0, (1 << width) - 1


def random_parameters(rng, channels, width, is_signed):
    """Golden (threshold, direction) pairs, including the edges of and beyond the value range."""
    lo, hi = value_range(width, is_signed)
    tmin, tmax = -(1 << width), (1 << width) - 1           # the signed(width + 1) range
    picks = [lo, hi, lo - 1, hi + 1, tmin, tmax, tmin - 5, tmax + 5, 0, 1, -(1 << 40), 1 << 40]
    threshold, direction = [], []
    for ch in range(channels):
        d = rng.choice([1, -1, 1, -1, 0])
        if d == 0:
            t = ch % 2 if ch < 4 else rng.randint(0, 1)
        elif rng.random() < 0.4:
            t = rng.choice(picks)
        else:
            t = rng.randint(lo, hi)
        threshold.append(t)
        direction.append(d)
    return threshold, direction


def random_beats(rng, count, lanes, width, is_signed, channels, shared, threshold):
    lo, hi = value_range(width, is_signed)
    beats = []
    for _ in range(count):
        channel = rng.randrange(channels if shared else channels - lanes + 1)
        values = []
        for lane in range(lanes):
            t = threshold[channel + (0 if shared else lane)]
            r = rng.random()
            if r < 0.3 and lo <= t <= hi:
                v = t + rng.choice([-1, 0, 0, 1])                 # x == T and its neighbours
            elif r < 0.45:
                v = rng.choice([lo, hi])
            else:
                v = rng.randint(lo, hi)
            values.append(min(max(v, lo), hi))
        beats.append((values, channel, rng.random() < 0.2))
    return beats


def expected_outputs(beats, lanes, shared, threshold, direction):
    """Golden bits of every beat: each (beat, lane) is one position of a channels x n tensor."""
    n = len(beats) * lanes
    x = [[0] * n for _ in threshold]
    for k, (values, channel, _) in enumerate(beats):
        for lane, v in enumerate(values):
            x[channel + (0 if shared else lane)][k * lanes + lane] = v
    bits = golden_bits(x, threshold, direction)
    return [(sum(bits[channel + (0 if shared else lane)][k * lanes + lane] << lane
                 for lane in range(lanes)), last)
            for k, (_, channel, last) in enumerate(beats)]


def run_unit(dut, threshold, direction, beats, gap=0.0, stall=0.0, seed=0, encode=True):
    """Load the parameters, stream ``beats``; return the output beats and cycle statistics."""
    rng = random.Random(seed)
    outputs = []
    stats = {"accepted": [], "presented": []}
    width, is_signed = dut.value_width, dut.signed

    async def producer(ctx):
        for ch, (t, d) in enumerate(zip(threshold, direction)):
            if encode:
                t, d = encode_parameter(t, d, width, is_signed)
            ctx.set(dut.param.payload.channel, ch)
            ctx.set(dut.param.payload.threshold, t)
            ctx.set(dut.param.payload.direction, d)
            ctx.set(dut.param.valid, 1)
            await ctx.tick()
        ctx.set(dut.param.valid, 0)
        cycle = 0
        for values, channel, last in beats:
            while rng.random() < gap:
                ctx.set(dut.i.valid, 0)
                await ctx.tick()
                cycle += 1
            for lane, v in enumerate(values):
                ctx.set(dut.i.payload.values[lane], v)
            ctx.set(dut.i.payload.channel, channel)
            ctx.set(dut.i.payload.last, last)
            ctx.set(dut.i.valid, 1)
            while True:
                *_, ready = await ctx.tick().sample(dut.i.ready)
                cycle += 1
                if ready:
                    stats["accepted"].append(cycle)
                    break
        ctx.set(dut.i.valid, 0)

    async def consumer(ctx):
        ready_rng = random.Random(seed + 1)
        await ctx.tick().repeat(len(threshold))
        cycle = 0
        while len(outputs) < len(beats):
            ready = ready_rng.random() >= stall
            ctx.set(dut.o.ready, ready)
            *_, valid, bits, last = await ctx.tick().sample(
                dut.o.valid, dut.o.payload.bits, dut.o.payload.last)
            if valid:
                stats["presented"].append(cycle)
            cycle += 1
            if valid and ready:
                outputs.append((bits, last))
            assert cycle < 20 * len(beats) + 100, "the unit stopped producing beats"
        ctx.set(dut.o.ready, 0)
        # Nothing more may come out: no beat is duplicated.
        for _ in range(5):
            assert not ctx.get(dut.o.valid)
            await ctx.tick()

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(producer)
    sim.add_testbench(consumer)
    sim.run()
    return outputs, stats


def check(outputs, expected):
    assert len(outputs) == len(expected)
    for k, (got, want) in enumerate(zip(outputs, expected)):
        assert got == want, f"beat {k}: got bits {got[0]:#x} last {got[1]}, " \
                            f"expected {want[0]:#x} last {want[1]}"


@pytest.mark.parametrize("lanes,width,is_signed,channels,shared", [
    (4, 8, False, 16, False),
    (4, 8, True, 16, False),
    (1, 1, False, 3, False),
    (3, 5, True, 7, True),
    (8, 6, False, 10, True),
    (2, 12, True, 9, False),
])
def test_random_streams(lanes, width, is_signed, channels, shared):
    rng = random.Random(lanes * 1000 + width * 10 + channels + is_signed)
    threshold, direction = random_parameters(rng, channels, width, is_signed)
    beats = random_beats(rng, 300, lanes, width, is_signed, channels, shared, threshold)
    dut = ThresholdUnit(lanes, width, is_signed, channels,
                        lane_channels="shared" if shared else "consecutive")
    outputs, _ = run_unit(dut, threshold, direction, beats, gap=0.3, stall=0.4, seed=width)
    check(outputs, expected_outputs(beats, lanes, shared, threshold, direction))


def test_full_rate_and_latency():
    """Back-to-back beats with ready high: never throttled, each out exactly 2 cycles later."""
    lanes, width, channels = 4, 8, 8
    rng = random.Random(5)
    threshold, direction = random_parameters(rng, channels, width, True)
    beats = random_beats(rng, 40, lanes, width, True, channels, False, threshold)
    dut = ThresholdUnit(lanes, width, True, channels)
    outputs, stats = run_unit(dut, threshold, direction, beats)
    check(outputs, expected_outputs(beats, lanes, False, threshold, direction))
    accepted = stats["accepted"]
    assert accepted == list(range(1, len(beats) + 1))      # one beat per cycle, no stalls
    # accepted[k] counts edges from the first beat's offer; presented[k] counts cycles of the
    # consumer, which starts with the first beat's offer: output valid 2 cycles after accept.
    assert stats["presented"] == [a + 1 for a in accepted]


def test_compare_semantics_edges():
    """Equality, the ends of the stored range and constant bits, lane by lane."""
    width, lanes = 4, 4
    # Channels: >= 5, <= 5, >= -8 (always 1), <= 7 (always 1), const 0, const 1, >= 8, <= -9.
    threshold = [5, 5, -8, 7, 0, 1, 8, -9]
    direction = [1, -1, 1, -1, 0, 0, 1, -1]
    beats = [([4, 5, 6, -8], 0, False), ([4, 5, 6, 7], 1, False), ([-8, 7, 0, 3], 4, True),
             ([5, 5, -8, 7], 0, False), ([7, -8, 7, -8], 4, True)]
    dut = ThresholdUnit(lanes, width, True, len(threshold))
    outputs, _ = run_unit(dut, threshold, direction, beats, stall=0.5, seed=3)
    expected = expected_outputs(beats, lanes, False, threshold, direction)
    check(outputs, expected)
    assert [bits for bits, _ in expected] == [0b1110, 0b0111, 0b0010, 0b1111, 0b0010]


@pytest.mark.parametrize("is_signed", [False, True])
def test_raw_extreme_thresholds(is_signed):
    """Thresholds at the ends of signed(value_width + 1), loaded without encode_parameter."""
    lanes, width = 4, 5
    tmin, tmax = -(1 << width), (1 << width) - 1
    lo, hi = value_range(width, is_signed)
    threshold = [tmin, tmax, tmin, tmax, lo, hi, lo, hi, 0, 1, 0, 1]
    direction = [1, 1, -1, -1, 1, 1, -1, -1, 0, 0, 1, -1]
    channels = len(threshold)
    rng = random.Random(9 + is_signed)
    beats = []
    for _ in range(80):
        channel = rng.randrange(channels - lanes + 1)
        beats.append(([rng.choice([lo, hi, lo + 1, hi - 1, 0, rng.randint(lo, hi)])
                       for _ in range(lanes)], channel, rng.random() < 0.5))
    dut = ThresholdUnit(lanes, width, is_signed, channels)
    outputs, _ = run_unit(dut, threshold, direction, beats, gap=0.3, stall=0.3, seed=1,
                          encode=False)
    check(outputs, expected_outputs(beats, lanes, False, threshold, direction))


def test_golden_agrees_with_float_batchnorm():
    """quantize.thresholds' integer compares equal sign(a * (x * scale) + b), sign(0) = +1."""
    rng = np.random.default_rng(11)
    channels, width = 64, 8
    a = rng.normal(size=channels) * 2
    a[:4] = 0.0                                             # gamma 0: constant bits
    b = rng.normal(size=channels) * 20
    b[0], b[1] = -1.0, 0.0                                  # const 0 and const 1 (sign(0) = +1)
    scale = rng.uniform(0.05, 2.0, size=channels)
    # Exact ties: a * scale = 0.5 and b = -1.5, so a * (x * scale) + b == 0 at x = 3.
    a[4:8], scale[4:8], b[4:8] = [1.0, -1.0, 2.0, -0.5], [0.5, 0.5, 0.25, -1.0], [-1.5, 1.5, -1.5,
                                                                                   -1.5]
    x = np.arange(-(1 << (width - 1)), 1 << (width - 1))
    float_bits = (a[:, None] * (x[None, :] * scale[:, None]) + b[:, None] >= 0).astype(int)
    threshold, direction = thresholds(a, b, scale)
    ints = golden_bits(np.broadcast_to(x, (channels, len(x))).copy(), threshold.tolist(),
                       direction.tolist())
    assert np.array_equal(np.array(ints), float_bits)
    assert float_bits[4, 3 - x[0]] == 1 and float_bits[4, 2 - x[0]] == 0

    # And the unit computes the same bits from the folded parameters.
    lanes = 8
    prng = random.Random(2)
    beats = []
    for _ in range(60):
        channel = prng.randrange(channels - lanes + 1)
        beats.append(([int(prng.choice(x)) for _ in range(lanes)], channel, False))
    dut = ThresholdUnit(lanes, width, True, channels)
    outputs, _ = run_unit(dut, threshold.tolist(), direction.tolist(), beats, gap=0.2,
                          stall=0.2, seed=4)
    expected = [(sum(int(float_bits[ch + i, v - x[0]]) << i for i, v in enumerate(values)), last)
                for values, ch, last in beats]
    check(outputs, expected)


@pytest.mark.parametrize("t,d,width,is_signed,want", [
    (0, 1, 4, False, (1, 0)), (1, 1, 4, False, (1, 1)), (15, 1, 4, False, (15, 1)),
    (16, 1, 4, False, (0, 0)), (15, -1, 4, False, (1, 0)), (-1, -1, 4, False, (0, 0)),
    (0, -1, 4, False, (0, -1)), (-8, 1, 4, True, (1, 0)), (7, -1, 4, True, (1, 0)),
    (-9, -1, 4, True, (0, 0)), (8, 1, 4, True, (0, 0)), (1, 0, 4, True, (1, 0)),
    (0, 0, 4, True, (0, 0)), (1 << 40, 1, 8, True, (0, 0)),
])
def test_encode_parameter(t, d, width, is_signed, want):
    assert encode_parameter(t, d, width, is_signed) == want


@pytest.mark.parametrize("kwargs,message", [
    ({"lanes": 0, "value_width": 8, "signed": False, "channels": 4},
     "lanes must be a positive integer, not 0"),
    ({"lanes": 2, "value_width": 8, "signed": False, "channels": 4, "lane_channels": "x"},
     "lane_channels must be"),
])
def test_bad_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ThresholdUnit(**kwargs)


def test_fills_while_output_stalled():
    """With o.ready low the two pipeline registers still fill: exactly 2 beats are accepted,
    then ready drops; raising o.ready drains them in order and ready returns the same cycle."""
    dut = ThresholdUnit(2, 4, False, 4)
    accepted = []

    async def tb(ctx):
        ctx.set(dut.o.ready, 0)
        ctx.set(dut.i.valid, 1)
        for k in range(4):
            ctx.set(dut.i.payload.values[0], k)
            ctx.set(dut.i.payload.values[1], k + 1)
            *_, ready = await ctx.tick().sample(dut.i.ready)
            accepted.append(ready)
        ctx.set(dut.i.valid, 0)
        assert accepted == [1, 1, 0, 0]
        assert ctx.get(dut.o.valid) and not ctx.get(dut.i.ready)
        ctx.set(dut.o.ready, 1)
        assert ctx.get(dut.i.ready)
        outs = []
        for _ in range(3):
            *_, valid, bits = await ctx.tick().sample(dut.o.valid, dut.o.payload.bits)
            outs.append((valid, bits))
        # Parameters all zero (direction 0, T 0): constant 0 bits; two beats, then empty.
        assert outs == [(1, 0), (1, 0), (0, 0)]

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(tb)
    sim.run()


@pytest.mark.parametrize("lane_channels", ["consecutive", "shared"])
def test_converts_to_rtlil(lane_channels):
    from amaranth.back import rtlil
    assert "module" in rtlil.convert(ThresholdUnit(4, 9, True, 20, lane_channels=lane_channels))
