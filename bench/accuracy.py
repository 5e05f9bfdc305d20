"""Benchmark: test accuracy of the small models on one data set, trained with :mod:`sw.train`.

::

    python -m bench.accuracy [--dataset fashion-mnist] [--epochs 3] [--train-subset 10000]
                             [--models NAME[@KEY=VALUE,...] ...] [--seed 0] [--threads 1]
                             [--jobs 2] [--output bench/results/accuracy_<dataset>.json]
                             [--docs docs/accuracy.md]
    python -m bench.accuracy --from-json bench/results/accuracy_fashion-mnist.json  # docs only

Trains each model with :func:`sw.train.train` (its defaults: Adam, cosine schedule, batch 64,
learning rate 2e-3) and records, per model, the final and best test accuracy over the full test
split, the parameter, size and operation counts of :func:`sw.models.summary.summary`, the epochs,
the number of training images and the wall time (with each epoch's training seconds). The
default models test two claims of the papers on our data:

* ABC-Net: more bases (M weight bases, N activation bases) come closer to full precision
  (``abcnet-small`` at several (M, N) against ``fp-small`` and ``fp-plain-small``);
* MeliusNet: its dense + improvement blocks beat a plain binary DenseNet of the same binary size
  (``meliusnet-small`` against ``binary-plain-small``).

``--train-subset N`` trains on a fixed stratified subset of N training images (the same images
for every model: the classes in their proportions of the training split, drawn with
``--subset-seed``, not ``--seed``); the normalization stays that of the full training split and
the test split is always complete. The figures go to ``bench/results/`` as JSON with the
command and the date, and a markdown table, with the command, to ``docs/accuracy.md``.

``--jobs J`` trains J models at once in separate processes (each with ``--threads`` threads);
a training run's result does not depend on ``--jobs``, but it may on ``--threads``.
"""

import argparse
import concurrent.futures
import dataclasses
import datetime
import hashlib
import itertools
import json
import math
import multiprocessing
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent

#: The default models: (name, options).
DEFAULT_MODELS = (
    "meliusnet-small", "binary-plain-small", "fp-small", "fp-plain-small",
    "abcnet-small@M=1,N=1", "abcnet-small@M=3,N=1", "abcnet-small@M=3,N=3",
    "abcnet-small@M=5,N=5",
)


def parse_model(text):
    """``"NAME"`` or ``"NAME@KEY=VALUE,..."`` (integer values) -> ``(name, options)``."""
    name, _, rest = text.partition("@")
    options = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"bad model option {item!r} in {text!r}")
        try:
            options[key] = int(value)
        except ValueError:
            options[key] = float(value)
    return name, options


def model_label(name, options):
    if not options:
        return name
    return f"{name} ({', '.join(f'{k}={v}' for k, v in options.items())})"


def stratified_subset(labels, size, seed):
    """Sorted indices of a stratified subset of ``size`` images: each class in its proportion
    (largest remainders get the leftover images), drawn with ``numpy.random.default_rng(seed)``."""
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    if not 0 < size <= len(labels):
        raise ValueError(f"train subset must lie in 1..{len(labels)}, not {size}")
    quotas = size * counts / len(labels)
    takes = np.floor(quotas).astype(int)
    leftover = size - takes.sum()
    takes[np.argsort(-(quotas - takes), kind="stable")[:leftover]] += 1
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:take]
              for c, take in zip(classes, takes, strict=True)]
    return np.sort(np.concatenate(chosen))


def _subset_loader(original, size, seed):
    """A ``load_dataset`` whose training split is the stratified subset."""
    from sw.data import ImageDataset

    def load_dataset(name, split):
        dataset = original(name, split)
        if split != "train":
            return dataset
        indices = torch.as_tensor(stratified_subset(dataset.labels.numpy(), size, seed))
        return ImageDataset(dataset.raw[indices], dataset.labels[indices], dataset.info, split)
    return load_dataset


def run_one(job):
    """Train one model (in a worker process); return its row."""
    from sw import data
    from sw.models import build_model
    from sw.models.summary import summary
    from sw.train import TrainConfig, train

    if job["train_subset"] is not None:
        data.load_dataset = _subset_loader(data.load_dataset, job["train_subset"],
                                           job["subset_seed"])
    info = data.load_dataset(job["dataset"], "test").info
    with torch.device("meta"):
        model = build_model(job["model"], num_classes=info.num_classes,
                            in_channels=info.in_channels, input_size=info.input_size,
                            **job["options"])
    counts = summary(model)
    config = TrainConfig(model=job["model"], dataset=job["dataset"],
                         model_options=dict(job["options"]), epochs=job["epochs"],
                         seed=job["seed"], threads=job["threads"], progress=False)
    started = time.monotonic()
    metrics = train(config)
    wall = time.monotonic() - started
    return {
        "model": job["model"],
        "options": job["options"],
        "label": model_label(job["model"], job["options"]),
        "final_accuracy": metrics["test_accuracy"],
        "best_accuracy": metrics["best_accuracy"],
        "best_epoch": metrics["best_epoch"],
        "final_train_accuracy": metrics.get("train_accuracy"),
        "epochs": metrics["epoch"],
        "train_images": job["train_images"],
        "binary_params": counts.binary_params,
        "fp_params": counts.fp_params,
        "size_bits": counts.size_bits,
        "size_kib": counts.size_bits / 8 / 1024,
        "binary_macs": counts.binary_macs,
        "fp_macs": counts.fp_macs,
        "ops": counts.ops,
        "wall_seconds": round(wall, 1),
        "epoch_seconds": [round(epoch["seconds"], 1) for epoch in metrics["history"]],
        "history": [{"epoch": e["epoch"], "test_accuracy": e["test_accuracy"],
                     "train_accuracy": e["train_accuracy"]} for e in metrics["history"]],
    }


def _pct(value):
    return "-" if value is None else f"{100 * value:.2f}"


def table(rows):
    """The rows as a markdown table."""
    lines = [("| model | test acc. final % | best % (epoch) | binary params | fp params | "
              "size KiB | ops (binary MACs/64 + fp MACs) | s/epoch |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        per_epoch = sum(row["epoch_seconds"]) / max(1, len(row["epoch_seconds"]))
        lines.append(
            f"| {row['label']} | {_pct(row['final_accuracy'])} | "
            f"{_pct(row['best_accuracy'])} ({row['best_epoch']}) | {row['binary_params']:,} | "
            f"{row['fp_params']:,} | {row['size_kib']:.1f} | {row['ops']:,.0f} | "
            f"{per_epoch:.0f} |")
    return "\n".join(lines)


def _find(rows, model, **options):
    for row in rows:
        if row["model"] == model and all(row["options"].get(k) == v for k, v in options.items()):
            return row
    return None


def _noise(a, b, test_images):
    """Two standard errors, in points, of the difference of two test accuracies from the
    sampling of the test images alone (binomial; seed-to-seed spread comes on top)."""
    var = sum(p * (1 - p) for p in (a, b)) / test_images
    return 200 * math.sqrt(var)


def _verdict(diff, noise):
    if abs(diff) <= noise:
        return (f"within {noise:.2f} points (two standard errors of test-set sampling), so "
                "not distinguishable on this test set")
    return f"beyond {noise:.2f} points (two standard errors of test-set sampling)"


def reading(rows, test_images):
    """Plain statements of what the figures say about the two claims (final accuracies)."""
    out = []
    fp = [r for r in rows if r["model"] in ("fp-small", "fp-plain-small")]
    abc = sorted((r for r in rows if r["model"] == "abcnet-small"),
                 key=lambda r: (r["options"].get("M", 0), r["options"].get("N", 0)))
    if abc and fp:
        best_fp = max(fp, key=lambda r: r["final_accuracy"])
        gaps = [(r["label"], 100 * (best_fp["final_accuracy"] - r["final_accuracy"]))
                for r in abc]
        accs = [r["final_accuracy"] for r in abc]
        monotone = all(b >= a for a, b in itertools.pairwise(accs))
        first, last = abc[0], abc[-1]
        diff = 100 * (last["final_accuracy"] - first["final_accuracy"])
        out.append(
            "* **More bases come closer to full precision (ABC-Net).** Gap of each ABC-Net to "
            f"the best full-precision model here ({best_fp['label']}, "
            f"{_pct(best_fp['final_accuracy'])} %), in points: "
            + "; ".join(f"{label}: {gap:+.2f}" for label, gap in gaps) + ". "
            + ("The final accuracy rises (or holds) with every step in (M, N) listed"
               if monotone else
               "The final accuracy does not rise with every step in (M, N) listed")
            + f"; from {first['label']} to {last['label']} it moves {diff:+.2f} points, "
            + _verdict(diff, _noise(first["final_accuracy"], last["final_accuracy"],
                                    test_images))
            + ". More bases also mean more binary weights and operations (see the table), so "
            "this is not a comparison at equal size. `abcnet-small` has no full-precision "
            "twin of the same architecture: the reference is a different (dense) network of "
            "similar width.")
    melius, plain = _find(rows, "meliusnet-small"), _find(rows, "binary-plain-small")
    if melius and plain:
        diff = 100 * (melius["final_accuracy"] - plain["final_accuracy"])
        noise = _noise(melius["final_accuracy"], plain["final_accuracy"], test_images)
        if abs(diff) <= noise:
            verdict = ("The claim is neither confirmed nor refuted at this budget: the "
                       "difference is " + _verdict(diff, noise) + ".")
        elif diff > 0:
            verdict = "On these figures MeliusNet is ahead, " + _verdict(diff, noise) + "."
        else:
            verdict = "On these figures MeliusNet is behind, " + _verdict(diff, noise) + "."
        out.append(
            "* **MeliusNet's blocks beat a plain binary DenseNet of equal size.** "
            f"meliusnet-small {_pct(melius['final_accuracy'])} % against binary-plain-small "
            f"{_pct(plain['final_accuracy'])} % ({diff:+.2f} points), at "
            f"{melius['binary_params']:,} against {plain['binary_params']:,} binary parameters "
            f"and {melius['size_kib']:.1f} against {plain['size_kib']:.1f} KiB in all. "
            + verdict)
    out.append(
        "* One seed per model and a short schedule: the spread between seeds is not measured "
        "here and may well exceed the test-set sampling error quoted above.")
    return "\n".join(out)


def write_docs(path, result):
    s = result["settings"]
    subset = (f"a **fixed stratified subset of {s['train_subset']:,} training images** "
              f"(subset seed {s['subset_seed']}, the same images for every model), not the "
              f"full {s['full_train_images']:,}" if s["train_subset"] is not None
              else f"all {s['full_train_images']:,} training images")
    text = f"""# Accuracy benchmark

Made by `bench/accuracy.py` on {result['date'][:10]} ({result['host']['machine']}, \
{s['jobs']} job(s) of {s['threads']} thread(s), CPU):

```
{result['command']}
```

Figures: [`{result['output']}`](../{result['output']}) (also each epoch's test accuracy and \
time). The whole run took {result['wall_seconds'] / 60:.1f} minutes of wall time. \
`python -m bench.accuracy --from-json {result['output']}` rewrites this page from the JSON.

**Budget.** {s['epochs']} epoch(s) on {subset}; test accuracy over the full test split \
({s['test_images']:,} images) after every epoch. Training follows `sw.train`'s defaults \
(Adam, lr 2e-3 cosine to 0, batch 64, seed {s['seed']}). This is a short budget: the networks \
are far from converged, and differences of a point or two between models are within what \
another seed or a longer schedule could change (one seed per model here). Read the figures as \
a smoke-level comparison, not as the papers' numbers.

{table(result['rows'])}

"Size" counts binary weights at 1 bit and the rest at 32 bits; "ops" is binary MACs / 64 plus \
full-precision MACs (see [models.md](models.md)). "s/epoch" is the mean time of an epoch as \
measured in this run (training on the subset plus evaluation on the full test split), one \
thread per training, on a machine shared with other jobs.

## What the figures say

{reading(result['rows'], s['test_images'])}
"""
    if result["missing"]:
        text += ("\n**Did not finish:** " + ", ".join(result["missing"])
                 + " (no figures are given for them).\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-subset", type=int, default=None, metavar="N",
                        help="train on a fixed stratified subset of N images (default: all)")
    parser.add_argument("--subset-seed", type=int, default=0)
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS),
                        metavar="NAME[@K=V,...]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="threads per training process")
    parser.add_argument("--jobs", type=int, default=1, help="trainings run at once")
    parser.add_argument("--output", default=None,
                        help="JSON (default: bench/results/accuracy_<dataset>.json)")
    parser.add_argument("--docs", default="docs/accuracy.md",
                        help="markdown table to write ('' for none)")
    parser.add_argument("--from-json", metavar="JSON",
                        help="train nothing: print and write the docs of an earlier result")
    args = parser.parse_args(argv)
    if args.from_json:
        result = json.loads(Path(args.from_json).read_text())
        print(table(result["rows"]))
        print()
        print(reading(result["rows"], result["settings"]["test_images"]))
        if args.docs:
            write_docs(Path(args.docs), result)
            print(f"wrote {args.docs}")
        return 0
    output = Path(args.output or f"bench/results/accuracy_{args.dataset}.json")
    models = [parse_model(text) for text in args.models]

    from sw import data
    full_train = data.load_dataset(args.dataset, "train")
    test_images = len(data.load_dataset(args.dataset, "test"))
    subset_digest = None
    if args.train_subset is not None:
        indices = stratified_subset(full_train.labels.numpy(), args.train_subset,
                                    args.subset_seed)
        subset_digest = hashlib.sha256(indices.astype(np.int64).tobytes()).hexdigest()
        train_images = args.train_subset
    else:
        train_images = len(full_train)

    jobs = [{"model": name, "options": options, "dataset": args.dataset,
             "epochs": args.epochs, "seed": args.seed, "threads": args.threads,
             "train_subset": args.train_subset, "subset_seed": args.subset_seed,
             "train_images": train_images} for name, options in models]
    started = time.monotonic()
    rows, missing = [None] * len(jobs), []
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs,
                                                mp_context=context) as pool:
        futures = {pool.submit(run_one, job): i for i, job in enumerate(jobs)}
        for future in concurrent.futures.as_completed(futures):
            i = futures[future]
            label = model_label(jobs[i]["model"], jobs[i]["options"])
            try:
                rows[i] = future.result()
            except Exception as error:  # noqa: BLE001 - report and go on with the others
                missing.append(f"{label} ({type(error).__name__}: {error})")
                print(f"{label}: FAILED: {error}", file=sys.stderr, flush=True)
                continue
            row = rows[i]
            print(f"{label}: final {_pct(row['final_accuracy'])} %, best "
                  f"{_pct(row['best_accuracy'])} % (epoch {row['best_epoch']}), "
                  f"{row['wall_seconds']:.0f} s", flush=True)
    rows = [row for row in rows if row is not None]
    result = {
        "benchmark": "accuracy",
        "command": shlex.join(["python", "-m", "bench.accuracy", *(argv or sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": {"machine": platform.machine(), "python": platform.python_version(),
                 "torch": torch.__version__},
        "output": output.as_posix(),
        "settings": {
            "dataset": args.dataset, "epochs": args.epochs, "seed": args.seed,
            "threads": args.threads, "jobs": args.jobs,
            "train_subset": args.train_subset,
            "train_subset_note": (
                None if args.train_subset is None else
                f"TRAINED ON A SUBSET: a fixed stratified subset of {args.train_subset} of "
                f"the {len(full_train)} training images (numpy default_rng(subset_seed), each "
                f"class in its proportion); test split complete"),
            "subset_seed": args.subset_seed if args.train_subset is not None else None,
            "subset_sha256": subset_digest,
            "full_train_images": len(full_train), "test_images": test_images,
            "train_config": {k: v for k, v in dataclasses.asdict(
                __import__("sw.train", fromlist=["TrainConfig"]).TrainConfig()).items()
                if k in ("batch_size", "lr", "optimizer", "weight_decay", "warmup_epochs")},
        },
        "wall_seconds": round(time.monotonic() - started, 1),
        "rows": rows,
        "missing": missing,
    }
    print()
    print(table(rows))
    print()
    print(reading(rows, test_images))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {output}")
    if args.docs:
        write_docs(Path(args.docs), result)
        print(f"wrote {args.docs}")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
