"""cocotb testbench: the device core (:class:`hw.core.DeviceCore`) as a GEMM device, against
PyTorch.

The toplevel is the core itself, byte streams in and out, without the UART: ports
``rx_data__payload``, ``rx_data__valid``, ``rx_data__ready`` (requests) and ``tx_data__payload``,
``tx_data__valid``, ``tx_data__ready`` (replies). Parameters (see :func:`sim.runner.parameters`):
the fields of :class:`hw.config.DeviceConfig` (the build), ``seed``, ``shapes`` (random GEMM
shapes in :func:`gemm_shapes`), ``gap_probability`` (the chance that ``rx_data__valid`` stays
low for a few cycles before a request byte) and ``ready_probability`` (the chance that
``tx_data__ready`` is high in a cycle). Run it with ``tests/test_cocotb_gemm.py``, or by hand::

    python -m sim.runner tests.test_cocotb_gemm:core sim.tb_core -p rows=2 -p cols=3 -p lane=8 \\
        -p max_depth=64 -p weight_depth=32 -p activation_depth=32 -p result_depth=32 \\
        -p max_payload=64 -p byte_timeout_us=1000 -p clock_hz=1000000 -p baud=250000 \\
        -t seed=1 -t shapes=6 -t gap_probability=0.2 -t ready_probability=0.6

(fields left out take the defaults of :class:`hw.config.DeviceConfig`).

The host side is built from the host's own code: requests with :func:`sw.protocol.encode_frame`,
matrices packed with :func:`sw.packing.pack_weights` and :func:`sw.packing.pack_activations`,
results unpacked with :func:`sw.packing.unpack_results`. WRITEs and READs are split to fit
``max_payload`` as the driver splits them. The reference is ``(W @ A + K) / 2`` computed by torch
in int64 from the +1/-1 matrices. Every reply must be a well-formed frame (sync byte, length,
CRC; checked by rebuilding it with :func:`sw.protocol.encode_frame`), and no byte may come back
that is not part of an expected reply.

The simulated clock period is nominal (10 ns). The speed of the simulation is written to
``speed.json`` in the build directory.
"""

import collections
import dataclasses
import random
import time

import cocotb
import torch
from cocotb.clock import Clock
from cocotb.triggers import Event, FallingEdge, ReadOnly, Timer, with_timeout

from hw.config import DeviceConfig
from sim.runner import parameters
from sim.tb_uart import record_speed
from sw import packing, protocol
from sw.protocol import Command, Memory, Status

PERIOD_NS = 10


def config():
    """The :class:`hw.config.DeviceConfig` of the build under test."""
    p = parameters()
    return DeviceConfig(**{field.name: p[field.name]
                           for field in dataclasses.fields(DeviceConfig) if field.name in p})


def gemm_cycles(m_tiles, n_tiles, k_words, rows, cols):
    """The GEMM reply's ``cycles`` the hardware documents (:class:`hw.gemm.GemmEngine`)."""
    return (m_tiles * n_tiles - 1) * max(k_words, rows) + k_words + 2 * rows + cols + 3


class Link:
    """Both byte streams of the core, driven and watched cycle by cycle.

    One task sets the inputs after each falling edge and samples the handshakes in the
    read-only phase that follows. Request bytes queued with :meth:`send` are offered in order,
    each after an idle gap of 1 .. ``max_gap`` cycles with probability ``gap_probability``;
    ``tx_data__ready`` is high with probability ``ready_probability``. Reply bytes accumulate
    in ``received``.
    """

    def __init__(self, dut, rng, gap_probability, ready_probability, max_gap=6):
        self.dut = dut
        self.rng = rng
        self.gap_probability = gap_probability
        self.ready_probability = ready_probability
        self.max_gap = max_gap
        self.outgoing = collections.deque()
        self.received = bytearray()
        self.arrived = Event()
        self.cycles = 0
        self.rx_stalls = 0          # cycles with a request byte offered and rx_data not ready
        self.tx_held = 0            # cycles with a reply byte offered and tx_data__ready low

    def start(self):
        cocotb.start_soon(self._run())

    async def _run(self):
        dut, rng = self.dut, self.rng
        presenting, idle = False, 0
        while True:
            await FallingEdge(dut.clk)
            self.cycles += 1
            if not presenting and self.outgoing:
                if idle:
                    idle -= 1
                elif rng.random() < self.gap_probability:
                    idle = rng.randint(1, self.max_gap) - 1
                else:
                    dut.rx_data__payload.value = self.outgoing[0]
                    presenting = True
            dut.rx_data__valid.value = int(presenting)
            ready = rng.random() < self.ready_probability
            dut.tx_data__ready.value = int(ready)
            await ReadOnly()
            if presenting:
                if int(dut.rx_data__ready.value):
                    self.outgoing.popleft()
                    presenting = False
                else:
                    self.rx_stalls += 1
            if int(dut.tx_data__valid.value):
                if ready:
                    self.received.append(int(dut.tx_data__payload.value))
                    self.arrived.set()
                else:
                    self.tx_held += 1

    def send(self, data):
        """Queue request bytes (they leave in order, behind those queued before)."""
        self.outgoing.extend(bytes(data))

    def _take_reply(self):
        buffer = self.received
        if not buffer:
            return None
        assert buffer[0] == protocol.REPLY_SYNC, (
            f"a reply must start with {protocol.REPLY_SYNC:#04x}, not "
            f"{bytes(buffer[:8]).hex(' ')}")
        if len(buffer) < protocol.HEADER_SIZE:
            return None
        length = buffer[2] | buffer[3] << 8
        size = protocol.HEADER_SIZE + length + protocol.CRC_SIZE
        if len(buffer) < size:
            return None
        frame = bytes(buffer[:size])
        del buffer[:size]
        status, payload = frame[1], frame[protocol.HEADER_SIZE:-protocol.CRC_SIZE]
        assert frame == protocol.encode_frame(protocol.REPLY_SYNC, status, payload), (
            f"malformed reply frame (bad CRC?): {frame.hex(' ')}")
        return Status(status), payload

    async def reply(self, timeout_cycles):
        """Wait (at most ``timeout_cycles``) for the next complete reply frame; return
        ``(status, payload)``."""
        async def wait():
            while (frame := self._take_reply()) is None:
                self.arrived.clear()
                await self.arrived.wait()
            return frame
        try:
            return await with_timeout(wait(), timeout_cycles * PERIOD_NS, "ns")
        except TimeoutError:
            raise AssertionError(
                f"no complete reply within {timeout_cycles} cycles ({len(self.outgoing)} request "
                f"bytes not taken, received {bytes(self.received[:16]).hex(' ')})") from None

    async def quiet(self, cycles):
        """Let ``cycles`` pass and check that every request byte was taken and that nothing
        came back that was not read as a reply."""
        await Timer(cycles * PERIOD_NS, unit="ns")
        assert not self.outgoing, f"{len(self.outgoing)} request bytes were never taken"
        assert not self.received, f"unexpected reply bytes: {bytes(self.received).hex(' ')}"


def _command_name(command):
    return Command(command).name if command in Command._value2member_map_ else hex(command)


class Host:
    """Requests to the core over a :class:`Link`, checked as they are answered."""

    def __init__(self, link, cfg):
        self.link = link
        self.cfg = cfg
        # Requests sent and not yet answered: (command, status, OK payload length or None,
        # request payload length, cycles of computation).
        self.pending = collections.deque()

    def timeout_for(self, size, compute_cycles=0):
        """Cycles a reply may take, generously: ``max_gap + 4`` cycles per byte of the request
        and of the longest reply, plus twice the computation."""
        return 200 + (size + self.cfg.max_payload + 16) * (self.link.max_gap + 4) \
            + 2 * compute_cycles

    def send(self, command, payload=b"", *, status=Status.OK, expected=None, compute=0,
             frame=None):
        """Queue a request without waiting for its reply; :meth:`answer` checks the reply.

        ``frame`` replaces the encoded request bytes (for broken frames)."""
        payload = bytes(payload)
        self.link.send(protocol.encode_frame(protocol.REQUEST_SYNC, command, payload)
                       if frame is None else frame)
        self.pending.append((command, status, expected, len(payload), compute))

    async def answer(self):
        """Wait for the reply to the oldest request sent; check its status (an error reply must
        name the request's command) and payload length; return the payload."""
        command, status, expected, size, compute = self.pending.popleft()
        got, payload = await self.link.reply(self.timeout_for(size, compute))
        name = _command_name(command)
        assert got == status, (
            f"{name} answered {got.name} (payload {payload.hex(' ')}), expected {status.name}")
        if status != Status.OK:
            assert payload == bytes([command]), (
                f"{status.name} reply to {name} must name the command, not {payload.hex(' ')}")
        elif expected is not None:
            assert len(payload) == expected, (
                f"{name} reply carries {len(payload)} bytes, expected {expected}")
        return payload

    async def request(self, command, payload=b"", **kwargs):
        self.send(command, payload, **kwargs)
        return await self.answer()

    # Memories, split into requests that fit max_payload (as sw.driver.Device does).

    def send_write(self, memory, address, words):
        cfg = self.cfg
        width = cfg.word_widths()[memory]
        size = packing.word_bytes(width)
        per_request = (cfg.max_payload - protocol.WRITE_HEADER.size) // size
        for first in range(0, len(words), per_request):
            data = packing.words_to_bytes(words[first:first + per_request], width)
            header = protocol.WRITE_HEADER.pack(memory=memory, address=address + first)
            self.send(Command.WRITE, header + data, expected=0)

    def send_read(self, memory, address, count):
        size = self.cfg.word_bytes(memory)
        per_request = self.cfg.max_payload // size
        for first in range(0, count, per_request):
            words = min(per_request, count - first)
            self.send(Command.READ, protocol.READ_REQUEST.pack(
                memory=memory, address=address + first, count=words), expected=words * size)

    async def answer_read(self, memory, count):
        """The words of the READs :meth:`send_read` queued for ``count`` words."""
        data = bytearray()
        while len(data) < count * self.cfg.word_bytes(memory):
            data += await self.answer()
        return packing.bytes_to_words(data, self.cfg.word_widths()[memory])

    async def write(self, memory, address, words):
        self.send_write(memory, address, words)
        while self.pending:
            await self.answer()

    async def read(self, memory, address, count):
        self.send_read(memory, address, count)
        return await self.answer_read(memory, count)

    def send_gemm(self, m_tiles, n_tiles, k_words, status=Status.OK):
        cfg = self.cfg
        self.send(Command.GEMM, protocol.GEMM_REQUEST.pack(
            m_tiles=m_tiles, n_tiles=n_tiles, k_words=k_words), status=status,
            expected=protocol.GEMM_REPLY.size,
            compute=max(0, gemm_cycles(m_tiles, n_tiles, k_words, cfg.rows, cfg.cols)))

    def check_cycles(self, payload, M, K, N):
        """Check a GEMM reply's cycles against :func:`gemm_cycles`."""
        cfg = self.cfg
        m_tiles, n_tiles, k_words = packing.gemm_tiling(M, K, N, cfg.rows, cfg.cols, cfg.lane)
        cycles = protocol.GEMM_REPLY.unpack(payload)["cycles"]
        expected = gemm_cycles(m_tiles, n_tiles, k_words, cfg.rows, cfg.cols)
        assert cycles == expected, (
            f"GEMM {M}x{K}x{N} ({m_tiles} x {n_tiles} tiles of {k_words} words) took {cycles} "
            f"cycles, documented {expected}")
        return cycles

    def counts(self, words, M, N):
        cfg = self.cfg
        return torch.from_numpy(
            packing.unpack_results(words, M, N, cfg.rows, cfg.cols, cfg.acc_width))

    async def run_gemm(self, M, K, N):
        """Run the GEMM of the loaded (M x K) and (K x N) matrices, check its cycles and read
        the counts back; return them as a tensor."""
        cfg = self.cfg
        m_tiles, n_tiles, k_words = packing.gemm_tiling(M, K, N, cfg.rows, cfg.cols, cfg.lane)
        self.send_gemm(m_tiles, n_tiles, k_words)
        self.check_cycles(await self.answer(), M, K, N)
        words = await self.read(Memory.RESULTS, 0, m_tiles * n_tiles * cfg.rows)
        return self.counts(words, M, N)

    async def gemm(self, W, A, *, pipelined=False):
        """Load ``W`` and ``A`` (+1/-1 tensors), run the GEMM (checking its cycles) and read
        the counts back; return them as a tensor.

        With ``pipelined``, every request is queued before the first reply is read (the core
        then holds the request stream off while it executes)."""
        cfg = self.cfg
        (M, K), N = W.shape, A.shape[1]
        self.send_write(Memory.WEIGHTS, 0, packing.pack_weights(W, cfg.rows, cfg.lane))
        self.send_write(Memory.ACTIVATIONS, 0, packing.pack_activations(A, cfg.cols, cfg.lane))
        if not pipelined:
            while self.pending:
                await self.answer()
            return await self.run_gemm(M, K, N)
        m_tiles, n_tiles, k_words = packing.gemm_tiling(M, K, N, cfg.rows, cfg.cols, cfg.lane)
        result_words = m_tiles * n_tiles * cfg.rows
        self.send_gemm(m_tiles, n_tiles, k_words)
        self.send_read(Memory.RESULTS, 0, result_words)
        while self.pending[0][0] != Command.GEMM:
            await self.answer()
        self.check_cycles(await self.answer(), M, K, N)
        return self.counts(await self.answer_read(Memory.RESULTS, result_words), M, N)


def random_signs(generator, *shape):
    return torch.randint(0, 2, shape, generator=generator) * 2 - 1


def reference(W, A):
    """``(W @ A + K) / 2`` of +1/-1 tensors, in int64."""
    return (W.to(torch.int64) @ A.to(torch.int64) + W.shape[1]) // 2


def check_counts(counts, W, A):
    expected = reference(W, A)
    assert counts.shape == expected.shape, f"counts of shape {tuple(counts.shape)}"
    wrong = (counts != expected).nonzero()
    if len(wrong):
        m, n = wrong[0].tolist()
        raise AssertionError(
            f"{W.shape[0]}x{W.shape[1]}x{A.shape[1]}: {len(wrong)} wrong counts, first at "
            f"[{m}, {n}]: {counts[m, n]}, torch reference {expected[m, n]}")


def fits(cfg, M, K, N):
    m_tiles, n_tiles, k_words = packing.gemm_tiling(M, K, N, cfg.rows, cfg.cols, cfg.lane)
    return (K <= cfg.max_depth and m_tiles * k_words <= cfg.weight_depth
            and n_tiles * k_words <= cfg.activation_depth
            and m_tiles * n_tiles * cfg.rows <= cfg.result_depth)


def random_shape(rng, cfg):
    """A random (M, K, N) that fits the device, K mostly not a multiple of lane."""
    K = rng.randint(1, cfg.max_depth)
    k_words = -(-K // cfg.lane)
    m_tiles = rng.randint(1, min(cfg.weight_depth // k_words, cfg.result_depth // cfg.rows))
    n_tiles = rng.randint(1, min(cfg.activation_depth // k_words,
                                 cfg.result_depth // (cfg.rows * m_tiles)))
    M = rng.randint((m_tiles - 1) * cfg.rows + 1, m_tiles * cfg.rows)
    N = rng.randint((n_tiles - 1) * cfg.cols + 1, n_tiles * cfg.cols)
    return M, K, N


def gemm_shapes(cfg, rng, count):
    """Edge shapes (K = 1; M, N, K one past a multiple of rows, cols, lane; K = max_depth;
    many tiles) and ``count`` random ones; every one fits ``cfg``."""
    rows, cols, lane = cfg.rows, cfg.cols, cfg.lane
    k_max = cfg.max_depth
    edge = [
        (1, 1, 1),
        (rows, 1, cols),
        (rows + 1, lane + 1, cols + 1),
        (2 * rows - 1, 2 * lane - 1, 2 * cols - 1),
        (rows, k_max, cols),
        (1, k_max, 1),
        (rows * 2 + 1, k_max - 1, cols * 2 - 1),
        (rows * 3, lane, cols * 3),
    ]
    shapes = [shape for shape in edge if fits(cfg, *shape)]
    assert any(K == k_max for _, K, _ in shapes), "no shape with K = max_depth fits"
    return shapes + [random_shape(rng, cfg) for _ in range(count)]


async def setup(dut, offset, *, gap_probability=None, ready_probability=None):
    """Start the clock, reset the core (its memories keep their contents) and the link;
    return ``(host, rng, torch generator)`` seeded from ``seed`` and ``offset``."""
    p = parameters()
    Clock(dut.clk, PERIOD_NS, unit="ns").start()
    dut.rst.value = 1
    dut.rx_data__valid.value = 0
    dut.rx_data__payload.value = 0
    dut.tx_data__ready.value = 0
    for _ in range(2):
        await FallingEdge(dut.clk)
    dut.rst.value = 0
    seed = p["seed"] * 1000 + offset
    rng = random.Random(seed)
    # The link draws from its own generator so that the test's data do not depend on timing.
    link = Link(dut, random.Random(seed + 500),
                p["gap_probability"] if gap_probability is None else gap_probability,
                p["ready_probability"] if ready_probability is None else ready_probability)
    link.start()
    return Host(link, config()), rng, torch.Generator().manual_seed(seed)


@cocotb.test()
async def info_and_ping(dut):
    """INFO answers the build's parameters (the configuration under test is the one built) and
    PING echoes a payload of max_payload bytes."""
    host, rng, _ = await setup(dut, 1)
    cfg = host.cfg
    info = await host.request(Command.INFO, expected=protocol.INFO.size)
    assert info == cfg.info(), f"INFO {protocol.INFO.unpack(info)}, built {cfg}"
    data = bytes(rng.getrandbits(8) for _ in range(cfg.max_payload))
    assert await host.request(Command.PING, data) == data
    await host.link.quiet(200)


@cocotb.test()
async def gemm_against_torch(dut):
    """GEMMs of edge and seeded random shapes (M, N, K not multiples of rows, cols, lane;
    K = 1; K = max_depth; several tiles), each request waited for, with random gaps on rx and
    random backpressure on tx: every count equals torch's, and every GEMM reply's cycles equal
    ``(T-1) * max(k_words, rows) + k_words + 2*rows + cols + 3``."""
    host, rng, generator = await setup(dut, 2)
    shapes = gemm_shapes(host.cfg, rng, parameters()["shapes"])
    wall, start = time.perf_counter(), host.link.cycles
    for M, K, N in shapes:
        W, A = random_signs(generator, M, K), random_signs(generator, K, N)
        check_counts(await host.gemm(W, A), W, A)
    record_speed("core_gemm", host.link.cycles - start, time.perf_counter() - wall)
    await host.link.quiet(200)
    assert host.link.tx_held > 0, "tx backpressure never held a reply byte"
    cocotb.log.info("%d GEMMs: %s", len(shapes), shapes)


@cocotb.test()
async def pipelined_requests(dut):
    """Every request of two GEMMs (a random one, then one that fills the memories with
    K = max_depth - 1) queued at once, without waiting for replies, sent without gaps to a slow
    reader on tx: the core holds rx off (its receive FIFO fills while it executes), answers
    every request in order, and the counts match torch."""
    host, rng, generator = await setup(dut, 3, gap_probability=0.0, ready_probability=0.3)
    cfg = host.cfg
    K = cfg.max_depth - 1
    k_words = -(-K // cfg.lane)
    m_tiles = min(cfg.weight_depth // k_words, cfg.result_depth // cfg.rows)
    n_tiles = min(cfg.activation_depth // k_words, cfg.result_depth // (cfg.rows * m_tiles))
    big = (m_tiles * cfg.rows - 1, K, n_tiles * cfg.cols - 1)
    for M, K, N in (random_shape(rng, cfg), big):
        W, A = random_signs(generator, M, K), random_signs(generator, K, N)
        check_counts(await host.gemm(W, A, pipelined=True), W, A)
    await host.link.quiet(200)
    assert host.link.rx_stalls > 0, "the core never held the request stream off"
    cocotb.log.info("request stream held off for %d cycles", host.link.rx_stalls)


@cocotb.test()
async def results_outside_the_product_untouched(dut):
    """A GEMM writes exactly its ``m_tiles * n_tiles * rows`` result words: the words after
    them keep what the host wrote there."""
    host, rng, generator = await setup(dut, 4)
    cfg = host.cfg
    width = cfg.word_widths()[Memory.RESULTS]
    sentinel = [rng.getrandbits(width) for _ in range(cfg.result_depth)]
    await host.write(Memory.RESULTS, 0, sentinel)
    M, K, N = cfg.rows + 1, cfg.lane + 3, cfg.cols
    W, A = random_signs(generator, M, K), random_signs(generator, K, N)
    check_counts(await host.gemm(W, A), W, A)
    m_tiles, n_tiles, _ = packing.gemm_tiling(M, K, N, cfg.rows, cfg.cols, cfg.lane)
    used = m_tiles * n_tiles * cfg.rows
    words = await host.read(Memory.RESULTS, 0, cfg.result_depth)
    assert words[used:] == sentinel[used:], "result words outside the product were written"
    await host.link.quiet(200)


@cocotb.test()
async def bad_frames_then_gemm(dut):
    """Broken requests between a GEMM's loads and its run: junk between frames is dropped; a
    WRITE of other weights with a bad CRC is answered BAD_CRC and writes nothing; a GEMM with a
    bad CRC is answered BAD_CRC; GEMMs that do not fit are answered BAD_ARGUMENT; a truncated
    frame is answered TIMEOUT. The good GEMM that follows computes the loaded matrices."""
    host, rng, generator = await setup(dut, 5)
    cfg = host.cfg
    M, K, N = cfg.rows + 1, 2 * cfg.lane + 1, cfg.cols + 2
    W, A = random_signs(generator, M, K), random_signs(generator, K, N)
    m_tiles, n_tiles, k_words = packing.gemm_tiling(M, K, N, cfg.rows, cfg.cols, cfg.lane)
    await host.write(Memory.WEIGHTS, 0, packing.pack_weights(W, cfg.rows, cfg.lane))
    await host.write(Memory.ACTIVATIONS, 0, packing.pack_activations(A, cfg.cols, cfg.lane))

    # Junk outside frames: no reply at all.
    host.link.send(bytes(rng.choice([b for b in range(256) if b != protocol.REQUEST_SYNC])
                         for _ in range(40)))
    # Other weights, with a bad CRC.
    width = cfg.word_widths()[Memory.WEIGHTS]
    other = [rng.getrandbits(width) for _ in range(m_tiles * k_words)]
    payload = protocol.WRITE_HEADER.pack(memory=Memory.WEIGHTS, address=0) + \
        packing.words_to_bytes(other[:(cfg.max_payload - protocol.WRITE_HEADER.size)
                                     // cfg.word_bytes(Memory.WEIGHTS)], width)
    frame = bytearray(protocol.encode_frame(protocol.REQUEST_SYNC, Command.WRITE, payload))
    frame[-2] ^= 0x01
    host.send(Command.WRITE, payload, status=Status.BAD_CRC, frame=frame)
    # A good GEMM request with a bad CRC.
    request = protocol.GEMM_REQUEST.pack(m_tiles=m_tiles, n_tiles=n_tiles, k_words=k_words)
    frame = bytearray(protocol.encode_frame(protocol.REQUEST_SYNC, Command.GEMM, request))
    frame[-1] ^= 0x80
    host.send(Command.GEMM, request, status=Status.BAD_CRC, frame=frame)
    # GEMMs that do not fit.
    host.send_gemm(m_tiles, n_tiles, cfg.max_k_words + 1, status=Status.BAD_ARGUMENT)
    host.send_gemm(0, n_tiles, k_words, status=Status.BAD_ARGUMENT)
    host.send_gemm(cfg.weight_depth + 1, 1, 1, status=Status.BAD_ARGUMENT)
    while host.pending:
        await host.answer()

    # A truncated frame: answered TIMEOUT once the byte timeout has passed.
    truncated = protocol.encode_frame(protocol.REQUEST_SYNC, Command.GEMM, request)[:5]
    host.send(Command.GEMM, request, status=Status.TIMEOUT, frame=truncated,
              compute=cfg.byte_timeout_cycles)
    await host.answer()

    check_counts(await host.run_gemm(M, K, N), W, A)
    await host.link.quiet(200)
