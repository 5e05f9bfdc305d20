"""cocotb on Verilator: the device core as a GEMM device, driven over its byte streams with the
host's framing and packing and checked against PyTorch (:mod:`sim.tb_core` through
:mod:`sim.runner`)."""

import dataclasses
import json

import pytest

from hw.config import DeviceConfig
from hw.core import DeviceCore
from sim.runner import run

#: The cocotb tests of sim.tb_core; every one must pass.
TESTS = 5

#: Small memories keep the builds and the runs short; the byte timeout is 1000 cycles. The
#: smallest receive FIFO (64 bytes), so that pipelined requests fill it and the core holds the
#: request stream off (``pipelined_requests``). GEMM-only cores (as the iCEBreaker's device):
#: with the layer program's units a core took 5.5 minutes of Verilator's C++ compile in CI.
#: The GEMM command on a device that runs the layer program (its GEMM engine sharing the array
#: with the binary conv engine, as on the ULX3S) is checked by tests/test_network_end_to_end.py
#: (``test_gemm_and_networks_share_the_array``) and the README's GEMM example (tests/test_docs.py).
CONFIGS = {
    "2x3x8": DeviceConfig(rows=2, cols=3, lane=8, max_depth=64, weight_depth=32,
                          activation_depth=32, result_depth=32, max_payload=64,
                          clock_hz=1_000_000, baud=250_000, byte_timeout_us=1000,
                          rx_buffer=64, layer_program=False),
    "4x4x32": DeviceConfig(rows=4, cols=4, lane=32, max_depth=512, weight_depth=64,
                           activation_depth=64, result_depth=64, max_payload=128,
                           clock_hz=1_000_000, baud=250_000, byte_timeout_us=1000,
                           rx_buffer=64, layer_program=False),
}


def core(**fields):
    """The toplevel: a :class:`hw.core.DeviceCore` of ``DeviceConfig(**fields)``."""
    return DeviceCore(DeviceConfig(**fields))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_gemm_against_torch(name):
    cfg = CONFIGS[name]
    results = run(core, "sim.tb_core", parameters=dataclasses.asdict(cfg), name=f"core-{name}",
                  testbench_parameters={"seed": cfg.rows * 100 + cfg.cols * 10 + cfg.lane,
                                        "shapes": 24, "gap_probability": 0.2,
                                        "ready_probability": 0.6})
    assert len(results.passed) == TESTS, results.summary()
    speed = json.loads((results.build_dir / "speed.json").read_text())
    print(", ".join(f"{what}: {figures['cycles_per_s']:,} cycles/s"
                    for what, figures in sorted(speed.items())))
