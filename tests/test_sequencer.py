"""The sequencer against a model: dispatch by opcode, per-op counters, run totals."""

import random

import pytest
from amaranth import Module, Signal
from amaranth.lib import memory
from amaranth.sim import Simulator

from hw.sequencer import Sequencer
from sw import isa


class _Bench:
    """A sequencer with a PROGRAM memory, a COUNTERS memory and two fake units that stay busy
    for ``fixed_out_channels`` (FIXED) or ``bconv_m_tiles`` (BCONV) cycles."""

    def __init__(self, descriptors, depth=16):
        self.m = m = Module()
        m.submodules.seq = self.seq = seq = Sequencer(depth)
        m.submodules.program = program = memory.Memory(
            shape=isa.DESCRIPTOR.width, depth=depth, init=descriptors)
        m.submodules.counters = self.counters = memory.Memory(shape=32, depth=depth, init=[])
        read = program.read_port(transparent_for=())
        write = self.counters.write_port()
        m.d.comb += [
            read.addr.eq(seq.prog_addr), read.en.eq(seq.prog_en),
            seq.prog_data.eq(read.data),
            write.addr.eq(seq.counter_addr), write.data.eq(seq.counter_data),
            write.en.eq(seq.counter_en),
        ]
        self.log = []
        self.dispatched = Signal(8)
        for unit, length in (("fixed", seq.fixed_config.out_channels),
                             ("bconv", seq.bconv_config.m_tiles)):
            remaining = Signal(16, name=f"{unit}_remaining")
            start = getattr(seq, f"{unit}_start")
            with m.If(start):
                m.d.sync += remaining.eq(length)
            with m.Elif(remaining != 0):
                m.d.sync += remaining.eq(remaining - 1)
            m.d.comb += getattr(seq, f"{unit}_busy").eq(remaining != 0)


def _descriptor(opcode, busy):
    return isa.DESCRIPTOR.pack(opcode=opcode, fixed_out_channels=busy if opcode == 1 else 0,
                               bconv_m_tiles=busy if opcode == 2 else 0)


@pytest.mark.parametrize("seed", [0, 1])
def test_sequencer_runs_ranges(seed):
    rng = random.Random(seed)
    ops = [(rng.choice([isa.Opcode.NOP, isa.Opcode.FIXED, isa.Opcode.BCONV]),
            rng.randint(1, 9)) for _ in range(12)]
    bench = _Bench([_descriptor(op, busy) for op, busy in ops])
    seq = bench.seq
    sim = Simulator(bench.m)
    sim.add_clock(1e-8)
    runs = [(0, 12), (3, 1), (5, 4)]

    async def testbench(ctx):
        for first, count in runs:
            ctx.set(seq.first, first)
            ctx.set(seq.count, count)
            ctx.set(seq.start, 1)
            await ctx.tick()
            ctx.set(seq.start, 0)
            busy_cycles = 0
            starts = []
            while ctx.get(seq.busy):
                if ctx.get(seq.fixed_start):
                    starts.append(("fixed", ctx.get(seq.fixed_config.out_channels)))
                if ctx.get(seq.bconv_start):
                    starts.append(("bconv", ctx.get(seq.bconv_config.m_tiles)))
                busy_cycles += 1
                await ctx.tick()
                assert busy_cycles < 1000, "sequencer hangs"
            expected_starts = [("fixed" if op == isa.Opcode.FIXED else "bconv", busy)
                               for op, busy in ops[first:first + count]
                               if op != isa.Opcode.NOP]
            assert starts == expected_starts
            counters = [ctx.get(bench.counters.data[i]) for i in range(first, first + count)]
            # Fetch, decode, dispatch, record; a unit op adds its busy cycles and the cycle
            # that sees busy low.
            expected = [4 if op == isa.Opcode.NOP else 5 + busy
                        for op, busy in ops[first:first + count]]
            assert counters == expected
            assert ctx.get(seq.cycles) == sum(expected) == busy_cycles

    sim.add_testbench(testbench)
    sim.run()


def test_sequencer_rejects_bad_depth():
    with pytest.raises(ValueError, match="program_depth"):
        Sequencer(0)
