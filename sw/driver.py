"""The host driver: commands of the byte protocol and binary GEMMs on a device.

:class:`Device` speaks :mod:`sw.protocol` over a transport: a pyserial object from
:func:`sw.transport.open_transport` (a board's UART or ``socket://`` to a simulated device), or
anything with the same ``write``, ``flush``, ``read``, ``reset_input_buffer`` and ``timeout``
(for example :class:`sim.model.LoopbackTransport`). The transport's ``read`` must return after at
most ``timeout`` seconds with what has arrived; the driver waits for a reply in several reads.

Each request is answered by exactly one reply frame. The driver discards unread input before it
sends a request when no reply is outstanding, then hunts for the reply's sync byte, reads the
header, payload and CRC, and checks the CRC, the status and the payload length the request calls
for.

Pipelining. :meth:`Device.submit` (and ``wait=False`` of :meth:`Device.write`,
:meth:`Device.write8`, :meth:`Device.read`, :meth:`Device.read_words`, :meth:`Device.run_ops`,
:meth:`Device.op_cycles`) sends a request without waiting for its reply and returns a
:class:`Pending`; its :meth:`~Pending.result` collects the replies, in order, up to its own. A
request is only sent while the frames in flight (sent, reply not yet complete), all but the
oldest, fit the device's receive buffer (``rx_buffer`` of INFO, see :mod:`sw.protocol`); until
INFO has been read, nothing is pipelined. The driver waits for older replies when they do not,
and also while the replies still due would exceed :data:`REPLY_BUDGET` bytes (the host's serial
driver holds them while this one writes and does not read).
A :meth:`Device.write` or :meth:`Device.read` larger than ``max_payload`` pipelines its own
frames. :meth:`Device.request` is :meth:`Device.submit` followed by ``result()``.

Errors (all derive from :class:`DriverError`):

* :class:`DeviceError`: the device answered with an error status;
* :class:`DeviceTimeoutError`: a reply did not arrive (completely) in time;
* :class:`ProtocolError`: a reply was malformed (no sync byte, bad CRC, unknown status, wrong
  payload length);
* :class:`IncompatibleDeviceError`: the device speaks another protocol version;
* :class:`CapacityError` (also a :class:`ValueError`): a GEMM does not fit the device.

After a :class:`DeviceTimeoutError` or :class:`ProtocolError` the link may be out of step: the
requests still in flight then fail with a :class:`DriverError` naming it; call
:meth:`Device.resync` before the next request.

Reply timeouts are ``timeout`` seconds plus twice the estimated time on the wire (10 bits per
byte at the device's baud rate) and, for GEMM, four times the estimated computation (from the
device's clock); ``time_scale`` multiplies the estimates for a simulated device that runs slower
than real time.
"""

import collections
import operator
import os
import time

from . import packing, protocol
from .protocol import Command, Memory, Status
from .transport import DEFAULT_BAUD, open_transport

__all__ = [
    "REPLY_BUDGET", "CapacityError", "Device", "DeviceError", "DeviceTimeoutError",
    "DriverError", "IncompatibleDeviceError", "Pending", "ProtocolError", "gemm",
    "gemm_cycles_estimate",
]

#: Most reply bytes (frames, by their expected size) the driver lets the device owe it while it
#: pipelines: they pile up in the host's serial buffers while the driver writes. A USB-serial
#: port's kernel buffer holds several times this; a socket far more.
REPLY_BUDGET = 4096

_STATUS_MEANING = {
    Status.BAD_CRC: "the request's CRC did not match",
    Status.UNKNOWN_COMMAND: "the device does not know the command",
    Status.BAD_LENGTH: "the request's length exceeds max_payload or does not fit the command",
    Status.TIMEOUT: "the request stopped arriving before it was complete",
    Status.BAD_ADDRESS: "a memory id, address or word count lies outside the device's memories",
    Status.ABORTED: "the run exceeded its cycle limit and was stopped (the execution units were "
                    "reset; load the image again)",
    Status.BAD_ARGUMENT: "an argument is out of range (a GEMM that does not fit the memories "
                         "or max_depth, a zero, or a WRITE8 to a memory other than INTS)",
    Status.READ_ONLY: "the memory is read-only (COUNTERS): nothing was written",
}


_STATUS_VALUES = frozenset(status.value for status in Status)


def _command_name(command):
    try:
        return Command(command).name
    except ValueError:
        return f"command {command:#04x}"


class DriverError(Exception):
    """Base class of the errors of the driver."""


class DeviceError(DriverError):
    """The device answered a request with an error status.

    Attributes
    ----------
    status : :class:`sw.protocol.Status`
    command : :class:`sw.protocol.Command` or int
        The command of the request.
    answered : int
        The command byte the error reply names (:data:`sw.protocol.NO_COMMAND` when the device
        lost the frame before its command byte).
    """

    def __init__(self, status, command, answered=None):
        self.status = Status(status)
        self.command = command
        self.answered = command if answered is None else answered
        message = (f"device answered {_command_name(command)} with {self.status.name}: "
                   f"{_STATUS_MEANING.get(self.status, 'error')}")
        if self.answered != command:
            message += f" (the reply names {_command_name(self.answered)})"
        super().__init__(message)


class DeviceTimeoutError(DriverError, TimeoutError):
    """A reply did not arrive, or not completely, within its timeout."""


class ProtocolError(DriverError):
    """A reply was malformed: no sync byte, a bad CRC, an unknown status or a wrong length."""


class IncompatibleDeviceError(DriverError):
    """The device speaks another protocol version than this driver."""


class CapacityError(DriverError, ValueError):
    """A GEMM needs more than the device has (memory words or K)."""


class Pending:
    """The outcome of requests sent without waiting (see the module docstring on pipelining).

    :meth:`result` waits for the replies of ``requests`` (collecting every older reply first,
    in order) and returns ``finish(payloads)``; it raises the first error among them: a
    :class:`DeviceError` for an error status, or the link's error if the link broke before
    they were answered. Calling it again returns the same value or raises the same error.
    """

    def __init__(self, device, requests, finish):
        self._device = device
        self._requests = list(requests)
        self._finish = finish

    @property
    def done(self):
        """Whether every reply has arrived (``result`` will not wait)."""
        return all(request.done for request in self._requests)

    def result(self):
        for request in self._requests:
            while not request.done:
                self._device._collect()
        for request in self._requests:
            if request.error is not None:
                raise request.error
        return self._finish([request.payload for request in self._requests])


class _Request:
    """One request in flight: what its reply must be and, once it has arrived, the outcome."""

    def __init__(self, command, expected, size, reply_size, allowed):
        self.command, self.expected, self.size, self.allowed = command, expected, size, allowed
        self.reply_size = reply_size
        self.done = False
        self.payload = None
        self.error = None


def gemm_cycles_estimate(m_tiles, n_tiles, k_words, rows, cols):
    """Clock cycles a GEMM is expected to take on the device (used for the reply timeout).

    Each of the ``m_tiles * n_tiles`` tiles holds the array's input for ``max(k_words, rows)``
    cycles; the last tile's results then leave through the pipeline and the result chains
    (``k_words + 2 * rows + cols + 3`` cycles for the last tile, measured on
    :class:`hw.core.DeviceCore`).
    """
    return (m_tiles * n_tiles - 1) * max(k_words, rows) + k_words + 2 * rows + cols + 3


def _plural(count, noun):
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _check_int(name, value, low, high):
    try:
        number = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        number = None
    if number is None or not low <= number <= high:
        raise ValueError(f"{name} must be an integer in {low} .. {high}, not {value!r}")
    return number


def _check_memory(memory):
    try:
        return Memory(memory)
    except ValueError:
        raise ValueError(f"memory must be a Memory ({', '.join(m.name for m in Memory)}), "
                         f"not {memory!r}") from None


class Device:
    """A device reached over a byte transport.

    Parameters
    ----------
    transport : serial.SerialBase or compatible
        The byte link (see the module docstring). Closed by :meth:`close`.
    timeout : float
        Seconds each reply may take beyond the estimated transfer and computation time.
    time_scale : float
        Factor applied to the estimated times: ``1`` for a board, larger for a simulation that
        runs slower than real time.

    The device's build parameters are read with :meth:`info` on first need and cached in
    :attr:`parameters`. Use as a context manager to close the transport at the end.
    """

    def __init__(self, transport, *, timeout=1.0, time_scale=1.0):
        if getattr(transport, "timeout", None) is None:
            raise ValueError("transport must have a read timeout in seconds, not None")
        for name, value in (("timeout", timeout), ("time_scale", time_scale)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{name} must be a positive number, not {value!r}")
        self.transport = transport
        self.timeout = float(timeout)
        self.time_scale = float(time_scale)
        #: Bytes dropped before a reply's sync byte, over the device's life (diagnostics).
        self.skipped_bytes = 0
        #: WRITE requests made through this object, per memory: a loaded network
        #: (:class:`sw.runtime.Accelerator`) sees from it that something else (a :meth:`gemm`,
        #: another program) overwrote its weights, and loads them again.
        self.writes = dict.fromkeys(Memory, 0)
        #: Bytes of request frames sent and of reply bytes received (sync bytes, headers and
        #: CRCs included) over the device's life: what the link carried, for benchmarks.
        self.bytes_sent = 0
        self.bytes_received = 0
        self._info = None
        #: Requests sent whose replies have not been collected, oldest first.
        self._in_flight = collections.deque()

    @classmethod
    def open(cls, port=None, *, baud=DEFAULT_BAUD, timeout=1.0, time_scale=1.0):
        """Open a transport with :func:`sw.transport.open_transport` and wrap it.

        Parameters
        ----------
        port : str, optional
            ``socket://HOST:PORT``, a serial port name, or ``None`` for the FTDI port.
        baud : int
            UART baud rate of the build.
        timeout, time_scale : float
            As for :class:`Device`.
        """
        return cls(open_transport(port, baud), timeout=timeout, time_scale=time_scale)

    def close(self):
        """Close the transport."""
        self.transport.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    # Link level.

    def _baud(self):
        if self._info is not None:
            return self._info["baud"]
        baud = getattr(self.transport, "baudrate", None)
        return baud if isinstance(baud, int) and baud > 0 else DEFAULT_BAUD

    def _wire_seconds(self, nbytes):
        return nbytes * 10 / self._baud()

    def _max_payload(self):
        return protocol.MAX_LENGTH if self._info is None else self._info["max_payload"]

    def _read(self, count, deadline):
        data = bytearray()
        while len(data) < count:
            chunk = self.transport.read(count - len(data))
            if chunk:
                data += chunk
                self.bytes_received += len(chunk)
            elif time.monotonic() >= deadline:
                break
        return bytes(data)

    def _send(self, command, payload):
        if not self._in_flight:
            self.transport.reset_input_buffer()
        frame = protocol.encode_frame(protocol.REQUEST_SYNC, command, payload)
        self.transport.write(frame)
        self.transport.flush()
        self.bytes_sent += len(frame)
        return len(frame)

    def _rx_buffer(self):
        """Bytes of requests the device buffers behind the one it executes (0: unknown)."""
        return 0 if self._info is None else self._info["rx_buffer"]

    def _collect(self):
        """Receive the oldest outstanding reply into its :class:`_Request`.

        A reply that does not arrive or is malformed leaves the link out of step: every
        request in flight then fails with that error (the oldest with the error itself), and
        it is raised.
        """
        request = self._in_flight[0]
        try:
            status, payload = self._receive(request.command, request.expected,
                                            time.monotonic() + request.allowed, request.allowed)
        except DriverError as error:
            failed = list(self._in_flight)
            self._in_flight.clear()
            for number, other in enumerate(failed):
                other.done = True
                other.error = error if number == 0 else DriverError(
                    f"no reply to {_command_name(other.command)}: the link broke on an "
                    f"earlier reply ({error}); resync")
            raise
        self._in_flight.popleft()
        request.done = True
        if status == Status.OK:
            request.payload = payload
        else:
            request.error = DeviceError(status, _as_command(request.command), payload[0])

    def _receive(self, command, expected, deadline, allowed):
        """Read one reply frame; return ``(status, payload)``.

        ``expected`` is the payload length of an OK reply, or ``None`` for any length.
        """
        name = _command_name(command)
        frame_size = protocol.HEADER_SIZE + protocol.CRC_SIZE
        limit = self._max_payload() + frame_size
        skipped = bytearray()
        while True:
            byte = self._read(1, deadline)
            if byte and byte[0] == protocol.REPLY_SYNC:
                break
            if byte:
                skipped += byte
            if skipped and (not byte or len(skipped) > limit):
                preview = skipped[:8].hex(" ") + (" ..." if len(skipped) > 8 else "")
                raise ProtocolError(
                    f"reply to {name} must start with sync byte {protocol.REPLY_SYNC:#04x}, "
                    f"not with {len(skipped)} other bytes ({preview})")
            if not byte:
                raise DeviceTimeoutError(f"no reply to {name} within {allowed:.2f} s: "
                                         f"0 bytes arrived")
        self.skipped_bytes += len(skipped)
        header = self._read(protocol.HEADER_SIZE - 1, deadline)
        if len(header) < protocol.HEADER_SIZE - 1:
            raise DeviceTimeoutError(
                f"reply to {name} incomplete after {allowed:.2f} s: {1 + len(header)} of at "
                f"least {frame_size} bytes arrived")
        status, length = header[0], header[1] | header[2] << 8
        if status not in _STATUS_VALUES:
            raise ProtocolError(f"reply status must be a Status, not {status:#04x} "
                                f"(reply to {name})")
        if status != Status.OK:
            expected = 1
        if expected is not None and length != expected:
            raise ProtocolError(f"reply to {name} with status {Status(status).name} must carry "
                                f"{_plural(expected, 'payload byte')}, not {length}")
        rest = self._read(length + protocol.CRC_SIZE, deadline)
        if len(rest) < length + protocol.CRC_SIZE:
            raise DeviceTimeoutError(
                f"reply to {name} incomplete after {allowed:.2f} s: "
                f"{protocol.HEADER_SIZE + len(rest)} of {frame_size + length} bytes arrived")
        payload = rest[:length]
        received = rest[length] | rest[length + 1] << 8
        computed = protocol.crc16(header + payload)
        if received != computed:
            raise ProtocolError(f"reply CRC must be {computed:#06x}, not {received:#06x} "
                                f"(reply to {name})")
        return Status(status), payload

    def _reply_allowance(self, request_size, reply_size, compute_seconds=0.0):
        frames = request_size + reply_size + 2 * (protocol.HEADER_SIZE + protocol.CRC_SIZE)
        return self.timeout + self.time_scale * (2 * self._wire_seconds(frames)
                                                 + 4 * compute_seconds)

    def request(self, command, payload=b"", *, expected=None, compute_seconds=0.0):
        """Send one request and return the payload of its OK reply (after the replies to the
        requests still in flight: see :meth:`submit`).

        Parameters
        ----------
        command : :class:`sw.protocol.Command` or int
            The command byte (any byte, to test a device's answer to unknown commands).
        payload : bytes-like
        expected : int, optional
            The payload length an OK reply must have.
        compute_seconds : float
            Estimated time the device needs to execute the request.

        Raises
        ------
        ValueError
            If the payload is longer than the device's ``max_payload`` (checked once the
            parameters are known: the device would drop the rest of such a frame unread, and
            could take a sync byte in it for the start of a frame).
        DeviceError, DeviceTimeoutError, ProtocolError
        """
        payload = bytes(payload)
        command = _check_int("command", command, 0, 0xFF)
        if len(payload) > self._max_payload():
            raise ValueError(f"payload must be at most max_payload ({self._max_payload()}) "
                             f"bytes, not {len(payload)}")
        return self.submit(command, payload, expected=expected,
                           compute_seconds=compute_seconds).result()

    def submit(self, command, payload=b"", *, expected=None, compute_seconds=0.0):
        """Send one request without waiting for its reply; return a :class:`Pending` whose
        ``result()`` is the payload of its OK reply.

        Before sending, the replies of older requests are collected (their outcomes kept for
        their own :class:`Pending`) until the frames in flight after the oldest, this one
        included, fit the device's ``rx_buffer`` and the replies due, this one's included, fit
        :data:`REPLY_BUDGET`; with nothing in flight any frame may go.
        The arguments and the errors are those of :meth:`request`.
        """
        payload = bytes(payload)
        command = _check_int("command", command, 0, 0xFF)
        if len(payload) > self._max_payload():
            raise ValueError(f"payload must be at most max_payload ({self._max_payload()}) "
                             f"bytes, not {len(payload)}")
        reply_size = protocol.MAX_LENGTH if expected is None else expected
        allowed = self._reply_allowance(len(payload), min(reply_size, self._max_payload()),
                                        compute_seconds)
        frame_overhead = protocol.HEADER_SIZE + protocol.CRC_SIZE
        size = len(payload) + frame_overhead
        reply_frame = min(reply_size, self._max_payload()) + frame_overhead
        while self._in_flight and (
                sum(r.size for r in self._in_flight) - self._in_flight[0].size + size
                > self._rx_buffer()
                or sum(r.reply_size for r in self._in_flight) + reply_frame > REPLY_BUDGET):
            self._collect()
        self._send(command, payload)
        request = _Request(command, expected, size, reply_frame, allowed)
        self._in_flight.append(request)
        return Pending(self, [request], lambda payloads: payloads[0])

    def ping(self, data=b""):
        """Check the link: send ``data`` and check that the device echoes it.

        Raises
        ------
        ProtocolError
            If the echo differs from ``data``.
        """
        data = bytes(data)
        echo = self.request(Command.PING, data, expected=len(data))
        if echo != data:
            raise ProtocolError(f"PING echo must be {data.hex(' ')}, not {echo.hex(' ')}")

    def info(self):
        """Read the device's build parameters and check its protocol version.

        Returns
        -------
        dict
            The fields of :data:`sw.protocol.INFO` (``rows``, ``cols``, ``lane``, ``acc_width``,
            ``max_payload``, ``max_depth``, the memory depths, ``clock_hz``, ``baud``).

        Raises
        ------
        IncompatibleDeviceError
            If the device's protocol version is not :data:`sw.protocol.PROTOCOL_VERSION`.
        """
        reply = self.request(Command.INFO)
        if reply[:1] != bytes([protocol.PROTOCOL_VERSION]):
            version = reply[0] if reply else "unknown"
            raise IncompatibleDeviceError(
                f"device protocol version must be {protocol.PROTOCOL_VERSION}, not {version}: "
                f"update the driver or the bitstream")
        if len(reply) != protocol.INFO.size:
            raise ProtocolError(f"reply to INFO must carry {protocol.INFO.size} payload bytes, "
                                f"not {len(reply)}")
        self._info = protocol.INFO.unpack(reply)
        return dict(self._info)

    @property
    def parameters(self):
        """The cached result of :meth:`info` (read from the device on first use)."""
        if self._info is None:
            self.info()
        return dict(self._info)

    def word_width(self, memory):
        """Bits per word of ``memory`` on this device."""
        return protocol.memory_word_widths(self.parameters)[_check_memory(memory)]

    def depth(self, memory):
        """Words in ``memory`` on this device."""
        return protocol.memory_depths(self.parameters)[_check_memory(memory)]

    def _check_range(self, memory, address, words):
        depth = self.depth(memory)
        address = _check_int("address", address, 0, 0xFFFF_FFFF)
        if address + words > depth:
            raise ValueError(f"{memory.name} words {address} .. {address + words - 1} must lie "
                             f"within the memory's {depth} words")
        return address

    def write(self, memory, address, data, *, wait=True):
        """Write whole words into a memory, in as many WRITE requests as ``max_payload`` needs
        (pipelined within the device's ``rx_buffer``).

        Parameters
        ----------
        memory : :class:`sw.protocol.Memory`
        address : int
            First word.
        data : bytes-like
            A whole number of words (:func:`sw.packing.words_to_bytes`); empty writes nothing.
        wait : bool
            Wait for the replies (the default), or return a :class:`Pending` (``result()`` is
            ``None``) and let later requests follow.

        Raises
        ------
        ValueError
            If ``data`` is not whole words or the words do not lie within the memory (nothing
            is written then).
        DeviceError, DeviceTimeoutError, ProtocolError
            From any of the requests (with ``wait=False``, from ``result()``); the requests
            before it have been executed.
        """
        memory = _check_memory(memory)
        data = bytes(data)
        size = packing.word_bytes(self.word_width(memory))
        if len(data) % size:
            raise ValueError(f"data must be a whole number of {memory.name} words ({size} "
                             f"bytes each), not {len(data)} bytes")
        return self._write_frames(Command.WRITE, memory, address, data, size, wait)

    def write8(self, address, values, *, wait=True):
        """Write INTS elements from one byte each (WRITE8: zero-extended on the device), a
        third of the bytes of :meth:`write_words` for 24-bit elements.

        Parameters
        ----------
        address : int
            First element.
        values : iterable of int or bytes-like
            The elements, each in 0 .. 255.
        wait : bool
            As for :meth:`write`.

        Raises
        ------
        ValueError
            If a value lies outside 0 .. 255 or the elements do not lie within INTS.
        DeviceError, DeviceTimeoutError, ProtocolError
        """
        if isinstance(values, (bytes, bytearray, memoryview)):
            data = bytes(values)
        else:
            values = [int(value) for value in values]
            if values and not 0 <= min(values) <= max(values) <= 0xFF:
                raise ValueError(f"WRITE8 values must lie in 0 .. 255, not "
                                 f"{min(values)} .. {max(values)}")
            data = bytes(values)
        return self._write_frames(Command.WRITE8, Memory.INTS, address, data, 1, wait)

    def _write_frames(self, command, memory, address, data, size, wait):
        if memory in protocol.READ_ONLY_MEMORIES:
            raise ValueError(f"{memory.name} is read-only")
        words = len(data) // size
        address = self._check_range(memory, address, words)
        per_request = (self.parameters["max_payload"] - protocol.WRITE_HEADER.size) // size
        pending = []
        for first in range(0, words, per_request):
            chunk = data[first * size:(first + per_request) * size]
            header = protocol.WRITE_HEADER.pack(memory=memory, address=address + first)
            # Counted before the request: a failed write may still have changed the memory.
            self.writes[memory] += 1
            pending.append(self.submit(command, header + chunk, expected=0))
        return self._join(pending, lambda results: None, wait)

    def _join(self, pending, finish, wait):
        """One :class:`Pending` for several (``finish`` maps their results), or its result."""
        joined = Pending(self, [request for part in pending for request in part._requests],
                         lambda payloads: finish(payloads))
        return joined.result() if wait else joined

    def read(self, memory, address, count, *, wait=True):
        """Read ``count`` words from a memory, in as many READ requests as ``max_payload`` needs.

        Parameters
        ----------
        wait : bool
            As for :meth:`write` (``result()`` is the bytes).

        Returns
        -------
        bytes
            ``count`` words of :func:`sw.packing.word_bytes` bytes each.

        Raises
        ------
        ValueError
            If the words do not lie within the memory.
        DeviceError, DeviceTimeoutError, ProtocolError
        """
        memory = _check_memory(memory)
        count = _check_int("count", count, 0, 0xFFFF_FFFF)
        address = self._check_range(memory, address, count)
        size = packing.word_bytes(self.word_width(memory))
        per_request = min(self.parameters["max_payload"] // size, 0xFFFF)
        pending = []
        for first in range(0, count, per_request):
            words = min(per_request, count - first)
            payload = protocol.READ_REQUEST.pack(memory=memory, address=address + first,
                                                 count=words)
            pending.append(self.submit(Command.READ, payload, expected=words * size))
        return self._join(pending, b"".join, wait)

    def write_words(self, memory, address, words, *, wait=True):
        """Write words given as integers (see :meth:`write`)."""
        memory = _check_memory(memory)
        return self.write(memory, address,
                          packing.words_to_bytes(words, self.word_width(memory)), wait=wait)

    def read_words(self, memory, address, count, *, wait=True):
        """Read words as integers (see :meth:`read`)."""
        memory = _check_memory(memory)
        width = self.word_width(memory)
        pending = self.read(memory, address, count, wait=False)
        return self._join([pending], lambda payloads: packing.bytes_to_words(
            b"".join(payloads), width), wait)

    def run_gemm(self, m_tiles, n_tiles, k_words):
        """Run a binary GEMM over the loaded memories.

        Parameters
        ----------
        m_tiles, n_tiles, k_words : int
            The tiling (see :mod:`sw.packing`); each in 1 .. 65535.

        Returns
        -------
        int
            Clock cycles the device took.

        Raises
        ------
        DeviceError
            With :attr:`Status.BAD_ARGUMENT` if the tiling does not fit the device.
        """
        m_tiles = _check_int("m_tiles", m_tiles, 1, 0xFFFF)
        n_tiles = _check_int("n_tiles", n_tiles, 1, 0xFFFF)
        k_words = _check_int("k_words", k_words, 1, 0xFFFF)
        p = self.parameters
        cycles = gemm_cycles_estimate(m_tiles, n_tiles, k_words, p["rows"], p["cols"])
        payload = protocol.GEMM_REQUEST.pack(m_tiles=m_tiles, n_tiles=n_tiles, k_words=k_words)
        reply = self.request(Command.GEMM, payload, expected=protocol.GEMM_REPLY.size,
                             compute_seconds=cycles / p["clock_hz"])
        return protocol.GEMM_REPLY.unpack(reply)["cycles"]

    def run_ops(self, first, count, *, estimated_cycles=None, max_cycles=None, wait=True):
        """Run ops ``first .. first + count - 1`` of the layer program in PROGRAM memory.

        Parameters
        ----------
        estimated_cycles : int, optional
            Expected cycles, for the reply timeout (by default, one second of device clock).
        max_cycles : int, optional
            The device aborts the run after this many cycles (default: four times the
            estimate plus 10,000).
        wait : bool
            As for :meth:`write` (``result()`` is the cycles).

        Returns
        -------
        int
            Clock cycles the run took (the sum of the ops' counters, see :meth:`op_cycles`).

        Raises
        ------
        ValueError
            If the range is empty or lies outside PROGRAM memory.
        DeviceError
            With :attr:`Status.BAD_ARGUMENT` if the device refuses the range, with
            :attr:`Status.ABORTED` if the run exceeded ``max_cycles``.
        """
        depth = self.depth(Memory.PROGRAM)
        first = _check_int("first", first, 0, depth - 1)
        count = _check_int("count", count, 1, depth - first)
        clock = self.parameters["clock_hz"]
        estimate = clock if estimated_cycles is None else estimated_cycles
        if max_cycles is None:
            max_cycles = min(4 * estimate + 10_000, 0xFFFF_FFFF)
        max_cycles = _check_int("max_cycles", max_cycles, 1, 0xFFFF_FFFF)
        payload = protocol.RUN_REQUEST.pack(first=first, count=count, max_cycles=max_cycles)
        pending = self.submit(Command.RUN, payload, expected=protocol.RUN_REPLY.size,
                              compute_seconds=max(estimate, max_cycles) / clock)
        return self._join([pending], lambda payloads: protocol.RUN_REPLY.unpack(
            payloads[0])["cycles"], wait)

    def op_cycles(self, first, count, *, wait=True):
        """The per-op cycle counters of ops ``first .. first + count - 1`` (last run)."""
        return self.read_words(Memory.COUNTERS, first, count, wait=wait)

    def send_raw(self, data):
        """Send ``data`` as it is (for diagnostics and fuzzing: malformed frames, garbage)."""
        data = bytes(data)
        self.transport.write(data)
        self.transport.flush()
        self.bytes_sent += len(data)

    def receive_reply(self, timeout, command=protocol.NO_COMMAND):
        """Wait up to ``timeout`` seconds (scaled by ``time_scale``) for one reply frame and
        return ``(status, payload)`` (for diagnostics and fuzzing, with :meth:`send_raw`).

        Raises
        ------
        DeviceTimeoutError, ProtocolError
        """
        allowed = timeout * self.time_scale
        return self._receive(command, None, time.monotonic() + allowed, allowed)

    def resync(self):
        """Bring the link back into step after an error.

        Sends ``max_payload + 6`` zero bytes (enough to end any frame in progress on the
        device; 65541 before the parameters are known), waits for the device to answer them,
        discards the input, then sends a PING with a random payload and waits for its echo,
        skipping any stale replies. Requests still in flight are abandoned: their
        :class:`Pending` raise a :class:`DriverError`.

        Raises
        ------
        DeviceTimeoutError
            If the echo does not arrive.
        """
        for request in self._in_flight:
            request.done = True
            request.error = DriverError(f"no reply to {_command_name(request.command)}: "
                                        f"abandoned by resync")
        self._in_flight.clear()
        frame_size = protocol.HEADER_SIZE + protocol.CRC_SIZE
        zeros = self._max_payload() + frame_size
        self.transport.write(bytes(zeros))
        self.transport.flush()
        time.sleep(self.time_scale * self._wire_seconds(zeros + self._max_payload() + frame_size)
                   + 0.01)
        self.transport.reset_input_buffer()
        nonce = os.urandom(8)
        allowed = self._reply_allowance(len(nonce), self._max_payload())
        deadline = time.monotonic() + allowed
        self._send(Command.PING, nonce)
        while True:
            try:
                status, payload = self._receive(Command.PING, None, deadline, allowed)
            except ProtocolError:
                continue
            except DeviceTimeoutError as error:
                raise DeviceTimeoutError(f"resync failed: {error}") from None
            if status == Status.OK and payload == nonce:
                return

    # Binary GEMM.

    def gemm(self, W, A, *, encoding="sign"):
        """Compute the xnor-popcount counts of a binary matrix product on the device.

        Parameters
        ----------
        W : array_like or torch.Tensor, shape (M, K)
            Binary weights.
        A : array_like or torch.Tensor, shape (K, N)
            Binary activations.
        encoding : {"sign", "bit"}
            How ``W`` and ``A`` are encoded (see :func:`sw.packing.to_bits`).

        Returns
        -------
        counts : numpy.ndarray of int64, shape (M, N)
            ``(W @ A + K) / 2`` with the matrices read as +1/-1.
        cycles : int
            Clock cycles the device took.

        Raises
        ------
        ValueError
            If a matrix is not a non-empty 2-D array of binary values or K does not match.
        CapacityError
            If K exceeds ``max_depth`` or a packed matrix or the result does not fit its memory
            (the message names the matrix, the words needed and the words the device has).
        """
        w = packing.to_bits(W, encoding, name="W", ndim=2)
        a = packing.to_bits(A, encoding, name="A", ndim=2)
        for name, bits in (("W", w), ("A", a)):
            if 0 in bits.shape:
                raise ValueError(f"{name} must have at least one row and one column, not shape "
                                 f"{bits.shape}")
        (M, K), (K_a, N) = w.shape, a.shape
        if K_a != K:
            raise ValueError(f"A must have {K} rows to match the columns of W, not {K_a}")
        p = self.parameters
        rows, cols, lane = p["rows"], p["cols"], p["lane"]
        if K > p["max_depth"]:
            raise CapacityError(f"K must be at most the device's max_depth ({p['max_depth']}), "
                                f"not {K}")
        m_tiles, n_tiles, k_words = packing.gemm_tiling(M, K, N, rows, cols, lane)
        needs = [
            (f"W ({M} x {K})", Memory.WEIGHTS, m_tiles * k_words,
             f"{_plural(m_tiles, 'tile')} of {_plural(k_words, 'word')}"),
            (f"A ({K} x {N})", Memory.ACTIVATIONS, n_tiles * k_words,
             f"{_plural(n_tiles, 'tile')} of {_plural(k_words, 'word')}"),
            (f"the result ({M} x {N})", Memory.RESULTS, m_tiles * n_tiles * rows,
             f"{m_tiles} x {_plural(n_tiles, 'tile')} of {_plural(rows, 'word')}"),
        ]
        for what, memory, words, how in needs:
            if words > self.depth(memory):
                raise CapacityError(f"{what} needs {words} words of {memory.name} memory "
                                    f"({how}), but the device has {self.depth(memory)}")
        for what, tiles in (("W", m_tiles), ("A", n_tiles)):
            if tiles > 0xFFFF:
                raise CapacityError(f"{what} needs {tiles} tiles, but a GEMM request holds at "
                                    f"most 65535")
        self.write_words(Memory.WEIGHTS, 0, packing.pack_weights(w, rows, lane, encoding="bit"))
        self.write_words(Memory.ACTIVATIONS, 0,
                         packing.pack_activations(a, cols, lane, encoding="bit"))
        cycles = self.run_gemm(m_tiles, n_tiles, k_words)
        words = self.read_words(Memory.RESULTS, 0, m_tiles * n_tiles * rows)
        counts = packing.unpack_results(words, M, N, rows, cols, p["acc_width"])
        return counts, cycles


def _as_command(command):
    try:
        return Command(command)
    except ValueError:
        return command


def gemm(W, A, port=None, *, encoding="sign", baud=DEFAULT_BAUD, timeout=1.0, time_scale=1.0):
    """Compute the xnor-popcount counts of ``W @ A`` on a device, opening and closing the link.

    Parameters
    ----------
    W, A, encoding
        As for :meth:`Device.gemm`.
    port, baud, timeout, time_scale
        As for :meth:`Device.open`.

    Returns
    -------
    counts : numpy.ndarray of int64, shape (M, N)
    cycles : int
    """
    with Device.open(port, baud=baud, timeout=timeout, time_scale=time_scale) as device:
        return device.gemm(W, A, encoding=encoding)
