"""Benchmark: array utilization of binary GEMMs, measured by the device's own cycle counter.

::

    python -m bench.gemm_utilization [--board ulx3s|icebreaker] [--size 85F] [--seed 0]
                                     [--output bench/results/gemm_utilization_<board>.json]

Simulates the board's default build (the configuration of its committed bitstream, clock and
baud included) as a :mod:`sim.board` under Verilator, computes a set of GEMMs on it through the
host driver over ``socket://`` and reads the cycles of each from the GEMM reply, which the
hardware counts from the start of the request to the last result written. For each workload it
prints and records:

* ``cycles``: measured; ``cycles_model``: :func:`sw.driver.gemm_cycles_estimate`;
* ``utilization``: useful bit-MACs (``M * K * N``) over the array's peak
  (``cycles * rows * cols * lane``), so padding of M, N and K to the tile counts as idle;
* ``us_at_fmax``: the time at the Fmax of the board's committed build report, and at the
  board clock.

Every result is also checked against PyTorch (``(W @ A + K) / 2`` for +-1 matrices); the
benchmark fails rather than report figures of a wrong answer. The workloads are binary layers
written as GEMMs (im2col: M output channels, K = input channels x kernel area, N output pixels).
The figures go to ``bench/results/`` as JSON with the command and the date.
"""

import argparse
import datetime
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from bench.committed import committed_fmax_mhz
from hw.board import BOARDS, get_board
from sim.board import BoardProcess
from sw.driver import Device, gemm_cycles_estimate
from sw.packing import gemm_tiling

ROOT = Path(__file__).resolve().parent.parent

#: (name, M, K, N): binary layers as GEMMs.
WORKLOADS = [
    ("conv3x3 64->64, 8x8 map", 64, 64 * 9, 64),
    ("conv3x3 128->128, 4x4 map", 128, 128 * 9, 16),
    ("conv3x3 64->64, 4x4 map", 64, 64 * 9, 16),
    ("conv1x1 256->64, 4x4 map", 64, 256, 16),
    ("conv1x1 64->64, 8x8 map (K < rows words)", 64, 64, 64),
    ("odd sizes 37 x 300 x 23", 37, 300, 23),
    ("FC 512->64, one image (N = 1)", 64, 512, 1),
]


def reference_counts(W, A):
    """The xnor-popcount counts of +-1 matrices: ``(W @ A + K) / 2``."""
    return (W @ A + W.shape[1]) // 2


def fits(config, M, K, N):
    m_tiles, n_tiles, k_words = gemm_tiling(M, K, N, config.rows, config.cols, config.lane)
    return (K <= config.max_depth and m_tiles * k_words <= config.weight_depth
            and n_tiles * k_words <= config.activation_depth
            and m_tiles * n_tiles * config.rows <= config.result_depth)


def measure(device, config, name, M, K, N, generator):
    W = torch.randint(0, 2, (M, K), generator=generator) * 2 - 1
    A = torch.randint(0, 2, (K, N), generator=generator) * 2 - 1
    counts, cycles = device.gemm(W, A)
    expected = reference_counts(W, A).numpy()
    if not (counts == expected).all():
        wrong = int((counts != expected).sum())
        raise AssertionError(f"{name}: {wrong} of {M * N} counts differ from PyTorch")
    m_tiles, n_tiles, k_words = gemm_tiling(M, K, N, config.rows, config.cols, config.lane)
    model = gemm_cycles_estimate(m_tiles, n_tiles, k_words, config.rows, config.cols)
    useful = M * K * N
    return {
        "name": name, "M": M, "K": K, "N": N,
        "m_tiles": m_tiles, "n_tiles": n_tiles, "k_words": k_words,
        "cycles": cycles, "cycles_model": model,
        "bit_macs": useful,
        "utilization": round(useful / (cycles * config.peak_bit_macs_per_cycle), 4),
        "correct": True,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m bench.gemm_utilization",
        description="Measure array utilization of binary GEMMs on a simulated board "
                    "(the board's default build, under Verilator) from the device's cycle "
                    "counter; write the figures to bench/results/ as JSON.")
    parser.add_argument("--board", choices=sorted(BOARDS), default="ulx3s",
                        help="board whose default build is simulated (default: %(default)s)")
    parser.add_argument("--size", default=None,
                        help="ULX3S size: 12F, 25F, 45F or 85F (default: the board's default)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the random matrices (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON file (default: bench/results/gemm_utilization_<board>.json)")
    args = parser.parse_args(argv)
    board = get_board(args.board, args.size)
    config = board.default_config
    output = args.output or ROOT / "bench" / "results" / f"gemm_utilization_{board.name}.json"
    fmax = committed_fmax_mhz(board, config, layer_program=False)
    generator = torch.Generator().manual_seed(args.seed)

    print(f"{board.name} {board.size or ''} default build: {config.rows}x{config.cols}x"
          f"{config.lane} array, peak {config.peak_bit_macs_per_cycle} bit-MACs/cycle; "
          f"simulating it (the first run builds it with Verilator)", flush=True)
    results = []
    start = time.monotonic()
    # The first run builds the device with Verilator: over 10 minutes for the 16-row default.
    with BoardProcess(config, connections=1, idle_timeout=300, time_limit=3600,
                      startup_timeout=1800) as sim_board, \
            Device.open(sim_board.url, timeout=5.0, time_scale=sim_board.time_scale) as device:
        for name, M, K, N in WORKLOADS:
            if not fits(config, M, K, N):
                print(f"  {name}: does not fit this build's memories, skipped", flush=True)
                continue
            result = measure(device, config, name, M, K, N, generator)
            for label, mhz in (("us_at_clock", config.clock_hz / 1e6), ("us_at_fmax", fmax)):
                if mhz:
                    result[label] = round(result["cycles"] / mhz, 2)
            results.append(result)
            print(f"  {name:42s} {result['cycles']:7d} cycles (model {result['cycles_model']}) "
                  f"utilization {100 * result['utilization']:5.1f}%", flush=True)
    wall = time.monotonic() - start

    record = {
        "benchmark": "gemm_utilization",
        "command": shlex.join(["python", "-m", "bench.gemm_utilization", *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "board": board.name, "size": board.size,
        "config": {"rows": config.rows, "cols": config.cols, "lane": config.lane,
                   "max_depth": config.max_depth, "weight_depth": config.weight_depth,
                   "activation_depth": config.activation_depth,
                   "result_depth": config.result_depth,
                   "clock_hz": config.clock_hz, "baud": config.baud},
        "peak_bit_macs_per_cycle": config.peak_bit_macs_per_cycle,
        "fmax_mhz_committed_build": fmax,
        "wall_s": round(wall, 1),
        "workloads": results,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {output.relative_to(ROOT) if output.is_relative_to(ROOT) else output} "
          f"({wall:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
