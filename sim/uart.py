"""cocotb UART source and sink: 8N1 frames on a serial pin of a design under simulation.

Both are timed in clock cycles of the design: a bit lasts ``cycles_per_bit`` cycles, which may
be fractional (pass ``Fraction(clock_hz, baud)`` to be exact). Bit boundaries of the source fall
on whole cycles, within half a cycle of their ideal time, and the average bit rate is exact.
To stay quick, both wait with one :class:`~cocotb.triggers.Timer` per bit rather than counting
clock edges in Python.

Typical use on a device with ports ``rx`` and ``tx``::

    clock = Clock(dut.clk, 10, unit="ns")
    clock.start()
    source = UartSource(dut.rx, clock, Fraction(clock_hz, baud))
    sink = UartSink(dut.tx, clock, Fraction(clock_hz, baud))
    await source.send(b"ping")
    reply = await sink.recv(4, timeout_cycles=100_000)
"""

import math
from fractions import Fraction

import cocotb
from cocotb.queue import Queue
from cocotb.simtime import convert, get_sim_time
from cocotb.triggers import FallingEdge, Lock, RisingEdge, Timer, with_timeout

__all__ = ["UartSink", "UartSource", "frame_bits"]


def frame_bits(byte, stop=1):
    """The 10 bits of an 8N1 frame: start bit, data LSB first, stop bit."""
    if not 0 <= byte <= 0xFF:
        raise ValueError(f"byte must be in 0..255, not {byte!r}")
    return [0] + [(byte >> i) & 1 for i in range(8)] + [stop]


def _cycles_per_bit(value):
    value = Fraction(value)
    if value < 2:
        raise ValueError(f"cycles_per_bit must be at least 2, not {value}")
    return value


def _clock_steps(clock):
    return convert(clock.period, clock.unit, to="step")


class UartSource:
    """Sends bytes as 8N1 frames on ``signal`` (an input of the design), idle high.

    Parameters
    ----------
    signal : cocotb handle
        The serial input, e.g. ``dut.rx``. It is driven high at construction.
    clock : :class:`cocotb.clock.Clock`
        The design's clock (started or about to be); bits are timed in its cycles.
    cycles_per_bit : int, float or Fraction
        Bit period in clock cycles (``Fraction(clock_hz, baud)``; scale it by 1.02 to send 2%
        slow).

    The line changes on falling clock edges, half a cycle away from the design's rising edges.
    """

    def __init__(self, signal, clock, cycles_per_bit):
        self.signal = signal
        self.clock = clock
        self.cycles_per_bit = _cycles_per_bit(cycles_per_bit)
        self._busy = Lock()
        self.signal.value = 1

    async def send(self, data, *, stop_bits=None, idle_bits=0):
        """Send ``data`` (bytes or a sequence of ints); return when the last stop bit has ended.

        Frames go out back to back unless ``idle_bits`` (may be fractional) asks for idle line
        between them. ``stop_bits``, if given, is a sequence of stop-bit values, one per byte
        (0 makes a framing error). Concurrent calls are serialized.
        """
        data = list(data)
        stops = [1] * len(data) if stop_bits is None else list(stop_bits)
        if len(stops) != len(data):
            raise ValueError(f"stop_bits must have one value per byte ({len(data)}), "
                             f"not {len(stops)}")
        async with self._busy:
            steps = _clock_steps(self.clock)
            await FallingEdge(self.clock.signal)
            position = Fraction(0)      # bits since the first start bit
            elapsed = 0                 # whole cycles since the first start bit
            for index, (byte, stop) in enumerate(zip(data, stops)):
                if index and idle_bits:
                    self.signal.value = 1
                    position += Fraction(idle_bits)
                    elapsed = await self._wait_until(position, elapsed, steps)
                for bit in frame_bits(byte, stop):
                    self.signal.value = bit
                    position += 1
                    elapsed = await self._wait_until(position, elapsed, steps)
            self.signal.value = 1

    async def send_break(self, bits):
        """Hold the line low for ``bits`` bit periods (a break), then release it."""
        async with self._busy:
            await FallingEdge(self.clock.signal)
            self.signal.value = 0
            await self._wait_until(Fraction(bits), 0, _clock_steps(self.clock))
            self.signal.value = 1

    async def _wait_until(self, position, elapsed, steps):
        target = math.floor(position * self.cycles_per_bit + Fraction(1, 2))
        if target > elapsed:
            await Timer((target - elapsed) * steps, unit="step")
        return max(target, elapsed)


class UartSink:
    """Receives 8N1 frames from ``signal`` (an output of the design) in the background.

    Parameters
    ----------
    signal : cocotb handle
        The serial output, e.g. ``dut.tx``.
    clock : :class:`cocotb.clock.Clock`
        The design's clock; bits are timed in its cycles.
    cycles_per_bit : int, float or Fraction
        Bit period in clock cycles (``Fraction(clock_hz, baud)``).

    Each frame is timed from its start edge; bit ``k`` is sampled in the cycle that holds
    ``(k + 0.5) * cycles_per_bit`` cycles after the edge, half a cycle after that cycle's rising
    edge (so no race with the design's flip-flops). A start bit that is high again at its middle
    is ignored. A frame whose stop bit is 0 is counted in :attr:`framing_errors` and dropped.

    Attributes
    ----------
    framing_errors : int
    frames : list of (float, int)
        Start time (ns) and value of every good frame received, for timing checks.
    """

    def __init__(self, signal, clock, cycles_per_bit):
        self.signal = signal
        self.clock = clock
        self.cycles_per_bit = _cycles_per_bit(cycles_per_bit)
        self.framing_errors = 0
        self.frames = []
        self._queue = Queue()
        self._task = cocotb.start_soon(self._run())

    def stop(self):
        """Stop monitoring the line."""
        self._task.cancel()

    def count(self):
        """Bytes received and not yet taken by :meth:`recv`."""
        return self._queue.qsize()

    async def recv(self, count, *, timeout_cycles=None):
        """Return the next ``count`` bytes received, waiting for them.

        Raises :exc:`cocotb.triggers.SimTimeoutError` if they have not all arrived within
        ``timeout_cycles`` clock cycles (default: 20 frame times per byte).
        """
        if timeout_cycles is None:
            timeout_cycles = math.ceil(20 * 10 * self.cycles_per_bit * max(count, 1))

        async def take():
            return bytes([await self._queue.get() for _ in range(count)])

        return await with_timeout(take(), timeout_cycles * _clock_steps(self.clock), "step")

    async def _run(self):
        steps = _clock_steps(self.clock)
        while True:
            if self._level() != 1:
                await RisingEdge(self.signal)
            await FallingEdge(self.signal)
            started = get_sim_time("ns")
            bits, elapsed = [], Fraction(0)
            for k in range(10):
                # Half a cycle past the rising edge that starts the cycle holding the middle.
                target = math.floor((k + Fraction(1, 2)) * self.cycles_per_bit) + Fraction(1, 2)
                await Timer(int((target - elapsed) * steps), unit="step")
                elapsed = target
                bits.append(self._level())
                if k == 0 and bits[0] != 0:
                    break
            if bits[0] != 0:
                continue
            if bits[9] != 1:
                self.framing_errors += 1
                continue
            byte = sum(bit << i for i, bit in enumerate(bits[1:9]))
            self.frames.append((started, byte))
            self._queue.put_nowait(byte)

    def _level(self):
        value = self.signal.value
        return int(value) if value.is_resolvable else None
