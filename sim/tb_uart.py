"""cocotb testbench: a UART loopback (receiver into transmitter) under Verilator.

The toplevel has ports ``clk``, ``rst``, ``rx`` and ``tx``; whatever arrives on ``rx`` must come
back unchanged on ``tx``. Parameters (see :func:`sim.runner.parameters`): ``clock_hz``, ``baud``,
``count`` (bytes per test) and ``seed``. Run it with ``tests/test_cocotb_uart.py``, or by hand::

    python -m sim.runner tests.test_cocotb_uart:UARTLoopback sim.tb_uart \\
        -p clock_hz=24000000 -p baud=3000000 -t count=2000 -t seed=1

The simulated clock period is nominal (10 ns); all UART timing is in clock cycles. The speed of
the simulation is logged and written to ``speed.json`` in the build directory.
"""

import json
import random
import time
from fractions import Fraction

import cocotb
from cocotb.clock import Clock
from cocotb.simtime import get_sim_time
from cocotb.triggers import Timer

from sim.runner import build_dir, parameters
from sim.uart import UartSink, UartSource

PERIOD_NS = 10


async def setup(dut):
    config = parameters()
    clock = Clock(dut.clk, PERIOD_NS, unit="ns")
    clock.start()
    dut.rst.value = 0
    bit = Fraction(config["clock_hz"], config["baud"])
    source = UartSource(dut.rx, clock, bit)
    sink = UartSink(dut.tx, clock, bit)
    await Timer(10 * PERIOD_NS, unit="ns")
    return config, bit, source, sink


def check(sent, received):
    for index, (want, got) in enumerate(zip(sent, received)):
        assert want == got, f"byte {index}: sent {want:#04x}, got back {got:#04x}"
    assert len(received) == len(sent), f"sent {len(sent)} bytes, got back {len(received)}"


def record_speed(name, cycles, wall_s):
    """Log cycles/s and merge it into ``speed.json`` in the build directory."""
    speed = cycles / wall_s
    cocotb.log.info("%s: %d cycles in %.2f s wall: %.0f cycles/s", name, cycles, wall_s, speed)
    path = build_dir() / "speed.json"
    figures = json.loads(path.read_text()) if path.exists() else {}
    figures[name] = {"cycles": cycles, "wall_s": round(wall_s, 3),
                     "cycles_per_s": round(speed)}
    path.write_text(json.dumps(figures, indent=1, sort_keys=True) + "\n")


@cocotb.test()
async def back_to_back(dut):
    """Random bytes sent back to back come back unchanged and in order."""
    config, bit, source, sink = await setup(dut)
    rng = random.Random(config["seed"])
    data = bytes(rng.getrandbits(8) for _ in range(config["count"]))

    wall, cycle = time.perf_counter(), get_sim_time("ns") / PERIOD_NS
    sender = cocotb.start_soon(source.send(data))
    received = await sink.recv(len(data), timeout_cycles=int(12 * bit * (len(data) + 4)))
    await sender
    record_speed("loopback", int(get_sim_time("ns") / PERIOD_NS - cycle),
                 time.perf_counter() - wall)
    check(data, received)
    assert sink.framing_errors == 0, f"{sink.framing_errors} framing errors on tx"


@cocotb.test()
async def idle_gaps(dut):
    """Bytes separated by random idle time (including fractions of a bit) come back."""
    config, bit, source, sink = await setup(dut)
    rng = random.Random(config["seed"] + 1)
    data = bytes(rng.getrandbits(8) for _ in range(max(8, config["count"] // 10)))
    for byte in data:
        await source.send([byte])
        await Timer(int(rng.uniform(0, 3) * bit) * PERIOD_NS + PERIOD_NS, unit="ns")
    received = await sink.recv(len(data), timeout_cycles=int(40 * bit))
    check(data, received)


@cocotb.test()
async def framing_error_dropped(dut):
    """A frame with a 0 stop bit is dropped by the receiver; the next byte still gets through."""
    _, bit, source, sink = await setup(dut)
    await source.send(b"\x3c\x99", stop_bits=[1, 0])
    await Timer(int(2 * bit) * PERIOD_NS, unit="ns")    # the line must go high after the error
    await source.send(b"\x42")
    received = await sink.recv(2, timeout_cycles=int(40 * bit))
    check(b"\x3c\x42", received)
    await Timer(int(15 * bit) * PERIOD_NS, unit="ns")
    assert sink.count() == 0, f"{sink.count()} unexpected bytes after the dropped frame"


@cocotb.test()
async def idle_clock_speed(dut):
    """Not a check: how fast Verilator clocks this design with the line idle."""
    await setup(dut)
    cycles = 1_000_000
    wall = time.perf_counter()
    await Timer(cycles * PERIOD_NS, unit="ns")
    record_speed("idle", cycles, time.perf_counter() - wall)
