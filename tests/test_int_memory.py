"""amaranth.sim tests of the banked INTS memory against a Python list model."""

import random

import pytest
from amaranth.sim import Simulator

from hw.int_memory import IntMemory


def to_signed(value, width):
    value &= (1 << width) - 1
    return value - (1 << width) if value >> (width - 1) else value


def run_random(depth, width, banks, seed, cycles=300, p_read=0.7, p_write=0.7):
    """Random reads and writes every cycle at every alignment (including runs that reach past
    ``depth``); each read's data is checked against the model on the next cycle, so a read of a
    run written in the previous cycle checks read-after-write."""
    rng = random.Random(seed)
    lo, hi = -(1 << (width - 1)), (1 << (width - 1)) - 1
    init = [rng.randint(lo, hi) for _ in range(depth)]
    model = list(init)
    dut = IntMemory(depth, width, banks, init=init)
    addr_max = (1 << dut.addr_width) - 1
    stats = {"reads": 0, "writes": 0, "raw": 0, "alignments": set()}

    def pick_addr():
        r = rng.random()
        if r < 0.15:
            return rng.randint(max(0, depth - banks), addr_max)     # the top, past depth
        return rng.randrange(depth)

    def expected_run(addr):
        return [model[addr + i] if addr + i < depth else 0 for i in range(banks)]

    async def bench(ctx):
        pending = None              # (cycle, addr, expected run) of last cycle's read
        last_write = None
        held = None
        for cycle in range(cycles):
            rd_en = rng.random() < p_read
            wr_en = rng.random() < p_write
            # Read-after-write: often read exactly the run written in the previous cycle.
            if last_write is not None and rng.random() < 0.3:
                rd_addr = last_write
                stats["raw"] += 1
            else:
                rd_addr = pick_addr()
            wr_addr = pick_addr()
            mask = rng.choice([0, 1, (1 << banks) - 1, rng.randrange(1 << banks)])
            values = [rng.choice([lo, hi, 0, -1, rng.randint(lo, hi)]) for _ in range(banks)]
            ctx.set(dut.rd_addr, rd_addr)
            ctx.set(dut.rd_en, rd_en)
            ctx.set(dut.wr_addr, wr_addr)
            ctx.set(dut.wr_en, wr_en)
            ctx.set(dut.wr_mask, mask)
            for i in range(banks):
                ctx.set(dut.wr_data[i], values[i])
            # The data of the previous cycle's read (or held data while rd_en was low).
            got = [ctx.get(dut.rd_data[i]) for i in range(banks)]
            if held is not None:
                assert got == held[1], (
                    f"cycle {cycle}: read of {held[0]} gave {got}, expected {held[1]}")
            # A read sees the memory before this cycle's write (not transparent).
            if rd_en:
                pending = (rd_addr, expected_run(rd_addr))
                stats["reads"] += 1
                stats["alignments"].add(rd_addr % banks)
            await ctx.tick()
            if pending is not None:
                held = pending
            if wr_en:
                stats["writes"] += 1
                for i in range(banks):
                    if mask >> i & 1 and wr_addr + i < depth:
                        model[wr_addr + i] = values[i]
            last_write = wr_addr if wr_en else None
            pending = None
        # Final contents, through the simulator's view of the banks.
        for a in range(depth):
            bank, row = dut.element(a)
            assert ctx.get(bank[row]) == model[a], f"element {a}"

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    return stats


@pytest.mark.parametrize("depth,width,banks", [
    (32, 8, 4), (24, 5, 8), (16, 24, 1), (12, 3, 2), (64, 12, 16), (16, 7, 16)])
def test_random_runs_against_list_model(depth, width, banks):
    stats = run_random(depth, width, banks, seed=depth * 100 + banks)
    assert stats["reads"] > 100 and stats["writes"] > 100 and stats["raw"] > 20
    assert stats["alignments"] == set(range(banks))


def test_scalar_and_unaligned_runs():
    """Directed: a scalar write (mask 0b1) changes one element; an unaligned run wraps the
    banks into the next row; a run past depth is dropped beyond the end and reads as 0."""
    dut = IntMemory(16, 8, 4, init=range(16))

    async def bench(ctx):
        async def write(addr, values, mask):
            ctx.set(dut.wr_addr, addr)
            ctx.set(dut.wr_mask, mask)
            for i, v in enumerate(values):
                ctx.set(dut.wr_data[i], v)
            ctx.set(dut.wr_en, 1)
            await ctx.tick()
            ctx.set(dut.wr_en, 0)

        async def read(addr):
            ctx.set(dut.rd_addr, addr)
            ctx.set(dut.rd_en, 1)
            await ctx.tick()
            ctx.set(dut.rd_en, 0)
            return [ctx.get(dut.rd_data[i]) for i in range(4)]

        await write(5, [-7, 99, 99, 99], 0b0001)
        assert await read(4) == [4, -7, 6, 7]
        await write(6, [-1, -2, -3, -4], 0b1111)         # banks 2, 3, 0, 1: rows 1, 1, 2, 2
        assert await read(5) == [-7, -1, -2, -3]
        assert await read(9) == [-4, 10, 11, 12]
        await write(14, [50, 51, 52, 53], 0b1111)        # 16, 17 do not exist
        assert await read(13) == [13, 50, 51, 0]
        assert await read(0) == [0, 1, 2, 3]            # nothing wrapped to the bottom
        # rd_data holds while rd_en is low.
        for _ in range(3):
            await ctx.tick()
            assert [ctx.get(dut.rd_data[i]) for i in range(4)] == [0, 1, 2, 3]

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()


def test_bad_parameters():
    with pytest.raises(ValueError, match="banks must be a power of two, not 3"):
        IntMemory(12, 8, 3)
    with pytest.raises(ValueError, match=r"depth must be a multiple of banks \(4\), not 10"):
        IntMemory(10, 8, 4)
    with pytest.raises(ValueError, match="width must be a positive integer, not 0"):
        IntMemory(8, 0, 4)
    with pytest.raises(ValueError, match="init must have at most depth"):
        IntMemory(4, 8, 4, init=range(5))


def test_converts_to_rtlil():
    from amaranth.back import rtlil
    assert "module" in rtlil.convert(IntMemory(1024, 24, 8))
