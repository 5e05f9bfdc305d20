"""The host link protocol: framing, opcodes, status codes and payload layouts.

This module is the single definition of the byte protocol between the host driver (``sw``) and
the device (``hw``). Both sides import it; it depends only on the Python standard library, so the
host never needs Amaranth.

Framing
-------
A request is::

    REQUEST_SYNC  command  length_lo  length_hi  payload[length]  crc_lo  crc_hi

and every request is answered by exactly one reply::

    REPLY_SYNC    status   length_lo  length_hi  payload[length]  crc_lo  crc_hi

The CRC is CRC-16/CCITT-FALSE (polynomial 0x1021, initial value 0xFFFF, no reflection, no final
XOR) over every byte after the sync byte and before the CRC. All multi-byte fields are
little-endian.

A reply whose status is not :attr:`Status.OK` carries a one-byte payload: the command byte of
the request it answers (:data:`NO_COMMAND` if the frame broke before its command byte was known).

Robustness rules the device follows:

* Bytes outside a frame that are not ``REQUEST_SYNC`` are dropped (resynchronization).
* A frame whose length exceeds the device's ``max_payload`` is answered with
  :attr:`Status.BAD_LENGTH` as soon as the length is known; the device then hunts for the next
  sync byte, so the rest of that frame is dropped.
* A frame that stalls for longer than the device's byte timeout is answered with
  :attr:`Status.TIMEOUT` (a truncated frame never hangs the device).
* A frame with a bad CRC is answered with :attr:`Status.BAD_CRC` and has no other effect.

Pipelining: the device executes requests one at a time, in order, and buffers the bytes that
arrive meanwhile in a receive FIFO of ``rx_buffer`` bytes (an :data:`INFO` field). A host may
send requests before the replies to earlier ones have arrived, as long as the frames of the
requests it has sent and whose replies it has not yet received *completely*, all but the oldest
of them, total at most ``rx_buffer`` bytes (sync, header and CRC included). Within that limit
every request is answered, in order. Beyond it the device has nowhere to put the bytes: the UART
drops them, and the frames they belonged to are answered with an error (``TIMEOUT``,
``BAD_CRC``, or whatever the remaining bytes make of the frame), or (when all their bytes were
lost) not at all; the host then recovers as from any broken frame.
"""

import enum
import struct

__all__ = [
    "CRC_SIZE",
    "GEMM_REPLY",
    "GEMM_REQUEST",
    "HEADER_SIZE",
    "INFO",
    "MAX_LENGTH",
    "NO_COMMAND",
    "PROTOCOL_VERSION",
    "READ_ONLY_MEMORIES",
    "READ_REQUEST",
    "REPLY_SYNC",
    "REQUEST_SYNC",
    "RUN_REPLY",
    "RUN_REQUEST",
    "WRITE_HEADER",
    "Command",
    "InfoLayout",
    "Memory",
    "Status",
    "crc16",
    "crc16_update",
    "encode_frame",
    "memory_depths",
    "memory_word_widths",
]

REQUEST_SYNC = 0xA5
REPLY_SYNC = 0x5A
PROTOCOL_VERSION = 6
#: Command byte used in error replies when the request's command byte was never received.
NO_COMMAND = 0x00
#: Sync, command/status and two length bytes.
HEADER_SIZE = 4
CRC_SIZE = 2
#: The length field is 16 bits wide; a device accepts at most its own ``max_payload``.
MAX_LENGTH = 0xFFFF


class Command(enum.IntEnum):
    """Request command bytes."""
    #: Echo the payload back.
    PING = 0x01
    #: Reply with the build parameters (:data:`INFO`).
    INFO = 0x02
    #: Write whole words into a memory (:data:`WRITE_HEADER` then the data).
    WRITE = 0x03
    #: Read whole words from a memory (:data:`READ_REQUEST`); the reply payload is the data.
    READ = 0x04
    #: Run a binary GEMM over the loaded memories (:data:`GEMM_REQUEST`, reply
    #: :data:`GEMM_REPLY`). The reply is sent when the computation has finished.
    GEMM = 0x05
    #: Run ops ``first .. first + count - 1`` of the layer program in PROGRAM memory
    #: (:data:`RUN_REQUEST`, reply :data:`RUN_REPLY`); each op's cycles go to COUNTERS memory
    #: at the op's index. The reply is sent when the last op has finished.
    RUN = 0x06
    #: Write INTS elements from one byte each (:data:`WRITE_HEADER`, then one unsigned byte
    #: per element, zero-extended to ``element_width``): a raw 8-bit image costs a third of
    #: its WRITE. Other memories are answered with :attr:`Status.BAD_ARGUMENT`.
    WRITE8 = 0x07


class Status(enum.IntEnum):
    """Reply status bytes."""
    OK = 0x00
    #: The frame's CRC did not match; the frame had no effect.
    BAD_CRC = 0x01
    #: The command byte is not a :class:`Command`.
    UNKNOWN_COMMAND = 0x02
    #: The length exceeds the device's ``max_payload`` or does not fit the command's layout.
    BAD_LENGTH = 0x03
    #: The frame stopped arriving before it was complete.
    TIMEOUT = 0x04
    #: A memory id, address or word count lies outside the device's memories.
    BAD_ADDRESS = 0x05
    #: An argument is out of range (for example a GEMM that does not fit the memories).
    BAD_ARGUMENT = 0x06
    #: A RUN took more than its ``max_cycles`` and was stopped; the execution units were reset
    #: (memories keep their contents; the op running then is left incomplete).
    ABORTED = 0x07
    #: A WRITE or WRITE8 to a memory the host may only read (:attr:`Memory.COUNTERS`); nothing
    #: was written.
    READ_ONLY = 0x08


class Memory(enum.IntEnum):
    """Memory ids for :attr:`Command.WRITE` and :attr:`Command.READ`.

    Each memory is an array of words; the host sees a word as ``ceil(width / 8)`` bytes,
    little-endian, bit 0 of the word in bit 0 of the first byte. The bit layouts inside the
    words are defined by :mod:`sw.packing`.
    """
    #: ``rows * lane`` bits per word: one lane of K for each of the array's rows.
    WEIGHTS = 0
    #: ``cols * lane`` bits per word: one lane of K for each of the array's columns.
    ACTIVATIONS = 1
    #: ``cols * acc_width`` bits per word: one output row of one tile.
    RESULTS = 2
    #: ``lane`` bits per word: bit tensors of the layer program (see :mod:`sw.isa`).
    BITS = 3
    #: ``element_width`` bits per word: one signed integer of an integer tensor.
    INTS = 4
    #: 8 bits per word: one signed fixed-point weight or coefficient.
    COEFS = 5
    #: :data:`sw.isa.PARAM` records: the parameters of one output channel.
    PARAMS = 6
    #: :data:`sw.isa.DESCRIPTOR` records: one op of the layer program.
    PROGRAM = 7
    #: 32 bits per word: the clock cycles of the op with the same index. Read only: a WRITE
    #: is answered with :attr:`Status.READ_ONLY`.
    COUNTERS = 8


def memory_word_widths(info):
    """``{Memory: bits per word}`` of a device whose :data:`INFO` fields are ``info`` (a dict
    or an object with those attributes)."""
    from . import isa

    def get(name):
        return info[name] if isinstance(info, dict) else getattr(info, name)
    return {
        Memory.WEIGHTS: get("rows") * get("lane"),
        Memory.ACTIVATIONS: get("cols") * get("lane"),
        Memory.RESULTS: get("cols") * get("acc_width"),
        Memory.BITS: get("lane"),
        Memory.INTS: get("element_width"),
        Memory.COEFS: 8,
        Memory.PARAMS: isa.PARAM.width,
        Memory.PROGRAM: isa.DESCRIPTOR.width,
        Memory.COUNTERS: 32,
    }


def memory_depths(info):
    """``{Memory: words}`` of a device whose :data:`INFO` fields are ``info``."""
    def get(name):
        return info[name] if isinstance(info, dict) else getattr(info, name)
    return {
        Memory.WEIGHTS: get("weight_depth"),
        Memory.ACTIVATIONS: get("activation_depth"),
        Memory.RESULTS: get("result_depth"),
        Memory.BITS: get("bits_depth"),
        Memory.INTS: get("int_depth"),
        Memory.COEFS: get("coef_depth"),
        Memory.PARAMS: get("param_depth"),
        Memory.PROGRAM: get("program_depth"),
        Memory.COUNTERS: get("program_depth"),
    }


def crc16_update(crc, byte):
    """Return the CRC-16/CCITT-FALSE register after shifting in one byte."""
    crc ^= byte << 8
    for _ in range(8):
        crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
        crc &= 0xFFFF
    return crc


def crc16(data, crc=0xFFFF):
    """Return the CRC-16/CCITT-FALSE of ``data`` (bytes-like)."""
    for byte in data:
        crc = crc16_update(crc, byte)
    return crc


def encode_frame(sync, code, payload=b""):
    """Return a complete frame: ``sync``, ``code`` (command or status), length, payload, CRC."""
    payload = bytes(payload)
    if len(payload) > MAX_LENGTH:
        raise ValueError(f"payload must be at most {MAX_LENGTH} bytes, not {len(payload)}")
    body = bytes([code]) + struct.pack("<H", len(payload)) + payload
    return bytes([sync]) + body + struct.pack("<H", crc16(body))


class _Layout:
    """A fixed little-endian record: ``fields`` is a sequence of ``(name, struct code)``."""

    def __init__(self, fields):
        self.fields = tuple(fields)
        self._struct = struct.Struct("<" + "".join(code for _, code in self.fields))
        self.size = self._struct.size

    @property
    def names(self):
        return tuple(name for name, _ in self.fields)

    def pack(self, **values):
        missing = set(self.names) - set(values)
        extra = set(values) - set(self.names)
        if missing or extra:
            raise TypeError(f"fields missing: {sorted(missing)}, unexpected: {sorted(extra)}")
        return self._struct.pack(*(values[name] for name in self.names))

    def unpack(self, data):
        if len(data) != self.size:
            raise ValueError(f"record must be {self.size} bytes, not {len(data)}")
        return dict(zip(self.names, self._struct.unpack(data)))

    def offsets(self):
        """Return ``{name: (byte offset, byte size)}``."""
        result, offset = {}, 0
        for name, code in self.fields:
            size = struct.calcsize("<" + code)
            result[name] = (offset, size)
            offset += size
        return result


InfoLayout = _Layout
#: Payload of the INFO reply: the device's build parameters.
INFO = _Layout([
    ("protocol_version", "B"),
    ("rows", "B"),            # systolic array rows (output channels per tile)
    ("cols", "B"),            # systolic array columns (output pixels per tile)
    ("acc_width", "B"),       # bits per result count
    ("lane", "H"),            # bits each processing element consumes per cycle
    ("max_payload", "H"),     # largest request payload the device accepts, in bytes
    ("max_depth", "I"),       # largest K (bits) a dot product may have
    ("weight_depth", "I"),    # words in Memory.WEIGHTS
    ("activation_depth", "I"),  # words in Memory.ACTIVATIONS
    ("result_depth", "I"),    # words in Memory.RESULTS
    ("clock_hz", "I"),        # system clock of the build
    ("baud", "I"),            # UART baud rate of the build
    ("element_width", "B"),   # bits of one INTS element (signed)
    ("bits_depth", "I"),      # words in Memory.BITS
    ("int_depth", "I"),       # words in Memory.INTS
    ("coef_depth", "I"),      # words in Memory.COEFS
    ("param_depth", "I"),     # words in Memory.PARAMS
    ("program_depth", "I"),   # words in Memory.PROGRAM and Memory.COUNTERS
    ("fixed_lanes", "B"),     # output pixels the fixed-point unit computes per cycle (0: none)
    ("rx_buffer", "I"),       # request bytes the device buffers while it is busy (pipelining)
    ("fixed_channels", "B"),  # output channels of a parallel FIXED op at once (0: none)
])
#: Memories a WRITE may not change (answered with :attr:`Status.READ_ONLY`).
READ_ONLY_MEMORIES = frozenset({Memory.COUNTERS})
#: Start of a WRITE payload; the data (whole words) follows. Also the start of a WRITE8
#: payload, which one byte per INTS element follows.
WRITE_HEADER = _Layout([("memory", "B"), ("address", "I")])
#: Payload of a READ request.
READ_REQUEST = _Layout([("memory", "B"), ("address", "I"), ("count", "H")])
#: Payload of a GEMM request: the tiling of an (M x K) by (K x N) product.
GEMM_REQUEST = _Layout([("m_tiles", "H"), ("n_tiles", "H"), ("k_words", "H")])
#: Payload of the GEMM reply: clock cycles from start to the last result written.
GEMM_REPLY = _Layout([("cycles", "I")])
#: Payload of a RUN request: a range of ops of the layer program and a cycle limit (the run is
#: aborted with :attr:`Status.ABORTED` when it exceeds it; 0 is refused).
RUN_REQUEST = _Layout([("first", "H"), ("count", "H"), ("max_cycles", "I")])
#: Payload of the RUN reply: clock cycles from the first op's start to the last op's end.
RUN_REPLY = _Layout([("cycles", "I")])
