"""Framing of the host link: frame receiver and reply transmitter (see :mod:`sw.protocol`)."""

from amaranth import Cat, Module, Signal
from amaranth.lib import data, memory, stream, wiring
from amaranth.lib.wiring import In, Out

from sw import protocol

from .crc import crc16_next

__all__ = ["FrameEvent", "FrameReceiver", "FrameTransmitter"]


#: What the receiver reports about one frame: ``status`` is ``Status.OK`` for a frame whose CRC
#: matched (its payload is then in the frame buffer), or the error to answer with.
FrameEvent = data.StructLayout({
    "status": 8,
    "command": 8,
    "length": 16,
})


class FrameReceiver(wiring.Component):
    """Parses request frames from a byte stream into a frame buffer.

    Parameters
    ----------
    max_payload : int
        Frame buffer size; longer frames are answered with ``Status.BAD_LENGTH`` as soon as their
        length field has arrived, and the receiver then hunts for the next sync byte.
    timeout_cycles : int
        A frame whose next byte does not arrive within this many cycles is abandoned and
        reported with ``Status.TIMEOUT``.

    Members
    -------
    i : ``In(stream.Signature(8))``
        Received bytes. The receiver takes one byte per cycle, except while ``pause`` is high or
        an event waits to be accepted.
    pause : ``In(1)``
        Hold off between frames (the executor is using the frame buffer). Only honoured while no
        frame is in progress, so a frame in progress is never broken by it.
    buffer : ``In(memory.WritePort.Signature(addr_width, 8))``
        Write port of the frame buffer; payload byte ``n`` is written to address ``n``.
    event : ``Out(stream.Signature(FrameEvent))``
        One event per frame: after the CRC of a complete frame, after an oversize length field,
        or at a timeout. Bytes that arrive outside frames and are not the sync byte are dropped
        without an event.
    """

    def __init__(self, max_payload, timeout_cycles):
        self.max_payload = max_payload
        self.timeout_cycles = timeout_cycles
        super().__init__({
            "i": In(stream.Signature(8)),
            "pause": In(1),
            "buffer": In(memory.WritePort.Signature(
                addr_width=(max_payload - 1).bit_length(), shape=8)),
            "event": Out(stream.Signature(FrameEvent)),
        })

    def elaborate(self, platform):
        m = Module()
        byte = self.i.payload
        take = Signal()             # a byte is consumed this cycle
        command = Signal(8)
        length = Signal(16)
        count = Signal(16)          # payload bytes received so far
        crc = Signal(16)
        crc_low = Signal(8)
        idle_cycles = Signal(range(self.timeout_cycles + 1))
        in_frame = Signal()

        m.d.comb += take.eq(self.i.valid & self.i.ready)
        with m.If(take | ~in_frame):
            m.d.sync += idle_cycles.eq(0)
        with m.Elif(idle_cycles != self.timeout_cycles):
            m.d.sync += idle_cycles.eq(idle_cycles + 1)
        timed_out = in_frame & (idle_cycles == self.timeout_cycles)

        with m.If(take):
            m.d.sync += crc.eq(crc16_next(crc, byte))
        m.d.comb += [
            self.buffer.addr.eq(count),
            self.buffer.data.eq(byte),
        ]

        def report(status):
            m.d.sync += [
                self.event.payload.status.eq(status),
                self.event.valid.eq(1),
            ]
            m.next = "Report"

        with m.FSM():
            with m.State("Hunt"):
                m.d.comb += self.i.ready.eq(~self.pause)
                m.d.sync += [
                    crc.eq(0xFFFF),
                    command.eq(protocol.NO_COMMAND),
                    count.eq(0),
                ]
                with m.If(take & (byte == protocol.REQUEST_SYNC)):
                    m.next = "Command"
            with m.State("Command"):
                m.d.comb += [self.i.ready.eq(1), in_frame.eq(1)]
                with m.If(timed_out):
                    report(protocol.Status.TIMEOUT)
                with m.Elif(take):
                    m.d.sync += command.eq(byte)
                    m.next = "Length low"
            with m.State("Length low"):
                m.d.comb += [self.i.ready.eq(1), in_frame.eq(1)]
                with m.If(timed_out):
                    report(protocol.Status.TIMEOUT)
                with m.Elif(take):
                    m.d.sync += length[:8].eq(byte)
                    m.next = "Length high"
            with m.State("Length high"):
                m.d.comb += [self.i.ready.eq(1), in_frame.eq(1)]
                full_length = Cat(length[:8], byte)
                with m.If(timed_out):
                    report(protocol.Status.TIMEOUT)
                with m.Elif(take):
                    m.d.sync += length[8:].eq(byte)
                    with m.If(full_length > self.max_payload):
                        report(protocol.Status.BAD_LENGTH)
                    with m.Elif(full_length == 0):
                        m.next = "CRC low"
                    with m.Else():
                        m.next = "Payload"
            with m.State("Payload"):
                m.d.comb += [self.i.ready.eq(1), in_frame.eq(1)]
                m.d.comb += self.buffer.en.eq(take)
                with m.If(timed_out):
                    report(protocol.Status.TIMEOUT)
                with m.Elif(take):
                    m.d.sync += count.eq(count + 1)
                    with m.If(count + 1 == length):
                        m.next = "CRC low"
            with m.State("CRC low"):
                m.d.comb += [self.i.ready.eq(1), in_frame.eq(1)]
                with m.If(timed_out):
                    report(protocol.Status.TIMEOUT)
                with m.Elif(take):
                    m.d.sync += crc_low.eq(byte)
                    # The CRC bytes are not part of the CRC: keep the register as it was.
                    m.d.sync += crc.eq(crc)
                    m.next = "CRC high"
            with m.State("CRC high"):
                m.d.comb += [self.i.ready.eq(1), in_frame.eq(1)]
                with m.If(timed_out):
                    report(protocol.Status.TIMEOUT)
                with m.Elif(take):
                    m.d.sync += crc.eq(crc)
                    with m.If(Cat(crc_low, byte) == crc):
                        report(protocol.Status.OK)
                    with m.Else():
                        report(protocol.Status.BAD_CRC)
            with m.State("Report"), m.If(self.event.ready):
                m.d.sync += self.event.valid.eq(0)
                m.next = "Hunt"

        m.d.comb += [
            self.event.payload.command.eq(command),
            self.event.payload.length.eq(length),
        ]
        return m


class FrameTransmitter(wiring.Component):
    """Sends one reply frame: sync, status, length, payload, CRC.

    Members
    -------
    start : ``In(stream.Signature(data.StructLayout({"status": 8, "length": 16})))``
        Begins a reply. Accepted only when no reply is in progress.
    payload : ``In(stream.Signature(8))``
        Exactly ``length`` payload bytes of the reply in progress, in order.
    o : ``Out(stream.Signature(8))``
        The frame's bytes, towards the UART transmitter.
    busy : ``Out(1)``
        A reply is in progress (from ``start`` accepted to the last CRC byte accepted by ``o``).

    Throughput: one byte per cycle when ``o`` and ``payload`` allow it.
    """

    def __init__(self):
        super().__init__({
            "start": In(stream.Signature(data.StructLayout({"status": 8, "length": 16}))),
            "payload": In(stream.Signature(8)),
            "o": Out(stream.Signature(8)),
            "busy": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        status = Signal(8)
        length = Signal(16)
        remaining = Signal(16)
        crc = Signal(16)
        sent = Signal()
        m.d.comb += sent.eq(self.o.valid & self.o.ready)

        def emit(value, next_state, in_crc=True):
            m.d.comb += [self.o.payload.eq(value), self.o.valid.eq(1)]
            with m.If(sent):
                if in_crc:
                    m.d.sync += crc.eq(crc16_next(crc, value))
                m.next = next_state

        with m.FSM():
            with m.State("Idle"):
                m.d.comb += self.start.ready.eq(1)
                m.d.sync += crc.eq(0xFFFF)
                with m.If(self.start.valid):
                    m.d.sync += [
                        status.eq(self.start.payload.status),
                        length.eq(self.start.payload.length),
                        remaining.eq(self.start.payload.length),
                    ]
                    m.next = "Sync"
            with m.State("Sync"):
                m.d.comb += self.busy.eq(1)
                emit(protocol.REPLY_SYNC, "Status", in_crc=False)
            with m.State("Status"):
                m.d.comb += self.busy.eq(1)
                emit(status, "Length low")
            with m.State("Length low"):
                m.d.comb += self.busy.eq(1)
                emit(length[:8], "Length high")
            with m.State("Length high"):
                m.d.comb += self.busy.eq(1)
                emit(length[8:], "Payload")
                with m.If(sent & (length == 0)):
                    m.next = "CRC low"
            with m.State("Payload"):
                m.d.comb += [
                    self.busy.eq(1),
                    self.o.payload.eq(self.payload.payload),
                    self.o.valid.eq(self.payload.valid),
                    self.payload.ready.eq(self.o.ready),
                ]
                with m.If(sent):
                    m.d.sync += [
                        crc.eq(crc16_next(crc, self.payload.payload)),
                        remaining.eq(remaining - 1),
                    ]
                    with m.If(remaining == 1):
                        m.next = "CRC low"
            with m.State("CRC low"):
                m.d.comb += self.busy.eq(1)
                emit(crc[:8], "CRC high", in_crc=False)
            with m.State("CRC high"):
                m.d.comb += self.busy.eq(1)
                emit(crc[8:], "Idle", in_crc=False)
        return m
