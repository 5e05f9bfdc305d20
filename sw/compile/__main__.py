"""``python -m sw.compile CHECKPOINT --board ulx3s -o MODEL``: compile and print a report.

``CHECKPOINT`` is a checkpoint of :mod:`sw.train`, or a QONNX model (a file ending in ``.onnx``,
e.g. from Brevitas' ``export_qonnx``), compiled by :mod:`sw.compile.qonnx`.
"""

import argparse
import sys

from hw.board import board_names, get_board

from . import artifact as artifact_file
from .codegen import generate
from .compiler import CALIBRATION_IMAGES, compile_checkpoint
from .lower import CompileError
from .plan import layer_stats

__all__ = ["format_report", "main"]


def _shape(shape):
    return "x".join(str(v) for v in shape)


def format_report(artifact, config):
    """The per-layer report (op, shapes, MACs, bytes, the device's cycles) and the totals.

    Cycles are the device's per-op counters as code generation predicts them exactly
    (:func:`sw.isa.op_cycles`), for ``config``'s build.
    """
    device_program = generate(artifact.program, config)
    # Per op as generated: an op too big for a weight memory is reported in pieces.
    stats = layer_stats(device_program.program, config)
    for s, op in zip(stats, device_program.ops):
        s.cycles = op.cycles
    header = (f"{'layer':<28} {'op':<9} {'in':>10} {'out':>10} {'binary MACs':>12} "
              f"{'fixed MACs':>11} {'weight B':>9} {'act B':>8} {'cycles':>9}")
    lines = [header, "-" * len(header)]
    for s in stats:
        lines.append(f"{s.name:<28} {s.kind:<9} {_shape(s.in_shape):>10} "
                     f"{_shape(s.out_shape):>10} {s.binary_macs:>12,} {s.fixed_macs:>11,} "
                     f"{s.weight_bytes:>9,} {s.activation_bytes:>8,} {s.cycles:>9,}")
    lines.append("-" * len(header))
    binary = sum(s.binary_macs for s in stats)
    fixed = sum(s.fixed_macs for s in stats)
    weight = sum(s.weight_bytes for s in stats)
    cycles = sum(s.cycles for s in stats)
    lines.append(f"{'total':<28} {len(stats):<9} {'':>10} {'':>10} {binary:>12,} {fixed:>11,} "
                 f"{weight:>9,} {'':>8} {cycles:>9,}")
    hw, dp = artifact.hardware, device_program
    lines.append(f"device memories: INTS {dp.ints_used:,} of {dp.geometry.int_depth:,} "
                 f"elements, BITS {dp.bits_used:,} of {dp.geometry.bits_depth:,} words; "
                 f"{len(dp.segments)} weight segment(s); longest binary dot product: "
                 f"{hw['max_depth']} bits")
    lines.append(f"array {config.rows}x{config.cols}x{config.lane}, "
                 f"{config.int_banks} fixed-point lanes, at "
                 f"{config.clock_hz / 1e6:g} MHz: {cycles:,} cycles = "
                 f"{cycles / config.clock_hz * 1e3:.3f} ms per image (device counters, "
                 f"weights loaded)")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m sw.compile", description=__doc__)
    parser.add_argument("checkpoint", metavar="CHECKPOINT",
                        help="a checkpoint of sw.train, or a QONNX model (.onnx)")
    parser.add_argument("--board", metavar="BOARD", default="ulx3s", choices=board_names(),
                        help="target board; its default array (default: %(default)s)")
    parser.add_argument("--size", metavar="SIZE", default=None,
                        help="FPGA size variant of the board (default: the board's default)")
    parser.add_argument("-o", "--output", metavar="MODEL", required=True,
                        help="artifact file to write")
    parser.add_argument("--calibration", metavar="N", type=int, default=CALIBRATION_IMAGES,
                        help="training images for the fixed-point ranges (default: %(default)s)")
    parser.add_argument("--act-bits", metavar="BITS", type=int, default=8,
                        help="width of fixed-point feature maps (default: %(default)s)")
    parser.add_argument("--pixel-max", metavar="N", type=int, default=255,
                        help="QONNX models: the graph input is raw / N for raw pixels 0..N "
                             "(default: %(default)s)")
    args = parser.parse_args(argv)
    board = get_board(args.board, args.size)
    config = board.default_config
    try:
        if str(args.checkpoint).lower().endswith(".onnx"):
            from .qonnx import compile_onnx
            artifact = compile_onnx(args.checkpoint, config, pixel_max=args.pixel_max)
        else:
            artifact, _ = compile_checkpoint(args.checkpoint, config,
                                             calibration_images=args.calibration,
                                             act_bits=args.act_bits)
    except (CompileError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    artifact_file.save(artifact, args.output)
    print(f"{args.checkpoint} -> {args.output} for {board.label}")
    print(format_report(artifact, config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
