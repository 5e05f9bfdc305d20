"""The golden model: executes a compiled program with integer arithmetic, as the hardware must.

Every tensor is ``torch.int64``; bit tensors hold 0/1. The operations' semantics are those of
``docs/compiler.md``; the hardware's output integers must equal :func:`run`'s for every input.
"""

import torch
import torch.nn.functional as F

__all__ = ["execute_op", "requantize", "run"]

_INT64_MIN = -(1 << 63)


def _matmul(a, b):
    """Exact integer ``a @ b``: in float64 (BLAS) when every partial sum is below 2**53, where
    float64 arithmetic on integers is exact, else in int64."""
    bound = int(a.abs().max()) * int(b.abs().max()) * a.shape[-1] if a.numel() and b.numel() \
        else 0
    if bound < 1 << 53:
        return (a.to(torch.float64) @ b.to(torch.float64)).to(torch.int64)
    return a @ b


def _channel(v):
    return torch.as_tensor(v, dtype=torch.int64).view(1, -1, 1, 1)


def requantize(v, shift, relu, bits):
    """Round half up by ``shift`` bits, then saturate (see :mod:`.quantize`)."""
    shift = _channel(shift)
    half = torch.where(shift > 0, torch.ones_like(shift) << (shift - 1).clamp(min=0), 0)
    y = torch.bitwise_right_shift(v + half, shift)
    if relu:
        return y.clamp(0, (1 << bits) - 1)
    return y.clamp(-(1 << (bits - 1)), (1 << (bits - 1)) - 1)


def _windows(x, kernel, stride, padding, value):
    """``(B, C, k*k, OH, OW)``: the k x k windows, position ``i * k + j``."""
    if padding:
        x = F.pad(x, (padding,) * 4, value=value)
    _, _, h, w = x.shape
    oh, ow = (h - kernel) // stride + 1, (w - kernel) // stride + 1
    return torch.stack([x[:, :, i:i + stride * (oh - 1) + 1:stride,
                          j:j + stride * (ow - 1) + 1:stride]
                        for i in range(kernel) for j in range(kernel)], dim=2)


def _conv(op, x):
    a = op.attrs
    weight = torch.as_tensor(op.params["weight"], dtype=torch.int64)
    cols = _windows(x, a["kernel"], a["stride"], a["padding"], 0)
    b, c, kk, oh, ow = cols.shape
    g = a["groups"]
    cols = cols.reshape(b, g, (c // g) * kk, oh * ow)
    w = weight.reshape(g, weight.shape[0] // g, -1)
    acc = torch.stack([_matmul(w[i], cols[:, i]) for i in range(g)], dim=1)
    acc = acc.reshape(b, weight.shape[0], oh, ow)
    v = acc * _channel(op.params["mul"]) + _channel(op.params["bias"])
    return requantize(v, op.params["shift"], a["relu"], a["bits"])


def _bconv(op, bits):
    a = op.attrs
    w = torch.as_tensor(op.params["weight_bits"], dtype=torch.int64)
    cols = _windows(bits, a["kernel"], a["stride"], a["padding"], 0)  # pad: bit 0 = -1
    b, _, _, oh, ow = cols.shape
    cols = cols.reshape(b, -1, oh * ow)
    # xnor-popcount: positions where both bits are 1 plus positions where both are 0.
    count = _matmul(w, cols) + _matmul(1 - w, 1 - cols)
    return count.reshape(b, w.shape[0], oh, ow)


def _combine(op, inputs):
    a, p = op.attrs, op.params
    coef = torch.as_tensor(p["coef"], dtype=torch.int64)
    m_bases = a["M"]
    counts = inputs[:a["N"]]
    out_c = counts[0].shape[1] // m_bases
    acc = 0
    for n, count in enumerate(counts):
        for m in range(m_bases):
            acc = acc + coef[n, m] * count[:, m * out_c:(m + 1) * out_c]
    v = acc * _channel(p["mul"]) + _channel(p["bias"])
    if a["residual"]:
        v = v + inputs[-1] * _channel(p["res_mul"])
    return requantize(v, p["shift"], a["relu"], a["bits"])


def execute_op(op, inputs):
    """One op on int64 inputs ``(B, C, H, W)`` (the op's input slices); returns its output slice."""
    kind, a, p = op.kind, op.attrs, op.params
    x = inputs[0]
    if kind == "input":
        return (x << a["shift"]) - _channel(p["zero"])
    if kind == "conv":
        return _conv(op, x)
    if kind == "requant":
        v = x * _channel(p["mul"]) + _channel(p["bias"])
        return requantize(v, p["shift"], a["relu"], a["bits"])
    if kind == "threshold":
        thr, direction = _channel(p["threshold"]), _channel(p["direction"])
        bits = torch.where(direction > 0, x >= thr, x <= thr)
        return torch.where(direction == 0, thr.expand_as(x), bits.to(torch.int64))
    if kind == "bconv":
        return _bconv(op, x)
    if kind == "combine":
        return _combine(op, inputs)
    if kind == "maxpool":
        return _windows(x, a["kernel"], a["stride"], a["padding"], _INT64_MIN).amax(dim=2)
    if kind == "shuffle":
        b, c, h, w = x.shape
        return x.reshape(b, a["groups"], c // a["groups"], h, w).transpose(1, 2).reshape(
            b, c, h, w)
    if kind == "gap":
        return x.sum(dim=(2, 3), keepdim=True)
    raise ValueError(f"{op.name}: unknown operation kind {kind!r}")


def run(program, images, return_intermediates=False):
    """Execute ``program`` (a :class:`~.ir.Program` or an artifact holding one) on raw images.

    Parameters
    ----------
    images : tensor ``(B, C, H, W)``
        Raw integer pixels (what the device receives).
    return_intermediates : bool
        Also return ``{op name: the op's output slice}`` (int64) after each op.

    Returns
    -------
    logits : torch.Tensor of int64, ``(B, classes)``
        (and the intermediates).
    """
    program = getattr(program, "program", program)
    images = torch.as_tensor(images)
    if images.is_floating_point() and not torch.equal(images, images.round()):
        raise ValueError("images must hold raw integer pixels, not normalized values")
    images = images.to(torch.int64)
    expected = program.tensors[program.input].shape
    if tuple(images.shape[1:]) != expected:
        raise ValueError(f"images must be (batch, {', '.join(map(str, expected))}), not "
                         f"{tuple(images.shape)}")
    batch = images.shape[0]
    env = {name: torch.zeros((batch, *spec.shape), dtype=torch.int64)
           for name, spec in program.tensors.items()}
    env[program.input] = images
    intermediates = {}
    for op in program.ops:
        inputs = [env[s.tensor][:, s.start:s.stop] for s in op.inputs]
        y = execute_op(op, inputs)
        out = env[op.output.tensor]
        if op.mode == "add":
            out[:, op.output.start:op.output.stop] += y
        else:
            out[:, op.output.start:op.output.stop] = y
        if return_intermediates:
            intermediates[op.name] = out[:, op.output.start:op.output.stop].clone()
    logits = env[program.logits].reshape(batch, -1)
    return (logits, intermediates) if return_intermediates else logits
