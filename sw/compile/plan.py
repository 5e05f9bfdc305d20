"""Memory plan (activation buffers with reuse), hardware validation and the per-layer report.

The plan gives every tensor of the program a byte offset in activation memory, live from the
op that first writes it to the last op that reads it; tensors whose lifetimes do not overlap
share memory (first fit, in order of definition, offsets aligned to :data:`ALIGN` bytes).

Cycle estimates (the hardware's figures come from its cycle counters; these are for planning):
a binary conv takes ``m_tiles * n_tiles * (k_words + rows + cols)`` cycles (a GEMM tile of
``k_words`` lanes plus the systolic skew); fixed-point layers ``ceil(MACs / rows)`` (one
multiply-accumulate lane per array row); element-wise ops ``ceil(work / cols)``.
"""

import dataclasses

from sw import protocol

from .lower import CompileError

__all__ = ["ALIGN", "LayerStats", "check_hardware", "first_fit", "layer_stats", "lifetimes",
           "plan_memory"]

#: Alignment of activation buffers in bytes.
ALIGN = 4
#: Bytes of per-output-channel requantization parameters (mul 2, shift 1, bias 4, res_mul 2).
PARAM_BYTES = 9


def _ceil_div(a, b):
    return -(-a // b)


def lifetimes(program):
    """``{tensor: (first op index, last op index)}``: from the op that first writes a tensor
    (-1 for the input) to the last op that reads it (``len(ops)`` for the logits)."""
    first, last = {}, {}
    first[program.input] = -1
    for index, op in enumerate(program.ops):
        for s in op.inputs:
            last[s.tensor] = index
        first.setdefault(op.output.tensor, index)
        last[op.output.tensor] = max(last.get(op.output.tensor, index), index)
    last[program.logits] = len(program.ops)
    return {name: (first[name], last.get(name, first[name])) for name in first}


def first_fit(placed, start, end, size):
    """The lowest offset at which ``size`` units fit beside the ``placed`` buffers
    (``(start, end, offset, size)`` tuples) whose lifetimes overlap ``[start, end]``."""
    busy = sorted((off, off + sz) for (s, e, off, sz) in placed if not (e < start or end < s))
    offset = 0
    for low, high in busy:
        if offset + size <= low:
            break
        offset = max(offset, high)
    return offset


def plan_memory(program):
    """``({tensor: (offset, nbytes)}, total bytes)``: activation buffers with reuse."""
    spans = lifetimes(program)
    placed = []
    offsets = {}
    for name in sorted(spans, key=lambda n: (spans[n][0], n)):
        start, end = spans[name]
        size = _ceil_div(program.tensors[name].nbytes, ALIGN) * ALIGN
        offset = first_fit(placed, start, end, size)
        placed.append((start, end, offset, size))
        offsets[name] = (offset, size)
    total = max((off + size for off, size in offsets.values()), default=0)
    return offsets, total


@dataclasses.dataclass
class LayerStats:
    """One op's figures for the report."""
    name: str
    kind: str
    in_shape: tuple
    out_shape: tuple
    binary_macs: int
    fixed_macs: int
    weight_bytes: int
    activation_bytes: int
    cycles: int
    k_bits: int = 0
    weight_words: int = 0


def layer_stats(program, config):
    """Per-op :class:`LayerStats` on a :class:`~hw.config.DeviceConfig`."""
    rows, cols, lane = config.rows, config.cols, config.lane
    weight_word = config.word_bytes(protocol.Memory.WEIGHTS)
    stats = []
    previous_weights = None
    for op in program.ops:
        src = program.tensors[op.inputs[0].tensor]
        in_shape = (op.inputs[0].channels, *src.shape[1:])
        out_shape = (op.output.channels, *program.tensors[op.output.tensor].shape[1:])
        pixels = out_shape[1] * out_shape[2]
        out_elements = out_shape[0] * pixels
        activation = sum(program.tensors[s.tensor].nbytes * s.channels
                         // program.tensors[s.tensor].shape[0] for s in op.inputs)
        activation += program.tensors[op.output.tensor].nbytes * op.output.channels \
            // program.tensors[op.output.tensor].shape[0]
        binary = fixed = weight = k_bits = words = 0
        if op.kind == "bconv":
            out_c, k_bits = op.params["weight_bits"].shape
            binary = out_c * k_bits * pixels
            k_words = _ceil_div(k_bits, lane)
            m_tiles, n_tiles = _ceil_div(out_c, rows), _ceil_div(pixels, cols)
            words = m_tiles * k_words
            key = op.params["weight_bits"].tobytes()
            # Weights already loaded for the previous op (ABC-Net's activation bases) are not
            # loaded again.
            weight = 0 if key == previous_weights else words * weight_word
            previous_weights = key
            cycles = m_tiles * n_tiles * (k_words + rows + cols)
        elif op.kind == "conv":
            w = op.params["weight"]
            fixed = w.size // w.shape[0] * out_elements
            weight = w.size + PARAM_BYTES * w.shape[0]
            cycles = _ceil_div(fixed, rows)
        elif op.kind == "combine":
            fixed = op.attrs["M"] * op.attrs["N"] * out_elements
            weight = 2 * op.params["coef"].size + PARAM_BYTES * out_shape[0]
            cycles = _ceil_div(fixed, rows)
        else:
            work = out_elements
            if op.kind == "maxpool":
                work *= op.attrs["kernel"] ** 2
            elif op.kind == "gap":
                work = in_shape[0] * in_shape[1] * in_shape[2]
            if op.kind in ("requant", "threshold"):
                weight = PARAM_BYTES * out_shape[0]
            cycles = _ceil_div(work, cols)
        stats.append(LayerStats(op.name, op.kind, in_shape, out_shape, binary, fixed, weight,
                                activation, cycles, k_bits, words))
    return stats


def check_hardware(program, config, activation_bytes=None):
    """Raise :class:`CompileError` naming the layer and the resource that does not fit.

    Checked: each binary layer's dot product length against ``max_depth`` (the accumulator),
    then everything :func:`.codegen.generate` checks (tensors in INTS and BITS, each op's data
    in WEIGHTS, COEFS and PARAMS, the instruction set's field ranges). Returns the byte plan's
    peak (for the report).
    """
    for s in layer_stats(program, config):
        if s.kind == "bconv" and s.k_bits > config.max_depth:
            raise CompileError(f"{s.name}: a dot product of {s.k_bits} bits exceeds the "
                               f"array's max_depth of {config.max_depth} bits")
    _, total = plan_memory(program)
    if activation_bytes is not None:
        total = activation_bytes
    # The device's activation memories (INTS, BITS), the weight memories and the instruction
    # set: code generation checks them and names the op and the memory that does not fit.
    from .codegen import generate
    generate(program, config)
    return total
