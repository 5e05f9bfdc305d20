"""cocotb on Verilator: the XNOR-popcount systolic array against PyTorch
(:mod:`sim.tb_array` through :mod:`sim.runner`)."""

import json

import pytest
from amaranth import Module
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from hw.array import XnorArray
from sim.runner import run

#: The cocotb tests of sim.tb_array; every one must pass.
TESTS = 5


class ArrayHarness(wiring.Component):
    """:class:`hw.array.XnorArray` with flat ports for Verilog.

    The array's output stream is ``always_ready``: its ``ready`` is a constant, which cannot be a
    Verilog port. The harness exposes the input stream's fields as ``i_weights``,
    ``i_activations``, ``i_first``, ``i_last``, ``i_valid``, ``i_ready`` and the output's as
    ``o_valid``, ``o_row`` and ``o_counts__<c>`` (one port per column).
    """

    def __init__(self, rows, cols, lane, max_depth):
        self.array = XnorArray(rows, cols, lane, max_depth)
        super().__init__({
            "i_weights": In(rows * lane),
            "i_activations": In(cols * lane),
            "i_first": In(1),
            "i_last": In(1),
            "i_valid": In(1),
            "i_ready": Out(1),
            "o_valid": Out(1),
            "o_row": Out(max(1, (rows - 1).bit_length())),
            "o_counts": Out(self.array.acc_width).array(cols),
        })

    def elaborate(self, platform):
        m = Module()
        m.submodules.array = array = self.array
        m.d.comb += [
            array.i.payload.weights.eq(self.i_weights),
            array.i.payload.activations.eq(self.i_activations),
            array.i.payload.first.eq(self.i_first),
            array.i.payload.last.eq(self.i_last),
            array.i.valid.eq(self.i_valid),
            self.i_ready.eq(array.i.ready),
            self.o_valid.eq(array.o.valid),
            self.o_row.eq(array.o.payload.row),
        ]
        for c, port in enumerate(self.o_counts):
            m.d.comb += port.eq(array.o.payload.counts[c])
        return m


@pytest.mark.parametrize("rows, cols, lane, max_depth", [
    (3, 5, 8, 96),          # odd shape, several lane-words per K
    (4, 4, 32, 4096),       # the board's array
], ids=["3x5x8", "4x4x32"])
def test_array_against_torch(rows, cols, lane, max_depth):
    results = run(ArrayHarness, "sim.tb_array",
                  parameters={"rows": rows, "cols": cols, "lane": lane, "max_depth": max_depth},
                  testbench_parameters={"seed": rows * 100 + cols * 10 + lane, "tiles": 48})
    assert len(results.passed) == TESTS, results.summary()
    speed = json.loads((results.build_dir / "speed.json").read_text())
    print(", ".join(f"{name}: {figures['cycles_per_s']:,} cycles/s"
                    for name, figures in sorted(speed.items())))
