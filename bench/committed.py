"""The committed board builds (``bitstreams/<board>/report.json``) as the benchmarks read them."""

import json
from pathlib import Path

from sw import isa

__all__ = ["committed_fmax_mhz"]

ROOT = Path(__file__).resolve().parent.parent


def committed_fmax_mhz(board, config, *, layer_program):
    """The Fmax in MHz of ``board``'s committed build if it has ``config``'s array shape (and,
    with ``layer_program`` set, runs the layer program with as many fixed-point lanes), else
    ``None``: another array's or a GEMM-only build's Fmax says nothing about the device
    measured. A build for another core clock (``report["clock_hz"]``, the oscillator's in
    builds from before the PLL) is another build of the design, whose Fmax is not this
    one's either."""
    path = ROOT / "bitstreams" / board.name / "report.json"
    if not path.exists():
        return None
    report = json.loads(path.read_text())
    built = report["config"]
    if report.get("clock_hz") != config.clock_hz:
        return None
    if (built["rows"], built["cols"], built["lane"]) != (config.rows, config.cols, config.lane):
        return None
    if layer_program and not built.get("layer_program", True):
        return None
    # Reports from before DeviceConfig.fixed_lanes had the columns' lanes.
    if layer_program and (isa.int_banks(built["cols"], built.get("fixed_lanes", 0))
                          != config.int_banks):
        return None
    # Reports from before DeviceConfig.fixed_channels computed one channel at a time.
    if layer_program and built.get("fixed_channels", 1) != config.fixed_channels:
        return None
    return min(clock["achieved_mhz"] for clock in report["fmax"].values())
