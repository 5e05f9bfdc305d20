"""The sequencer: runs a range of the layer program's descriptors on the execution units.

Each op of the program is one :data:`sw.isa.DESCRIPTOR` in PROGRAM memory. The sequencer
fetches a descriptor, hands its settings to the unit its opcode names
(:class:`hw.fixed_unit.FixedUnit` or :class:`hw.bconv_engine.BconvEngine`), waits until the
unit is idle again and writes the op's clock cycles into COUNTERS memory at the op's index,
where the host reads them (per-layer cycle counters).
"""

from amaranth import Module, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from sw.isa import Opcode

from .isa import BCONV_LAYOUT, DESCRIPTOR_LAYOUT, FIXED_LAYOUT

__all__ = ["Sequencer"]


class Sequencer(wiring.Component):
    """Runs ops ``first .. first + count - 1``, one at a time.

    Parameters
    ----------
    program_depth : int
        Descriptors in PROGRAM memory (and counters in COUNTERS memory).

    Members
    -------
    start : ``In(1)``, first : ``In(16)``, count : ``In(16)``
        While ``busy`` is low, a high ``start`` begins a run of ``count`` ops (at least one;
        the caller checks ``first + count <= program_depth``).
    busy : ``Out(1)``
        High from the cycle after ``start`` until the last counter has been written.
    cycles : ``Out(32)``
        Cycles ``busy`` was high during the last run: the sum of the run's op counters.
        Valid once ``busy`` is low.
    prog_addr, prog_en : ``Out``; prog_data : ``In(DESCRIPTOR_LAYOUT)``
        PROGRAM memory read port (data valid the cycle after ``prog_en``).
    counter_addr, counter_data, counter_en : ``Out``
        COUNTERS memory write port.
    fixed_config : ``Out(FIXED_LAYOUT)``, fixed_start : ``Out(1)``, fixed_busy : ``In(1)``
    bconv_config : ``Out(BCONV_LAYOUT)``, bconv_start : ``Out(1)``, bconv_busy : ``In(1)``
        The units' settings (held from dispatch until the next descriptor is fetched) and
        handshakes (``start`` while the unit is idle; the unit raises ``busy`` the next cycle).

    Timing: an op's counter holds the cycles from its fetch to its record cycle inclusive:
    4 (fetch, decode, dispatch, record) plus the cycles its unit is busy plus 1 (the cycle that
    sees busy low). A NOP takes 4.
    """

    def __init__(self, program_depth):
        if not isinstance(program_depth, int) or not 1 <= program_depth <= 1 << 16:
            raise ValueError(f"program_depth must be an integer in 1..65536, not "
                             f"{program_depth!r}")
        self.program_depth = program_depth
        addr = max(1, (program_depth - 1).bit_length())
        super().__init__({
            "start": In(1),
            "first": In(16),
            "count": In(16),
            "busy": Out(1),
            "cycles": Out(32),
            "prog_addr": Out(addr),
            "prog_en": Out(1),
            "prog_data": In(DESCRIPTOR_LAYOUT),
            "counter_addr": Out(addr),
            "counter_data": Out(32),
            "counter_en": Out(1),
            "fixed_config": Out(FIXED_LAYOUT),
            "fixed_start": Out(1),
            "fixed_busy": In(1),
            "bconv_config": Out(BCONV_LAYOUT),
            "bconv_start": Out(1),
            "bconv_busy": In(1),
        })

    def elaborate(self, platform):
        m = Module()
        op = Signal(16)
        remaining = Signal(16)
        op_cycles = Signal(32)
        total = Signal(32)
        descriptor = Signal(DESCRIPTOR_LAYOUT)
        m.d.comb += [
            self.fixed_config.eq(descriptor.fixed),
            self.bconv_config.eq(descriptor.bconv),
            self.prog_addr.eq(op),
            self.counter_addr.eq(op),
            self.counter_data.eq(op_cycles + 1),
        ]
        with m.FSM():
            with m.State("Idle"):
                with m.If(self.start):
                    m.d.sync += [
                        op.eq(self.first),
                        remaining.eq(self.count),
                        total.eq(0),
                        self.busy.eq(1),
                    ]
                    m.next = "Fetch"
            with m.State("Fetch"):
                m.d.comb += self.prog_en.eq(1)
                m.d.sync += [total.eq(total + 1), op_cycles.eq(1)]
                m.next = "Decode"
            with m.State("Decode"):
                m.d.sync += [
                    descriptor.eq(self.prog_data),
                    total.eq(total + 1),
                    op_cycles.eq(op_cycles + 1),
                ]
                m.next = "Dispatch"
            with m.State("Dispatch"):
                m.d.sync += [total.eq(total + 1), op_cycles.eq(op_cycles + 1)]
                with m.Switch(descriptor.opcode):
                    with m.Case(Opcode.FIXED):
                        m.d.comb += self.fixed_start.eq(1)
                        m.next = "Wait"
                    with m.Case(Opcode.BCONV):
                        m.d.comb += self.bconv_start.eq(1)
                        m.next = "Wait"
                    with m.Default():
                        m.next = "Record"
            with m.State("Wait"):
                m.d.sync += [total.eq(total + 1), op_cycles.eq(op_cycles + 1)]
                # A unit raises busy the cycle after its start, so the first Wait cycle
                # already sees it.
                with m.If(~self.fixed_busy & ~self.bconv_busy):
                    m.next = "Record"
            with m.State("Record"):
                m.d.comb += self.counter_en.eq(1)
                m.d.sync += [op.eq(op + 1), remaining.eq(remaining - 1)]
                m.d.sync += total.eq(total + 1)
                with m.If(remaining == 1):
                    m.d.sync += [self.busy.eq(0), self.cycles.eq(total + 1)]
                    m.next = "Idle"
                with m.Else():
                    m.next = "Fetch"
        return m
