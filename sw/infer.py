"""Command line: classify images with a compiled model.

::

    python -m sw.infer IMAGE [IMAGE ...] --model MODEL.bnn [--device golden|board|socket://H:P]
                       [--port PORT] [--baud B] [--top-k K] [--time-scale S] [--timeout T]

Prints, per image, the top-k classes with their probabilities, and for a device the clock
cycles of the inference and the host's wall time. See :func:`sw.run_inference`.
"""

import argparse
import sys

from .driver import DriverError
from .inference import GOLDEN, ImageError, clear_cache, run_inference


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m sw.infer",
        description="Classify images with a compiled model (an artifact from python -m "
                    "sw.compile) on the golden model, a board or a simulated board.")
    parser.add_argument("images", nargs="+", metavar="IMAGE",
                        help="image files (converted to the model's channels, size and pixel "
                             "range)")
    parser.add_argument("--model", required=True, help="artifact file")
    parser.add_argument("--device", default=GOLDEN,
                        help="golden (default), board (the FTDI port, or --port), a "
                             "socket://HOST:PORT of python -m sim.board, or a serial port")
    parser.add_argument("--port", default=None, help="serial port of the board")
    parser.add_argument("--baud", type=int, default=3_000_000,
                        help="UART baud rate of the build (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=3, help="classes shown (default: 3)")
    parser.add_argument("--time-scale", type=float, default=None,
                        help="slowdown of a simulated board (its first line says)")
    parser.add_argument("--timeout", type=float, default=2.0,
                        help="seconds a reply may take beyond the estimate (default: 2)")
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error(f"--top-k must be at least 1, not {args.top_k}")
    try:
        predictions = run_inference(args.images, args.model, args.device, port=args.port,
                                    baud=args.baud, timeout=args.timeout,
                                    time_scale=args.time_scale, progress=True)
    except (ImageError, DriverError, OSError, ValueError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        clear_cache()
    for path, prediction in zip(args.images, predictions):
        top = ", ".join(f"{label} {100 * p:.1f}%" for label, p in prediction.top(args.top_k))
        timing = (f"; {prediction.cycles:,} cycles ({1e3 * prediction.device_seconds:.3f} ms "
                  f"at the device clock), {prediction.seconds:.2f} s on the host"
                  if prediction.cycles is not None else
                  f"; {1e3 * prediction.seconds:.1f} ms on the host")
        print(f"{path}: {prediction.label} (class {prediction.index}) | top {args.top_k}: "
              f"{top}{timing}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
