"""Parameter, size and operation counts of models, by the MeliusNet authors' counting rule.

* **Binary parameters**: the weights of binary layers (:class:`~.binary.BinaryConv2d`,
  :class:`~.binary.BinaryLinear`), one bit each; an :class:`~.abcnet.ABCConv2d` stores M binary
  bases, so it counts ``M x`` its weight's size.
* **Full-precision parameters**: every other parameter (real conv weights, BN gamma and beta, FC
  weight and bias, ABC-Net's shifts and scales) plus ABC-Net's M alphas per layer, 32 bits each.
  Buffers (BN running statistics) are not parameters and are not counted.
* **Size** = (binary parameters x 1 bit + full-precision parameters x 32 bits) / 8 / 1024^2 MiB.
* **Ops** = binary MACs / 64 + full-precision convolution MACs. An ABC conv does M x N binary
  convolutions. FC layers, BN and pooling are not counted.

``python -m sw.models.summary`` prints the counts of every registered model at its reference
input sizes (:data:`sw.models.MODELS`).
"""

import argparse
import dataclasses
import math

import torch
from torch import nn

from .abcnet import ABCConv2d
from .binary import BinaryConv2d, BinaryLinear

__all__ = ["ModelSummary", "format_table", "summarize_registered", "summary"]


@dataclasses.dataclass(frozen=True)
class ModelSummary:
    """Counts of one model at one input size."""

    name: str
    input_size: int
    in_channels: int
    binary_params: int
    fp_params: int
    binary_macs: int
    fp_macs: int

    @property
    def total_params(self):
        return self.binary_params + self.fp_params

    @property
    def size_bits(self):
        return self.binary_params + 32 * self.fp_params

    @property
    def size_mib(self):
        return self.size_bits / 8 / 1024**2

    @property
    def ops(self):
        return self.binary_macs / 64 + self.fp_macs


def _param_counts(model):
    binary = fp = 0
    binary_weights = set()
    for module in model.modules():
        if isinstance(module, (BinaryConv2d, BinaryLinear)):
            binary += module.weight.numel()
            binary_weights.add(id(module.weight))
        elif isinstance(module, ABCConv2d):
            binary += module.M * module.weight.numel()
            binary_weights.add(id(module.weight))
            fp += module.M
    fp += sum(p.numel() for p in model.parameters() if id(p) not in binary_weights)
    return binary, fp


def _mac_hook(totals):
    def hook(module, inputs, output):
        positions = output[0].numel()
        if isinstance(module, ABCConv2d):
            totals["binary"] += module.M * module.N * positions * module.fan_in
        elif isinstance(module, (BinaryConv2d, BinaryLinear)):
            totals["binary"] += positions * module.fan_in
        else:
            kh, kw = module.kernel_size
            totals["fp"] += positions * module.in_channels // module.groups * kh * kw
    return hook


def summary(model, input_size=None, in_channels=None, *, name=None):
    """Counts of ``model`` for one image of ``input_size`` x ``input_size`` pixels.

    ``input_size`` and ``in_channels`` default to the model's attributes of those names (set by
    :func:`sw.models.build_model`). The model runs one forward pass in eval mode on its device;
    build it under ``torch.device("meta")`` to count without computing. Its training mode is
    restored afterwards.

    Returns
    -------
    ModelSummary
    """
    input_size = getattr(model, "input_size", None) if input_size is None else input_size
    in_channels = getattr(model, "in_channels", None) if in_channels is None else in_channels
    if input_size is None or in_channels is None:
        raise ValueError("input_size and in_channels must be given for a model without "
                         "input_size and in_channels attributes")
    binary_params, fp_params = _param_counts(model)
    totals = {"binary": 0, "fp": 0}
    hook = _mac_hook(totals)
    handles = [module.register_forward_hook(hook) for module in model.modules()
               if isinstance(module, (nn.Conv2d, BinaryConv2d, BinaryLinear, ABCConv2d))]
    device = next(model.parameters()).device
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, in_channels, input_size, input_size, device=device))
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    return ModelSummary(name or type(model).__name__, input_size, in_channels, binary_params,
                        fp_params, totals["binary"], totals["fp"])


def summarize_registered(names=None, **options):
    """:class:`ModelSummary` of registered models (all by default) at each of their reference
    inputs, built with ``options`` on the meta device (no memory for weights, no arithmetic)."""
    from . import MODELS, build_model

    results = []
    for name in names or MODELS:
        spec = MODELS[name]
        for setting in spec.reference_inputs:
            with torch.device("meta"):
                model = build_model(name, **setting, **options)
            results.append(summary(model, name=name))
    return results


def _option(text):
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"option must be KEY=VALUE, not {text!r}")
    for convert in (int, float):
        try:
            return key, convert(value)
        except ValueError:
            pass
    return key, value


_COLUMNS = ("model", "input", "binary params", "fp params", "total params", "size MiB",
            "ops", "binary MACs", "fp conv MACs")


def _scientific(value):
    """``value`` as the paper writes it, e.g. ``2.081 x 10^8``."""
    if value == 0:
        return "0"
    exponent = math.floor(math.log10(value))
    mantissa = value / 10**exponent
    if f"{mantissa:.3f}" == "10.000":
        mantissa, exponent = mantissa / 10, exponent + 1
    return f"{mantissa:.3f} x 10^{exponent}"


def _row(s):
    return (s.name, f"{s.in_channels}x{s.input_size}x{s.input_size}", f"{s.binary_params:,}",
            f"{s.fp_params:,}", f"{s.total_params:,}", f"{s.size_mib:.3f}",
            _scientific(s.ops), f"{s.binary_macs:,}", f"{s.fp_macs:,}")


def format_table(summaries, markdown=False):
    """The summaries as a fixed-width text table or a Markdown table."""
    rows = [_COLUMNS] + [_row(s) for s in summaries]
    if markdown:
        lines = ["| " + " | ".join(row) + " |" for row in rows]
        lines.insert(1, "|" + "|".join(["---"] + ["---:"] * (len(_COLUMNS) - 1)) + "|")
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = []
    for index, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells))
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv=None):
    from . import MODELS

    parser = argparse.ArgumentParser(
        prog="python -m sw.models.summary",
        description="Print parameters, size and ops of the registered models (the MeliusNet "
                    "authors' counting rule: binary weights 1 bit, other parameters 32 bits; "
                    "ops = binary MACs / 64 + full-precision conv MACs).")
    parser.add_argument("models", nargs="*", metavar="MODEL",
                        help=f"models to count (default: all of {', '.join(MODELS)})")
    parser.add_argument("--markdown", action="store_true",
                        help="print a Markdown table (default: %(default)s)")
    parser.add_argument("--set", type=_option, action="append", default=[], metavar="KEY=VALUE",
                        help="a model option for every model counted, e.g. M=5 (repeatable)")
    args = parser.parse_args(argv)
    unknown = [name for name in args.models if name not in MODELS]
    if unknown:
        parser.error(f"unknown models: {', '.join(unknown)} (known: {', '.join(MODELS)})")
    try:
        summaries = summarize_registered(args.models or None, **dict(args.set))
    except (TypeError, ValueError) as error:
        parser.error(str(error))
    print(format_table(summaries, markdown=args.markdown))


if __name__ == "__main__":
    main()
