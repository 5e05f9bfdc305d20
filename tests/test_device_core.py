"""amaranth.sim tests of the device core at the byte level (no UART)."""

import random
import struct

import pytest
from amaranth.sim import Simulator

from hw.config import DeviceConfig
from hw.core import DeviceCore
from sw import protocol
from sw.protocol import Command, Memory, Status

SMALL = DeviceConfig(rows=2, cols=3, lane=8, max_depth=64, weight_depth=32,
                     activation_depth=32, result_depth=32, max_payload=64,
                     clock_hz=1_000_000, baud=250_000, byte_timeout_us=200)


def request(command, payload=b""):
    return protocol.encode_frame(protocol.REQUEST_SYNC, command, payload)


def reply(status, payload=b""):
    return protocol.encode_frame(protocol.REPLY_SYNC, status, payload)


def error(status, command):
    return reply(status, bytes([command]))


def run_core(config, chunks, seed=0, ready_probability=1.0, gap_probability=0.0,
             max_cycles=200_000):
    """Feed ``chunks`` (a list of (bytes, idle cycles after)) and collect the reply bytes.

    Returns the bytes the core sent, after every chunk has been consumed and the core has been
    idle long enough to answer (``max_cycles`` bounds the whole run).
    """
    dut = DeviceCore(config)
    rng = random.Random(seed)
    out = bytearray()
    done = {"feeding": True}

    async def feeder(ctx):
        for data, idle in chunks:
            for byte in data:
                while rng.random() < gap_probability:
                    ctx.set(dut.rx_data.valid, 0)
                    await ctx.tick()
                ctx.set(dut.rx_data.payload, byte)
                ctx.set(dut.rx_data.valid, 1)
                await ctx.tick().until(dut.rx_data.ready)
            ctx.set(dut.rx_data.valid, 0)
            if idle:
                await ctx.tick().repeat(idle)
        done["feeding"] = False

    async def collector(ctx):
        quiet = 0
        for _ in range(max_cycles):
            ready = rng.random() < ready_probability
            ctx.set(dut.tx_data.ready, ready)
            valid, payload = ctx.get(dut.tx_data.valid), ctx.get(dut.tx_data.payload)
            await ctx.tick()
            if valid and ready:
                out.append(payload)
                quiet = 0
            else:
                quiet += 1
            if not done["feeding"] and quiet > 4000:
                return
        raise AssertionError(f"no quiet period within {max_cycles} cycles")

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(feeder)
    sim.add_testbench(collector)
    sim.run()
    return bytes(out)


def pack_words(words, width):
    size = (width + 7) // 8
    return b"".join(word.to_bytes(size, "little") for word in words)


def test_ping_info_and_memory_round_trip():
    cfg = SMALL
    wb = cfg.word_bytes(Memory.WEIGHTS)
    data = bytes(range(1, 1 + 3 * wb))
    chunks = [
        (request(Command.PING, b"hello"), 0),
        (request(Command.PING), 0),
        (request(Command.INFO), 0),
        (request(Command.WRITE, protocol.WRITE_HEADER.pack(memory=Memory.WEIGHTS, address=5)
                 + data), 0),
        (request(Command.READ, protocol.READ_REQUEST.pack(memory=Memory.WEIGHTS, address=4,
                                                          count=5)), 0),
    ]
    got = run_core(cfg, chunks, ready_probability=0.5, gap_probability=0.2)
    expected = (reply(Status.OK, b"hello") + reply(Status.OK) + reply(Status.OK, cfg.info())
                + reply(Status.OK) + reply(Status.OK, bytes(wb) + data + bytes(wb)))
    assert got == expected


def test_errors_are_answered_and_the_link_recovers():
    cfg = SMALL
    bad_crc = bytearray(request(Command.PING, b"abc"))
    bad_crc[-1] ^= 0x40
    oversize = bytes([protocol.REQUEST_SYNC, Command.PING]) + struct.pack("<H", 65)
    chunks = [
        (b"\x00\x13garbage", 0),
        (bytes(bad_crc), 0),
        (request(0x7E, b"x"), 0),
        (request(Command.INFO, b"x"), 0),
        (request(Command.READ, protocol.READ_REQUEST.pack(memory=9, address=0, count=1)), 0),
        (request(Command.READ, protocol.READ_REQUEST.pack(memory=0, address=31, count=2)), 0),
        (request(Command.READ, protocol.READ_REQUEST.pack(memory=0, address=0, count=0)), 0),
        (request(Command.WRITE, protocol.WRITE_HEADER.pack(memory=1, address=0) + b"\x01"),
         0),
        (request(Command.WRITE, protocol.WRITE_HEADER.pack(memory=1, address=32)
                 + bytes(cfg.word_bytes(Memory.ACTIVATIONS))), 0),
        (request(Command.GEMM, protocol.GEMM_REQUEST.pack(m_tiles=1, n_tiles=1, k_words=9)),
         0),
        (request(Command.GEMM, protocol.GEMM_REQUEST.pack(m_tiles=0, n_tiles=1, k_words=1)),
         0),
        (oversize, 0),
        (bytes([protocol.REQUEST_SYNC, Command.PING, 3, 0, 1]), 3000),  # truncated: times out
        (request(Command.PING, b"ok"), 0),
    ]
    got = run_core(cfg, chunks, ready_probability=0.7)
    expected = (error(Status.BAD_CRC, Command.PING) + error(Status.UNKNOWN_COMMAND, 0x7E)
                + error(Status.BAD_LENGTH, Command.INFO) + error(Status.BAD_ADDRESS, Command.READ)
                + error(Status.BAD_ADDRESS, Command.READ) + error(Status.BAD_LENGTH, Command.READ)
                + error(Status.BAD_LENGTH, Command.WRITE)
                + error(Status.BAD_ADDRESS, Command.WRITE)
                + error(Status.BAD_ARGUMENT, Command.GEMM)
                + error(Status.BAD_ARGUMENT, Command.GEMM)
                + error(Status.BAD_LENGTH, Command.PING) + error(Status.TIMEOUT, Command.PING)
                + reply(Status.OK, b"ok"))
    assert got == expected


def counts_reference(weights, activations, K):
    """Counts from unpacked +-1 lists: weights[m][k], activations[k][n]."""
    return [[sum(w == a for w, a in zip(row, col)) for col in zip(*activations)]
            for row in weights]


@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (2, 8, 3), (5, 19, 4), (3, 40, 7)])
def test_gemm_matches_reference(M, K, N):
    cfg = SMALL
    rng = random.Random(M * 100 + K * 10 + N)
    W = [[rng.choice((-1, 1)) for _ in range(K)] for _ in range(M)]
    A = [[rng.choice((-1, 1)) for _ in range(N)] for _ in range(K)]
    rows, cols, lane = cfg.rows, cfg.cols, cfg.lane
    k_words = -(-K // lane)
    m_tiles, n_tiles = -(-M // rows), -(-N // cols)
    # Pack per the layout of sw.packing (written out here independently).
    w_words = []
    for mt in range(m_tiles):
        for kw in range(k_words):
            word = 0
            for r in range(rows):
                for i in range(lane):
                    m, k = mt * rows + r, kw * lane + i
                    if m < M and k < K and W[m][k] > 0:
                        word |= 1 << (r * lane + i)
            w_words.append(word)
    a_words = []
    for nt in range(n_tiles):
        for kw in range(k_words):
            word = 0
            for c in range(cols):
                for i in range(lane):
                    n, k = nt * cols + c, kw * lane + i
                    if not (n < N and k < K) or A[k][n] > 0:
                        word |= 1 << (c * lane + i)
            a_words.append(word)
    result_words = m_tiles * n_tiles * rows
    chunks = [
        (request(Command.WRITE, protocol.WRITE_HEADER.pack(memory=Memory.WEIGHTS, address=0)
                 + pack_words(w_words, rows * lane)), 0),
        (request(Command.WRITE, protocol.WRITE_HEADER.pack(memory=Memory.ACTIVATIONS,
                                                           address=0)
                 + pack_words(a_words, cols * lane)), 0),
        (request(Command.GEMM, protocol.GEMM_REQUEST.pack(m_tiles=m_tiles, n_tiles=n_tiles,
                                                          k_words=k_words)), 0),
        (request(Command.READ, protocol.READ_REQUEST.pack(memory=Memory.RESULTS, address=0,
                                                          count=result_words)), 0),
    ]
    got = run_core(cfg, chunks, ready_probability=0.8)
    ok = reply(Status.OK)
    assert got[:2 * len(ok)] == ok + ok
    gemm_reply = got[2 * len(ok):2 * len(ok) + 6 + protocol.GEMM_REPLY.size]
    assert gemm_reply[:4] == bytes([protocol.REPLY_SYNC, Status.OK, 4, 0]), gemm_reply.hex()
    cycles = struct.unpack("<I", gemm_reply[4:8])[0]
    tiles = m_tiles * n_tiles
    assert cycles == (tiles - 1) * max(k_words, rows) + k_words + 2 * rows + cols + 3
    read_reply = got[2 * len(ok) + len(gemm_reply):]
    width = cols * cfg.acc_width
    size = (width + 7) // 8
    payload = read_reply[4:-2]
    assert read_reply == reply(Status.OK, payload) and len(payload) == result_words * size
    expected = counts_reference(W, A, K)
    for index in range(result_words):
        word = int.from_bytes(payload[index * size:(index + 1) * size], "little")
        tile, r = divmod(index, rows)
        mt, nt = divmod(tile, n_tiles)
        for c in range(cols):
            m, n = mt * rows + r, nt * cols + c
            if m < M and n < N:
                count = word >> (c * cfg.acc_width) & ((1 << cfg.acc_width) - 1)
                assert count == expected[m][n], f"count[{m}][{n}]: expected " \
                    f"{expected[m][n]}, got {count}"


def test_write8_and_read_only_counters():
    """WRITE8 zero-extends one byte per INTS element; a WRITE or WRITE8 to COUNTERS is
    READ_ONLY (nothing written), a WRITE8 elsewhere BAD_ARGUMENT; pipelined back to back."""
    cfg = SMALL
    rng = random.Random(8)
    values = [rng.randrange(256) for _ in range(14)] + [0, 255, 128]
    ints_bytes = cfg.word_bytes(Memory.INTS)
    header = protocol.WRITE_HEADER.pack
    chunks = [
        (request(Command.WRITE, header(memory=Memory.INTS, address=0) + b"\xff" * 3 * 15), 0),
        (request(Command.WRITE8, header(memory=Memory.INTS, address=3) + bytes(values)), 0),
        (request(Command.READ, protocol.READ_REQUEST.pack(memory=Memory.INTS, address=0,
                                                          count=len(values) + 4)), 0),
        (request(Command.WRITE, header(memory=Memory.COUNTERS, address=0) + bytes(4)), 0),
        (request(Command.WRITE8, header(memory=Memory.COUNTERS, address=0) + b"\x01"), 0),
        (request(Command.WRITE8, header(memory=Memory.WEIGHTS, address=0) + b"\x01"), 0),
        (request(Command.WRITE8, header(memory=Memory.INTS, address=cfg.int_depth - 1)
                 + b"\x01\x02"), 0),
        (request(Command.WRITE8, header(memory=Memory.INTS, address=0)), 0),
        (request(Command.READ, protocol.READ_REQUEST.pack(memory=Memory.COUNTERS, address=0,
                                                          count=1)), 0),
    ]
    got = run_core(cfg, chunks, seed=3, ready_probability=0.6, gap_probability=0.1)
    words = [0xFFFFFF] * 3 + values + [0]       # the last element was never written
    expected = (reply(Status.OK) + reply(Status.OK)
                + reply(Status.OK, b"".join(w.to_bytes(ints_bytes, "little") for w in words))
                + error(Status.READ_ONLY, Command.WRITE) + error(Status.READ_ONLY, Command.WRITE8)
                + error(Status.BAD_ARGUMENT, Command.WRITE8)
                + error(Status.BAD_ADDRESS, Command.WRITE8)
                + error(Status.BAD_LENGTH, Command.WRITE8)
                + reply(Status.OK, bytes(4)))
    assert got == expected
