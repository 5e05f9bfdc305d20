"""Tests of the host driver (sw.driver, sw.transport) against the device model (sim.model)."""

import contextlib
import socket
import struct
import threading
import time

import numpy as np
import pytest
import torch
from serial.tools.list_ports_common import ListPortInfo

import sw
from hw.config import DeviceConfig
from sim.model import DeviceModel, LoopbackTransport
from sw import protocol
from sw.driver import (
    CapacityError,
    Device,
    DeviceError,
    DeviceTimeoutError,
    DriverError,
    IncompatibleDeviceError,
    ProtocolError,
)
from sw.packing import gemm_tiling, reference_counts, words_to_bytes
from sw.protocol import Command, Memory, Status
from sw.transport import PortSelectionError, find_ftdi_port, open_transport

#: Small memories, a payload that forces chunking, lane and widths that are multiples of 8.
SMALL = DeviceConfig(rows=2, cols=3, lane=8, max_depth=256, weight_depth=64,
                     activation_depth=64, result_depth=64, max_payload=64,
                     clock_hz=1_000_000, baud=250_000)
#: Word widths that are not multiples of 8 (36, 60 and 5 * 10 bits).
ODD = DeviceConfig(rows=3, cols=5, lane=12, max_depth=600, max_payload=100)
#: One processing element with a wide lane.
SINGLE = DeviceConfig(rows=1, cols=1, lane=64, max_depth=1024, max_payload=64)
#: The default build (4 x 4 x 32).
DEFAULT = DeviceConfig()

GEMM_CASES = [
    (SMALL, (1, 1, 1)), (SMALL, (5, 19, 4)), (SMALL, (7, 64, 9)), (SMALL, (10, 40, 14)),
    (ODD, (3, 12, 5)), (ODD, (10, 100, 11)), (ODD, (20, 599, 23)),
    (SINGLE, (1, 64, 1)), (SINGLE, (4, 65, 3)), (SINGLE, (9, 1000, 5)),
    (DEFAULT, (4, 32, 4)), (DEFAULT, (33, 300, 21)), (DEFAULT, (8, 4096, 8)),
]


def make_device(config=SMALL, *, timeout=0.05, **transport_options):
    model = DeviceModel(config)
    transport = LoopbackTransport(model, **transport_options)
    return Device(transport, timeout=timeout), transport, model


def random_signs(rng, shape):
    return rng.choice(np.array([-1, 1], dtype=np.int8), size=shape)


def reply(status, payload=b""):
    return protocol.encode_frame(protocol.REPLY_SYNC, status, payload)


def request(command, payload=b""):
    return protocol.encode_frame(protocol.REQUEST_SYNC, command, payload)


def reframe(frame, status=None, payload=None):
    """Re-encode a reply frame with a changed status or payload and a correct CRC."""
    old_status, length = frame[1], frame[2] | frame[3] << 8
    return reply(old_status if status is None else status,
                 frame[4:4 + length] if payload is None else payload)


def parse_requests(data):
    """Split the bytes a driver wrote into ``(command, payload)`` frames (no garbage allowed)."""
    frames, offset = [], 0
    while offset < len(data):
        assert data[offset] == protocol.REQUEST_SYNC, f"byte {offset}: {data[offset]:#04x}"
        command, length = data[offset + 1], data[offset + 2] | data[offset + 3] << 8
        payload = bytes(data[offset + 4:offset + 4 + length])
        crc = data[offset + 4 + length] | data[offset + 5 + length] << 8
        assert crc == protocol.crc16(data[offset + 1:offset + 4 + length])
        frames.append((command, payload))
        offset += 6 + length
    return frames


# GEMM through the model.

@pytest.mark.parametrize("config,shape", GEMM_CASES,
                         ids=[f"{c.rows}x{c.cols}x{c.lane}-{m}x{k}x{n}"
                              for c, (m, k, n) in GEMM_CASES])
def test_gemm_matches_reference(config, shape):
    M, K, N = shape
    rng = np.random.default_rng(M * 10_000 + K * 100 + N)
    W, A = random_signs(rng, (M, K)), random_signs(rng, (K, N))
    device, transport, model = make_device(config)
    counts, cycles = device.gemm(W, A)
    assert counts.shape == (M, N) and counts.dtype == np.int64
    np.testing.assert_array_equal(counts, reference_counts(W, A))
    m_tiles, n_tiles, k_words = gemm_tiling(M, K, N, config.rows, config.cols, config.lane)
    assert cycles == model.gemm_cycles(m_tiles, n_tiles, k_words)
    assert model.gemm_runs == 1
    for command, payload in parse_requests(transport.written):
        assert len(payload) <= config.max_payload


def test_gemm_twice_on_one_device():
    rng = np.random.default_rng(7)
    device, transport, _ = make_device(SMALL)
    W1, A1 = random_signs(rng, (10, 40)), random_signs(rng, (40, 14))
    W2, A2 = random_signs(rng, (3, 9)), random_signs(rng, (9, 2))
    np.testing.assert_array_equal(device.gemm(W1, A1)[0], reference_counts(W1, A1))
    np.testing.assert_array_equal(device.gemm(W2, A2)[0], reference_counts(W2, A2))
    infos = [c for c, _ in parse_requests(transport.written) if c == Command.INFO]
    assert infos == [Command.INFO], "the parameters must be read once and cached"


def test_gemm_accepts_torch_and_bits():
    rng = np.random.default_rng(8)
    W, A = random_signs(rng, (5, 30)), random_signs(rng, (30, 7))
    device, _, _ = make_device(ODD)
    expected = reference_counts(W, A)
    counts, _ = device.gemm(torch.from_numpy(W).float(), torch.from_numpy(A))
    np.testing.assert_array_equal(counts, expected)
    counts, _ = device.gemm(W > 0, torch.from_numpy(A > 0), encoding="bit")
    np.testing.assert_array_equal(counts, expected)


@contextlib.contextmanager
def model_server(model):
    """Serve ``model`` on a local TCP port; yield its ``socket://`` URL."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(10)

    def serve():
        try:
            connection, _ = server.accept()
        except OSError:
            return
        with connection:
            while data := connection.recv(4096):
                connection.sendall(model.feed(data))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"socket://127.0.0.1:{server.getsockname()[1]}"
    finally:
        server.close()
        thread.join(timeout=10)


def test_gemm_over_socket_url():
    rng = np.random.default_rng(9)
    W, A = random_signs(rng, (9, 77)), random_signs(rng, (77, 10))
    model = DeviceModel(ODD)
    with model_server(model) as url:
        counts, cycles = sw.gemm(W, A, port=url, timeout=2.0)
    np.testing.assert_array_equal(counts, reference_counts(W, A))
    assert cycles == model.gemm_cycles(*gemm_tiling(9, 77, 10, ODD.rows, ODD.cols, ODD.lane))
    assert model.gemm_runs == 1


def test_open_transport_socket_and_errors():
    model = DeviceModel(SMALL)
    with (model_server(model) as url,
          Device(open_transport(url, timeout=0.05), timeout=2.0) as device):
        device.ping(b"over tcp")
        assert device.info()["rows"] == SMALL.rows
    with pytest.raises(ValueError, match=r"^timeout must be a positive number of seconds, "
                                         r"not 0$"):
        open_transport("socket://127.0.0.1:1", timeout=0)
    with pytest.raises(TypeError, match=r"^port must be a string or None, not 5$"):
        open_transport(5)


# Commands.

def test_info_and_parameters():
    device, _, _ = make_device(ODD)
    info = device.info()
    assert info == protocol.INFO.unpack(ODD.info())
    assert info["protocol_version"] == protocol.PROTOCOL_VERSION
    assert device.parameters == info
    assert device.word_width(Memory.WEIGHTS) == 36
    assert device.word_width(Memory.ACTIVATIONS) == 60
    assert device.word_width(Memory.RESULTS) == 50
    assert device.depth(Memory.RESULTS) == ODD.result_depth


def test_incompatible_version():
    def newer(frame):
        return reframe(frame, payload=bytes([protocol.PROTOCOL_VERSION + 1]) + frame[5:-2])

    device, _, _ = make_device(tamper=newer)
    with pytest.raises(IncompatibleDeviceError,
                       match=rf"^device protocol version must be {protocol.PROTOCOL_VERSION}, "
                             rf"not {protocol.PROTOCOL_VERSION + 1}: update the driver or the "
                             rf"bitstream$"):
        device.info()


def test_ping():
    device, transport, _ = make_device()
    device.ping()
    device.ping(b"hello")
    device.ping(bytes(range(SMALL.max_payload)))
    assert [c for c, _ in parse_requests(transport.written)] == [Command.PING] * 3


def test_link_bytes_are_counted():
    # Every byte of the request frames and of the replies read: what a benchmark's link bound
    # is computed from. A PING's reply echoes its payload: frames of 6 bytes plus the payload.
    device, transport, _ = make_device()
    device.info()
    sent, received = device.bytes_sent, device.bytes_received
    assert sent == len(transport.written) > 0 and received > 0
    device.ping(b"hello")
    assert device.bytes_sent - sent == 6 + 5
    assert device.bytes_received - received == 6 + 5
    device.send_raw(b"\x00\x01")
    assert device.bytes_sent - sent == 6 + 5 + 2


def test_write_and_read_in_chunks():
    device, transport, model = make_device(SMALL)
    rng = np.random.default_rng(10)
    width = SMALL.rows * SMALL.lane                     # 16 bits: 2 bytes a word
    words = [int(w) for w in rng.integers(0, 1 << width, size=40)]
    device.write_words(Memory.WEIGHTS, 10, words)
    assert model.memories[Memory.WEIGHTS][10:50] == words
    assert model.memories[Memory.WEIGHTS][:10] == [0] * 10
    assert device.read_words(Memory.WEIGHTS, 10, 40) == words
    assert device.read(Memory.WEIGHTS, 9, 2) == words_to_bytes([0, words[0]], width)
    frames = parse_requests(transport.written)
    writes = [p for c, p in frames if c == Command.WRITE]
    # (64 - 5) // 2 = 29 words per WRITE; 64 // 2 = 32 words per READ.
    assert [len(p) - protocol.WRITE_HEADER.size for p in writes] == [58, 22]
    assert [protocol.WRITE_HEADER.unpack(p[:5])["address"] for p in writes] == [10, 39]
    reads = [protocol.READ_REQUEST.unpack(p) for c, p in frames if c == Command.READ]
    assert [(r["address"], r["count"]) for r in reads] == [(10, 32), (42, 8), (9, 2)]
    assert device.read(Memory.RESULTS, 0, 0) == b""
    device.write(Memory.RESULTS, 0, b"")
    assert len(parse_requests(transport.written)) == len(frames)


def test_write_and_read_argument_errors():
    device, transport, _ = make_device(SMALL)
    with pytest.raises(ValueError, match=r"^data must be a whole number of WEIGHTS words "
                                         r"\(2 bytes each\), not 3 bytes$"):
        device.write(Memory.WEIGHTS, 0, b"abc")
    with pytest.raises(ValueError, match=r"^ACTIVATIONS words 60 \.\. 64 must lie within the "
                                         r"memory's 64 words$"):
        device.write(Memory.ACTIVATIONS, 60, bytes(5 * 3))
    with pytest.raises(ValueError, match=r"^RESULTS words 0 \.\. 64 must lie within the "
                                         r"memory's 64 words$"):
        device.read(Memory.RESULTS, 0, 65)
    with pytest.raises(ValueError, match=r"^memory must be a Memory \(WEIGHTS, ACTIVATIONS, "
                                         r"RESULTS, BITS, INTS, COEFS, PARAMS, PROGRAM, "
                                         r"COUNTERS\), not 9$"):
        device.read(9, 0, 1)
    with pytest.raises(ValueError, match=r"^address must be an integer in 0 \.\. 4294967295, "
                                         r"not -1$"):
        device.read(Memory.WEIGHTS, -1, 1)
    with pytest.raises(ValueError, match=r"^m_tiles must be an integer in 1 \.\. 65535, "
                                         r"not 0$"):
        device.run_gemm(0, 1, 1)
    assert [c for c, _ in parse_requests(transport.written)] == [Command.INFO]


# Error replies.

def test_device_errors():
    device, _, model = make_device(SMALL)
    cases = [
        (lambda: device.request(Command.READ,
                                protocol.READ_REQUEST.pack(memory=9, address=0, count=1)),
         Status.BAD_ADDRESS, Command.READ,
         ("device answered READ with BAD_ADDRESS: a memory id, address or word count lies "
          "outside the device's memories")),
        (lambda: device.run_gemm(1, 1, SMALL.max_k_words + 1),
         Status.BAD_ARGUMENT, Command.GEMM,
         ("device answered GEMM with BAD_ARGUMENT: an argument is out of range (a GEMM that does "
          "not fit the memories or max_depth, a zero, or a WRITE8 to a memory other than "
          "INTS)")),
        (lambda: device.request(0x7E, b"?"),
         Status.UNKNOWN_COMMAND, 0x7E,
         ("device answered command 0x7e with UNKNOWN_COMMAND: the device does not know the "
          "command")),
        (lambda: device.request(Command.INFO, b"x"),
         Status.BAD_LENGTH, Command.INFO,
         ("device answered INFO with BAD_LENGTH: the request's length exceeds max_payload or "
          "does not fit the command")),
    ]
    for action, status, command, message in cases:
        with pytest.raises(DeviceError) as info:
            action()
        assert str(info.value) == message
        assert info.value.status is status
        assert info.value.command == command
        assert isinstance(info.value, DriverError)
    device.ping(b"still fine")
    assert model.gemm_runs == 0
    with pytest.raises(ValueError, match=r"^payload must be at most max_payload \(64\) bytes, "
                                         r"not 65$"):
        device.ping(bytes(SMALL.max_payload + 1))


def test_oversize_frame_before_the_parameters_are_known():
    device, _, _ = make_device(SMALL)
    with pytest.raises(DeviceError, match=r"^device answered PING with BAD_LENGTH: the "
                                          r"request's length exceeds max_payload or does not "
                                          r"fit the command$") as info:
        device.ping(bytes(SMALL.max_payload + 1))
    assert info.value.status is Status.BAD_LENGTH and info.value.command is Command.PING
    device.ping(b"still fine")


def test_device_error_naming_another_command():
    def timed_out(frame):
        return reply(Status.TIMEOUT, bytes([protocol.NO_COMMAND]))

    device, _, _ = make_device(tamper=timed_out)
    with pytest.raises(DeviceError, match=r"^device answered PING with TIMEOUT: the request "
                                          r"stopped arriving before it was complete \(the reply "
                                          r"names command 0x00\)$") as info:
        device.ping(b"x")
    assert info.value.answered == protocol.NO_COMMAND
    assert str(DeviceError(Status.BAD_CRC, Command.WRITE)) == \
        "device answered WRITE with BAD_CRC: the request's CRC did not match"


def test_reply_timeouts():
    device, transport, _ = make_device()
    transport.tamper = lambda frame: b""
    with pytest.raises(DeviceTimeoutError,
                       match=r"^no reply to PING within 0\.05 s: 0 bytes arrived$") as info:
        device.ping(b"ok")
    assert isinstance(info.value, TimeoutError) and isinstance(info.value, DriverError)
    transport.tamper = lambda frame: frame[:5]
    with pytest.raises(DeviceTimeoutError, match=r"^reply to PING incomplete after 0\.05 s: "
                                                 r"5 of 8 bytes arrived$"):
        device.ping(b"ok")
    transport.tamper = lambda frame: frame[:2]
    with pytest.raises(DeviceTimeoutError, match=r"^reply to PING incomplete after 0\.05 s: "
                                                 r"2 of at least 6 bytes arrived$"):
        device.ping(b"ok")


def test_gemm_timeout_allows_for_the_computation():
    # 1000 x 1000 tiles of 8 words at 80 MHz: 0.1 s of computation, allowed 4 times over.
    device, transport, _ = make_device(SMALL.replace(clock_hz=80_000_000), timeout=0.01)
    device.info()
    transport.tamper = lambda frame: b""
    start = time.monotonic()
    with pytest.raises(DeviceTimeoutError,
                       match=r"^no reply to GEMM within 0\.41 s: 0 bytes arrived$"):
        device.run_gemm(1000, 1000, 8)
    assert time.monotonic() - start >= 0.41


def test_malformed_replies():
    device, transport, _ = make_device()
    frame = reply(Status.OK, b"ok")
    assert protocol.REPLY_SYNC not in frame[1:]
    cases = [
        (lambda f: b"\x00" + f[1:],
         (rf"^reply to PING must start with sync byte 0x5a, not with 8 other bytes "
          rf"\({bytes(1).hex()} {frame[1:].hex(' ')}\)$")),
        (lambda f: f[:-1] + bytes([f[-1] ^ 0x01]),
         (rf"^reply CRC must be 0x{protocol.crc16(frame[1:-2]):04x}, not "
          rf"0x{(protocol.crc16(frame[1:-2]) ^ 0x0100):04x} \(reply to PING\)$")),
        (lambda f: reframe(f, status=0x17),
         r"^reply status must be a Status, not 0x17 \(reply to PING\)$"),
        (lambda f: reframe(f, payload=b"ok!"),
         r"^reply to PING with status OK must carry 2 payload bytes, not 3$"),
        (lambda f: reframe(f, status=Status.BAD_CRC, payload=b"\x01\x02"),
         r"^reply to PING with status BAD_CRC must carry 1 payload byte, not 2$"),
        (lambda f: reframe(f, payload=b"ol"),
         r"^PING echo must be 6f 6b, not 6f 6c$"),
        (lambda f: bytes(40),
         (r"^reply to PING must start with sync byte 0x5a, not with 40 other bytes "
          r"\(00 00 00 00 00 00 00 00 \.\.\.\)$")),
    ]
    for tamper, message in cases:
        transport.tamper = tamper
        with pytest.raises(ProtocolError, match=message):
            device.ping(b"ok")
    transport.tamper = None
    device.ping(b"ok")


def test_garbage_before_a_reply_is_skipped():
    device, transport, _ = make_device()
    transport.tamper = lambda frame: b"\x13\x37" + frame
    device.ping(b"ok")
    assert device.skipped_bytes == 2


# Matrices that do not fit.

def test_gemm_shape_and_value_errors():
    device, transport, model = make_device(SMALL)
    ones = np.ones
    cases = [
        (ValueError, ones((3, 8)), ones((7, 2)),
         r"^A must have 8 rows to match the columns of W, not 7$"),
        (ValueError, ones(8), ones((8, 2)),
         r"^W must be a 2-D array, not an array of shape \(8,\)$"),
        (ValueError, ones((0, 8)), ones((8, 2)),
         r"^W must have at least one row and one column, not shape \(0, 8\)$"),
        (ValueError, np.full((2, 8), 2), ones((8, 2)),
         r"^W must hold only \+1 and -1, not np\.int64\(2\) \(at index \(0, 0\)\)$"),
        (CapacityError, ones((2, 257)), ones((257, 2)),
         r"^K must be at most the device's max_depth \(256\), not 257$"),
        (CapacityError, ones((200, 8)), ones((8, 2)),
         (r"^W \(200 x 8\) needs 100 words of WEIGHTS memory \(100 tiles of 1 word\), but the "
          r"device has 64$")),
        (CapacityError, ones((2, 17)), ones((17, 100)),
         (r"^A \(17 x 100\) needs 102 words of ACTIVATIONS memory \(34 tiles of 3 words\), but "
          r"the device has 64$")),
        (CapacityError, ones((12, 8)), ones((8, 18)),
         (r"^the result \(12 x 18\) needs 72 words of RESULTS memory \(6 x 6 tiles of 2 words\), "
          r"but the device has 64$")),
    ]
    for error, W, A, message in cases:
        with pytest.raises(error, match=message):
            device.gemm(W, A)
    assert issubclass(CapacityError, ValueError) and issubclass(CapacityError, DriverError)
    assert [c for c, _ in parse_requests(transport.written)] == [Command.INFO]
    assert model.memories[Memory.WEIGHTS] == [0] * SMALL.weight_depth


def test_device_arguments():
    class Blocking:
        timeout = None

    with pytest.raises(ValueError, match=r"^transport must have a read timeout in seconds, "
                                         r"not None$"):
        Device(Blocking())
    with pytest.raises(ValueError, match=r"^time_scale must be a positive number, not 0$"):
        Device(LoopbackTransport(DeviceModel(SMALL)), time_scale=0)


# Resynchronization.

def test_resync_after_a_garbage_stream():
    device, transport, model = make_device(SMALL, auto_timeout=False)
    device.info()
    # A WRITE frame cut short (its length promises 30 bytes), then noise that contains sync
    # bytes and a second truncated frame.
    transport.write(bytes([protocol.REQUEST_SYNC, Command.WRITE, 30, 0]) + bytes(range(12)))
    transport.write(b"\xa5\x01\xa5\x13\x37\xa5\x04\x07")
    assert model.in_frame
    device.resync()
    assert not model.in_frame
    device.ping(b"back")
    rng = np.random.default_rng(11)
    W, A = random_signs(rng, (6, 40)), random_signs(rng, (40, 5))
    np.testing.assert_array_equal(device.gemm(W, A)[0], reference_counts(W, A))


def test_resync_sends_max_payload_plus_6_zeros_and_skips_stale_replies():
    device, transport, model = make_device(SMALL, auto_timeout=False)
    device.info()
    transport.write(bytes([protocol.REQUEST_SYNC, Command.PING, 20, 0, 1, 2]))
    start = len(transport.written)
    stale = reply(Status.BAD_CRC, bytes([Command.PING]))
    transport.tamper = lambda frame: stale + frame
    device.resync()
    sent = transport.written[start:]
    assert sent[:SMALL.max_payload + 6] == bytes(SMALL.max_payload + 6)
    assert parse_requests(sent[SMALL.max_payload + 6:])[0][0] == Command.PING
    assert model.memories[Memory.WEIGHTS] == [0] * SMALL.weight_depth


def test_resync_before_info_and_failure():
    device, transport, _ = make_device(SMALL)
    device.resync()
    assert len(transport.written) >= protocol.MAX_LENGTH + 6
    transport.tamper = lambda frame: b""
    with pytest.raises(DeviceTimeoutError,
                       match=r"^resync failed: no reply to PING within \d+\.\d\d s: "
                             r"0 bytes arrived$"):
        device.resync()


# The device model on its own.

class TestModel:
    def setup_method(self):
        self.model = DeviceModel(SMALL)

    def error(self, status, command):
        return reply(status, bytes([command]))

    def test_oversize_length_is_answered_at_once(self):
        head = bytes([protocol.REQUEST_SYNC, Command.PING]) + struct.pack("<H", 65)
        assert self.model.feed(head[:3]) == b""
        assert self.model.feed(head[3:]) == self.error(Status.BAD_LENGTH, Command.PING)
        assert not self.model.in_frame
        assert self.model.feed(bytes(65) + b"\x11\x22") == b""
        assert self.model.feed(request(Command.PING, b"hi")) == reply(Status.OK, b"hi")

    def test_timeout(self):
        assert self.model.timeout() == b""
        assert self.model.feed(bytes([protocol.REQUEST_SYNC])) == b""
        assert self.model.timeout() == self.error(Status.TIMEOUT, protocol.NO_COMMAND)
        assert self.model.feed(request(Command.PING, b"abc")[:-3]) == b""
        assert self.model.timeout() == self.error(Status.TIMEOUT, Command.PING)
        assert self.model.feed(request(Command.PING)) == reply(Status.OK)

    def test_bad_crc_has_no_effect(self):
        frame = bytearray(request(Command.WRITE, protocol.WRITE_HEADER.pack(memory=0, address=0)
                                  + b"\xff\xff"))
        frame[-2] ^= 1
        assert self.model.feed(frame) == self.error(Status.BAD_CRC, Command.WRITE)
        assert self.model.memories[Memory.WEIGHTS][0] == 0

    def test_non_sync_bytes_are_dropped(self):
        assert self.model.feed(b"\x00\x5a\xff" + request(Command.INFO)) == \
            reply(Status.OK, SMALL.info())

    @pytest.mark.parametrize("command,payload,status", [
        (0x7E, b"", Status.UNKNOWN_COMMAND),
        (Command.INFO, b"x", Status.BAD_LENGTH),
        (Command.WRITE, protocol.WRITE_HEADER.pack(memory=0, address=0), Status.BAD_LENGTH),
        (Command.WRITE, protocol.WRITE_HEADER.pack(memory=9, address=0) + b"\x00\x00",
         Status.BAD_ADDRESS),
        (Command.WRITE, protocol.WRITE_HEADER.pack(memory=0, address=0) + b"\x00",
         Status.BAD_LENGTH),
        (Command.WRITE, protocol.WRITE_HEADER.pack(memory=0, address=63) + bytes(4),
         Status.BAD_ADDRESS),
        (Command.READ, protocol.READ_REQUEST.pack(memory=0, address=0, count=1)[:-1],
         Status.BAD_LENGTH),
        (Command.READ, protocol.READ_REQUEST.pack(memory=9, address=0, count=0),
         Status.BAD_ADDRESS),
        (Command.READ, protocol.READ_REQUEST.pack(memory=0, address=0, count=0),
         Status.BAD_LENGTH),
        (Command.READ, protocol.READ_REQUEST.pack(memory=1, address=0, count=22),
         Status.BAD_LENGTH),
        (Command.READ, protocol.READ_REQUEST.pack(memory=2, address=60, count=5),
         Status.BAD_ADDRESS),
        (Command.GEMM, protocol.GEMM_REQUEST.pack(m_tiles=1, n_tiles=1, k_words=1) + b"\x00",
         Status.BAD_LENGTH),
        (Command.GEMM, protocol.GEMM_REQUEST.pack(m_tiles=0, n_tiles=1, k_words=1),
         Status.BAD_ARGUMENT),
        (Command.GEMM, protocol.GEMM_REQUEST.pack(m_tiles=1, n_tiles=0, k_words=1),
         Status.BAD_ARGUMENT),
        (Command.GEMM, protocol.GEMM_REQUEST.pack(m_tiles=1, n_tiles=1, k_words=0),
         Status.BAD_ARGUMENT),
        (Command.GEMM, protocol.GEMM_REQUEST.pack(m_tiles=1, n_tiles=1, k_words=33),
         Status.BAD_ARGUMENT),
        (Command.GEMM, protocol.GEMM_REQUEST.pack(m_tiles=3, n_tiles=1, k_words=32),
         Status.BAD_ARGUMENT),
        (Command.GEMM, protocol.GEMM_REQUEST.pack(m_tiles=1, n_tiles=3, k_words=32),
         Status.BAD_ARGUMENT),
        (Command.GEMM, protocol.GEMM_REQUEST.pack(m_tiles=5, n_tiles=7, k_words=1),
         Status.BAD_ARGUMENT),
    ])
    def test_errors(self, command, payload, status):
        assert self.model.feed(request(command, payload)) == self.error(status, command)

    def test_limits_that_fit(self):
        ok = [
            (Command.READ, protocol.READ_REQUEST.pack(memory=1, address=0, count=10)),
            (Command.READ, protocol.READ_REQUEST.pack(memory=2, address=59, count=5)),
            (Command.WRITE, protocol.WRITE_HEADER.pack(memory=0, address=62) + bytes(4)),
            (Command.GEMM, protocol.GEMM_REQUEST.pack(m_tiles=2, n_tiles=2, k_words=32)),
            (Command.GEMM, protocol.GEMM_REQUEST.pack(m_tiles=4, n_tiles=8, k_words=1)),
        ]
        for command, payload in ok:
            answer = self.model.feed(request(command, payload))
            assert answer[:2] == bytes([protocol.REPLY_SYNC, Status.OK]), (command, answer)

    def test_write_ignores_bits_above_the_width(self):
        # ACTIVATIONS words are 24 bits; RESULTS words 3 * 9 = 27 bits in 4 bytes.
        header = protocol.WRITE_HEADER.pack(memory=Memory.RESULTS, address=1)
        assert self.model.feed(request(Command.WRITE, header + b"\xff" * 4)) == reply(Status.OK)
        assert self.model.memories[Memory.RESULTS][1] == (1 << 27) - 1
        read = protocol.READ_REQUEST.pack(memory=Memory.RESULTS, address=1, count=1)
        assert self.model.feed(request(Command.READ, read)) == \
            reply(Status.OK, b"\xff\xff\xff\x07")

    def test_gemm_leaves_other_result_words(self):
        header = protocol.WRITE_HEADER.pack(memory=Memory.RESULTS, address=2)
        self.model.feed(request(Command.WRITE, header + b"\x01\x02\x03\x04"))
        gemm = protocol.GEMM_REQUEST.pack(m_tiles=1, n_tiles=1, k_words=1)
        answer = self.model.feed(request(Command.GEMM, gemm))
        assert answer == reply(Status.OK, protocol.GEMM_REPLY.pack(
            cycles=self.model.gemm_cycles(1, 1, 1)))
        # Zero weights against zero activations: every lane bit agrees.
        assert self.model.memories[Memory.RESULTS][:2] == [8 | 8 << 9 | 8 << 18] * 2
        assert self.model.memories[Memory.RESULTS][2] == 0x04030201


# Finding the board's port.

def port(device, vid=None, pid=None, serial_number=None, location=None, description="n/a"):
    info = ListPortInfo(device, skip_link_detection=True)
    info.vid, info.pid = vid, pid
    info.serial_number, info.location, info.description = serial_number, location, description
    return info


class TestFindPort:
    def test_ulx3s(self):
        ports = [port("/dev/ttyS0"), port("/dev/ttyUSB0", 0x0403, 0x6015, "D00123")]
        assert find_ftdi_port(ports) == "/dev/ttyUSB0"

    def test_icebreaker_linux_takes_interface_1(self):
        ports = [port("/dev/ttyUSB0", 0x0403, 0x6010, "FT1", "1-2:1.0"),
                 port("/dev/ttyUSB1", 0x0403, 0x6010, "FT1", "1-2:1.1")]
        assert find_ftdi_port(ports) == "/dev/ttyUSB1"
        # Interface 0 claimed by a programmer: only the UART is listed.
        assert find_ftdi_port(ports[1:]) == "/dev/ttyUSB1"
        with pytest.raises(PortSelectionError):
            find_ftdi_port(ports[:1])

    def test_icebreaker_macos_takes_channel_b(self):
        ports = [port("/dev/cu.usbserial-FT1A", 0x0403, 0x6010, "FT1A"),
                 port("/dev/cu.usbserial-FT1B", 0x0403, 0x6010, "FT1B")]
        assert find_ftdi_port(ports) == "/dev/cu.usbserial-FT1B"

    def test_icebreaker_unknown_interfaces_take_the_second_port(self):
        ports = [port("COM4", 0x0403, 0x6010), port("COM3", 0x0403, 0x6010)]
        assert find_ftdi_port(ports) == "COM4"

    def test_none_found(self):
        ports = [port("/dev/ttyS0", description="ttyS0"),
                 port("/dev/ttyACM0", 0x1209, 0x0001, description="other board")]
        with pytest.raises(PortSelectionError, match=(
                r"^no FTDI USB-UART \(vendor id 0x0403\) found; serial ports present: "
                r"/dev/ttyACM0 \(other board\); /dev/ttyS0 \(ttyS0\)\. Connect the board, or "
                r"pass port='/dev/ttyUSBn' or 'socket://HOST:PORT'$")):
            find_ftdi_port(ports)
        with pytest.raises(PortSelectionError, match=r"no serial ports present\. Connect"):
            find_ftdi_port([])

    def test_several_found(self):
        ports = [port("/dev/ttyUSB3", 0x0403, 0x6015, description="ULX3S"),
                 port("/dev/ttyUSB0", 0x0403, 0x6015, description="ULX3S"),
                 port("/dev/ttyUSB1", 0x0403, 0x6010, "FT1", "1-2:1.1", "iCEBreaker")]
        with pytest.raises(PortSelectionError, match=(
                r"^found 3 FTDI USB-UARTs: /dev/ttyUSB0 \(ULX3S\); /dev/ttyUSB1 \(iCEBreaker\); "
                r"/dev/ttyUSB3 \(ULX3S\)\. Choose one with port=NAME$")):
            find_ftdi_port(ports)


def test_package_exports():
    for name in sw.__all__:
        assert getattr(sw, name) is not None
    assert sw.gemm is not None and sw.Device is Device


def test_a_gemm_only_device_cannot_load_a_network():
    from sw.driver import IncompatibleDeviceError
    from sw.runtime import Accelerator
    from tests.compile_nets import compile_net
    device, _, _ = make_device(SMALL.replace(layer_program=False))
    _, artifact = compile_net("melius", 0)
    with pytest.raises(IncompatibleDeviceError, match="GEMM-only build"):
        Accelerator(device, artifact.program)


# Pipelining, WRITE8 and the read-only COUNTERS (protocol version 4).

class BufferCheckingTransport(LoopbackTransport):
    """A loopback whose writes must respect the device's receive buffer: the request frames
    whose replies the host has not read completely, all but the oldest, may hold at most
    ``rx_buffer`` bytes (``sw.protocol``). Records the most frames ever in flight."""

    def __init__(self, model, **options):
        super().__init__(model, **options)
        self.in_flight = []         # [frame bytes, reply bytes not yet read]
        self.most_in_flight = 0

    def write(self, data):
        before = len(self._input)
        count = super().write(data)
        after_oldest = sum(size for size, _ in self.in_flight[1:])
        if self.in_flight:
            after_oldest += len(data)
        assert after_oldest <= self.model.config.rx_buffer, (after_oldest, self.in_flight)
        self.in_flight.append([len(data), len(self._input) - before])
        self.most_in_flight = max(self.most_in_flight, len(self.in_flight))
        return count

    def read(self, size=1):
        data = super().read(size)
        left = len(data)
        while left and self.in_flight:
            take = min(left, self.in_flight[0][1])
            self.in_flight[0][1] -= take
            left -= take
            if not self.in_flight[0][1]:
                self.in_flight.pop(0)
        return data


def make_checked_device(config):
    model = DeviceModel(config)
    transport = BufferCheckingTransport(model)
    return Device(transport, timeout=0.05), transport, model


@pytest.mark.parametrize("rx_buffer", [64, 150, 2048])
def test_pipelined_writes_and_reads_respect_the_receive_buffer(rx_buffer):
    config = SMALL.replace(rx_buffer=rx_buffer)
    device, transport, model = make_checked_device(config)
    rng = np.random.default_rng(rx_buffer)
    width = config.rows * config.lane
    words = [int(w) for w in rng.integers(0, 1 << width, size=config.weight_depth)]
    device.write_words(Memory.WEIGHTS, 0, words)
    assert model.memories[Memory.WEIGHTS] == words
    # Several READs, pipelined, each with its own result.
    pending = [device.read_words(Memory.WEIGHTS, first, 7, wait=False)
               for first in range(0, 56, 7)]
    assert [p.result() for p in pending] == [words[f:f + 7] for f in range(0, 56, 7)]
    assert all(p.done for p in pending) and not device._in_flight
    # The READ frames are 13 bytes: as many follow the oldest as the buffer holds (the
    # transport checked the limit at every write).
    assert transport.most_in_flight == 1 + min(7, rx_buffer // 13)


def test_nothing_is_pipelined_before_info():
    device, transport, _ = make_checked_device(SMALL)
    pending = [device.submit(Command.PING, bytes([n])) for n in range(3)]
    assert transport.most_in_flight == 1          # rx_buffer unknown: one at a time
    assert [p.result() for p in pending] == [b"\x00", b"\x01", b"\x02"]
    device.info()
    pending = [device.submit(Command.PING, bytes([n]) * 10) for n in range(5)]
    assert transport.most_in_flight == 5
    assert [p.result() for p in pending] == [bytes([n]) * 10 for n in range(5)]


def test_a_pipelined_error_belongs_to_its_own_request():
    device, _, _ = make_checked_device(SMALL)
    device.info()
    first = device.submit(Command.PING, b"a")
    bad = device.submit(Command.READ, protocol.READ_REQUEST.pack(memory=0, address=63,
                                                                 count=2))
    last = device.submit(Command.PING, b"z")
    assert last.result() == b"z"                  # collects the two before it
    assert first.result() == b"a"
    for _ in range(2):                            # the same error each time
        with pytest.raises(DeviceError) as info:
            bad.result()
        assert info.value.status == Status.BAD_ADDRESS and info.value.command == Command.READ


def test_a_broken_link_fails_every_request_in_flight():
    drop = {"on": False}

    def tamper(frame):
        return b"" if drop["on"] else frame

    device, _, _ = make_device(tamper=tamper, auto_timeout=False)
    device.info()
    drop["on"] = True
    pending = [device.submit(Command.PING, bytes([n])) for n in range(3)]
    with pytest.raises(DeviceTimeoutError):
        pending[1].result()
    with pytest.raises(DeviceTimeoutError):
        pending[0].result()
    with pytest.raises(DriverError, match="the link broke on an earlier reply"):
        pending[2].result()
    drop["on"] = False
    device.resync()
    device.ping(b"again")


def test_resync_abandons_requests_in_flight():
    device, _, _ = make_device()
    device.info()
    pending = device.submit(Command.PING, b"late")
    device.resync()
    with pytest.raises(DriverError, match="abandoned by resync"):
        pending.result()


def test_write8_zero_extends_into_ints():
    device, transport, model = make_device(SMALL)
    values = list(range(256)) + [255, 0, 128]
    device.write8(5, values)
    assert model.memories[Memory.INTS][5:5 + len(values)] == values
    assert device.read_words(Memory.INTS, 5, len(values)) == values
    frames = parse_requests(transport.written)
    writes = [payload for command, payload in frames if command == Command.WRITE8]
    # One byte per element: 59 elements per 64-byte frame after the 5-byte header.
    assert [len(p) - protocol.WRITE_HEADER.size for p in writes] == [59] * 4 + [23]
    device.write8(0, b"\x01\x02")
    assert model.memories[Memory.INTS][:2] == [1, 2]
    for bad in ([256], [-1]):
        with pytest.raises(ValueError, match="0 .. 255"):
            device.write8(0, bad)
    with pytest.raises(ValueError, match="within the memory"):
        device.write8(SMALL.int_depth - 1, [1, 2])


@pytest.mark.parametrize("command,memory,status", [
    (Command.WRITE, Memory.COUNTERS, Status.READ_ONLY),
    (Command.WRITE8, Memory.COUNTERS, Status.READ_ONLY),
    (Command.WRITE8, Memory.WEIGHTS, Status.BAD_ARGUMENT),
    (Command.WRITE8, 9, Status.BAD_ADDRESS),
])
def test_write_errors_of_version_4(command, memory, status):
    device, _, model = make_device(SMALL)
    payload = protocol.WRITE_HEADER.pack(memory=memory, address=0) + bytes(4)
    with pytest.raises(DeviceError) as info:
        device.request(command, payload, expected=0)
    assert info.value.status == status and info.value.command == command
    if memory == Memory.COUNTERS:
        assert model.memories[Memory.COUNTERS][0] == 0
        assert "read-only (COUNTERS)" in str(info.value)


def test_driver_refuses_to_write_counters():
    device, transport, _ = make_device(SMALL)
    device.info()
    sent = len(transport.written)
    with pytest.raises(ValueError, match="COUNTERS is read-only"):
        device.write_words(Memory.COUNTERS, 0, [1])
    assert len(transport.written) == sent


def test_pipelined_replies_due_stay_within_the_reply_budget():
    # 64-word READs of a 2,048-deep memory: 262-byte replies; at most REPLY_BUDGET bytes due.
    config = DeviceConfig(rows=2, cols=2, lane=16, max_depth=256, weight_depth=2048,
                          max_payload=256, rx_buffer=4096)
    device, transport, _ = make_checked_device(config)
    device.info()
    due = []
    original = device._send

    def send(command, payload):
        due.append(sum(r.reply_size for r in device._in_flight))
        return original(command, payload)

    device._send = send
    pending = [device.read(Memory.WEIGHTS, first, 64, wait=False) for first in range(0, 2048, 64)]
    assert [p.result() for p in pending] == [bytes(256)] * 32
    reply = 64 * 4 + 6
    assert max(due) + reply <= sw.driver.REPLY_BUDGET < max(due) + 2 * reply
    assert transport.most_in_flight == sw.driver.REPLY_BUDGET // reply
