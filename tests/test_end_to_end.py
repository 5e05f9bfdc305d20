"""End to end: the host driver drives the simulated device through ``socket://``.

``python -m sim.board`` (:class:`sim.board.BoardProcess`) simulates :class:`hw.device.Device`
under Verilator with its UART bridged to a TCP port; :mod:`sw.driver` talks to it exactly as it
talks to a board. The checks: PING, INFO against the :class:`~hw.config.DeviceConfig` built,
binary GEMMs with M, N and K that are not multiples of the array's shape compared with PyTorch,
the cycle counts against :func:`sw.driver.gemm_cycles_estimate`, successive connections
(including one that leaves a frame unfinished), and the board's exits.

Every wait is bounded: the board gets a wall-clock ``time_limit`` and an ``idle_timeout``, its
start and exit are awaited with timeouts, the driver's reply timeouts are finite, and the board
and its simulator are killed at teardown whatever happened. The first run builds the device with
Verilator (about half a minute on two cores); later runs reuse the build.
"""

import random
import re
import socket
import time

import pytest
import torch

import sw
from hw.config import DeviceConfig
from sim.board import BoardProcess
from sim.model import DeviceModel
from sw import protocol
from sw.driver import DeviceError, gemm_cycles_estimate
from sw.packing import gemm_tiling
from tests import boards

#: Small memories for a quick build; 8 clock cycles per UART bit; a short byte timeout (48,000
#: cycles) so that an abandoned frame is answered quickly; a payload limit that splits writes.
CONFIG = DeviceConfig(rows=3, cols=2, lane=16, max_depth=256, weight_depth=64,
                      activation_depth=64, result_depth=64, max_payload=64,
                      clock_hz=24_000_000, baud=3_000_000, byte_timeout_us=2000)

#: Seconds each reply may take beyond the driver's estimate (scaled by the board's time_scale).
REPLY_TIMEOUT = 5.0
#: Limits handed to every board: it ends itself even if this test process dies.
BOARD_LIMITS = {"idle_timeout": 60, "time_limit": 300, "startup_timeout": 300}

#: (M, N, K): none a multiple of rows (3), cols (2) or lane (16) unless noted.
SHAPES = [
    (7, 5, 45),
    (10, 7, 200),     # 4 x 4 tiles of 13 words: 52 of the 64 words of W and A
    (1, 1, 1),
    (5, 3, 256),      # K = max_depth
]


def request(command, payload=b""):
    return protocol.encode_frame(protocol.REQUEST_SYNC, command, payload)


def random_signs(shape, generator):
    """A tensor of +1/-1 (int64)."""
    return torch.randint(0, 2, shape, generator=generator, dtype=torch.int64) * 2 - 1


def check_gemm(W, A, counts, cycles):
    (M, K), (_, N) = W.shape, A.shape
    expected = (W @ A + K) // 2
    got = torch.from_numpy(counts)
    assert got.shape == (M, N), f"counts have shape {tuple(got.shape)}, expected {(M, N)}"
    mismatches = (got != expected).nonzero().tolist()
    assert not mismatches, (f"{len(mismatches)} of {M * N} counts differ, first at "
                            f"{mismatches[0]}: {got[tuple(mismatches[0])]} != "
                            f"{expected[tuple(mismatches[0])]}")
    m_tiles, n_tiles, k_words = gemm_tiling(M, K, N, CONFIG.rows, CONFIG.cols, CONFIG.lane)
    estimate = gemm_cycles_estimate(m_tiles, n_tiles, k_words, CONFIG.rows, CONFIG.cols)
    assert cycles == estimate, (f"GEMM {M}x{K}x{N} took {cycles} cycles, the estimate is "
                                f"{estimate}")


@pytest.fixture(scope="class")
def board():
    """A board serving successive connections for the tests of one class."""
    yield from boards.serving(CONFIG, BOARD_LIMITS)


def open_device(board):
    return boards.open_device(board, REPLY_TIMEOUT)


class TestServingBoard:
    def test_listening_line(self, board):
        assert board.url == f"socket://127.0.0.1:{board.port}"
        assert board.port > 0
        assert board.time_scale >= 1

    def test_ping_and_info(self, board):
        with open_device(board) as device:
            device.ping()
            device.ping(b"hello, simulated board")
            device.ping(bytes(range(CONFIG.max_payload)))
            info = device.info()
        assert info == protocol.INFO.unpack(CONFIG.info())
        assert info["protocol_version"] == protocol.PROTOCOL_VERSION
        assert (info["rows"], info["cols"], info["lane"]) == (CONFIG.rows, CONFIG.cols,
                                                              CONFIG.lane)
        assert (info["weight_depth"], info["activation_depth"], info["result_depth"]) == (
            CONFIG.weight_depth, CONFIG.activation_depth, CONFIG.result_depth)
        assert (info["clock_hz"], info["baud"]) == (CONFIG.clock_hz, CONFIG.baud)
        assert info["acc_width"] == CONFIG.acc_width

    def test_gemms_match_torch(self, board):
        generator = torch.Generator().manual_seed(20240601)
        with open_device(board) as device:
            for M, N, K in SHAPES:
                W, A = random_signs((M, K), generator), random_signs((K, N), generator)
                counts, cycles = device.gemm(W, A)
                check_gemm(W, A, counts, cycles)

    def test_sw_gemm_opens_its_own_connection(self, board):
        generator = torch.Generator().manual_seed(7)
        for M, N, K in [(4, 3, 100), (2, 5, 17)]:
            W, A = random_signs((M, K), generator), random_signs((K, N), generator)
            counts, cycles = sw.gemm(W, A, port=board.url, timeout=REPLY_TIMEOUT,
                                     time_scale=board.time_scale)
            check_gemm(W, A, counts, cycles)

    def test_abandoned_frame_does_not_reach_the_next_client(self, board):
        # A client that leaves mid-frame: the device answers TIMEOUT after its byte timeout,
        # and the board must swallow that reply before it serves the next client.
        with socket.create_connection(("127.0.0.1", board.port), timeout=10) as client:
            client.sendall(bytes([protocol.REQUEST_SYNC, protocol.Command.PING, 10, 0, 1, 2]))
        with open_device(board) as device:
            device.ping(b"fresh")       # a stale TIMEOUT reply here would fail the echo check
            assert device.skipped_bytes == 0
        assert "discarded 7 reply bytes of the last client" in board.output()

    def test_back_to_back_infos_are_all_answered(self, board):
        # 20 INFO requests in one write, as a pipelining host sends them: each is answered,
        # in order (protocol version 3 answered 12, one TIMEOUT and lost 7).
        with open_device(board) as device:
            device.send_raw(protocol.encode_frame(protocol.REQUEST_SYNC,
                                                  protocol.Command.INFO) * 20)
            replies = [device.receive_reply(REPLY_TIMEOUT) for _ in range(20)]
            assert replies == [(protocol.Status.OK, CONFIG.info())] * 20
            device.ping(b"after")
            assert device.skipped_bytes == 0

    @pytest.mark.parametrize("seed", [1, 2])
    def test_pipelined_burst_with_a_corrupt_frame(self, board, seed):
        # Seeded random frames in one write, up to the receive buffer: writes, reads of what
        # was written (replies of up to max_payload bytes, so requests arrive mid-reply),
        # PINGs, an unknown command, an oversize length and a corrupt CRC in the middle.
        # Every frame gets its reply, in order, as the model answers the same bytes.
        rng = random.Random(seed)
        header, read = protocol.WRITE_HEADER.pack, protocol.READ_REQUEST.pack
        word = CONFIG.word_bytes(protocol.Memory.ACTIVATIONS)
        frames = []
        for _ in range(12):
            kind = rng.choice(["write", "read", "ping", "write8"])
            address = rng.randrange(CONFIG.activation_depth - 15)
            count = rng.randrange(1, 15)
            if kind in ("write", "read"):
                frames.append(request(protocol.Command.WRITE, header(
                    memory=protocol.Memory.ACTIVATIONS, address=address)
                    + rng.randbytes(count * word)))
                if kind == "read":
                    frames.append(request(protocol.Command.READ, read(
                        memory=protocol.Memory.ACTIVATIONS, address=address, count=count)))
            elif kind == "write8":
                frames.append(request(protocol.Command.WRITE8, header(
                    memory=protocol.Memory.INTS, address=address) + rng.randbytes(count)))
                frames.append(request(protocol.Command.READ, read(
                    memory=protocol.Memory.INTS, address=address, count=count)))
            else:
                frames.append(request(protocol.Command.PING,
                                      rng.randbytes(rng.randrange(CONFIG.max_payload + 1))))
        corrupt = bytearray(request(protocol.Command.PING, b"corrupt"))
        corrupt[-1] ^= 0x10
        middle = len(frames) // 2
        frames[middle:middle] = [bytes(corrupt), request(0x7E, b"?"),
                                 bytes([protocol.REQUEST_SYNC, protocol.Command.PING, 0xFF,
                                        0x00])]
        burst = b"".join(frames)
        assert len(burst) - len(frames[0]) <= CONFIG.rx_buffer
        expected = DeviceModel(CONFIG).feed(burst)
        with open_device(board) as device:
            device.send_raw(burst)
            got = b""
            for _ in frames:
                status, payload = device.receive_reply(REPLY_TIMEOUT)
                got += protocol.encode_frame(protocol.REPLY_SYNC, status, payload)
            assert got == expected
            device.ping(b"after the burst")

    def test_driver_pipelines_and_counters_are_read_only(self, board):
        with open_device(board) as device:
            device.info()
            words = list(range(1, CONFIG.activation_depth + 1))
            device.write_words(protocol.Memory.ACTIVATIONS, 0, words)   # 5 frames, pipelined
            pending = [device.read_words(protocol.Memory.ACTIVATIONS, first, 16, wait=False)
                       for first in range(0, 64, 16)]
            device.write8(10, bytes([0, 1, 254, 255]))
            assert [p.result() for p in pending] == [words[f:f + 16] for f in range(0, 64, 16)]
            assert device.read_words(protocol.Memory.INTS, 10, 4) == [0, 1, 254, 255]
            before = device.read_words(protocol.Memory.COUNTERS, 0, 1)
            with pytest.raises(DeviceError) as info:
                device.request(protocol.Command.WRITE, protocol.WRITE_HEADER.pack(
                    memory=protocol.Memory.COUNTERS, address=0) + b"\x01\x02\x03\x04",
                    expected=0)
            assert info.value.status == protocol.Status.READ_ONLY
            assert device.read_words(protocol.Memory.COUNTERS, 0, 1) == before

    def test_speed_is_reported(self, board):
        with open_device(board) as device:
            device.ping(b"x")
        deadline = time.monotonic() + 10
        pattern = re.compile(r"connection \d+ ended \(client closed\) .*\(([\d,]+) cycles/s "
                             r"simulated, ([\d,]+) bytes/s through the socket\)")
        while not pattern.search(board.output()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pattern.search(board.output()), board.output(20)


def test_board_exits_after_its_connections():
    # After the class's board (the build directory is locked while one runs).
    with BoardProcess(CONFIG, connections=1, **BOARD_LIMITS) as board:
        with open_device(board) as device:
            device.ping(b"last")
        assert board.wait(60) == 0, board.output(20)
        assert "served 1 connection; exiting" in board.output()


def test_board_time_limit_fails_the_run():
    with BoardProcess(CONFIG, **{**BOARD_LIMITS, "time_limit": 1}) as board:
        assert board.wait(60) == 1, board.output(20)
        assert "time limit of 1 s reached" in board.output()
