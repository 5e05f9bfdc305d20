"""cocotb testbench of :mod:`sim.board`: a TCP socket bridged to the device's UART pins.

The toplevel is :class:`hw.device.Device` (ports ``clk``, ``rst``, ``rx``, ``tx``). Parameters
(:func:`sim.runner.parameters`): the :class:`hw.config.DeviceConfig` fields, and ``host``,
``port``, ``connections``, ``idle_timeout``, ``time_limit``, ``poll_cycles`` and
``drain_timeout`` as :func:`sim.board.main` describes them, and ``parent_pid``, the id of the
``python -m sim.board`` process (see :func:`die_with_parent`). Run it with ``python -m sim.board``.

How the bridge keeps the simulation going without stalling it:

* The socket is non-blocking and polled every ``poll_cycles`` simulated cycles (default: four
  byte times). Bytes from the client are queued for a :class:`sim.uart.UartSource` task that
  sends them into ``rx`` back to back; bytes a :class:`sim.uart.UartSink` receives on ``tx``
  are written back at the next poll. At most :data:`INBOX_LIMIT` bytes wait for the source; the
  rest stay in the kernel's buffers (TCP flow control).
* The bridge follows the framing of :mod:`sw.protocol` in both directions to know when every
  request the device has begun has been answered. Only then, with nothing waiting to be sent,
  does it wait for the client in the wall clock (``select``, :data:`IDLE_WAIT_S` at a time),
  between single poll intervals: the simulation is then nearly frozen instead of clocking an
  idle device at full speed, and wakes up as soon as the client sends. The tracking is a
  heuristic (a client that stalls mid-frame until the device's byte timeout can put it out of
  step); when out of step it errs on the side of clocking the device.
* Waiting for a connection blocks the simulator: simulated time stands still between clients.

The clock period is nominal (10 ns); all timing is in clock cycles.
"""

import dataclasses
import math
import os
import select
import signal
import socket
import sys
import time
from fractions import Fraction

import cocotb
from cocotb.clock import Clock
from cocotb.queue import Queue
from cocotb.simtime import get_sim_time
from cocotb.triggers import Timer

from hw.config import DeviceConfig
from sim.board import listening_line
from sim.runner import parameters
from sim.uart import UartSink, UartSource
from sw import protocol
from sw.protocol import Command, Status

PERIOD_NS = 10
#: Bytes received from the client that may wait for the UART source.
INBOX_LIMIT = 4096
#: Seconds one wall-clock wait for the client lasts while the device is idle.
IDLE_WAIT_S = 0.02
#: Seconds one wait for a connection lasts (between checks of the limits).
ACCEPT_WAIT_S = 0.25
#: ``prctl`` option: the signal a process gets when its parent dies (linux/prctl.h).
PR_SET_PDEATHSIG = 1
#: Payload of the self-test PING, which also measures the simulation speed under traffic.
SELF_TEST_PAYLOAD = bytes(range(0x30, 0x30 + 48))


def _plural(count, noun):
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


class FrameTracker:
    """Counts the frames of :mod:`sw.protocol` in one direction of a byte stream.

    ``started`` counts sync bytes that begin a frame, ``finished`` frames whose CRC has passed.
    Bytes between frames that are not ``sync`` are skipped, as the device skips them. With
    ``max_payload`` given (requests), a longer length ends the frame at once, as the device
    answers it with ``BAD_LENGTH`` and hunts for the next sync byte.
    """

    def __init__(self, sync, max_payload=None):
        self.sync = sync
        self.max_payload = max_payload
        self.started = self.finished = 0
        self._header = None        # bytes after the sync byte while in the header, else None
        self._remaining = 0        # payload and CRC bytes still to come

    def feed(self, data):
        index = 0
        while index < len(data):
            if self._remaining:
                take = min(self._remaining, len(data) - index)
                self._remaining -= take
                index += take
                if not self._remaining:
                    self.finished += 1
            elif self._header is not None:
                take = min(protocol.HEADER_SIZE - 1 - len(self._header), len(data) - index)
                self._header += data[index:index + take]
                index += take
                if len(self._header) == protocol.HEADER_SIZE - 1:
                    length = self._header[1] | self._header[2] << 8
                    self._header = None
                    if self.max_payload is not None and length > self.max_payload:
                        self.finished += 1
                    else:
                        self._remaining = length + protocol.CRC_SIZE
            else:
                found = data.find(self.sync, index)
                if found < 0:
                    return
                self.started += 1
                self._header = bytearray()
                index = found + 1


class Board:
    """The bridge between the listening socket and the UART pins (see the module docstring)."""

    def __init__(self, dut, settings):
        self.settings = settings
        self.config = DeviceConfig(**{field.name: settings[field.name]
                                      for field in dataclasses.fields(DeviceConfig)})
        self.cycles_per_bit = Fraction(self.config.clock_hz, self.config.baud)
        self.clock = Clock(dut.clk, PERIOD_NS, unit="ns")
        self.clock.start()
        dut.rst.value = 0
        self.source = UartSource(dut.rx, self.clock, self.cycles_per_bit)
        self.sink = UartSink(dut.tx, self.clock, self.cycles_per_bit)
        byte_cycles = 10 * self.cycles_per_bit
        self.poll_cycles = settings["poll_cycles"] or max(8, math.ceil(4 * byte_cycles))
        self.started = time.monotonic()
        self.last_activity = self.started
        self._inbox = Queue()
        self._queued = 0           # bytes in the inbox or being sent by the source
        self._feeder = cocotb.start_soon(self._feed())
        self._reset_trackers()

    # Time and limits.

    @staticmethod
    def cycles():
        return round(get_sim_time("ns")) // PERIOD_NS

    def check_time_limit(self):
        limit = self.settings["time_limit"]
        if limit and time.monotonic() - self.started > limit:
            raise AssertionError(f"sim.board: time limit of {limit:g} s reached")

    def idle_expired(self):
        limit = self.settings["idle_timeout"]
        return bool(limit) and time.monotonic() - self.last_activity > limit

    async def poll_interval(self):
        await Timer(self.poll_cycles * PERIOD_NS, unit="ns")

    # The UART side.

    async def _feed(self):
        while True:
            chunk = await self._inbox.get()
            await self.source.send(chunk)
            self._queued -= len(chunk)

    def _reset_trackers(self):
        self.requests = FrameTracker(protocol.REQUEST_SYNC, self.config.max_payload)
        self.replies = FrameTracker(protocol.REPLY_SYNC)

    def device_idle(self):
        """Every request begun has been answered and nothing waits to be sent to the device."""
        return self._queued == 0 and self.replies.finished >= self.requests.started

    def to_device(self, data):
        self.requests.feed(data)
        self._queued += len(data)
        self._inbox.put_nowait(bytes(data))

    async def from_device(self):
        """Bytes the device has sent since the last call (b"" if none)."""
        count = self.sink.count()
        if not count:
            return b""
        if len(self.sink.frames) > 10_000:
            self.sink.frames.clear()        # timing records we never read; bound the memory
        data = await self.sink.recv(count, timeout_cycles=1)
        self.replies.feed(data)
        return data

    async def self_test(self):
        """PING the device through the UART; return the simulated cycles per second it took."""
        frame = protocol.encode_frame(protocol.REQUEST_SYNC, Command.PING, SELF_TEST_PAYLOAD)
        expected = protocol.encode_frame(protocol.REPLY_SYNC, Status.OK, SELF_TEST_PAYLOAD)
        first, wall = self.cycles(), time.perf_counter()
        self.to_device(frame)
        timeout = math.ceil(4 * 10 * self.cycles_per_bit * (len(frame) + len(expected)) + 1000)
        reply = await self.sink.recv(len(expected), timeout_cycles=timeout)
        self.replies.feed(reply)
        speed = (self.cycles() - first) / (time.perf_counter() - wall)
        assert reply == expected, (f"sim.board: self-test PING answered {reply.hex(' ')}, "
                                   f"expected {expected.hex(' ')}")
        return speed

    # The socket side.

    def listen(self):
        host, port = self.settings["host"], self.settings["port"]
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            self.listener = socket.create_server((host, port), family=family, backlog=8)
        except OSError as error:
            raise AssertionError(f"sim.board: cannot listen on {host}:{port}: {error}") from None
        bound = self.listener.getsockname()[1]
        shown = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
        return f"socket://{shown}:{bound}"

    def accept(self):
        """Wait (blocking the simulator) for a client; ``None`` when the idle timeout expires."""
        while True:
            self.check_time_limit()
            if self.idle_expired():
                return None
            readable, _, _ = select.select([self.listener], [], [], ACCEPT_WAIT_S)
            if readable:
                connection, address = self.listener.accept()
                connection.setblocking(False)
                connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.last_activity = time.monotonic()
                return connection, address

    async def session(self, connection, address, number):
        """Bridge one client until it disconnects (or the idle timeout); print its figures."""
        print(f"sim.board: connection {number} from {address[0]}:{address[1]}", flush=True)
        first_cycle, wall = self.cycles(), time.perf_counter()
        first_request = self.requests.started
        received = sent = 0
        outbox = bytearray()
        reason = "client closed"
        try:
            while True:
                self.check_time_limit()
                outbox += await self.from_device()
                if outbox:
                    try:
                        count = connection.send(outbox)
                    except BlockingIOError:
                        count = 0
                    except OSError:
                        break               # the client is gone; its replies go nowhere
                    del outbox[:count]
                    sent += count
                    self.last_activity = time.monotonic()
                data = None
                if self._queued < INBOX_LIMIT:
                    try:
                        data = connection.recv(INBOX_LIMIT)
                    except BlockingIOError:
                        pass
                    except OSError:
                        break
                    if data == b"":
                        break
                    if data:
                        self.to_device(data)
                        received += len(data)
                        self.last_activity = time.monotonic()
                        continue            # take in all that has arrived before clocking on
                if not outbox and self.device_idle():
                    if self.idle_expired():
                        reason = "idle timeout"
                        break
                    # Nothing for the device to do: wait for the client in the wall clock.
                    readable, _, _ = select.select([connection], [], [], IDLE_WAIT_S)
                    if readable:
                        continue
                await self.poll_interval()
        finally:
            connection.close()
        cycles, seconds = self.cycles() - first_cycle, time.perf_counter() - wall
        print(f"sim.board: connection {number} ended ({reason}) after {seconds:.2f} s: "
              f"{received} bytes in, {sent} bytes out, "
              f"{_plural(self.requests.started - first_request, 'request')}, "
              f"{cycles} cycles ({cycles / seconds:,.0f} cycles/s simulated, "
              f"{(received + sent) / seconds:,.0f} bytes/s through the socket)", flush=True)
        return reason

    async def drain(self):
        """Clock the device until the requests of the last client are answered (replies are
        discarded), so that the next client finds it idle."""
        deadline = time.monotonic() + self.settings["drain_timeout"]
        discarded = 0
        while not self.device_idle():
            self.check_time_limit()
            if time.monotonic() > deadline:
                print(f"sim.board: warning: {self.requests.started - self.replies.finished} "
                      f"requests of the last client still unanswered after "
                      f"{self.settings['drain_timeout']:g} s; serving on", flush=True)
                break
            await self.poll_interval()
            discarded += len(await self.from_device())
        # A few byte times more, in case the tracking is out of step with the device.
        await Timer(math.ceil(40 * self.cycles_per_bit) * PERIOD_NS, unit="ns")
        discarded += len(await self.from_device())
        if discarded:
            print(f"sim.board: discarded {discarded} reply bytes of the last client", flush=True)
        self._reset_trackers()


def die_with_parent(parent_pid):
    """Have the kernel kill this process (the simulator) when its parent, ``python -m
    sim.board`` with id ``parent_pid``, dies, even by SIGKILL; exit at once if it already has.
    Linux only (``prctl(PR_SET_PDEATHSIG)``); elsewhere, and without ``parent_pid``, nothing."""
    if not parent_pid or not sys.platform.startswith("linux"):
        return
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return
    if os.getppid() != parent_pid:
        # The parent died before the request: nobody is left to serve.
        print(f"sim.board: the board process {parent_pid} has ended; exiting", flush=True)
        os._exit(1)


@cocotb.test()
async def serve(dut):
    """Serve the device's UART on a TCP socket until a limit ends the run."""
    settings = parameters()
    die_with_parent(settings.get("parent_pid"))
    board = Board(dut, settings)
    await Timer(10 * PERIOD_NS, unit="ns")
    speed = await board.self_test()
    # Twice the ratio of real to simulated speed: margin for a loaded machine.
    time_scale = max(1, math.ceil(2 * board.config.clock_hz / speed))
    url = board.listen()
    try:
        print(listening_line(url, board.config, time_scale), flush=True)
        print(f"sim.board: self-test PING passed at {speed:,.0f} simulated cycles/s "
              f"({board.config.clock_hz / speed:.0f} times slower than real time)", flush=True)
        served, wanted = 0, settings["connections"]
        while not wanted or served < wanted:
            accepted = board.accept()
            if accepted is None:
                print(f"sim.board: no client for {settings['idle_timeout']:g} s; exiting",
                      flush=True)
                return
            served += 1
            reason = await board.session(*accepted, served)
            if reason == "idle timeout":
                print(f"sim.board: client idle for {settings['idle_timeout']:g} s; exiting",
                      flush=True)
                return
            if not wanted or served < wanted:
                await board.drain()
        print(f"sim.board: served {_plural(served, 'connection')}; exiting", flush=True)
    finally:
        board.listener.close()
