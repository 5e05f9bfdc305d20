"""Lowering: walk a :mod:`sw.models` network and emit the layer program (:mod:`.ir`).

Supported: MeliusNet and the plain binary DenseNet (:class:`~sw.models.MeliusNet` with binary
blocks) and ABC-Net (:class:`~sw.models.ABCResNet`). Scales of fixed-point feature maps come
from a calibration pass of the float model (the largest magnitude per channel).
"""

import numpy as np
import torch
from torch import nn

from ..models.abcnet import ABCConv2d, ABCResNet
from ..models.binary import BinaryConv2d, ChannelShuffle, Sign
from ..models.meliusnet import DenseBlock, ImprovementBlock, MeliusNet
from . import quantize as q
from .ir import Op, Program, Slice, TensorSpec

__all__ = ["INPUT_SHIFT", "LOGIT_BITS", "CompileError", "calibrate", "lower"]

#: Raw pixels are shifted left by this many bits before the mean is subtracted, so that the
#: rounded mean is within 1/32 of a pixel step.
INPUT_SHIFT = 4
#: Width of the logits: 16 bits (of the 18 of the ULX3S-85F default's INTS elements) resolve
#: the largest calibrated logit into 32,768 steps, far finer than the top-1 decision needs.
LOGIT_BITS = 16
#: Signed width of the ABC-Net combination coefficients.
COEF_BITS = 8


class CompileError(ValueError):
    """The model cannot be compiled, or does not fit the hardware; the message names the layer."""


def _np(t):
    return t.detach().to(torch.float64).cpu().numpy()


def _bn_affine(bn):
    """``(a, b)`` with ``bn(x) = a x + b`` per channel (eval mode)."""
    std = np.sqrt(_np(bn.running_var) + bn.eps)
    gamma = _np(bn.weight) if bn.weight is not None else np.ones_like(std)
    beta = _np(bn.bias) if bn.bias is not None else np.zeros_like(std)
    a = gamma / std
    return a, beta - a * _np(bn.running_mean)


@torch.no_grad()
def calibrate(model, images):
    """Largest magnitude per channel of every module's output over ``images`` (normalized)."""
    stats = {}
    hooks = []

    def hook(module, args, output):
        if isinstance(output, torch.Tensor) and output.dim() in (2, 4):
            dims = (0, 2, 3) if output.dim() == 4 else (0,)
            stats[module] = _np(output.abs().amax(dim=dims))

    for module in model.modules():
        hooks.append(module.register_forward_hook(hook))
    try:
        model.eval()(images.to(torch.float32))
    finally:
        for handle in hooks:
            handle.remove()
    return stats


class _Builder:
    def __init__(self, stats, act_bits):
        self.stats = stats
        self.act_bits = act_bits
        self.tensors = {}
        self.bounds = {}
        self.signed = set()
        self.ops = []

    def tensor(self, name, shape, kind, scale=None):
        if name in self.tensors:
            raise CompileError(f"tensor {name!r} defined twice")
        c = shape[0]
        self.tensors[name] = TensorSpec(name, tuple(int(s) for s in shape), kind, 1,
                                        None if kind == "bits" else np.ones(c))
        self.bounds[name] = np.zeros(c, dtype=np.int64)
        if scale is not None:
            self.tensors[name].scale[:] = scale
        return Slice(name, 0, c)

    def shape(self, s):
        return self.tensors[s.tensor].shape

    def scale(self, s):
        return self.tensors[s.tensor].scale[s.start:s.stop]

    def emit(self, kind, name, inputs, output, *, mode="write", bound, scale=None, attrs=None,
             params=None, signed=False):
        if signed or any(s.tensor in self.signed for s in inputs if kind in ("maxpool", "gap",
                                                                            "shuffle")):
            self.signed.add(output.tensor)
        self.ops.append(Op(kind, name, list(inputs), output, mode, dict(attrs or {}),
                           dict(params or {})))
        spec = self.tensors[output.tensor]
        sl = slice(output.start, output.stop)
        if mode == "add":
            self.bounds[output.tensor][sl] += bound
        else:
            self.bounds[output.tensor][sl] = bound
        if scale is not None:
            spec.scale[sl] = scale
        return output

    def stat(self, module, name):
        if module not in self.stats:
            raise CompileError(f"{name}: no calibration statistics (the module never ran)")
        return self.stats[module]

    def finish(self, input_name, logits):
        for name, spec in self.tensors.items():
            if spec.kind == "int":
                spec.signed = name in self.signed
                spec.bits = max(int(np.max(self.bounds[name], initial=0)).bit_length()
                                + spec.signed, 2)
        return Program(self.tensors, self.ops, input_name, logits)

    # -- operations ---------------------------------------------------------------------------

    def conv(self, name, src, weight, bias, a, b, out_scale, relu, bits, dst, *, stride=1,
             padding=0, groups=1):
        """Fixed-point conv (``weight`` real, ``(O, C/g, k, k)``) then ``a * y + b``."""
        weight = np.asarray(weight, dtype=np.float64)
        out_c = weight.shape[0]
        in_scale = self.scale(src)
        per_group = weight.shape[1]
        channel = (np.arange(out_c)[:, None] // (out_c // groups)) * per_group + np.arange(
            per_group)[None, :]
        folded = weight * in_scale[channel][:, :, None, None]
        wq, wscale = q.quantize_weights(folded)
        bias = np.zeros(out_c) if bias is None else bias
        params = q.requant_params(a * wscale / out_scale, (a * bias + b) / out_scale)
        params["weight"] = wq
        k = weight.shape[-1]
        high = q.integer_range(bits, relu)[1]
        return self.emit("conv", name, [src], dst, bound=high, scale=out_scale,
                         signed=not relu,
                         attrs={"kernel": k, "stride": stride, "padding": padding,
                                "groups": groups, "relu": int(relu), "bits": bits},
                         params=params)

    def conv_module(self, name, src, conv, bn, stat_module, relu, dst=None, bits=None):
        bits = bits or self.act_bits
        a, b = _bn_affine(bn) if bn is not None else (np.ones(conv.out_channels),
                                                      np.zeros(conv.out_channels))
        out_scale = q.scale_from_max(self.stat(stat_module, name), bits, relu)
        if dst is None:
            _, h, w = self.shape(src)
            k, s, p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
            oh, ow = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
            dst = self.tensor(name, (conv.out_channels, oh, ow), "int")
        bias = None if conv.bias is None else _np(conv.bias)
        return self.conv(name, src, _np(conv.weight), bias, a, b, out_scale, relu, bits, dst,
                         stride=conv.stride[0], padding=conv.padding[0], groups=conv.groups)

    def requant(self, name, src, bn, stat_module, relu, bits=None):
        bits = bits or self.act_bits
        a, b = _bn_affine(bn)
        out_scale = q.scale_from_max(self.stat(stat_module, name), bits, relu)
        params = q.requant_params(a * self.scale(src) / out_scale, b / out_scale)
        dst = self.tensor(name, (src.channels, *self.shape(src)[1:]), "int")
        high = q.integer_range(bits, relu)[1]
        return self.emit("requant", name, [src], dst, bound=high, scale=out_scale,
                         signed=not relu,
                         attrs={"relu": int(relu), "bits": bits}, params=params)

    def maxpool(self, name, src, kernel, stride, padding, dst=None):
        _, h, w = self.shape(src)
        oh = (h + 2 * padding - kernel) // stride + 1
        ow = (w + 2 * padding - kernel) // stride + 1
        if dst is None:
            dst = self.tensor(name, (src.channels, oh, ow), "int")
        return self.emit("maxpool", name, [src], dst,
                         bound=self.bounds[src.tensor][src.start:src.stop],
                         scale=self.scale(src),
                         attrs={"kernel": kernel, "stride": stride, "padding": padding})

    def threshold(self, name, src, a, b):
        thr, direction = q.thresholds(a, b, self.scale(src))
        dst = self.tensor(name, (src.channels, *self.shape(src)[1:]), "bits")
        return self.emit("threshold", name, [src], dst, bound=1,
                         params={"threshold": thr, "direction": direction})

    def bconv(self, name, src, weight_bits, kernel, stride, padding, dst=None, mode="write"):
        out_c = weight_bits.shape[0]
        fan_in = weight_bits.shape[1]
        if fan_in != src.channels * kernel * kernel:
            raise CompileError(f"{name}: weights of fan-in {fan_in} do not match "
                               f"{src.channels} input channels")
        _, h, w = self.shape(src)
        oh, ow = (h + 2 * padding - kernel) // stride + 1, (w + 2 * padding - kernel) // stride + 1
        if dst is None:
            dst = self.tensor(name, (out_c, oh, ow), "int")
        elif self.shape(dst)[1:] != (oh, ow):
            raise CompileError(f"{name}: output {oh}x{ow} does not match {dst.tensor}")
        return self.emit("bconv", name, [src], dst, mode=mode, bound=fan_in, scale=1.0,
                         attrs={"kernel": kernel, "stride": stride, "padding": padding},
                         params={"weight_bits": np.asarray(weight_bits, dtype=bool)})


# -- MeliusNet ---------------------------------------------------------------------------------

def _lower_meliusnet(bld, model, x):
    stem = model.stem
    names = dict(stem.named_children())
    x = bld.conv_module("stem.conv1", x, stem.conv1, stem.bn1, stem.relu1, True)
    x = bld.conv_module("stem.conv2", x, stem.conv2, stem.bn2, stem.relu2, True)
    stage_channels = []
    channels = stem.conv3.out_channels
    for stage, blocks in enumerate(model.blocks):
        total = channels
        for block in blocks:
            if isinstance(block, DenseBlock):
                total = block.out_channels
        stage_channels.append(total)
        if stage < len(model.transitions):
            channels = model.transitions[stage].out_channels

    def buffer(stage, h, w):
        return bld.tensor(f"stage{stage}", (stage_channels[stage], h, w), "int")

    if "pool" in names:
        x = bld.conv_module("stem.conv3", x, stem.conv3, stem.bn3, stem.relu3, True)
        pool = stem.pool
        _, h, w = bld.shape(x)
        oh = (h + 2 * pool.padding - pool.kernel_size) // pool.stride + 1
        ow = (w + 2 * pool.padding - pool.kernel_size) // pool.stride + 1
        buf = buffer(0, oh, ow)
        bld.maxpool("stem.pool", x, pool.kernel_size, pool.stride, pool.padding,
                    Slice(buf.tensor, 0, x.channels))
    else:
        _, h, w = bld.shape(x)
        k, s, p = stem.conv3.kernel_size[0], stem.conv3.stride[0], stem.conv3.padding[0]
        buf = buffer(0, (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1)
        bld.conv_module("stem.conv3", x, stem.conv3, stem.bn3, stem.relu3, True,
                        dst=Slice(buf.tensor, 0, stem.conv3.out_channels))
    channels = stem.conv3.out_channels
    for stage, blocks in enumerate(model.blocks):
        for index, block in enumerate(blocks):
            name = f"blocks.{stage}.{index}"
            if not (isinstance(block.act, Sign) and isinstance(block.conv, BinaryConv2d)):
                raise CompileError(f"{name}: only binary blocks (Sign -> BinaryConv2d) compile, "
                                   f"not {type(block.conv).__name__}")
            conv = block.conv
            if conv.groups != 1:
                raise CompileError(f"{name}.conv: grouped binary convs are not supported")
            bits = bld.threshold(f"{name}.bn", Slice(buf.tensor, 0, channels), *_bn_affine(
                block.bn))
            weight = conv.weight_bits().reshape(conv.out_channels, -1).numpy()
            if isinstance(block, DenseBlock):
                dst, mode = Slice(buf.tensor, channels, channels + conv.out_channels), "write"
                channels += conv.out_channels
            elif isinstance(block, ImprovementBlock):
                dst, mode = Slice(buf.tensor, channels - conv.out_channels, channels), "add"
                if np.any(bld.scale(dst) != 1.0):
                    raise CompileError(f"{name}: adds into channels that do not hold counts")
            else:
                raise CompileError(f"{name}: unsupported block {type(block).__name__}")
            bld.bconv(f"{name}.conv", bits, weight, conv.kernel_size, conv.stride,
                      conv.padding, dst=dst, mode=mode)
        if stage < len(model.transitions):
            tr = model.transitions[stage]
            name = f"transitions.{stage}"
            x = bld.requant(f"{name}.bn", Slice(buf.tensor, 0, channels), tr.bn, tr.act, True)
            x = bld.maxpool(f"{name}.pool", x, 2, 2, 0)
            if isinstance(tr.shuffle, ChannelShuffle):
                c, h, w = bld.shape(x)
                dst = bld.tensor(f"{name}.shuffle", (c, h, w), "int")
                g = tr.shuffle.groups
                perm = np.arange(c).reshape(g, c // g).T.reshape(-1)
                bld.emit("shuffle", f"{name}.shuffle", [x], dst, bound=bld.bounds[x.tensor],
                         scale=bld.scale(x)[perm], attrs={"groups": g})
                x = dst
            _, h, w = bld.shape(x)
            buf = buffer(stage + 1, h, w)
            bld.conv_module(f"{name}.conv", x, tr.conv, None, tr.conv, False,
                            dst=Slice(buf.tensor, 0, tr.conv.out_channels))
            channels = tr.conv.out_channels
    return _lower_head(bld, model.head, Slice(buf.tensor, 0, channels))


def _lower_head(bld, head, x):
    x = bld.requant("head.bn", x, head.bn, head.act, True)
    c, h, w = bld.shape(x)
    bound = bld.bounds[x.tensor] * h * w
    dst = bld.tensor("head.pool", (c, 1, 1), "int")
    x = bld.emit("gap", "head.pool", [x], dst, bound=bound, scale=bld.scale(x) / (h * w))
    fc = head.fc
    logits_max = float(np.max(bld.stat(fc, "head.fc")))
    scale = np.full(fc.out_features, q.scale_from_max(logits_max, LOGIT_BITS, False))
    out = bld.tensor("logits", (fc.out_features, 1, 1), "int")
    bias = None if fc.bias is None else _np(fc.bias)
    bld.conv("head.fc", x, _np(fc.weight)[:, :, None, None], bias, np.ones(fc.out_features),
             np.zeros(fc.out_features), scale, False, LOGIT_BITS, out)
    return out


# -- ABC-Net -----------------------------------------------------------------------------------

def _abc_conv(bld, name, conv, x, bn, stat_module, residual=None):
    if not isinstance(conv, ABCConv2d):
        raise CompileError(f"{name}: expected an ABCConv2d, not {type(conv).__name__}")
    with torch.no_grad():
        bases, alpha = conv.weight_bases()
    bases = _np(bases) >= 0
    alpha = _np(alpha)
    beta = _np(conv.scales)
    shifts = _np(conv.shifts)
    out_c, k = conv.out_channels, conv.kernel_size
    weight = bases.reshape(conv.M * out_c, -1)
    # The N activation bases' counts are slices of one tensor (base n in channels
    # [n * M * out_c, (n + 1) * M * out_c)), so that the combine reads them with one stride.
    _, h, w = bld.shape(x)
    oh = (h + 2 * conv.padding - k) // conv.stride + 1
    ow = (w + 2 * conv.padding - k) // conv.stride + 1
    per_base = conv.M * out_c
    store = bld.tensor(f"{name}.counts", (conv.N * per_base, oh, ow), "int")
    counts = []
    for n in range(conv.N):
        bits = bld.threshold(f"{name}.act{n}", x, np.ones(x.channels),
                             np.full(x.channels, shifts[n] - 0.5))
        dst = Slice(store.tensor, n * per_base, (n + 1) * per_base)
        counts.append(bld.bconv(f"{name}.base{n}", bits, weight, k, conv.stride, conv.padding,
                                dst=dst))
    coef = beta[:, None] * alpha[None, :]
    limit = (1 << (COEF_BITS - 1)) - 1
    coef_scale = max(np.abs(coef).max(), 1e-30) / limit
    qcoef = q.round_half_up(coef / coef_scale)
    total = qcoef.sum()
    a, b = _bn_affine(bn)
    out_scale = q.scale_from_max(bld.stat(stat_module, name), bld.act_bits, False)
    inputs = list(counts)
    res_real = None
    if residual is not None:
        inputs.append(residual)
        res_real = bld.scale(residual) / out_scale
    params = q.requant_params(2 * a * coef_scale / out_scale,
                              (b - a * coef_scale * conv.fan_in * total) / out_scale, res_real)
    params["coef"] = qcoef
    dst = bld.tensor(f"{name}.out", (out_c, *bld.shape(counts[0])[1:]), "int")
    high = q.integer_range(bld.act_bits, False)[1]
    return bld.emit("combine", f"{name}.combine", inputs, dst, bound=high, signed=True,
                    scale=out_scale, attrs={"M": conv.M, "N": conv.N, "relu": 0,
                                            "bits": bld.act_bits,
                                            "residual": int(residual is not None)},
                    params=params)


def _lower_abcnet(bld, model, x):
    stem = model.stem
    names = dict(stem.named_children())
    if "pool" in names:
        x = bld.conv_module("stem.conv", x, stem.conv, None, stem.conv, False)
        pool = stem.pool
        x = bld.maxpool("stem.pool", x, pool.kernel_size, pool.stride, pool.padding)
        x = bld.requant("stem.bn", x, stem.bn, stem.bn, False)
    else:
        x = bld.conv_module("stem.conv", x, stem.conv, stem.bn, stem.bn, False)
    for stage, blocks in enumerate(model.blocks):
        for index, block in enumerate(blocks):
            name = f"blocks.{stage}.{index}"
            y = _abc_conv(bld, f"{name}.conv1", block.conv1, x, block.bn1, block.bn1)
            if isinstance(block.shortcut, nn.Identity):
                res = x
            else:
                res = _abc_conv(bld, f"{name}.shortcut", block.shortcut.conv, x,
                                block.shortcut.bn, block.shortcut)
            x = _abc_conv(bld, f"{name}.conv2", block.conv2, y, block.bn2, block, residual=res)
    return _lower_head(bld, model.head, x)


# -- entry point -------------------------------------------------------------------------------

def lower(model, calibration, preprocessing, *, act_bits=8):
    """Compile ``model`` into a :class:`~.ir.Program`.

    Parameters
    ----------
    model : MeliusNet or ABCResNet
    calibration : torch.Tensor
        Normalized images ``(B, C, H, W)`` for the float model's ranges.
    preprocessing : dict
        ``mean``, ``std`` (per channel, raw pixel units) and ``pixel_range``.
    act_bits : int
        Width of fixed-point feature maps.
    """
    if not isinstance(model, (MeliusNet, ABCResNet)):
        raise CompileError(f"model: cannot compile a {type(model).__name__} (MeliusNet, the "
                           f"plain binary DenseNet and ABCResNet compile)")
    model.eval()
    stats = calibrate(model, calibration)
    bld = _Builder(stats, act_bits)
    _, channels, size, _ = calibration.shape
    mean = np.asarray(preprocessing["mean"], dtype=np.float64)
    std = np.asarray(preprocessing["std"], dtype=np.float64)
    pixel_max = int(max(abs(v) for v in preprocessing["pixel_range"]))
    image = bld.tensor("image", (channels, size, size), "int")
    bld.bounds["image"][:] = pixel_max
    factor = 1 << INPUT_SHIFT
    x = bld.tensor("input", (channels, size, size), "int", scale=1.0 / (std * factor))
    bld.emit("input", "input", [image], x, signed=True, bound=pixel_max * factor + np.abs(
        q.round_half_up(mean * factor)), attrs={"shift": INPUT_SHIFT},
        params={"zero": q.round_half_up(mean * factor)})
    if isinstance(model, MeliusNet):
        logits = _lower_meliusnet(bld, model, x)
    else:
        logits = _lower_abcnet(bld, model, x)
    return bld.finish("image", logits.tensor)
