"""Ops too big for a weight memory, split along their output channels.

Code generation (:func:`.codegen.generate`) streams a program whose data does not fit the
device's WEIGHTS, COEFS and PARAMS memories in **segments** of consecutive ops, but each op's own
data must fit them at once. :func:`split_for_memories` splits each op whose data does not into
ops of consecutive output channels that each fit: every piece reads the same inputs and writes
its channel slice of the same output (with the same mode), with its rows of the weights and
its channels' parameters. Each output channel of these ops depends only on its own weights
and parameters, so the pieces compute exactly what the op did (the golden model runs the
program as it was compiled; :mod:`sim.isa_model` and the simulated device run the pieces).

Split op kinds and their data per output channel:

* ``bconv``: ``k_words`` WEIGHTS words per row tile of ``rows`` channels; pieces take whole row
  tiles (a multiple of ``rows`` channels);
* ``conv`` (fixed point): ``C / groups * k * k`` COEFS words and one PARAMS record per channel;
  with groups, pieces take whole groups (and read only their groups' input channels);
* ``input``, ``requant`` (element-wise): one PARAMS record per channel; pieces read their own
  input channels.

A ``threshold`` is not split: it writes whole bits tensors (a BITS word holds many channels).

A piece is named ``<op>[<first>:<stop>]`` after its output channels.

An int tensor too big for INTS can be split the same way when one conv makes it and one
per-channel op right after it is its only reader (a binary conv's counts and their max pool,
CNV's pattern): :func:`split_activation` runs the pair piece by piece through a smaller
tensor, ``<tensor>.piece``, holding one piece's channels.
"""

import dataclasses
import itertools

import numpy as np

from .ir import Program, Slice

__all__ = ["split_activation", "split_for_memories"]

#: Ops whose output channel ``o`` depends only on input channel ``o`` (and its parameters).
_PER_CHANNEL = ("maxpool", "requant", "gap")


def _ceil_div(a, b):
    return -(-a // b)


def _piece_channels(op, geo):
    """``(step, fits)``: the channel granularity of ``op``'s pieces and the most channels one
    piece may take, or None when the op is not split (its data fits, or it has no
    per-channel data)."""
    out_c = op.output.channels
    if op.kind == "bconv":
        channels = op.inputs[0].channels if op.inputs else 0
        k = int(op.attrs.get("kernel", 1))
        k_words = k * k * _ceil_div(channels, geo.lane)
        if _ceil_div(out_c, geo.rows) * k_words <= geo.weight_depth or k_words == 0:
            return None
        return geo.rows, geo.rows * (geo.weight_depth // k_words)
    if op.kind == "conv":
        weight = np.asarray(op.params["weight"])
        groups = int(op.attrs.get("groups", 1))
        per_channel = int(np.prod(weight.shape[1:]))
        if out_c * per_channel <= geo.coef_depth and out_c <= geo.param_depth:
            return None
        step = out_c // groups if groups > 1 else 1
        most = min(geo.coef_depth // max(per_channel, 1), geo.param_depth)
        return step, most - most % step
    if op.kind in ("input", "requant") and out_c > geo.param_depth:
        return 1, geo.param_depth
    return None


def _piece(op, lo, hi):
    """Output channels ``lo:hi`` of ``op`` (relative to its output slice)."""
    out = Slice(op.output.tensor, op.output.start + lo, op.output.start + hi)
    name = f"{op.name}[{lo}:{hi}]"
    params = {}
    for key, value in op.params.items():
        value = np.asarray(value)
        # Per-output-channel arrays have the output channels first; the rest is shared.
        params[key] = value[lo:hi] if value.ndim and value.shape[0] == op.output.channels \
            else value
    inputs, attrs = list(op.inputs), dict(op.attrs)
    if op.kind == "conv" and int(attrs.get("groups", 1)) > 1:
        groups = int(attrs["groups"])
        per_group_out = op.output.channels // groups
        per_group_in = op.inputs[0].channels // groups
        first, stop = lo // per_group_out, hi // per_group_out
        src = op.inputs[0]
        inputs = [Slice(src.tensor, src.start + first * per_group_in,
                        src.start + stop * per_group_in)]
        attrs["groups"] = stop - first
    elif op.kind in ("input", "requant", *_PER_CHANNEL):
        src = op.inputs[0]
        inputs = [Slice(src.tensor, src.start + lo, src.start + hi)]
    return dataclasses.replace(op, name=name, inputs=inputs, output=out, attrs=attrs,
                               params=params)


def split_for_memories(program, geo):
    """``(program, split)``: ``program`` with each op whose own WEIGHTS, COEFS or PARAMS data
    does not fit ``geo`` (a :class:`.codegen.Geometry`) replaced by pieces that fit, and
    ``split``: ``{op name: [piece names]}`` for the ops split. The program is returned
    unchanged (the same object) when nothing is split. An op that cannot be split small
    enough (one row tile's weights exceed WEIGHTS, one group's coefficients exceed COEFS) is
    left whole, for code generation to refuse by name."""
    ops, split = [], {}
    for op in program.ops:
        sizes = _piece_channels(op, geo)
        out_c = op.output.channels
        if sizes is None:
            ops.append(op)
            continue
        step, most = sizes
        if most < step:
            ops.append(op)
            continue
        # Equal pieces (each a multiple of ``step``), as few as fit.
        count = _ceil_div(out_c, most)
        units = _ceil_div(out_c, step)
        per = _ceil_div(units, count) * step
        bounds = list(range(0, out_c, per)) + [out_c]
        pieces = [_piece(op, lo, hi) for lo, hi in itertools.pairwise(bounds)]
        if len(pieces) == 1:
            ops.append(op)
            continue
        split[op.name] = [piece.name for piece in pieces]
        ops.extend(pieces)
    if not split:
        return program, split
    return Program(program.tensors, ops, program.input, program.logits), split


def split_activation(program, tensor, pieces, geo):
    """``(program, split)`` with the int tensor ``tensor`` replaced by one of about
    ``1 / pieces`` of its channels: its writer and its reader run piece by piece, or None when
    the pattern does not hold or the tensor cannot be split that small.

    The pattern: one ``bconv`` or ungrouped fixed-point ``conv`` writes all of ``tensor``
    (mode write; it is not the logits), and the next op, a per-channel op (max pool,
    requantization, global pool) that writes (mode write) an int tensor, reads all of it and
    is its only reader. Pieces of the writer take whole row tiles (``geo.rows`` channels).
    """
    ops = program.ops
    spec = program.tensors[tensor]
    writers = [i for i, op in enumerate(ops) if op.output.tensor == tensor]
    readers = [i for i, op in enumerate(ops) if any(s.tensor == tensor for s in op.inputs)]
    if spec.kind != "int" or tensor == program.logits or len(writers) != 1 \
            or readers != [writers[0] + 1]:
        return None
    index = writers[0]
    writer, reader = ops[index], ops[index + 1]
    channels = spec.shape[0]
    whole = program.is_whole

    if writer.kind not in ("bconv", "conv") or writer.mode != "write" \
            or not whole(writer.output) \
            or (writer.kind == "conv" and int(writer.attrs.get("groups", 1)) != 1) \
            or reader.kind not in _PER_CHANNEL or reader.mode != "write" \
            or len(reader.inputs) != 1 or not whole(reader.inputs[0]) \
            or program.tensors[reader.output.tensor].kind != "int":
        return None
    step = geo.rows if writer.kind == "bconv" else 1
    units = _ceil_div(channels, step)
    if pieces > units:
        return None
    per = _ceil_div(units, pieces) * step
    if per >= channels:
        return None
    piece_name = f"{tensor}.piece"
    tensors = dict(program.tensors)
    tensors[piece_name] = dataclasses.replace(spec, name=piece_name,
                                              shape=(per, *spec.shape[1:]),
                                              scale=None if spec.scale is None
                                              else np.asarray(spec.scale)[:per])
    new_ops, names = [], []
    for lo in range(0, channels, per):
        hi = min(lo + per, channels)
        first = _piece(writer, lo, hi)
        first = dataclasses.replace(first, output=Slice(piece_name, 0, hi - lo))
        second = _piece(reader, lo, hi)
        second = dataclasses.replace(second, inputs=[Slice(piece_name, 0, hi - lo)])
        new_ops += [first, second]
        names += [first.name, second.name]
    ops = ops[:index] + new_ops + ops[index + 2:]
    split = {writer.name: names[0::2], reader.name: names[1::2]}
    return Program(tensors, ops, program.input, program.logits), split
