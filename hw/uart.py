"""An 8N1 UART with a fractional bit timer, for the host link.

The bit period ``clock_hz / baud`` is generally not a whole number of clock cycles (25 MHz at
3 Mbaud is 8.33 cycles per bit). Both directions time bits with a phase accumulator that adds
``baud`` every cycle and wraps at ``clock_hz`` (both divided by their greatest common divisor),
so the average bit period is exact and every bit edge (transmitter) or sampling point (receiver)
lies less than one clock cycle from its ideal time.
"""

import math

from amaranth import Cat, Const, Module, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.cdc import FFSynchronizer
from amaranth.lib.wiring import In, Out

__all__ = ["UART", "UARTReceiver", "UARTTransmitter"]


def _check_rates(clock_hz, baud):
    for name, value in (("clock_hz", clock_hz), ("baud", baud)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an integer, not {value!r}")
        if value < 1:
            raise ValueError(f"{name} must be positive, not {value!r}")
    if clock_hz < 4 * baud:
        raise ValueError(f"clock_hz must be at least 4 * baud ({4 * baud}), not {clock_hz}")


class _BitTimer:
    """A phase accumulator that overflows once per bit period, on average exactly.

    Each cycle in which ``run`` is high adds ``step`` to ``phase``; ``tick`` is high in the
    cycles in which the sum reaches ``modulus`` (one bit period is ``modulus / step`` cycles),
    and ``phase`` wraps. ``restart(phase)`` loads ``phase`` (in ``1 / modulus`` of a bit) for the
    next cycle, overriding the update.
    """

    def __init__(self, m, clock_hz, baud, *, scale=1, name):
        gcd = math.gcd(clock_hz, baud)
        self.step = baud // gcd * scale
        self.modulus = clock_hz // gcd * scale
        self.phase = Signal(range(self.modulus), name=f"{name}_phase")
        self.tick = Signal(name=f"{name}_tick")
        self.run = Signal(name=f"{name}_run")
        self._m = m
        # Sum of the phase and one step; it never reaches 2 * modulus.
        total = Signal(range(2 * self.modulus), name=f"{name}_total")
        m.d.comb += [
            total.eq(self.phase + self.step),
            self.tick.eq(self.run & (total >= self.modulus)),
        ]
        with m.If(self.run):
            with m.If(self.tick):
                m.d.sync += self.phase.eq(total - self.modulus)
            with m.Else():
                m.d.sync += self.phase.eq(total)

    def restart(self, phase):
        # Later assignments win in Amaranth, so this overrides the update above.
        self._m.d.sync += self.phase.eq(phase)


class UARTReceiver(wiring.Component):
    """Receives 8N1 serial frames (start bit, 8 data bits LSB first, stop bit).

    Parameters
    ----------
    clock_hz : int
        Frequency of the ``sync`` domain.
    baud : int
        Bit rate; ``clock_hz / baud`` must be at least 4 and need not be an integer.

    Members
    -------
    rx : ``In(1)``
        Serial line, idle high. It passes through a 2-flip-flop synchronizer inside, so it may
        come straight from a pin.
    o : ``Out(stream.Signature(8))``
        Received bytes. ``valid`` rises one cycle after the middle of the stop bit, about
        ``9.5 * clock_hz / baud + 3`` cycles after the start edge reaches ``rx``; the byte is
        held until accepted. The consumer is expected to always be ready (one byte per frame is
        at most one byte per ``10 * clock_hz / baud`` cycles).
    overrun : ``Out(1)``
        Pulses for one cycle when a byte completes while the previous one is still unaccepted;
        the new byte is dropped.
    framing_error : ``Out(1)``
        Pulses for one cycle when a stop bit is 0; that byte is dropped. The receiver then waits
        for the line to return high before it looks for the next start bit, so a held-low line
        (a break) gives one error, not a stream of them.

    Timing: each bit is sampled once, near its middle as measured from the start edge with the
    fractional bit timer; the sampling point is off the ideal by less than one cycle, counting
    the uncertainty of where in a cycle the start edge fell. A start bit that is high again at its
    middle is ignored as a glitch. A sender whose bit rate is off by a fraction ``d`` is received
    correctly while ``9.5 * d * bit < bit / 2 - 1`` (``bit = clock_hz / baud``): up to 2.6% at
    4 cycles per bit, 4% at 8.33, approaching 5% for large ratios.
    """

    def __init__(self, clock_hz, baud):
        _check_rates(clock_hz, baud)
        self.clock_hz = clock_hz
        self.baud = baud
        super().__init__({
            "rx": In(1, init=1),
            "o": Out(stream.Signature(8)),
            "overrun": Out(1),
            "framing_error": Out(1),
        })

    def elaborate(self, platform):
        m = Module()

        line = Signal(init=1)
        m.submodules.rx_sync = FFSynchronizer(self.rx, line, init=1)
        line_prev = Signal(init=1)
        m.d.sync += line_prev.eq(line)

        # Scaled by 2 so that a half bit period is a whole number of phase units.
        timer = _BitTimer(m, self.clock_hz, self.baud, scale=2, name="rx_bit")
        # The start edge fell somewhere in the cycle before the one in which it was seen, half a
        # cycle earlier on average. Loading half a bit plus one cycle puts the tick for bit n at
        # ceil((n + 0.5) * bit - 1) cycles after the edge was seen: within one cycle of the
        # middle of the bit whatever the fraction, and centred on it on average.
        start_phase = timer.modulus // 2 + timer.step

        busy = Signal()
        bit_index = Signal(range(10))       # 0: start bit, 1..8: data, 9: stop bit
        shreg = Signal(8)
        m.d.comb += timer.run.eq(busy)

        m.d.sync += [self.overrun.eq(0), self.framing_error.eq(0)]
        with m.If(self.o.valid & self.o.ready):
            m.d.sync += self.o.valid.eq(0)

        # The timer only ticks while busy.
        with m.If(~busy & line_prev & ~line):
            m.d.sync += [busy.eq(1), bit_index.eq(0)]
            timer.restart(start_phase)
        with m.Elif(timer.tick):
            m.d.sync += bit_index.eq(bit_index + 1)
            with m.Switch(bit_index):
                with m.Case(0):
                    # A start bit that is high again at its middle was a glitch.
                    m.d.sync += busy.eq(~line)
                with m.Case(9):
                    m.d.sync += busy.eq(0)
                    with m.If(~line):
                        m.d.sync += self.framing_error.eq(1)
                    with m.Elif(self.o.valid & ~self.o.ready):
                        m.d.sync += self.overrun.eq(1)
                    with m.Else():
                        m.d.sync += [self.o.payload.eq(shreg), self.o.valid.eq(1)]
                with m.Default():
                    m.d.sync += shreg.eq(Cat(shreg[1:], line))

        return m


class UARTTransmitter(wiring.Component):
    """Sends bytes as 8N1 serial frames (start bit, 8 data bits LSB first, stop bit).

    Parameters
    ----------
    clock_hz : int
        Frequency of the ``sync`` domain.
    baud : int
        Bit rate; ``clock_hz / baud`` must be at least 4 and need not be an integer.

    Members
    -------
    i : ``In(stream.Signature(8))``
        Bytes to send. A byte accepted in cycle ``t`` starts its start bit on ``tx`` in cycle
        ``t + 1``. ``ready`` (which does not depend on ``valid``) is high while the line is idle
        and, during a frame, only in the last cycle of the stop bit, so bytes offered continuously go out back to back: one frame
        every ``10 * clock_hz / baud`` cycles on average, with no idle time between frames.
    tx : ``Out(1)``
        Serial line, idle high, driven by a flip-flop. Bit ``n`` of a run of back-to-back frames
        (``n`` counting across frames from 0 at the first start bit) begins
        ``ceil(n * clock_hz / baud)`` cycles after the first start bit, so every edge comes less
        than one cycle after its ideal time and the average rate is exact.
    """

    def __init__(self, clock_hz, baud):
        _check_rates(clock_hz, baud)
        self.clock_hz = clock_hz
        self.baud = baud
        super().__init__({
            "i": In(stream.Signature(8)),
            "tx": Out(1, init=1),
        })

    def elaborate(self, platform):
        m = Module()

        timer = _BitTimer(m, self.clock_hz, self.baud, name="tx_bit")
        busy = Signal()
        bits_left = Signal(range(10))       # bits after the one on the line
        shreg = Signal(9)                   # data bits, then the stop bit
        m.d.comb += [
            timer.run.eq(busy),
            self.i.ready.eq(~busy | (timer.tick & (bits_left == 0))),
        ]

        with m.If(self.i.valid & self.i.ready):
            m.d.sync += [
                busy.eq(1),
                self.tx.eq(0),
                shreg.eq(Cat(self.i.payload, Const(1, 1))),
                bits_left.eq(9),
            ]
            with m.If(~busy):
                timer.restart(0)
        with m.Elif(busy & timer.tick):
            with m.If(bits_left == 0):
                m.d.sync += busy.eq(0)
            with m.Else():
                m.d.sync += [
                    self.tx.eq(shreg[0]),
                    shreg.eq(shreg >> 1),
                    bits_left.eq(bits_left - 1),
                ]

        return m


class UART(wiring.Component):
    """An 8N1 UART: a :class:`UARTReceiver` and a :class:`UARTTransmitter` at one bit rate.

    Parameters
    ----------
    clock_hz : int
        Frequency of the ``sync`` domain.
    baud : int
        Bit rate; ``clock_hz / baud`` must be at least 4 and need not be an integer.

    Members
    -------
    rx : ``In(1)``
        Serial line from the host, idle high (synchronized inside).
    tx : ``Out(1)``
        Serial line to the host, idle high.
    rx_data : ``Out(stream.Signature(8))``
        Received bytes (see :class:`UARTReceiver`); the consumer should always be ready.
    tx_data : ``In(stream.Signature(8))``
        Bytes to send (see :class:`UARTTransmitter`); back to back at the full line rate.
    rx_overrun : ``Out(1)``
        Pulses when a received byte was dropped because the previous one was not accepted.
    rx_framing_error : ``Out(1)``
        Pulses when a received frame had a 0 stop bit (the byte is dropped).
    """

    def __init__(self, clock_hz, baud):
        _check_rates(clock_hz, baud)
        self.clock_hz = clock_hz
        self.baud = baud
        super().__init__({
            "rx": In(1, init=1),
            "tx": Out(1, init=1),
            "rx_data": Out(stream.Signature(8)),
            "tx_data": In(stream.Signature(8)),
            "rx_overrun": Out(1),
            "rx_framing_error": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        m.submodules.receiver = receiver = UARTReceiver(self.clock_hz, self.baud)
        m.submodules.transmitter = transmitter = UARTTransmitter(self.clock_hz, self.baud)
        wiring.connect(m, wiring.flipped(self.rx_data), receiver.o)
        wiring.connect(m, wiring.flipped(self.tx_data), transmitter.i)
        m.d.comb += [
            receiver.rx.eq(self.rx),
            self.tx.eq(transmitter.tx),
            self.rx_overrun.eq(receiver.overrun),
            self.rx_framing_error.eq(receiver.framing_error),
        ]
        return m
