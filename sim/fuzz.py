"""A protocol fuzzer: random and corrupted frames against a device, each reply checked.

:func:`fuzz` sends ``frames`` frames drawn from the kinds below, seeded, to a
:class:`sw.driver.Device` (a simulated board over ``socket://`` in the tests and the benchmark)
and checks that every frame gets exactly the reply the protocol (:mod:`sw.protocol`) promises:

==============  =====================================================================  ==========
kind            frame                                                                  reply
==============  =====================================================================  ==========
bad_crc         a well-formed frame of any command with one CRC bit flipped            BAD_CRC
unknown         a command byte that is no :class:`~sw.protocol.Command`                UNKNOWN_COMMAND
bad_length      INFO with a payload, READ/GEMM/RUN with a payload of the wrong size    BAD_LENGTH
oversize        a length above ``max_payload`` (header only, then non-sync garbage)    BAD_LENGTH
bad_address     READ of an unknown memory or past a memory's end                       BAD_ADDRESS
bad_argument    RUN of no ops, past PROGRAM or of no cycles; GEMM with a zero tile     BAD_ARGUMENT
read_only       WRITE or WRITE8 of COUNTERS                                            READ_ONLY
truncated       a frame cut short, then silence                                        TIMEOUT
garbage         bytes that contain no sync byte, between frames                        (none)
valid           PING with a random payload, INFO, READ of COUNTERS                     OK + data
==============  =====================================================================  ==========

Nothing the fuzzer sends changes the device's memories (writes only ever go out with a bad
CRC, or to the read-only COUNTERS), so a model loaded before the run must still infer bit-exactly after it. A reply that does
not come within ``reply_timeout`` counts as a hang; the fuzzer then resynchronizes
(:meth:`sw.driver.Device.resync`) and goes on.
"""

import collections
import dataclasses
import random
import struct
import time

from sw import protocol
from sw.driver import DeviceTimeoutError, ProtocolError
from sw.protocol import Command, Memory, Status

__all__ = ["KINDS", "FuzzReport", "fuzz"]

#: Frame kinds and their relative weights (truncations are rare: each costs a byte timeout).
KINDS = {"bad_crc": 20, "unknown": 10, "bad_length": 15, "oversize": 5, "bad_address": 10,
         "bad_argument": 10, "read_only": 5, "truncated": 1, "garbage": 9, "valid": 20}


@dataclasses.dataclass
class FuzzReport:
    """What a fuzz run saw."""
    frames: int = 0
    bytes_sent: int = 0
    replies: int = 0
    errors_answered: int = 0
    ok_answered: int = 0
    wrong_replies: int = 0
    hangs: int = 0
    resyncs: int = 0
    seconds: float = 0.0
    by_kind: dict = dataclasses.field(default_factory=collections.Counter)
    first_problems: list = dataclasses.field(default_factory=list)

    def as_dict(self):
        result = dataclasses.asdict(self)
        result["by_kind"] = dict(self.by_kind)
        return result


def _frame(command, payload):
    return protocol.encode_frame(protocol.REQUEST_SYNC, command, payload)


def _garbage(rng, length):
    return bytes(rng.choice([b for b in range(256) if b != protocol.REQUEST_SYNC])
                 for _ in range(length))


def _random_request(rng, info):
    """A well-formed request of a random command (any arguments)."""
    command = rng.choice(list(Command))
    if command == Command.PING:
        return command, rng.randbytes(rng.randint(0, 24))
    if command == Command.INFO:
        return command, b""
    if command in (Command.WRITE, Command.WRITE8):
        return command, protocol.WRITE_HEADER.pack(memory=rng.randrange(len(Memory)),
                                                    address=rng.randrange(64)) \
            + rng.randbytes(rng.randint(1, 16))
    if command == Command.READ:
        return command, protocol.READ_REQUEST.pack(memory=rng.randrange(len(Memory)),
                                                   address=rng.randrange(64), count=1)
    if command == Command.GEMM:
        return command, protocol.GEMM_REQUEST.pack(m_tiles=1, n_tiles=1, k_words=1)
    return command, protocol.RUN_REQUEST.pack(first=0, count=1, max_cycles=1000)


def _case(rng, info):
    """``(kind, bytes to send, expected status or None, command, expected payload or None)``."""
    kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
    depths = protocol.memory_depths(info)
    if kind == "bad_crc":
        command, payload = _random_request(rng, info)
        frame = bytearray(_frame(command, payload))
        frame[-1 - rng.randrange(2)] ^= 1 << rng.randrange(8)
        return kind, bytes(frame), Status.BAD_CRC, command, None
    if kind == "unknown":
        known = {int(c) for c in Command}
        command = rng.choice([b for b in range(256) if b not in known])
        return kind, _frame(command, rng.randbytes(rng.randint(0, 8))), \
            Status.UNKNOWN_COMMAND, command, None
    if kind == "bad_length":
        command, size = rng.choice([(Command.INFO, 0), (Command.READ, protocol.READ_REQUEST.size),
                                    (Command.GEMM, protocol.GEMM_REQUEST.size),
                                    (Command.RUN, protocol.RUN_REQUEST.size)])
        length = rng.choice([n for n in range(size + 5) if n != size])
        return kind, _frame(command, rng.randbytes(length)), Status.BAD_LENGTH, command, None
    if kind == "oversize":
        command = rng.choice(list(Command))
        length = rng.randint(info["max_payload"] + 1, protocol.MAX_LENGTH)
        data = bytes([protocol.REQUEST_SYNC, command]) + struct.pack("<H", length) \
            + _garbage(rng, rng.randint(0, 12))
        return kind, data, Status.BAD_LENGTH, command, None
    if kind == "bad_address":
        if rng.random() < 0.5:
            memory, address = rng.randint(len(Memory), 255), 0
        else:
            memory = rng.choice([m for m in Memory if depths[m]])
            address = depths[memory] + rng.randrange(4)
        payload = protocol.READ_REQUEST.pack(memory=memory, address=address, count=1)
        return kind, _frame(Command.READ, payload), Status.BAD_ADDRESS, Command.READ, None
    if kind == "bad_argument":
        if rng.random() < 0.5 and info["program_depth"]:
            first, count, limit = rng.choice([(rng.randrange(info["program_depth"]), 0, 100),
                                              (info["program_depth"], 1, 100),
                                              (0, 1, 0)])
            payload = protocol.RUN_REQUEST.pack(first=first, count=count, max_cycles=limit)
            return kind, _frame(Command.RUN, payload), Status.BAD_ARGUMENT, Command.RUN, None
        payload = protocol.GEMM_REQUEST.pack(m_tiles=0, n_tiles=1, k_words=1)
        return kind, _frame(Command.GEMM, payload), Status.BAD_ARGUMENT, Command.GEMM, None
    if kind == "read_only":
        command = rng.choice([Command.WRITE, Command.WRITE8])
        payload = protocol.WRITE_HEADER.pack(memory=Memory.COUNTERS, address=rng.randrange(64)) \
            + rng.randbytes(4 * rng.randint(1, 4))
        return kind, _frame(command, payload), Status.READ_ONLY, command, None
    if kind == "truncated":
        command, payload = _random_request(rng, info)
        frame = _frame(command, payload)
        cut = rng.randint(1, len(frame) - 1)
        expected_command = frame[1] if cut >= 2 else protocol.NO_COMMAND
        return kind, frame[:cut], Status.TIMEOUT, expected_command, None
    if kind == "garbage":
        return kind, _garbage(rng, rng.randint(1, 16)), None, None, None
    choice = rng.randrange(3)
    if choice == 0:
        data = rng.randbytes(rng.randint(0, min(32, info["max_payload"])))
        return kind, _frame(Command.PING, data), Status.OK, Command.PING, data
    if choice == 1:
        return kind, _frame(Command.INFO, b""), Status.OK, Command.INFO, \
            protocol.INFO.pack(**info)
    memory = Memory.COUNTERS if depths[Memory.COUNTERS] else Memory.WEIGHTS
    payload = protocol.READ_REQUEST.pack(memory=memory, address=0, count=1)
    return kind, _frame(Command.READ, payload), Status.OK, Command.READ, None


def fuzz(device, frames, *, seed=0, reply_timeout=2.0, byte_timeout_s=None, progress=None):
    """Send ``frames`` random frames to ``device`` and check every reply.

    Parameters
    ----------
    device : :class:`sw.driver.Device`
    reply_timeout : float
        Seconds (scaled by the device's ``time_scale``) a reply may take before it counts as a
        hang.
    byte_timeout_s : float, optional
        The device's byte timeout in seconds (default: from ``device``'s clock and the protocol
        default); truncated frames wait this long, scaled, for their TIMEOUT reply.
    progress : callable, optional
        Called with the number of frames sent so far, every 100 frames.

    Returns
    -------
    FuzzReport
    """
    rng = random.Random(seed)
    info = device.info()
    report = FuzzReport()
    started = time.monotonic()
    pending_garbage = b""
    for index in range(frames):
        kind, data, status, command, payload = _case(rng, info)
        report.frames += 1
        report.by_kind[kind] += 1
        if status is None:
            # Garbage goes out in front of the next frame, as on a noisy line.
            pending_garbage += data
            device.send_raw(data)
            report.bytes_sent += len(data)
            continue
        pending_garbage = b""
        device.send_raw(data)
        report.bytes_sent += len(data)
        wait = reply_timeout + (4 * (byte_timeout_s or 0.02) if kind == "truncated" else 0)
        try:
            got_status, got_payload = device.receive_reply(wait, command or 0)
        except DeviceTimeoutError as error:
            report.hangs += 1
            _note(report, f"frame {index} ({kind}): {error}")
            device.resync()
            report.resyncs += 1
            continue
        except ProtocolError as error:
            report.wrong_replies += 1
            _note(report, f"frame {index} ({kind}): {error}")
            device.resync()
            report.resyncs += 1
            continue
        report.replies += 1
        if got_status == Status.OK:
            report.ok_answered += 1
        else:
            report.errors_answered += 1
        wrong = got_status != status or (
            got_status != Status.OK and got_payload != bytes([command & 0xFF])) or (
            payload is not None and got_payload != payload)
        if wrong:
            report.wrong_replies += 1
            _note(report, f"frame {index} ({kind}): expected {status.name}, got "
                          f"{got_status.name} {got_payload[:8].hex()}")
        if progress is not None and (index + 1) % 100 == 0:
            progress(index + 1)
    report.seconds = round(time.monotonic() - started, 1)
    return report


def _note(report, text):
    if len(report.first_problems) < 10:
        report.first_problems.append(text)
