"""Benchmark: whole networks on the simulated accelerator, per-layer cycles and utilization.

::

    python -m bench.network_performance [--networks meliusnet cnv] [--images 1] [--batch 8]
                                        [--fmax-mhz F] [--output-dir bench/results]

Simulates the ULX3S-85F default build (:func:`hw.board.get_board`) under Verilator as a
:mod:`sim.board` and runs each network through :class:`sw.runtime.Accelerator` over
``socket://``: the descriptors and weights are loaded, each image is written and run, and the
device's per-op cycle counters (COUNTERS memory) are read back. Every image's logits are
checked against the golden model; the benchmark fails rather than report figures of a wrong
answer. The UART runs at 4 clock cycles per bit in the simulation (the cycle counters do not
depend on it; loading is just faster to simulate).

Networks (:mod:`bench.networks`, random weights): ``meliusnet`` (``meliusnet-small`` at
28x28x1) and ``cnv`` (FINN's CNV-W1A1 topology at 32x32x3), both on the same configuration,
every weight resident (one segment). ``--cols`` and ``--fixed-lanes`` simulate a variant of
it; the JSON records the configuration used.

Figures per op: cycles (hardware counter), useful binary MACs and fixed-point MACs,
utilization of binary convs (bit-MACs / (cycles * rows * cols * lane)), share of the total.
Per network: cycles per image, images/s at the Fmax given (default: the committed ULX3S
build's report) and at the board clock, and two upper bounds: the array's (every binary MAC
at peak, nothing else costing a cycle) and the link's: the bytes the driver sent and received
for one image (with every segment's weights again when they do not fit on chip at once) at
the board's baud, and, for a network whose weights are streamed, the bytes per image of a
batch of ``--batch`` images (:meth:`sw.runtime.Accelerator.infer_batch`: each segment loaded
once for the batch). Writes ``bench/results/network_performance.json`` and a PNG per network
(per-layer cycles and binary-conv utilization).
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

from bench.committed import committed_fmax_mhz
from bench.networks import cnv_w1a1_program, meliusnet_program
from hw.board import get_board
from sim.board import BoardProcess
from sw import isa
from sw.compile import golden
from sw.driver import Device
from sw.packing import word_bytes
from sw.protocol import Memory
from sw.runtime import Accelerator

ROOT = Path(__file__).resolve().parent.parent


def op_figures(program, dp, config):
    """Useful work of each op: binary MACs (bconv) and fixed-point MACs / terms."""
    figures = []
    peak = config.rows * config.cols * config.lane
    for op, info in zip(program.ops, dp.ops):
        out = program.tensors[op.output.tensor]
        pixels = out.shape[1] * out.shape[2]
        binary = fixed = 0
        if op.kind == "bconv":
            o, k = op.params["weight_bits"].shape
            binary = o * k * pixels
        elif op.kind == "conv":
            w = op.params["weight"]
            fixed = w.size // w.shape[0] * op.output.channels * pixels
        # The unit that ran it: a conv with ``opcode`` BCONV ran on the array as bit-planes.
        figures.append({"name": op.name, "kind": op.kind, "opcode": info.opcode.name,
                        "binary_macs": int(binary), "fixed_macs": int(fixed), "peak": peak})
    return figures


def _check(name, index, result, expected):
    if not np.array_equal(result.logits, expected):
        raise AssertionError(f"{name}: image {index}: device logits {result.logits.tolist()} "
                             f"!= golden {expected.tolist()}")


def _link_bytes(device):
    return device.bytes_sent + device.bytes_received


def run_network(name, program, images, config, images_to_run, batch):
    count = max(images_to_run, batch)
    if count > len(images):
        raise ValueError(f"{name}: {count} images asked for, the benchmark has {len(images)}")
    expected = golden.run(program, torch.as_tensor(images[:count])).numpy()
    fast = config.replace(baud=config.clock_hz // 4)
    started = time.monotonic()
    with BoardProcess(fast, connections=1, idle_timeout=900, time_limit=7200,
                      startup_timeout=1800) as board, \
            Device.open(board.url, timeout=30.0, time_scale=board.time_scale) as device:
        accelerator = Accelerator(device, program)
        dp = accelerator.device_program
        loaded = time.monotonic()
        results = []
        for index in range(images_to_run):
            before = _link_bytes(device)
            result = accelerator.infer(images[index])
            single_bytes = _link_bytes(device) - before
            _check(name, index, result, expected[index])
            results.append(result)
        batch_bytes = None
        if len(dp.segments) > 1 and batch > 1:
            # Streamed weights: a batch loads each segment once for all its images.
            before = _link_bytes(device)
            batched = accelerator.infer_batch(images[:batch])
            batch_bytes = (_link_bytes(device) - before) / batch
            for index, result in enumerate(batched):
                _check(name, index, result, expected[index])
            results += batched
    wall = time.monotonic() - started
    counters = results[-1].op_cycles
    total = sum(counters)
    figures = op_figures(dp.program, dp, config)
    layers = []
    for figure, cycles in zip(figures, counters):
        layer = dict(figure, cycles=int(cycles), share=round(cycles / total, 4))
        if figure["binary_macs"]:
            layer["utilization"] = round(figure["binary_macs"] / (cycles * figure["peak"]), 4)
        del layer["peak"]
        layers.append(layer)
    binary_cycles = sum(lay["cycles"] for lay in layers if lay["kind"] == "bconv")
    binary_macs = sum(lay["binary_macs"] for lay in layers)
    # Payload bytes of the weights streamed for one image when they do not fit on chip at
    # once (every segment's data again).
    widths = config.word_widths()
    streamed = 0 if len(dp.segments) == 1 else sum(
        len(words) * word_bytes(widths[Memory[memory]])
        for segment in dp.segments for memory, _, words in segment.writes)
    record = {
        "network": name,
        "ops": len(layers), "segments": len(dp.segments),
        "cycles_per_image": int(total),
        "cycles_by_kind": {kind: int(sum(lay["cycles"] for lay in layers
                                         if lay["kind"] == kind))
                           for kind in sorted({lay["kind"] for lay in layers})},
        "binary_utilization": round(binary_macs / (binary_cycles * config.peak_bit_macs_per_cycle),
                                    4) if binary_cycles else None,
        "images_per_s_at_clock": round(config.clock_hz / total, 1),
        # Upper bounds: every binary MAC at the array's peak and nothing else taking a cycle;
        # the UART (10 bits per byte at the board's baud) carrying only the payload bytes.
        "binary_macs_per_image": int(binary_macs),
        "array_bound_images_per_s_at_clock": round(
            config.clock_hz * config.peak_bit_macs_per_cycle / binary_macs, 1)
        if binary_macs else None,
        # Bytes on the wire (both directions, frames included) as measured by the driver:
        # one image run alone, and per image of a batch (streamed weights loaded once per
        # batch); the link's bound is the board's baud at 10 bits per byte.
        "link_bytes_per_image": int(single_bytes),
        "weight_bytes_streamed_per_image": int(streamed),
        "link_bound_images_per_s": round(config.baud / 10 / single_bytes, 1),
        "batch": batch if batch_bytes is not None else None,
        "link_bytes_per_image_in_batch": round(batch_bytes) if batch_bytes else None,
        "link_bound_images_per_s_in_batch": (round(config.baud / 10 / batch_bytes, 1)
                                             if batch_bytes else None),
        "images_checked_against_golden": len(results),
        "same_cycles_every_image": all(r.op_cycles == counters for r in results),
        "load_s": round(loaded - started, 1), "wall_s": round(wall, 1),
        "config": {k: getattr(config, k) for k in (
            "rows", "cols", "lane", "max_depth", "weight_depth", "int_depth", "bits_depth",
            "coef_depth", "param_depth", "program_depth", "element_width", "clock_hz",
            "baud", "fixed_channels")} | {"fixed_lanes": config.int_banks},
        "layers": layers,
    }
    return record


def plot(record, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    layers = record["layers"]
    names = [lay["name"] for lay in layers]
    colors = {"bconv": "tab:blue", "conv": "tab:red", "threshold": "tab:green",
              "maxpool": "tab:orange", "requant": "tab:purple", "gap": "tab:brown",
              "input": "tab:gray", "combine": "tab:pink", "shuffle": "tab:olive"}
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(8, 0.35 * len(names)), 7),
                                      sharex=True)
    x = np.arange(len(names))
    top.bar(x, [lay["cycles"] for lay in layers],
            color=[colors.get(lay["kind"], "black") for lay in layers])
    top.set_yscale("log")
    top.set_ylabel("cycles (log)")
    top.set_title(f"{record['network']}: {record['cycles_per_image']:,} cycles per image "
                  f"on {record['config']['rows']}x{record['config']['cols']}x"
                  f"{record['config']['lane']}")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for k, c in colors.items()
               if any(lay["kind"] == k for lay in layers)]
    top.legend(handles, [k for k in colors if any(lay["kind"] == k for lay in layers)],
               fontsize=7, ncol=4)
    util = [100 * lay.get("utilization", 0) for lay in layers]
    bottom.bar(x, util, color="tab:blue")
    bottom.axhline(85, color="black", linewidth=0.8, linestyle="--")
    bottom.set_ylim(0, 100)
    bottom.set_ylabel("binary conv utilization %")
    bottom.set_xticks(x, names, rotation=90, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m bench.network_performance",
        description="Run whole networks on the simulated ULX3S-85F accelerator and record "
                    "per-layer cycles, binary-conv utilization and images/s.")
    parser.add_argument("--networks", nargs="+", choices=["meliusnet", "cnv"],
                        default=["meliusnet", "cnv"])
    parser.add_argument("--images", type=int, default=1,
                        help="images run one at a time (and checked against golden) per network")
    parser.add_argument("--batch", type=int, default=8,
                        help="for a network whose weights are streamed: images run as one batch "
                             "(each segment loaded once; checked against golden) for the link's "
                             "figures per image in a batch (default: %(default)s)")
    parser.add_argument("--fmax-mhz", type=float, default=None,
                        help="Fmax for images/s (default: that of a committed ULX3S build "
                             "of the same array that runs the layer program)")
    parser.add_argument("--cols", type=int, default=None,
                        help="array columns, as a build with --cols has (default: the 85F "
                             "default's)")
    parser.add_argument("--fixed-lanes", type=int, default=None,
                        help="at least this many fixed-point lanes, as a build with "
                             "--fixed-lanes has (default: the 85F default's)")
    parser.add_argument("--output-dir", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    for option in ("images", "batch"):
        if getattr(args, option) < 1:
            parser.error(f"--{option} must be at least 1, not {getattr(args, option)}")
    torch.set_num_threads(1)
    board = get_board("ulx3s", "85F")
    config = board.default_config
    changes = {name: value for name, value in (("cols", args.cols),
                                                ("fixed_lanes", args.fixed_lanes))
               if value is not None and value != getattr(config, name)}
    try:
        config = config.replace(**changes)
    except ValueError as error:
        parser.error(str(error))
    default = board.default_config
    suffix = ""
    if (config.cols, config.int_banks) != (default.cols, default.int_banks):
        suffix = f"_{config.rows}x{config.cols}x{config.lane}"
        if config.int_banks != isa.int_banks(config.cols):
            suffix += f"_lanes{config.int_banks}"
    args.output_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for name in args.networks:
        if name == "meliusnet":
            program, images = meliusnet_program(config)
        else:
            program, images = cnv_w1a1_program()
        print(f"{name}: simulating (the first run of a configuration builds it with "
              f"Verilator)", flush=True)
        record = run_network(name, program, images, config, args.images, args.batch)
        records.append(record)
        png = args.output_dir / f"network_performance_{name}{suffix}.png"
        plot(record, png)
        print(f"{name}: {record['cycles_per_image']:,} cycles per image, binary convs "
              f"{100 * (record['binary_utilization'] or 0):.1f}% utilized, "
              f"{record['images_per_s_at_clock']} images/s at the board clock", flush=True)
        for lay in record["layers"]:
            util = f"{100 * lay['utilization']:5.1f}%" if "utilization" in lay else "      "
            print(f"  {lay['name']:28s} {lay['kind']:9s} {lay['opcode']:6s} "
                  f"{lay['cycles']:9,d} {util}")
    # The Fmax is read after the (long) simulations, so a build that finished meanwhile counts.
    fmax = args.fmax_mhz or committed_fmax_mhz(board, config, layer_program=True)
    for record in records:
        record["images_per_s_at_fmax"] = (round(fmax * 1e6 / record["cycles_per_image"], 1)
                                          if fmax else None)
        record["array_bound_images_per_s_at_fmax"] = (
            round(record["array_bound_images_per_s_at_clock"] * fmax * 1e6
                  / record["config"]["clock_hz"], 1)
            if fmax and record["array_bound_images_per_s_at_clock"] else None)
        print(f"{record['network']}: {record['images_per_s_at_fmax']} images/s at {fmax} MHz "
              f"(bound of the array alone: {record['array_bound_images_per_s_at_fmax']}); "
              f"the link carries {record['link_bytes_per_image']:,} bytes per image, at most "
              f"{record['link_bound_images_per_s']} images/s"
              + (f"; in a batch of {record['batch']}, "
                 f"{record['link_bytes_per_image_in_batch']:,} bytes per image, at most "
                 f"{record['link_bound_images_per_s_in_batch']} images/s"
                 if record["batch"] else ""))
    output = args.output_dir / f"network_performance{suffix}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({
        "benchmark": "network_performance",
        "command": shlex.join(["python", "-m", "bench.network_performance", *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": platform.node(), "board": "ulx3s", "size": "85F", "fmax_mhz": fmax,
        "networks": records,
    }, indent=1) + "\n")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
