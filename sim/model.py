"""A behavioural model of the device at the byte level, and a transport that talks to it.

:class:`DeviceModel` answers request bytes with reply bytes exactly as :mod:`sw.protocol`
specifies and as :class:`hw.core.DeviceCore` does, without Amaranth and without time:

* Bytes outside a frame that are not ``REQUEST_SYNC`` are dropped.
* A length above ``max_payload`` is answered with ``BAD_LENGTH`` right after the length bytes;
  the model then hunts for the next sync byte.
* A bad CRC is answered with ``BAD_CRC`` and has no other effect.
* The byte timeout happens when the caller says so: :meth:`DeviceModel.timeout` answers a frame
  in progress with ``TIMEOUT``.
* Error replies carry one byte, the request's command byte (``NO_COMMAND`` when the frame broke
  before it).

Checks of a frame whose CRC matched, in the order the device makes them (the first failing one
answers):

=======  ==================================================================================
PING     none; the payload (0 .. ``max_payload`` bytes) is echoed
INFO     length 0, else BAD_LENGTH; replies ``config.info()``
WRITE    length > 5 (at least one data byte), else BAD_LENGTH; memory id, else BAD_ADDRESS;
         not COUNTERS, else READ_ONLY; data a whole number of words, else BAD_LENGTH; words
         within the memory, else BAD_ADDRESS. Bits above the word width are ignored.
WRITE8   as WRITE, and the memory INTS (after the READ_ONLY check), else BAD_ARGUMENT; each
         data byte is one element, zero-extended
READ     length 7, else BAD_LENGTH; memory id, else BAD_ADDRESS; ``1 <= count`` and
         ``count * word_bytes <= max_payload``, else BAD_LENGTH; words within the memory, else
         BAD_ADDRESS
GEMM     length 6, else BAD_LENGTH; no zero, ``k_words <= max_depth // lane``,
         ``m_tiles * k_words <= weight_depth``, ``n_tiles * k_words <= activation_depth``,
         ``m_tiles * n_tiles * rows <= result_depth``, else BAD_ARGUMENT
other    UNKNOWN_COMMAND
=======  ==================================================================================

The GEMM reads the memories in the layout of :mod:`sw.packing` (implemented here again, from the
layout's definition, so that a test of the packing against the model is not circular) and writes
the counts into the RESULTS words of every tile; other RESULTS words keep their contents. Its
reply's ``cycles`` is :meth:`DeviceModel.gemm_cycles`, an estimate of the hardware's count (exact
for the hardware it was measured on, but not a contract). Memories start as zeros.

:class:`LoopbackTransport` has the interface the driver uses of a pyserial object and feeds a
:class:`DeviceModel`, so the driver can be tested without hardware.
"""

import time

from hw.config import DeviceConfig
from sw import protocol
from sw.protocol import Command, Memory, Status

__all__ = ["DeviceModel", "LoopbackTransport"]


class DeviceModel:
    """The device as a function from request bytes to reply bytes.

    Parameters
    ----------
    config : :class:`hw.config.DeviceConfig`, optional
        The build to model (default: ``DeviceConfig()``).

    Attributes
    ----------
    memories : dict of :class:`sw.protocol.Memory` to list of int
        The words of each memory.
    gemm_runs : int
        GEMM requests executed.
    """

    def __init__(self, config=None):
        self.config = DeviceConfig() if config is None else config
        self.memories = {memory: [0] * depth for memory, depth in self.config.depths().items()}
        self.gemm_runs = 0
        self._hunt()

    def _hunt(self):
        self._state = "hunt"
        self._command = protocol.NO_COMMAND
        self._length = 0
        self._body = bytearray()        # command, length and payload: what the CRC covers
        self._crc = bytearray()

    @property
    def in_frame(self):
        """Whether a frame has started and not yet ended."""
        return self._state != "hunt"

    def _error(self, status, command=None):
        command = self._command if command is None else command
        return protocol.encode_frame(protocol.REPLY_SYNC, status, bytes([command]))

    def feed(self, data):
        """Process received bytes.

        Parameters
        ----------
        data : bytes-like

        Returns
        -------
        bytes
            The reply bytes the device sends in answer (possibly several frames, or none).
        """
        out = bytearray()
        for byte in bytes(data):
            out += self._byte(byte)
        return bytes(out)

    def timeout(self):
        """Let the device's byte timeout pass.

        Returns
        -------
        bytes
            A ``TIMEOUT`` reply if a frame was in progress (it is abandoned), else nothing.
        """
        if not self.in_frame:
            return b""
        reply = self._error(Status.TIMEOUT)
        self._hunt()
        return reply

    def _byte(self, byte):
        state = self._state
        if state == "hunt":
            if byte == protocol.REQUEST_SYNC:
                self._state = "command"
            return b""
        if state in ("command", "length low", "length high", "payload"):
            self._body.append(byte)
        if state == "command":
            self._command = byte
            self._state = "length low"
        elif state == "length low":
            self._state = "length high"
        elif state == "length high":
            self._length = self._body[1] | byte << 8
            if self._length > self.config.max_payload:
                reply = self._error(Status.BAD_LENGTH)
                self._hunt()
                return reply
            self._state = "payload" if self._length else "crc"
        elif state == "payload":
            if len(self._body) == 3 + self._length:
                self._state = "crc"
        else:
            self._crc.append(byte)
            if len(self._crc) == protocol.CRC_SIZE:
                body = bytes(self._body)
                crc_ok = int.from_bytes(self._crc, "little") == protocol.crc16(body)
                command = self._command
                self._hunt()
                if not crc_ok:
                    return self._error(Status.BAD_CRC, command)
                return self._execute(command, body[3:])
        return b""

    # Commands.

    def _execute(self, command, payload):
        handlers = {
            Command.PING: self._ping,
            Command.INFO: self._info,
            Command.WRITE: self._write,
            Command.WRITE8: self._write8,
            Command.READ: self._read,
            Command.GEMM: self._gemm,
        }
        handler = handlers.get(command)
        if handler is None:
            return self._error(Status.UNKNOWN_COMMAND, command)
        result = handler(payload)
        if isinstance(result, Status):
            return self._error(result, command)
        return protocol.encode_frame(protocol.REPLY_SYNC, Status.OK, result)

    def _ping(self, payload):
        return payload

    def _info(self, payload):
        if payload:
            return Status.BAD_LENGTH
        return self.config.info()

    def _word_bytes(self, memory):
        return self.config.word_bytes(memory)

    def _write8(self, payload):
        return self._write(payload, narrow=True)

    def _write(self, payload, narrow=False):
        header_size = protocol.WRITE_HEADER.size
        if len(payload) <= header_size:
            return Status.BAD_LENGTH
        header = protocol.WRITE_HEADER.unpack(payload[:header_size])
        if header["memory"] not in set(Memory):
            return Status.BAD_ADDRESS
        memory = Memory(header["memory"])
        if memory in protocol.READ_ONLY_MEMORIES:
            return Status.READ_ONLY
        if narrow and memory != Memory.INTS:
            return Status.BAD_ARGUMENT
        data = payload[header_size:]
        size = 1 if narrow else self._word_bytes(memory)
        if len(data) % size:
            return Status.BAD_LENGTH
        words = len(data) // size
        address = header["address"]
        if address + words > len(self.memories[memory]):
            return Status.BAD_ADDRESS
        mask = (1 << self.config.word_widths()[memory]) - 1
        for index in range(words):
            word = int.from_bytes(data[index * size:(index + 1) * size], "little")
            self.memories[memory][address + index] = word & mask
        return b""

    def _read(self, payload):
        if len(payload) != protocol.READ_REQUEST.size:
            return Status.BAD_LENGTH
        request = protocol.READ_REQUEST.unpack(payload)
        if request["memory"] not in set(Memory):
            return Status.BAD_ADDRESS
        memory = Memory(request["memory"])
        size = self._word_bytes(memory)
        count, address = request["count"], request["address"]
        if count == 0 or count * size > self.config.max_payload:
            return Status.BAD_LENGTH
        if address + count > len(self.memories[memory]):
            return Status.BAD_ADDRESS
        return b"".join(word.to_bytes(size, "little")
                        for word in self.memories[memory][address:address + count])

    def gemm_fits(self, m_tiles, n_tiles, k_words):
        """Whether the device accepts a GEMM with this tiling (else ``BAD_ARGUMENT``)."""
        cfg = self.config
        return (m_tiles > 0 and n_tiles > 0 and k_words > 0
                and k_words <= cfg.max_k_words
                and m_tiles * k_words <= cfg.weight_depth
                and n_tiles * k_words <= cfg.activation_depth
                and m_tiles * n_tiles * cfg.rows <= cfg.result_depth)

    def gemm_cycles(self, m_tiles, n_tiles, k_words):
        """The ``cycles`` the model reports for a GEMM.

        ``(tiles - 1) * max(k_words, rows) + k_words + 2 * rows + cols + 3`` with
        ``tiles = m_tiles * n_tiles``: a tile holds the array's input for ``max(k_words, rows)``
        cycles, and the last tile's results leave through the pipeline and the result chains.
        This matched :class:`hw.core.DeviceCore` in ``amaranth.sim`` when it was written; it is
        an estimate, not part of the protocol.
        """
        cfg = self.config
        tiles = m_tiles * n_tiles
        return (tiles - 1) * max(k_words, cfg.rows) + k_words + 2 * cfg.rows + cfg.cols + 3

    def _gemm(self, payload):
        if len(payload) != protocol.GEMM_REQUEST.size:
            return Status.BAD_LENGTH
        request = protocol.GEMM_REQUEST.unpack(payload)
        m_tiles, n_tiles, k_words = request["m_tiles"], request["n_tiles"], request["k_words"]
        if not self.gemm_fits(m_tiles, n_tiles, k_words):
            return Status.BAD_ARGUMENT
        cfg = self.config
        rows, cols, lane, acc_width = cfg.rows, cfg.cols, cfg.lane, cfg.acc_width
        lane_mask = (1 << lane) - 1
        weights = self.memories[Memory.WEIGHTS]
        activations = self.memories[Memory.ACTIVATIONS]

        def gather(words, base, slot):
            # The k_words lanes of one array row (or column) as one integer, lane kw at kw*lane.
            value = 0
            for kw in range(k_words):
                value |= ((words[base + kw] >> (slot * lane)) & lane_mask) << (kw * lane)
            return value

        weight_rows = [[gather(weights, mt * k_words, r) for r in range(rows)]
                       for mt in range(m_tiles)]
        activation_cols = [[gather(activations, nt * k_words, c) for c in range(cols)]
                           for nt in range(n_tiles)]
        all_lanes = (1 << (k_words * lane)) - 1
        results = self.memories[Memory.RESULTS]
        for mt in range(m_tiles):
            for nt in range(n_tiles):
                for r in range(rows):
                    w = weight_rows[mt][r]
                    word = 0
                    for c, a in enumerate(activation_cols[nt]):
                        # XNOR, then popcount: positions where the signs agree.
                        word |= (~(w ^ a) & all_lanes).bit_count() << (c * acc_width)
                    results[(mt * n_tiles + nt) * rows + r] = word
        self.gemm_runs += 1
        return protocol.GEMM_REPLY.pack(cycles=self.gemm_cycles(m_tiles, n_tiles, k_words))


class LoopbackTransport:
    """A pyserial-like transport whose far end is a :class:`DeviceModel`.

    Parameters
    ----------
    model : DeviceModel
    timeout : float
        Seconds a ``read`` that finds too few bytes waits before it returns them (the model
        has answered everything already, so waiting only mimics pyserial).
    auto_timeout : bool
        If a ``read`` finds too few bytes while the model is inside a frame, let the model's
        byte timeout pass first (as a real device's would while the host waits).
    tamper : callable, optional
        ``tamper(reply_bytes) -> bytes`` is applied to the model's answer to each ``write``:
        a test's way to corrupt, truncate or drop replies.

    Attributes
    ----------
    written : bytearray
        Every byte written, in order.
    """

    def __init__(self, model, *, timeout=0.01, auto_timeout=True, tamper=None):
        self.model = model
        self.timeout = timeout
        self.auto_timeout = auto_timeout
        self.tamper = tamper
        self.written = bytearray()
        self.is_open = True
        self._input = bytearray()

    def _check_open(self):
        if not self.is_open:
            raise OSError("the loopback transport is closed")

    def write(self, data):
        self._check_open()
        data = bytes(data)
        self.written += data
        reply = self.model.feed(data)
        if self.tamper is not None:
            reply = self.tamper(reply)
        self._input += reply
        return len(data)

    def read(self, size=1):
        self._check_open()
        if len(self._input) < size and self.auto_timeout and self.model.in_frame:
            self._input += self.model.timeout()
        if len(self._input) < size and self.timeout:
            time.sleep(self.timeout)
        data = bytes(self._input[:size])
        del self._input[:size]
        return data

    @property
    def in_waiting(self):
        return len(self._input)

    def reset_input_buffer(self):
        self._input.clear()

    def flush(self):
        pass

    def close(self):
        self.is_open = False
