"""amaranth.sim tests of the UART against a Python model of the serial waveform."""

import math
import random
from fractions import Fraction

import pytest
from amaranth import Elaboratable, Module, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out
from amaranth.sim import Simulator

from hw.uart import UART, UARTReceiver, UARTTransmitter

#: (clock_hz, baud) pairs for clock/baud ratios 4, 8.33, 12, 25 and 104.17.
RATES = [
    (4_000_000, 1_000_000),
    (25_000_000, 3_000_000),
    (12_000_000, 1_000_000),
    (25_000_000, 1_000_000),
    (10_000_000, 96_000),
]
RATE_IDS = [f"{c / b:.2f}" for c, b in RATES]


def byte_count(clock_hz, baud):
    """Enough bytes to exercise every phase of the bit timer, few enough to keep tests quick."""
    return max(16, min(100, 1500 * baud // clock_hz))


# --- Python model of the serial line --------------------------------------------------------

def frame_bits(byte, stop=1):
    """The 10 bits of an 8N1 frame: start bit, data LSB first, stop bit."""
    return [0] + [(byte >> i) & 1 for i in range(8)] + [stop]


def waveform(frames, bit_cycles, start=5.0):
    """Transitions of a serial line carrying ``frames``.

    ``frames`` is a list of ``(byte, gap, stop)``: ``gap`` idle cycles (a float) before the
    frame, ``stop`` the stop bit's value. ``bit_cycles`` is the sender's bit period in clock
    cycles (a float; a sender off by 2% has ``1.02 * clock_hz / baud``). Returns the list of
    ``(time, level)`` (time in cycles, the line holds ``level`` from ``time`` on) and the start
    time of each frame.
    """
    events, starts = [], []
    time = start
    for byte, gap, stop in frames:
        time += gap
        starts.append(time)
        events.extend((time + k * bit_cycles, bit) for k, bit in enumerate(frame_bits(byte, stop)))
        time += 10 * bit_cycles
        # Back to idle (a frame with a 0 stop bit leaves the line low until here).
        events.append((time, 1))
    return events, starts


def line_driver(pin, events, done):
    """Testbench driving ``pin`` with ``events``; the level of cycle ``c`` is the waveform's
    level at time ``c``, so an edge at time ``t`` shows in cycle ``ceil(t)``."""
    async def testbench(ctx):
        ctx.set(pin, 1)
        cycle = 0
        for time, level in events:
            target = math.ceil(time)
            if target > cycle:
                await ctx.tick().repeat(target - cycle)
                cycle = target
            ctx.set(pin, level)
        await ctx.tick().repeat(40)
        done.append(cycle + 40)
    return testbench


def decode_line(trace, bit_cycles):
    """Decode a sampled serial line (one level per cycle) the way an ideal receiver would:
    find each start edge, sample each bit at its middle. Returns ``[(start cycle, byte, stop)]``.
    """
    frames = []
    cycle = 1
    while cycle < len(trace):
        if trace[cycle - 1] == 1 and trace[cycle] == 0:
            bits = []
            for k in range(10):
                at = cycle + math.floor((k + Fraction(1, 2)) * bit_cycles)
                bits.append(trace[at] if at < len(trace) else 1)
            byte = sum(bit << i for i, bit in enumerate(bits[1:9]))
            frames.append((cycle, byte, bits[9]))
            cycle += math.floor(Fraction(19, 2) * bit_cycles)
        else:
            cycle += 1
    return frames


class Harness(Elaboratable):
    """The device under test with a free-running cycle counter, so that testbenches can wait
    for events (cheap) instead of stepping every cycle (slow) and still know the cycle. In each
    cycle ``c`` (after ``c`` clock edges), ``cycle`` reads ``c``."""

    def __init__(self, dut):
        self.dut = dut
        self.cycle = Signal(32)

    def elaborate(self, platform):
        m = Module()
        m.submodules.dut = self.dut
        m.d.sync += self.cycle.eq(self.cycle + 1)
        return m


def run(harness, testbenches, background=()):
    sim = Simulator(harness)
    sim.add_clock(1e-6)
    for testbench in testbenches:
        sim.add_testbench(testbench)
    for testbench in background:
        sim.add_testbench(testbench, background=True)
    sim.run()


async def put(ctx, port, payload, cycle):
    """Offer ``payload`` on stream ``port`` until it is taken; return the cycle it was taken in.
    Leaves ``valid`` high (the caller lowers it, or offers the next payload)."""
    ctx.set(port.payload, payload)
    ctx.set(port.valid, 1)
    while not ctx.get(port.ready):
        await ctx.changed(port.ready)
    taken = ctx.get(cycle)
    await ctx.tick()
    return taken


def watch(ctx, *signals, sample=()):
    """Iterate over the changes of ``signals``: yields their values, then ``sample``'s."""
    return ctx.changed(*signals).sample(*sample)


# --- Receiver -------------------------------------------------------------------------------

def receive(clock_hz, baud, frames, *, bit_scale=1.0, ready_at=None):
    """Send ``frames`` (see :func:`waveform`) into a receiver; return what it reported.

    ``o.ready`` is high from cycle ``ready_at`` on (from the start by default). Returns a dict
    with ``bytes`` (``(cycle, byte)`` for each rise of ``o.valid``), ``valid`` (``(cycle,
    level)`` for each change of ``o.valid``), ``framing`` and ``overrun`` (cycles of the
    pulses) and ``starts`` (frame start times).
    """
    dut = UARTReceiver(clock_hz, baud)
    harness = Harness(dut)
    events, starts = waveform(frames, bit_scale * clock_hz / baud)
    done = []
    seen = {"bytes": [], "framing": [], "overrun": [], "starts": starts, "valid": []}

    async def monitor(ctx):
        async for valid, framing, overrun, payload, cycle in watch(
                ctx, dut.o.valid, dut.framing_error, dut.overrun,
                sample=(dut.o.payload, harness.cycle)):
            if valid and (not seen["valid"] or not seen["valid"][-1][1]):
                seen["bytes"].append((cycle, payload))
            if not seen["valid"] or seen["valid"][-1][1] != valid:
                seen["valid"].append((cycle, valid))
            if framing:
                seen["framing"].append(cycle)
            if overrun:
                seen["overrun"].append(cycle)

    async def consumer(ctx):
        if ready_at is None:
            ctx.set(dut.o.ready, 1)
        else:
            await ctx.tick().repeat(ready_at)
            ctx.set(dut.o.ready, 1)

    run(harness, [line_driver(dut.rx, events, done)], background=[monitor, consumer])
    return seen


def check_bytes(expected, actual):
    for index, (want, got) in enumerate(zip(expected, actual)):
        assert want == got, f"byte {index}: expected {want:#04x}, got {got:#04x}"
    assert len(actual) == len(expected), \
        f"expected {len(expected)} bytes, got {len(actual)}; first missing index {len(actual)}"


def random_frames(rng, count, bit_cycles, back_to_back=0.5):
    """Random bytes; each frame follows the previous back to back with probability
    ``back_to_back``, otherwise after a random idle gap of up to 3 bit periods."""
    return [(rng.getrandbits(8),
             0.0 if rng.random() < back_to_back else rng.uniform(0, 3 * bit_cycles), 1)
            for _ in range(count)]


@pytest.mark.parametrize("clock_hz, baud", RATES, ids=RATE_IDS)
@pytest.mark.parametrize("bit_scale", [1.0, 0.98, 1.02], ids=["exact", "fast2%", "slow2%"])
def test_receiver_random(clock_hz, baud, bit_scale):
    rng = random.Random(clock_hz ^ baud ^ int(bit_scale * 100))
    bit = clock_hz / baud
    frames = random_frames(rng, byte_count(clock_hz, baud), bit * bit_scale)
    # A fractional start shifts the sender's edges against the receiver's clock.
    frames[0] = (frames[0][0], rng.random(), 1)
    seen = receive(clock_hz, baud, frames, bit_scale=bit_scale)
    check_bytes([byte for byte, _, _ in frames], [byte for _, byte in seen["bytes"]])
    assert seen["framing"] == [] and seen["overrun"] == [], \
        f"framing errors at cycles {seen['framing']}, overruns at cycles {seen['overrun']}"
    if bit_scale == 1.0:
        # Documented latency: valid rises 9.5 bit periods + 3 cycles after the start edge,
        # give or take one cycle.
        for index, ((cycle, _), start) in enumerate(zip(seen["bytes"], seen["starts"])):
            delay = cycle - start - 9.5 * bit
            assert 2 - 1e-9 <= delay < 4, \
                f"byte {index}: valid {cycle - start:.2f} cycles after the start edge, " \
                f"expected {9.5 * bit + 3:.2f} +- 1"


@pytest.mark.parametrize("clock_hz, baud", RATES, ids=RATE_IDS)
def test_receiver_back_to_back(clock_hz, baud):
    rng = random.Random(7)
    frames = random_frames(rng, byte_count(clock_hz, baud), clock_hz / baud, back_to_back=1.0)
    seen = receive(clock_hz, baud, frames)
    check_bytes([byte for byte, _, _ in frames], [byte for _, byte in seen["bytes"]])


@pytest.mark.parametrize("clock_hz, baud", RATES, ids=RATE_IDS)
def test_receiver_framing_error(clock_hz, baud):
    rng = random.Random(11)
    bit = clock_hz / baud
    frames = []
    for index in range(24):
        stop = 0 if index % 3 == 1 else 1
        # After a bad stop bit the line must go high before the next start edge can be seen.
        gap = bit * rng.uniform(1, 2) if frames and frames[-1][2] == 0 else 0.0
        frames.append((rng.getrandbits(8), gap, stop))
    seen = receive(clock_hz, baud, frames)
    check_bytes([byte for byte, _, stop in frames if stop],
                [byte for _, byte in seen["bytes"]])
    bad = [index for index, (_, _, stop) in enumerate(frames) if not stop]
    assert len(seen["framing"]) == len(bad), \
        f"expected {len(bad)} framing errors (frames {bad}), got {len(seen['framing'])}"
    for frame, cycle in zip(bad, seen["framing"]):
        start = seen["starts"][frame]
        assert 9 * bit < cycle - start < 10 * bit + 4, \
            f"frame {frame}: framing error {cycle - start:.1f} cycles after its start edge"
    assert seen["overrun"] == []


def test_receiver_break_and_glitch():
    clock_hz, baud = 25_000_000, 3_000_000
    bit = clock_hz / baud
    # A break (line low for 30 bits) is one framing error; a one-cycle glitch is ignored.
    events = [(5.0, 0), (5.0 + 30 * bit, 1), (5.0 + 33 * bit, 0), (6.0 + 33 * bit, 1)]
    frames_start = 5.0 + 40 * bit
    frame_events, _ = waveform([(0x5A, 0.0, 1), (0xC3, 0.0, 1)], bit, start=frames_start)
    dut = UARTReceiver(clock_hz, baud)
    harness = Harness(dut)
    seen = {"bytes": [], "framing": 0}
    done = []

    async def monitor(ctx):
        ctx.set(dut.o.ready, 1)
        async for valid, framing, payload in watch(ctx, dut.o.valid, dut.framing_error,
                                                   sample=(dut.o.payload,)):
            if valid:
                seen["bytes"].append(payload)
            seen["framing"] += framing

    run(harness, [line_driver(dut.rx, events + frame_events, done)], background=[monitor])
    assert seen["framing"] == 1, f"expected 1 framing error for a break, got {seen['framing']}"
    check_bytes([0x5A, 0xC3], seen["bytes"])


def test_receiver_overrun():
    clock_hz, baud = 12_000_000, 1_000_000
    bit = clock_hz / baud
    frames = [(0x11, 0.0, 1), (0x22, 0.0, 1), (0x33, 0.0, 1), (0x44, 3 * bit, 1)]
    # Not ready until the middle of the fourth frame: the second and third bytes overrun.
    release = int(5 + 10 * bit * 3 + 3 * bit + 5 * bit)
    seen = receive(clock_hz, baud, frames, ready_at=release)
    check_bytes([0x11, 0x44], [byte for _, byte in seen["bytes"]])
    assert len(seen["overrun"]) == 2, f"expected 2 overruns, got cycles {seen['overrun']}"
    # The first byte is held until ready rises, then taken at the next clock edge.
    first_fall = next(cycle for cycle, level in seen["valid"]
                      if level == 0 and cycle > seen["bytes"][0][0])
    assert first_fall == release + 1, \
        f"valid changes {seen['valid']}: expected the first byte held until cycle {release}"
    assert seen["framing"] == []


# --- Transmitter ----------------------------------------------------------------------------

def transmit(clock_hz, baud, data, gaps):
    """Offer ``data`` to a transmitter, byte ``n`` after ``gaps[n]`` cycles without ``valid``.

    Returns the ``tx`` level of every cycle, the cycle each byte was offered and the cycle it
    was accepted.
    """
    dut = UARTTransmitter(clock_hz, baud)
    harness = Harness(dut)
    edges, offered, accepted, length = [(0, 1)], [], [], []

    async def producer(ctx):
        for byte, gap in zip(data, gaps):
            if gap:
                ctx.set(dut.i.valid, 0)
                await ctx.tick().repeat(gap)
            offered.append(ctx.get(harness.cycle))
            accepted.append(await put(ctx, dut.i, byte, harness.cycle))
        ctx.set(dut.i.valid, 0)
        await ctx.tick().repeat(math.ceil(12 * clock_hz / baud))
        length.append(ctx.get(harness.cycle))

    async def monitor(ctx):
        async for level, cycle in watch(ctx, dut.tx, sample=(harness.cycle,)):
            edges.append((cycle, level))

    run(harness, [producer], background=[monitor])
    trace = []
    for (cycle, level), (end, _) in zip(edges, edges[1:] + [(length[0], None)]):
        trace.extend([level] * (end - cycle))
    return trace, offered, accepted


def expected_line(clock_hz, baud, data, offered, length):
    """The documented transmitter: returns the expected ``tx`` level per cycle and the cycle in
    which each byte should be accepted."""
    bit = Fraction(clock_hz, baud)
    line = [1] * length
    accept = []
    run_start = None        # first cycle of the current run of back-to-back frames
    run_bits = 0            # bits sent in the current run
    frame_end = 0           # first cycle after the previous frame's stop bit
    for byte, offer in zip(data, offered):
        if run_start is not None and offer <= frame_end - 1:
            # Offered before the stop bit ended: accepted in its last cycle, sent back to back.
            accept.append(frame_end - 1)
        else:
            accept.append(max(offer, frame_end))
            run_start, run_bits = accept[-1] + 1, 0
        for k, level in enumerate(frame_bits(byte)):
            begin = run_start + math.ceil((run_bits + k) * bit)
            end = run_start + math.ceil((run_bits + k + 1) * bit)
            for cycle in range(begin, min(end, length)):
                line[cycle] = level
        run_bits += 10
        frame_end = run_start + math.ceil(run_bits * bit)
    return line, accept


def check_transmitter(clock_hz, baud, data, gaps):
    trace, offered, accepted = transmit(clock_hz, baud, data, gaps)
    want, want_accept = expected_line(clock_hz, baud, data, offered, len(trace))
    for index, (want_cycle, got_cycle) in enumerate(zip(want_accept, accepted)):
        assert want_cycle == got_cycle, \
            f"byte {index}: expected accepted in cycle {want_cycle}, got {got_cycle}"
    for cycle, (want_level, got_level) in enumerate(zip(want, trace)):
        assert want_level == got_level, \
            f"cycle {cycle}: tx expected {want_level}, got {got_level}"
    frames = decode_line(trace, Fraction(clock_hz, baud))
    check_bytes(data, [byte for _, byte, _ in frames])
    return frames


@pytest.mark.parametrize("clock_hz, baud", RATES, ids=RATE_IDS)
def test_transmitter_back_to_back(clock_hz, baud):
    rng = random.Random(3)
    data = [rng.getrandbits(8) for _ in range(byte_count(clock_hz, baud))]
    frames = check_transmitter(clock_hz, baud, data, [0] * len(data))
    # Fed continuously, frame n starts exactly ceil(10 * n * bit) cycles after the first.
    bit = Fraction(clock_hz, baud)
    first = frames[0][0]
    for index, (start, _, _) in enumerate(frames):
        assert start - first == math.ceil(10 * index * bit), \
            f"byte {index}: start bit {start - first} cycles after the first, expected " \
            f"{math.ceil(10 * index * bit)} (no idle time between frames)"


@pytest.mark.parametrize("clock_hz, baud", RATES, ids=RATE_IDS)
def test_transmitter_random_gaps(clock_hz, baud):
    rng = random.Random(5)
    bit = clock_hz / baud
    count = byte_count(clock_hz, baud)
    data = [rng.getrandbits(8) for _ in range(count)]
    # Gaps from none to longer than a frame, so bytes arrive both mid-frame and on an idle line.
    gaps = [rng.choice([0, 0, rng.randrange(1, 4), rng.randrange(int(12 * bit))])
            for _ in range(count)]
    check_transmitter(clock_hz, baud, data, gaps)


# --- Loopback and construction --------------------------------------------------------------

class _Loopback(wiring.Component):
    """Transmitter into receiver on one line."""

    def __init__(self, clock_hz, baud):
        self.clock_hz, self.baud = clock_hz, baud
        super().__init__({
            "i": In(stream.Signature(8)),
            "o": Out(stream.Signature(8)),
            "framing_error": Out(1),
            "overrun": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        m.submodules.transmitter = transmitter = UARTTransmitter(self.clock_hz, self.baud)
        m.submodules.receiver = receiver = UARTReceiver(self.clock_hz, self.baud)
        wiring.connect(m, wiring.flipped(self.i), transmitter.i)
        wiring.connect(m, receiver.o, wiring.flipped(self.o))
        m.d.comb += [
            receiver.rx.eq(transmitter.tx),
            self.framing_error.eq(receiver.framing_error),
            self.overrun.eq(receiver.overrun),
        ]
        return m


@pytest.mark.parametrize("clock_hz, baud", RATES, ids=RATE_IDS)
def test_loopback(clock_hz, baud):
    rng = random.Random(13)
    count = byte_count(clock_hz, baud)
    data = [rng.getrandbits(8) for _ in range(count)]
    gaps = [0 if rng.random() < 0.7 else rng.randrange(int(15 * clock_hz / baud))
            for _ in range(count)]
    dut = _Loopback(clock_hz, baud)
    harness = Harness(dut)
    received, errors = [], []

    async def producer(ctx):
        for byte, gap in zip(data, gaps):
            if gap:
                ctx.set(dut.i.valid, 0)
                await ctx.tick().repeat(gap)
            await put(ctx, dut.i, byte, harness.cycle)
        ctx.set(dut.i.valid, 0)
        await ctx.tick().repeat(math.ceil(12 * clock_hz / baud))

    async def consumer(ctx):
        ctx.set(dut.o.ready, 1)
        async for valid, framing, overrun, payload, cycle in watch(
                ctx, dut.o.valid, dut.framing_error, dut.overrun,
                sample=(dut.o.payload, harness.cycle)):
            if valid:
                received.append(payload)
            if framing or overrun:
                errors.append((cycle, framing, overrun))

    run(harness, [producer], background=[consumer])
    check_bytes(data, received)
    assert errors == [], f"(cycle, framing error, overrun): {errors}"


def test_uart_combined():
    clock_hz, baud = 25_000_000, 3_000_000
    dut = UART(clock_hz, baud)
    harness = Harness(dut)
    data = [0x00, 0xFF, 0xA5, 0x5A, 0x01, 0x80]
    received = []

    async def producer(ctx):
        for byte in data:
            await put(ctx, dut.tx_data, byte, harness.cycle)
        ctx.set(dut.tx_data.valid, 0)
        await ctx.tick().repeat(12 * 9)

    async def wire(ctx):
        async for (level,) in watch(ctx, dut.tx):
            ctx.set(dut.rx, level)

    async def consumer(ctx):
        ctx.set(dut.rx_data.ready, 1)
        async for valid, payload in watch(ctx, dut.rx_data.valid, sample=(dut.rx_data.payload,)):
            if valid:
                received.append(payload)

    run(harness, [producer], background=[wire, consumer])
    check_bytes(data, received)


@pytest.mark.parametrize("cls", [UARTReceiver, UARTTransmitter, UART])
def test_bad_parameters(cls):
    with pytest.raises(ValueError, match=r"^clock_hz must be at least 4 \* baud \(400\), not 399$"):
        cls(399, 100)
    with pytest.raises(ValueError, match=r"^baud must be positive, not 0$"):
        cls(100, 0)
    with pytest.raises(TypeError, match=r"^clock_hz must be an integer, not 25000000\.0$"):
        cls(25e6, 115200)
    cls(400, 100)
