"""Benchmark: the full protocol fuzz run against the simulated device.

::

    python -m bench.fuzz [--frames 10000] [--seed 0] [--output bench/results/fuzz.json]

Simulates the simulated board's default device (4x4x32 array) with a 2 ms byte timeout (so
that truncated frames are answered quickly) under Verilator as a :mod:`sim.board`, loads a MeliusNet (random weights,
8x8 input) through :class:`sw.runtime.Accelerator`, checks one inference against the golden
model, sends ``--frames`` random and corrupted frames with :func:`sim.fuzz.fuzz` (every reply
checked), and runs the inference again, which must still be bit-exact. Records frames sent,
errors answered, wrong replies, hangs, resyncs, the frames of each kind and the time of one
inference before and after.
"""

import argparse
import datetime
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.networks import meliusnet_program
from sim.board import BOARD_CONFIG, BoardProcess
from sim.fuzz import fuzz
from sw.compile import golden
from sw.driver import Device
from sw.runtime import Accelerator

ROOT = Path(__file__).resolve().parent.parent
#: The simulated board's default build (it holds meliusnet-small at 8x8) with a 2 ms byte
#: timeout.
CONFIG = BOARD_CONFIG.replace(byte_timeout_us=2000)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m bench.fuzz",
        description="Fuzz the simulated device's host link, then check a bit-exact inference.")
    parser.add_argument("--frames", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "fuzz.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    program, images = meliusnet_program(CONFIG, seed=args.seed, size=8)
    image = images[0]
    expected = golden.run(program, torch.as_tensor(image[None])).numpy()[0]
    with BoardProcess(CONFIG, connections=1, idle_timeout=600, time_limit=14_400,
                      startup_timeout=1800) as board, \
            Device.open(board.url, timeout=10.0, time_scale=board.time_scale) as device:
        accelerator = Accelerator(device, program)
        started = time.monotonic()
        before = accelerator.infer(image)
        before_s = time.monotonic() - started
        if not np.array_equal(before.logits, expected):
            raise AssertionError("inference before fuzzing differs from the golden model")
        report = fuzz(device, args.frames, seed=args.seed, reply_timeout=5.0,
                      byte_timeout_s=CONFIG.byte_timeout_us / 1e6,
                      progress=lambda n: print(f"  {n} frames", flush=True)
                      if n % 1000 == 0 else None)
        started = time.monotonic()
        after = accelerator.infer(image)
        after_s = time.monotonic() - started
        exact_after = bool(np.array_equal(after.logits, expected))
    record = {
        "benchmark": "fuzz",
        "command": shlex.join(["python", "-m", "bench.fuzz", *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        **report.as_dict(),
        "bit_exact_after": exact_after,
        "inference_cycles": int(after.cycles),
        "inference_s_before": round(before_s, 2), "inference_s_after": round(after_s, 2),
        "config": {"rows": CONFIG.rows, "cols": CONFIG.cols, "lane": CONFIG.lane,
                   "clock_hz": CONFIG.clock_hz, "baud": CONFIG.baud,
                   "byte_timeout_us": CONFIG.byte_timeout_us},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=1) + "\n")
    print(f"{report.frames} frames ({report.bytes_sent} bytes) in {report.seconds} s: "
          f"{report.replies} replies ({report.errors_answered} errors, {report.ok_answered} OK), "
          f"{report.wrong_replies} wrong, {report.hangs} hangs, {report.resyncs} resyncs; "
          f"inference after fuzzing bit-exact: {exact_after}")
    return 0 if exact_after and not (report.wrong_replies or report.hangs) else 1


if __name__ == "__main__":
    sys.exit(main())
