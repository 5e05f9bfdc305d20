"""cocotb on Verilator: a UART loopback driven by the cocotb UART source and sink
(:mod:`sim.tb_uart` through :mod:`sim.runner`)."""

import json

import pytest
from amaranth import Module
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from hw.uart import UARTReceiver, UARTTransmitter
from sim.runner import run


class UARTLoopback(wiring.Component):
    """Whatever arrives on ``rx`` is sent back on ``tx`` (receiver into transmitter)."""

    def __init__(self, clock_hz, baud):
        self.clock_hz = clock_hz
        self.baud = baud
        super().__init__({"rx": In(1, init=1), "tx": Out(1, init=1)})

    def elaborate(self, platform):
        m = Module()
        m.submodules.receiver = receiver = UARTReceiver(self.clock_hz, self.baud)
        m.submodules.transmitter = transmitter = UARTTransmitter(self.clock_hz, self.baud)
        wiring.connect(m, receiver.o, transmitter.i)
        m.d.comb += [receiver.rx.eq(self.rx), self.tx.eq(transmitter.tx)]
        return m


@pytest.mark.parametrize("clock_hz, baud", [(24_000_000, 3_000_000)], ids=["8"])
def test_uart_loopback(clock_hz, baud):
    results = run(UARTLoopback, "sim.tb_uart",
                  parameters={"clock_hz": clock_hz, "baud": baud},
                  testbench_parameters={"count": 2000, "seed": 1})
    assert len(results.passed) == 4, results.summary()
    speed = json.loads((results.build_dir / "speed.json").read_text())
    print(", ".join(f"{name}: {figures['cycles_per_s']:,} cycles/s"
                    for name, figures in sorted(speed.items())))
