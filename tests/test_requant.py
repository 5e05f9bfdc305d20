"""amaranth.sim tests of the requantizer against the golden model's requantization."""

import random

import pytest
import torch
from amaranth.sim import Simulator

from hw.requant import Requantizer
from sw.compile import golden
from sw.compile.quantize import MAX_SHIFT, MUL_BITS


def reference(v, shift, relu, bits):
    """``rq`` of ``docs/compiler.md`` on Python ints, written independently of the golden model."""
    y = (v + (1 << (shift - 1))) >> shift if shift else v
    low, high = (0, (1 << bits) - 1) if relu else (-(1 << (bits - 1)), (1 << (bits - 1)) - 1)
    return min(max(y, low), high)


def golden_rq(vs, shifts, relus, bits):
    """:func:`sw.compile.golden.requantize` of each ``vs[k]`` with channel parameters ``k``."""
    out = [None] * len(vs)
    for relu in (False, True):
        index = [k for k in range(len(vs)) if relus[k] == relu]
        if not index:
            continue
        v = torch.tensor([vs[k] for k in index], dtype=torch.int64).view(1, -1, 1, 1)
        y = golden.requantize(v, [shifts[k] for k in index], relu, bits).flatten().tolist()
        for k, value in zip(index, y):
            out[k] = value
    return out


def signed_range(width):
    return -(1 << (width - 1)), (1 << (width - 1)) - 1


def random_params(rng, channels, bias_width, residual):
    """Per-channel (mul, shift, bias, relu, res_mul), with extremes and rounding-tie channels."""
    mul_lo, mul_hi = signed_range(MUL_BITS)
    bias_lo, bias_hi = signed_range(bias_width)
    params = []
    for ch in range(channels):
        kind = ch % 6
        shift = rng.choice([0, 1, MAX_SHIFT, rng.randint(0, MAX_SHIFT)])
        if kind == 0:  # ties: acc * 2**(s-1) is an exact .5 for odd acc
            shift = rng.randint(1, MUL_BITS - 1)  # mul = 2**(shift-1) fits MUL_BITS
            mul, bias = 1 << (shift - 1), rng.randint(-8, 8) << shift
        elif kind == 1:  # extremes
            mul = rng.choice([mul_lo, mul_hi])
            bias = rng.choice([bias_lo, bias_hi, 0])
        else:
            mul = rng.randint(mul_lo, mul_hi)
            # A bias around the scale of the products, so outputs land inside and outside.
            bias = rng.randint(-(1 << min(shift + 10, bias_width - 1)),
                               (1 << min(shift + 10, bias_width - 1)) - 1)
        res_mul = rng.choice([mul_lo, mul_hi, rng.randint(mul_lo, mul_hi)]) if residual else 0
        assert mul_lo <= min(mul, res_mul) <= max(mul, res_mul) <= mul_hi
        assert bias_lo <= bias <= bias_hi and 0 <= shift <= MAX_SHIFT
        params.append((mul, shift, bias, rng.random() < 0.5, res_mul))
    return params


def random_beats(rng, dut, count):
    acc_lo, acc_hi = signed_range(dut.in_width)
    res_lo, res_hi = signed_range(dut.res_width) if dut.res_width else (0, 0)
    beats = []
    for n in range(count):
        values = [rng.choice([acc_lo, acc_hi, 0, -1, 1, rng.randint(-64, 64),
                              rng.randint(acc_lo, acc_hi), rng.randint(acc_lo, acc_hi)])
                  for _ in range(dut.lanes)]
        res = [rng.choice([res_lo, res_hi, rng.randint(res_lo, res_hi)])
               for _ in range(dut.lanes)]
        beats.append((values, rng.randrange(dut.groups), res, n % 5 == 4))
    return beats


def expected_outputs(dut, params, beats):
    """Outputs per beat from the golden model, cross-checked against :func:`reference`."""
    vs, shifts, relus = [], [], []
    padding = (0, 0, 0, False, 0)
    for values, group, res, _ in beats:
        for lane in range(dut.lanes):
            ch = group * dut.lanes + lane
            mul, shift, bias, relu, res_mul = params[ch] if ch < len(params) else padding
            vs.append(values[lane] * mul + bias + res[lane] * res_mul)
            shifts.append(shift)
            relus.append(relu)
    want = golden_rq(vs, shifts, relus, dut.out_bits)
    assert want == [reference(v, s, r, dut.out_bits) for v, s, r in zip(vs, shifts, relus)]
    mask = (1 << dut.out_bits) - 1
    # The lanes of channels past the last are don't-care: None.
    flat = [y & mask if k % dut.lanes + beats[k // dut.lanes][1] * dut.lanes < len(params)
            else None for k, y in enumerate(want)]
    return [(flat[n * dut.lanes:(n + 1) * dut.lanes], beats[n][3]) for n in range(len(beats))]


def run_requant(dut, params, beats, gap_probability=0.0, stall_probability=0.0, seed=0,
                output_edges=None):
    """Load ``params``, stream ``beats``; return (outputs, clock edges the beats went in at).

    ``output_edges``, when given, receives the clock edges the outputs were taken at (counted
    like the input edges, from the start of the simulation)."""
    rng = random.Random(seed)
    outputs, accepted = [], []
    output_edges = [] if output_edges is None else output_edges

    async def producer(ctx):
        edge = 0
        for ch, (mul, shift, bias, relu, res_mul) in enumerate(params):
            ctx.set(dut.params.payload.channel, ch)
            ctx.set(dut.params.payload.mul, mul)
            ctx.set(dut.params.payload.shift, shift)
            ctx.set(dut.params.payload.bias, bias)
            ctx.set(dut.params.payload.relu, relu)
            if dut.res_width:
                ctx.set(dut.params.payload.res_mul, res_mul)
            ctx.set(dut.params.valid, 1)
            await ctx.tick()
            edge += 1
        ctx.set(dut.params.valid, 0)
        for values, group, res, last in beats:
            while rng.random() < gap_probability:
                ctx.set(dut.i.valid, 0)
                await ctx.tick()
                edge += 1
            for lane in range(dut.lanes):
                ctx.set(dut.i.payload.values[lane], values[lane])
                if dut.res_width:
                    ctx.set(dut.i.payload.res[lane], res[lane])
            ctx.set(dut.i.payload.group, group)
            ctx.set(dut.i.payload.last, last)
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
        while len(outputs) < len(beats):
            ctx.set(dut.o.ready, rng.random() >= stall_probability)
            _, _, ready, valid, payload = await ctx.tick().sample(
                dut.o.ready, dut.o.valid, dut.o.payload)
            edge += 1
            if ready and valid:
                output_edges.append(edge)
                outputs.append(([payload.values[lane] for lane in range(dut.lanes)],
                                 payload.last))
            assert edge < 100_000, "the requantizer produced no output"
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


def test_reference_matches_golden():
    rng = random.Random(1)
    vs, shifts, relus = [], [], []
    for _ in range(2000):
        shift = rng.choice([0, 1, 2, MAX_SHIFT, rng.randint(0, MAX_SHIFT)])
        half = (1 << (shift - 1)) if shift else 0
        v = rng.choice([rng.randint(-(1 << 60), 1 << 60), rng.randint(-50, 50) * (2 * half) + half,
                        rng.randint(-1000, 1000)])
        vs.append(v)
        shifts.append(shift)
        relus.append(rng.random() < 0.5)
    for bits in (1, 8, 24):
        assert golden_rq(vs, shifts, relus, bits) == [reference(v, s, r, bits)
                                                        for v, s, r in zip(vs, shifts, relus)]
    # Round half up on both signs.
    assert [reference(v, 1, False, 8) for v in (-3, -1, 1, 3)] == [-1, 0, 1, 2]


@pytest.mark.parametrize("lanes, in_width, out_bits, channels, res_width, gaps, stalls, seed", [
    (4, 24, 8, 24, None, 0.3, 0.3, 0),
    (3, 32, 8, 14, 9, 0.2, 0.5, 1),
    (2, 18, 4, 12, None, 0.0, 0.7, 2),
    (1, 20, 1, 6, 9, 0.5, 0.1, 3),
])
def test_random(lanes, in_width, out_bits, channels, res_width, gaps, stalls, seed):
    rng = random.Random(seed)
    dut = Requantizer(lanes, in_width, out_bits, channels, res_width=res_width)
    params = random_params(rng, channels, dut.bias_width, res_width is not None)
    beats = random_beats(rng, dut, 300)
    want = expected_outputs(dut, params, beats)
    got, _ = run_requant(dut, params, beats, gaps, stalls, seed)
    for n, (g, w) in enumerate(zip(got, want)):
        g = ([None if x is None else y for x, y in zip(w[0], g[0])], g[1])
        assert g == w, f"beat {n} (group {beats[n][1]}, values {beats[n][0]}): {g} != {w}"
    assert len(got) == len(want)


def test_saturation_both_ends():
    dut = Requantizer(2, 24, 8, 4)
    # Channels 0/1: no ReLU, 2/3: ReLU; huge positive / negative products.
    params = [(32767, 0, 0, False, 0), (-32768, 0, 0, False, 0),
              (32767, 0, 0, True, 0), (-32768, 0, 0, True, 0)]
    beats = [([(1 << 23) - 1, (1 << 23) - 1], 0, [0, 0], False),
             ([-(1 << 23), -(1 << 23)], 0, [0, 0], False),
             ([(1 << 23) - 1, (1 << 23) - 1], 1, [0, 0], False),
             ([-(1 << 23), -(1 << 23)], 1, [0, 0], True)]
    want = expected_outputs(dut, params, beats)
    assert want == [([127, 0x80], False), ([0x80, 127], False), ([255, 0], False),
                    ([0, 255], True)]
    got, _ = run_requant(dut, params, beats)
    assert got == want


def test_full_rate_and_latency():
    rng = random.Random(7)
    dut = Requantizer(4, 24, 8, 16)
    params = random_params(rng, 16, dut.bias_width, False)
    beats = random_beats(rng, dut, 64)
    edges = []
    got, accepted = run_requant(dut, params, beats, output_edges=edges)
    assert got == expected_outputs(dut, params, beats)
    # One beat per cycle in, one per cycle out, LATENCY edges apart.
    assert accepted == list(range(accepted[0], accepted[0] + len(beats)))
    assert edges == [a + Requantizer.LATENCY for a in accepted]


def test_bad_parameters():
    with pytest.raises(ValueError):
        Requantizer(0, 24, 8, 16)
    with pytest.raises(ValueError):
        Requantizer(4, 24, 8, 16, res_width=0)
    with pytest.raises(ValueError):
        Requantizer(4, 24, 8, 16, max_shift=-1)
