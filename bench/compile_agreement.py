"""Benchmark: agreement of the compiled golden model with the float model on a test split.

::

    python -m bench.compile_agreement CHECKPOINT [CHECKPOINT ...] [--board ulx3s]
                                      [--activation-depth WORDS] [--limit N] [--act-bits 8]
                                      [--threads 1]
                                      [--output bench/results/compile_agreement.json]

Each checkpoint (of :mod:`sw.train`) is compiled with :func:`sw.compile.compile_checkpoint` for
the board's default array (calibration: 1,024 training images, seed 0), then the float model
(on normalized images) and :func:`sw.compile.golden.run` (on the raw pixels) classify the test
split of the checkpoint's data set (all of it, or the first ``--limit`` images). Recorded per
checkpoint: float and golden top-1 accuracy, their difference in percentage points, and the
top-1 agreement (the fraction of images on which both predict the same class).
"""

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

from hw.board import get_board
from sw import data, train
from sw.compile import compile_checkpoint, golden

__all__ = ["main", "measure"]


def measure(checkpoint, config, *, limit=None, act_bits=8, batch=500):
    """Return the figures of one checkpoint (a dict)."""
    started = time.monotonic()
    loaded = train.load_checkpoint(checkpoint)
    artifact, model = compile_checkpoint(loaded, config, act_bits=act_bits)
    test = data.load_dataset(loaded["dataset"]["name"], "test")
    count = len(test) if limit is None else min(limit, len(test))
    raw, labels = test.raw[:count], test.labels[:count]
    float_pred, golden_pred = [], []
    for start in range(0, count, batch):
        chunk = raw[start:start + batch]
        with torch.no_grad():
            float_pred.append(model(test.normalize(chunk)).argmax(1))
        golden_pred.append(golden.run(artifact, chunk).argmax(1))
    f, g = torch.cat(float_pred), torch.cat(golden_pred)
    float_acc = (f == labels).double().mean().item()
    golden_acc = (g == labels).double().mean().item()
    return {
        "checkpoint": str(checkpoint), "model": loaded["model"]["name"],
        "dataset": loaded["dataset"]["name"], "epochs": loaded.get("epoch"),
        "test_images": count, "act_bits": act_bits,
        "float_accuracy": float_acc, "golden_accuracy": golden_acc,
        "accuracy_difference_pp": 100 * (golden_acc - float_acc),
        "top1_agreement": (f == g).double().mean().item(),
        "seconds": round(time.monotonic() - started, 1),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.compile_agreement",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", metavar="CHECKPOINT", nargs="+")
    parser.add_argument("--board", metavar="BOARD", default="ulx3s",
                        help="target board (default: %(default)s)")
    parser.add_argument("--activation-depth", metavar="WORDS", type=int, default=None,
                        help="compile for the board's default build with this many words of "
                             "activation memory instead (a model too large for the default "
                             "build can still be measured; default: the board's)")
    parser.add_argument("--limit", metavar="N", type=int, default=None,
                        help="only the first N test images (default: all)")
    parser.add_argument("--act-bits", metavar="BITS", type=int, default=8,
                        help="width of fixed-point feature maps (default: %(default)s)")
    parser.add_argument("--threads", metavar="N", type=int, default=1,
                        help="PyTorch threads (default: %(default)s)")
    parser.add_argument("--output", metavar="JSON", default="bench/results/compile_agreement.json",
                        help="where the figures go (default: %(default)s)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = get_board(args.board).default_config
    if args.activation_depth is not None:
        config = config.replace(activation_depth=args.activation_depth)
    rows = []
    for checkpoint in args.checkpoints:
        row = measure(checkpoint, config, limit=args.limit, act_bits=args.act_bits)
        print(f"{row['model']} on {row['dataset']} ({row['test_images']} test images): float "
              f"{100 * row['float_accuracy']:.2f}%, golden {100 * row['golden_accuracy']:.2f}% "
              f"({row['accuracy_difference_pp']:+.2f} pp), top-1 agreement "
              f"{100 * row['top1_agreement']:.2f}%  [{row['seconds']} s]")
        rows.append(row)
    result = {
        "benchmark": "compile_agreement",
        "command": "python -m bench.compile_agreement " + " ".join(argv or sys.argv[1:]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": {"machine": platform.machine(), "python": platform.python_version(),
                 "torch": torch.__version__},
        "board": args.board, "activation_depth": config.activation_depth, "rows": rows,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
