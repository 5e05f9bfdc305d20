"""The QONNX front end: binary networks exported by Brevitas (``export_qonnx``) -> the layer program.

``compile_onnx(path_or_model, config)`` reads a QONNX graph (the interchange format of FINN,
hls4ml and qonnx) of a binary-weight network and returns the same :class:`~.artifact.Artifact`
as :func:`~.compiler.compile_model`; ``python -m sw.compile MODEL.onnx --board ulx3s -o MODEL``
does it from the command line. The graph is walked node by node in its (topological) order; each
value is one of

* **pixels**: the graph input and what elementwise nodes make of it before the first quantizer,
  kept as a table of float32 values per element and per raw pixel value (the graph input is
  ``float32(raw) / float32(pixel_max)``, torchvision's ``ToTensor`` for 8-bit images). Each node
  is applied to the table in float32, as onnxruntime applies it to a tensor, so the quantizer
  that ends the chain gives exactly the reference's codes for every pixel value. A
  ``BipolarQuant`` there becomes a ``threshold`` of the raw pixels (the table must be a step
  function of the pixel), a ``Quant`` a ``requant`` of the raw pixels (an integer multiplier,
  bias and shift found, and checked, to reproduce the codes for every pixel value);
* **ints**: an integer tensor of the program with ``real = a[c] * stored + b[c]`` per channel
  (counts of binary layers, sums of the first layer, max pools of them). ``Mul``, ``Add``,
  ``Sub``, ``Div`` by constants and ``BatchNormalization`` update ``a`` and ``b`` exactly (in
  float64, from the float32 constants);
* **bits**: a ``BipolarQuant`` of ints, ``real = s * (2 bit - 1)`` (``s > 0`` one scale for the
  tensor): a ``threshold`` op, emitted when the bits are used. ``BipolarQuant(v) = s`` where
  ``v >= 0`` (``sign(0) = +1``, as Brevitas' binary quantizer and qonnx's executor), so the
  threshold is :func:`.quantize.thresholds` of ``(a, b)``;
* **constants**: initializers, ``Constant`` nodes and nodes of constants (the weight
  quantizers), evaluated here.

Layers: ``Conv``, ``Gemm`` and ``MatMul`` with binary weights (``+-s[o]``, one scale per output
channel) on bits become ``bconv`` ops: ``real = s_x s_w[o] (2 count - K)``. On the 8-bit codes
of the first layer a ``Conv`` becomes a fixed-point ``conv`` with +-1 int8 weights. A ``Gemm``
on a ``C x k x k`` map flattened by ``Reshape``/``Flatten`` is a ``bconv`` with a ``k x k``
kernel (the flatten order is the kernel's channel, row, column order). ``MaxPool`` of bits
pools the counts before the threshold: the channels whose threshold compares downwards have
their weights negated first (``count' = K - count``), so that every compare is upward and
pooling commutes with it. ONNX ``Conv`` pads with 0, which is neither +1 nor -1: a binary conv
with padding is refused; a ``Pad`` of the bits with the value ``-s`` (bit 0) before it is the
array's own padding and compiles.

The logits are the last layer's counts (or sums): the graph output must be ``a * stored + b``
with one ``a`` and one ``b`` for all classes (Brevitas' ``TensorNorm``), so that the argmax is
the reference's; a negative ``a`` negates the last layer's weights. ``a`` and ``b`` are recorded
in the artifact's ``preprocessing["qonnx"]["logits"]``.

A node that cannot be mapped raises :class:`~.lower.CompileError` naming the node, its op type
and why.
"""

import numpy as np
import torch

from sw import isa

from . import quantize as q
from .artifact import Artifact
from .golden import requantize
from .ir import Slice
from .lower import CompileError, _Builder
from .plan import check_hardware, layer_stats, plan_memory

__all__ = ["PIXEL_MAX", "TIE_TOLERANCE", "compare_with_reference", "compile_onnx", "graph_input",
           "lower_onnx", "raw_to_input"]

#: The graph input is ``raw / PIXEL_MAX`` for raw pixels ``0 .. PIXEL_MAX`` unless told otherwise.
PIXEL_MAX = 255

#: Nodes that pass their (first) input through in inference.
_PASS = {"Identity", "Dropout"}

_QONNX_DOMAINS = ("qonnx.custom_op.general", "finn.custom_op.general", "onnx.brevitas")


def _onnx():
    try:
        import onnx
        import onnx.numpy_helper
    except ImportError as error:  # pragma: no cover - onnx is a dependency of the front end
        raise CompileError("compiling ONNX models needs the onnx package (pip install onnx)") \
            from error
    return onnx


class _Pixels:
    """The graph input before its first quantizer: ``table[..., p]`` is the float32 value of
    each element for raw pixel value ``p`` (``shape`` per image, without the batch)."""

    def __init__(self, table, shape):
        self.table = table
        self.shape = tuple(shape)


class _Ints:
    """A program tensor (``src``, a whole tensor) with ``real = a[c] * stored + b[c]``.

    ``shape`` is the graph's per-image shape (``(C, H, W)``, or ``(C*H*W,)`` after a flatten);
    ``producer`` the op that wrote it (its weights may be negated), ``fan_in`` its dot product
    length (``None`` for a pool)."""

    def __init__(self, src, a, b, shape, producer=None):
        self.src = src
        self.a = np.asarray(a, dtype=np.float64)
        self.b = np.asarray(b, dtype=np.float64)
        self.shape = tuple(shape)
        self.producer = producer


class _Bits:
    """``real = scale * (2 bit - 1)``: the threshold of ``ints`` (pending until used) or the
    emitted bits tensor ``src``; ``pad`` is a pending ``Pad`` with bit 0."""

    def __init__(self, ints, scale, shape, src=None, pad=0, onnx=None):
        self.ints = ints
        self.scale = float(scale)
        self.shape = tuple(shape)
        self.src = src
        self.pad = pad
        self.onnx = onnx            # the graph's tensor of the same +-scale values


def _attrs(node):
    onnx = _onnx()
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _bipolar(x, scale):
    """qonnx ``BipolarQuant``: ``scale`` where ``x >= 0``, else ``-scale``."""
    return np.where(x >= 0, 1.0, -1.0).astype(np.float32) * scale


def _round(x, mode):
    mode = mode.upper()
    if mode == "ROUND":
        return np.round(x)               # half to even, as numpy and onnxruntime
    if mode == "FLOOR":
        return np.floor(x)
    if mode == "CEIL":
        return np.ceil(x)
    if mode == "ROUND_TO_ZERO":
        return np.trunc(x)
    raise ValueError(f"rounding mode {mode!r}")


def _int_quant(x, scale, zero, bit_width, signed, narrow, mode):
    """qonnx ``Quant``: ``(clip(round(x / scale + zero)) - zero) * scale`` -> ``(codes, range)``
    with the integer codes before the final scaling (``codes - zero`` times ``scale``)."""
    bw = int(np.asarray(bit_width).reshape(-1)[0])
    if signed:
        low, high = -(1 << (bw - 1)) + int(narrow), (1 << (bw - 1)) - 1
    else:
        low, high = 0, (1 << bw) - 1 - int(narrow)
    y = np.asarray(x, dtype=np.float32) / np.asarray(scale, dtype=np.float32) + np.asarray(
        zero, dtype=np.float32)
    codes = np.clip(_round(y, mode), low, high)
    return codes, (low, high)


def _per_channel(value, shape, what):
    """A constant that broadcasts against activations ``(1, *shape)`` as one value per channel
    (``(C,)``); ``ValueError`` if it varies within a channel."""
    value = np.asarray(value, dtype=np.float64)
    try:
        full = np.broadcast_to(value, (1, *shape))[0]
    except ValueError:
        raise ValueError(f"{what} of shape {value.shape} does not broadcast to activations of "
                         f"shape {tuple(shape)}") from None
    flat = full.reshape(shape[0], -1)
    if np.any(flat != flat[:, :1]):
        raise ValueError(f"{what} of shape {value.shape} is not one value per channel")
    return flat[:, 0].copy()


def _mode(attrs):
    mode = attrs.get("rounding_mode", "ROUND")
    return mode.decode() if isinstance(mode, bytes) else mode


class _Lowering:
    def __init__(self, model, config, pixel_max):
        onnx = _onnx()
        self.onnx = onnx
        self.graph = model.graph
        self.config = config
        self.pixel_max = int(pixel_max)
        self.bld = _Builder({}, 8)
        self.values = {}
        self.consts = {}
        self.image = None
        self.input_quant = None
        self.activations = []
        for init in self.graph.initializer:
            self.consts[init.name] = onnx.numpy_helper.to_array(init)
        inputs = [i for i in self.graph.input if i.name not in self.consts]
        if len(inputs) != 1:
            raise CompileError(f"model: {len(inputs)} graph inputs besides the initializers "
                               f"({[i.name for i in inputs]}); one image input compiles")
        dims = [d.dim_value for d in inputs[0].type.tensor_type.shape.dim]
        if len(dims) != 4 or dims[0] not in (0, 1) or dims[2] != dims[3] or dims[2] < 1:
            raise CompileError(f"input {inputs[0].name!r}: shape {dims}; a batch of square "
                               f"images (1, C, H, H) compiles")
        self.input_name = inputs[0].name
        self.input_shape = tuple(dims[1:])
        pixels = np.arange(self.pixel_max + 1, dtype=np.float32) / np.float32(self.pixel_max)
        table = np.broadcast_to(pixels, (*self.input_shape, pixels.size)).copy()
        self.values[self.input_name] = _Pixels(table, self.input_shape)
        if len(self.graph.output) != 1:
            raise CompileError(f"model: {len(self.graph.output)} graph outputs; one compiles")

    # -- helpers --------------------------------------------------------------------------------

    def fail(self, node, why):
        raise CompileError(f"node {node.name!r} ({node.op_type}): {why}")

    def const(self, node, name):
        if name not in self.consts:
            self.fail(node, f"input {name!r} must be a constant")
        return self.consts[name]

    def is_const(self, name):
        return name == "" or name in self.consts

    def value(self, node, name):
        if name in self.values:
            return self.values[name]
        if name in self.consts:
            self.fail(node, f"input {name!r} is a constant where activations were expected")
        self.fail(node, f"input {name!r} comes from no node this compiler mapped")

    def tensor(self, name, shape, kind):
        base, n = name, 1
        while name in self.bld.tensors:
            name, n = f"{base}.{n}", n + 1
        return self.bld.tensor(name, shape, kind)

    # -- constant nodes --------------------------------------------------------------------------

    def fold(self, node):
        """Evaluate a node whose inputs are all constants."""
        op, x = node.op_type, [self.consts.get(n) for n in node.input]
        a = _attrs(node)
        if op == "BipolarQuant":
            y = _bipolar(x[0], x[1])
        elif op == "Quant":
            codes, _ = _int_quant(x[0], x[1], x[2], x[3], a.get("signed", 1),
                                  a.get("narrow", 0), _mode(a))
            y = ((codes - x[2]) * x[1]).astype(np.float32)
        elif op in ("Mul", "Add", "Sub", "Div"):
            f = {"Mul": np.multiply, "Add": np.add, "Sub": np.subtract, "Div": np.divide}[op]
            y = f(x[0], x[1])
        elif op == "Sqrt":
            y = np.sqrt(x[0])
        elif op == "Pow":
            y = np.power(x[0], x[1])
        elif op == "Neg":
            y = -x[0]
        elif op == "Transpose":
            y = np.transpose(x[0], a.get("perm"))
        elif op == "Reshape":
            y = x[0].reshape([d if d != 0 else x[0].shape[i] for i, d in enumerate(x[1])])
        elif op in _PASS or op == "Cast" and a.get("to") == 1:
            y = x[0]
        else:
            self.fail(node, "a node of constants that this compiler does not evaluate")
        self.consts[node.output[0]] = np.asarray(y)

    # -- the walk ------------------------------------------------------------------------------

    def run(self):
        for node in self.graph.node:
            if node.op_type == "Constant":
                a = _attrs(node)
                if "value" not in a:
                    self.fail(node, "only tensor-valued Constant nodes are supported")
                self.consts[node.output[0]] = self.onnx.numpy_helper.to_array(a["value"])
                continue
            data = [n for n in node.input if n]
            if data and all(n in self.consts for n in data):
                self.fold(node)
                continue
            method = getattr(self, f"_{node.op_type}", None)
            if method is None:
                self.fail(node, "this op type is not supported by the QONNX front end")
            if node.domain and node.domain not in _QONNX_DOMAINS and node.domain != "ai.onnx":
                self.fail(node, f"domain {node.domain!r} is not a QONNX domain")
            result = method(node)
            self.values[node.output[0]] = result
        out = self.graph.output[0].name
        return self.finish(self.value(self.graph.node[-1], out), out)

    # -- pixels (before the input quantizer) -----------------------------------------------------

    def _elementwise(self, node):
        x0, x1 = node.input[0], node.input[1]
        op = node.op_type
        const_first = self.is_const(x0)
        if const_first and op in ("Mul", "Add"):
            x0, x1 = x1, x0
            const_first = False
        v = self.value(node, x1 if const_first else x0)
        c = np.asarray(self.const(node, x0 if const_first else x1))
        if isinstance(v, _Pixels):
            try:
                # Per image (the batch axis dropped); the table's last axis is the pixel value.
                cc = np.broadcast_to(c.astype(np.float32), (1, *v.shape))[0][..., None]
            except ValueError:
                self.fail(node, f"a constant of shape {c.shape} does not broadcast to "
                                f"{v.shape}")
            f = {"Mul": np.multiply, "Add": np.add, "Sub": np.subtract, "Div": np.divide}[op]
            table = f(cc, v.table) if const_first else f(v.table, cc)
            return _Pixels(table.astype(np.float32), v.shape)
        if isinstance(v, _Ints):
            try:
                k = _per_channel(c, v.shape, "the constant")
            except ValueError as error:
                self.fail(node, str(error))
            a, b = v.a, v.b
            if op == "Mul":
                a, b = a * k, b * k
            elif op == "Add":
                b = b + k
            elif op == "Sub":
                a, b = (-a, k - b) if const_first else (a, b - k)
            elif op == "Div":
                if const_first:
                    self.fail(node, "dividing a constant by activations is not affine")
                a, b = a / k, b / k
            return _Ints(v.src, a, b, v.shape, v.producer)
        self.fail(node, "arithmetic on binary activations (only on integer sums and counts, "
                        "before a quantizer)")

    _Mul = _Add = _Sub = _Div = _elementwise

    def _Identity(self, node):
        return self.value(node, node.input[0])

    _Dropout = _Identity

    def _BatchNormalization(self, node):
        v = self.value(node, node.input[0])
        if not isinstance(v, _Ints):
            self.fail(node, "BatchNormalization of anything but integer sums or counts")
        gamma, beta, mean, var = (np.asarray(self.const(node, n), dtype=np.float64)
                                  for n in node.input[1:5])
        eps = float(np.float32(_attrs(node).get("epsilon", 1e-5)))
        scale = gamma / np.sqrt(var + eps)
        return _Ints(v.src, v.a * scale, v.b * scale + beta - mean * scale, v.shape, v.producer)

    def _reshape(self, node, shape):
        v = self.value(node, node.input[0])
        old = v.shape
        size = int(np.prod(old))
        shape = [int(s) for s in shape]
        if shape and shape[0] in (0, 1, -1):
            shape = shape[1:]
        if -1 in shape:
            known = int(np.prod([s for s in shape if s != -1]))
            shape[shape.index(-1)] = size // known
        shape = [old[i] if s == 0 else s for i, s in enumerate(shape)]
        if int(np.prod(shape)) != size:
            self.fail(node, f"cannot reshape {old} to {shape}")
        if isinstance(v, _Pixels):
            return _Pixels(v.table.reshape(*shape, v.table.shape[-1]), shape)
        if len(shape) != 1 and tuple(shape) != tuple(old):
            self.fail(node, f"a reshape of activations from {old} to {shape}: only flattening "
                            f"(to one axis per image) is supported")
        if isinstance(v, _Ints):
            return _Ints(v.src, v.a, v.b, shape, v.producer)
        return _Bits(v.ints, v.scale, shape, v.src, v.pad, v.onnx)

    def _Reshape(self, node):
        return self._reshape(node, self.const(node, node.input[1]))

    def _Flatten(self, node):
        axis = _attrs(node).get("axis", 1)
        if axis != 1:
            self.fail(node, f"Flatten with axis {axis} (only axis 1, per image)")
        return self._reshape(node, [1, -1])

    # -- quantizers ----------------------------------------------------------------------------

    def _pixel_codes(self, node, v, codes):
        """Per-channel tables ``(C, P)`` of the program input ``(C, H, W)``: the codes
        ``(*shape, P)`` must not depend on the position within a channel."""
        shape = v.shape if len(v.shape) == 3 else (int(np.prod(v.shape)), 1, 1)
        per = codes.reshape(shape[0], -1, codes.shape[-1])
        if np.any(per != per[:, :1]):
            self.fail(node, "the input preprocessing differs within a channel")
        self.image = self.tensor("image", shape, "int")
        self.bld.bounds["image"][:] = self.pixel_max
        return shape, per[:, 0]

    def _BipolarQuant(self, node):
        v = self.value(node, node.input[0])
        scale = np.asarray(self.const(node, node.input[1]), dtype=np.float64)
        if scale.size != 1 or not scale.reshape(-1)[0] > 0:
            self.fail(node, f"a bipolar scale of {scale.reshape(-1)[:4]} (one positive scale "
                            f"per tensor compiles)")
        scale = float(scale.reshape(-1)[0])
        if isinstance(v, _Pixels):
            if self.image is not None:
                self.fail(node, "a second quantizer of the input pixels")
            bits = v.table >= 0
            shape, table = self._pixel_codes(node, v, bits)
            thr = np.zeros(shape[0], np.int64)
            direction = np.zeros(shape[0], np.int64)
            pixels = np.arange(self.pixel_max + 1)
            for c, row in enumerate(table):
                if row.all() or not row.any():
                    thr[c], direction[c] = int(row[0]), 0
                elif np.array_equal(row, pixels >= pixels[row][0]):
                    thr[c], direction[c] = pixels[row][0], 1
                elif np.array_equal(row, pixels <= pixels[row][-1]):
                    thr[c], direction[c] = pixels[row][-1], -1
                else:
                    self.fail(node, f"the binarized input of channel {c} is not a threshold "
                                    f"of the pixel value")
            out = self.tensor(f"{node.name}", shape, "bits")
            self.bld.emit("threshold", node.name, [Slice("image", 0, shape[0])], out, bound=1,
                          params={"threshold": thr, "direction": direction})
            self.input_quant = {"node": node.name, "kind": "bipolar", "scale": scale}
            self.activations.append({"op": node.name, "onnx": node.output[0], "a": None,
                                     "b": None})
            return _Bits(None, scale, v.shape, src=out, onnx=node.output[0])
        if isinstance(v, _Ints):
            return _Bits(v, scale, v.shape, onnx=node.output[0])
        self.fail(node, "a quantizer of binary activations")

    def _Quant(self, node):
        v = self.value(node, node.input[0])
        scale, zero, bit_width = (np.asarray(self.const(node, n)) for n in node.input[1:4])
        a = _attrs(node)
        mode = _mode(a)
        if not isinstance(v, _Pixels):
            self.fail(node, f"a {int(bit_width.reshape(-1)[0])}-bit Quant of activations after "
                            f"the input: only binary activations (BipolarQuant) compile there")
        if self.image is not None:
            self.fail(node, "a second quantizer of the input pixels")
        if scale.size != 1 or zero.size != 1:
            self.fail(node, "per-channel input quantization (one scale and zero point compile)")
        codes, (low, high) = _int_quant(v.table, scale, zero, bit_width, a.get("signed", 1),
                                        a.get("narrow", 0), mode)
        shape, table = self._pixel_codes(node, v, codes)
        # The requantization saturates to the quantizer's clip range: signed or unsigned
        # (after a "ReLU") codes of the quantizer's width.
        bits = int(bit_width.reshape(-1)[0])
        relu = int(not a.get("signed", 1))
        params = {"mul": [], "bias": [], "shift": []}
        for c, row in enumerate(table):
            found = _fit_codes(row.astype(np.int64), bits, relu)
            if found is None:
                self.fail(node, f"no integer multiplier, bias and shift reproduce the input "
                                f"codes of channel {c} for every pixel value")
            for key, value in zip(("mul", "bias", "shift"), found):
                params[key].append(value)
        params = {k: np.asarray(v, np.int64) for k, v in params.items()}
        out = self.tensor(node.name, shape, "int")
        self.bld.emit("requant", node.name, [Slice("image", 0, shape[0])], out,
                      bound=max(abs(low), abs(high)), signed=not relu,
                      attrs={"relu": relu, "bits": bits}, params=params)
        s, z = float(scale.reshape(-1)[0]), float(zero.reshape(-1)[0])
        self.input_quant = {"node": node.name, "kind": "int", "scale": s, "zero_point": z,
                            "bit_width": int(bit_width.reshape(-1)[0]),
                            "signed": int(a.get("signed", 1)),
                            "narrow": int(a.get("narrow", 0)), "rounding_mode": mode}
        return _Ints(out, np.full(shape[0], s), np.full(shape[0], -z * s), v.shape)

    # -- bits ----------------------------------------------------------------------------------

    def bits_tensor(self, node, v):
        """Emit the pending threshold of ``v`` (a :class:`_Bits`); return its bits slice."""
        if v.src is not None:
            return v.src
        ints = v.ints
        thr, direction = q.thresholds(ints.a, ints.b, np.ones_like(ints.a))
        name = f"{ints.src.tensor}.act"
        shape = self.bld.shape(ints.src)
        out = self.tensor(name, shape, "bits")
        self.bld.emit("threshold", name, [ints.src], out, bound=1,
                      params={"threshold": thr, "direction": direction})
        v.src = out
        self.activations.append({"op": name, "onnx": v.onnx, "a": [float(x) for x in ints.a],
                                 "b": [float(x) for x in ints.b]})
        return out

    def flip(self, node, ints, channels):
        """Negate the producer's weights of ``channels`` (a bool mask): ``count' = K - count``
        (binary) or ``acc' = -acc`` (fixed point); returns the new ``(a, b)``."""
        if not channels.any():
            return ints.a, ints.b
        op = ints.producer
        if op is None or op.output.tensor != ints.src.tensor:
            self.fail(node, "a max pool or the logits need the preceding layer's weights "
                            "negated, and these values do not come straight from a layer")
        a, b = ints.a.copy(), ints.b.copy()
        if op.kind == "bconv":
            w = op.params["weight_bits"]
            w[channels] = ~w[channels]
            k = w.shape[1]
            b[channels] = b[channels] + a[channels] * k
        elif op.kind == "conv":
            op.params["weight"][channels] = -op.params["weight"][channels]
        else:  # pragma: no cover - producers are bconv or conv
            self.fail(node, f"cannot negate the weights of a {op.kind}")
        a[channels] = -a[channels]
        return a, b

    def _MaxPool(self, node):
        v = self.value(node, node.input[0])
        a = _attrs(node)
        k = list(a.get("kernel_shape", []))
        strides = list(a.get("strides", [1, 1]))
        pads = list(a.get("pads", [0, 0, 0, 0]))
        if (len(k) != 2 or k[0] != k[1] or len(set(strides)) != 1 or len(set(pads)) > 1
                or a.get("ceil_mode", 0) or any(d != 1 for d in a.get("dilations", [1, 1]))
                or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")):
            self.fail(node, f"a max pool with kernel {k}, strides {strides}, pads {pads} "
                            f"(square kernels, equal strides and pads, no ceil mode or dilation "
                            f"compile)")
        kernel, stride, pad = k[0], strides[0], pads[0] if pads else 0
        if isinstance(v, _Bits):
            if v.src is not None or v.pad:
                self.fail(node, "a max pool of bits that are not the threshold of a layer's "
                                "sums (the device pools integers)")
            ints = v.ints
        elif isinstance(v, _Ints):
            ints = v
        else:
            self.fail(node, "a max pool of the input pixels")
        negative = ints.a < 0
        a_, b_ = self.flip(node, ints, negative)
        name = node.name
        out = self.bld.maxpool(name if name not in self.bld.tensors else f"{name}.1",
                               ints.src, kernel, stride, pad)
        c, h, w = self.bld.shape(out)
        pooled = _Ints(out, a_, b_, (c, h, w))
        if isinstance(v, _Bits):
            return _Bits(pooled, v.scale, (c, h, w), onnx=node.output[0])
        return pooled

    def _Pad(self, node):
        v = self.value(node, node.input[0])
        a = _attrs(node)
        pads = list(self.const(node, node.input[1])) if len(node.input) > 1 \
            else list(a.get("pads", []))
        value = float(self.const(node, node.input[2]).reshape(-1)[0]) \
            if len(node.input) > 2 and node.input[2] else float(a.get("value", 0.0))
        mode = a.get("mode", b"constant")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if not isinstance(v, _Bits) or mode != "constant":
            self.fail(node, "only a constant Pad of binary activations compiles")
        n = len(pads) // 2
        before, after = pads[:n], pads[n:]
        if any(before[:2]) or any(after[:2]) or len(set(before[2:] + after[2:])) != 1:
            self.fail(node, f"pads {pads}: only the same padding on every side of H and W")
        if value != -v.scale:
            self.fail(node, f"padding binary activations of scale {v.scale} with {value}: the "
                            f"array pads with -1 (bit 0), so only {-v.scale} compiles")
        c, h, w = v.shape
        p = int(before[2])
        return _Bits(v.ints, v.scale, (c, h + 2 * p, w + 2 * p), v.src, v.pad + p, v.onnx)

    # -- layers --------------------------------------------------------------------------------

    def binary_weight(self, node, w):
        """``(sign bits (O, K), scale per output channel)`` of a binary weight tensor."""
        w = np.asarray(w, dtype=np.float64)
        flat = w.reshape(w.shape[0], -1)
        s = np.abs(flat).max(axis=1)
        if np.any(s == 0) or np.any(np.abs(flat) != s[:, None]):
            self.fail(node, "weights that are not binary (+-s per output channel); quantize "
                            "them with BipolarQuant (Brevitas' 1-bit weight quantizers)")
        return flat > 0, s

    def _Conv(self, node):
        v = self.value(node, node.input[0])
        w = np.asarray(self.const(node, node.input[1]))
        a = _attrs(node)
        k = list(a.get("kernel_shape", w.shape[2:]))
        strides = list(a.get("strides", [1, 1]))
        pads = list(a.get("pads", [0, 0, 0, 0]))
        if (a.get("group", 1) != 1 or len(k) != 2 or k[0] != k[1] or len(set(strides)) != 1
                or len(set(pads)) > 1 or any(d != 1 for d in a.get("dilations", [1, 1]))
                or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")):
            self.fail(node, f"group {a.get('group', 1)}, kernel {k}, strides {strides}, pads "
                            f"{pads}: ungrouped square kernels with equal strides and pads and "
                            f"no dilation compile")
        kernel, stride, pad = k[0], strides[0], pads[0] if pads else 0
        bias = None
        if len(node.input) > 2 and node.input[2]:
            bias = np.asarray(self.const(node, node.input[2]), dtype=np.float64)
        wbits, ws = self.binary_weight(node, w)
        if isinstance(v, _Bits):
            if pad:
                self.fail(node, "an ONNX Conv pads with 0, which is neither +1 nor -1; the "
                                "array pads binary activations with -1 (pad with a Pad node of "
                                "value -1 instead)")
            src = self.bits_tensor(node, v)
            out = self.bld.bconv(self.name(node), src, wbits, kernel, stride, v.pad)
            fan_in = wbits.shape[1]
            a_out = 2 * v.scale * ws
            b_out = -fan_in * v.scale * ws + (0 if bias is None else bias)
            return _Ints(out, a_out, b_out, self.bld.shape(out), self.bld.ops[-1])
        if isinstance(v, _Ints):
            if np.any(v.a != v.a[0]):
                self.fail(node, "input channels of different scales")
            if pad and np.any(v.b != 0):
                self.fail(node, "zero padding of values with a zero point")
            weight = np.where(wbits, 1, -1).astype(np.int8).reshape(w.shape)
            _, h, wd = self.bld.shape(v.src)
            oh, ow = (h + 2 * pad - kernel) // stride + 1, (wd + 2 * pad - kernel) // stride + 1
            bound = int(np.max(self.bld.bounds[v.src.tensor])) * wbits.shape[1]
            bits = bound.bit_length() + 1
            name = self.name(node)
            out = self.tensor(name, (w.shape[0], oh, ow), "int")
            o = w.shape[0]
            self.bld.emit("conv", name, [v.src], out, bound=bound, signed=True,
                          attrs={"kernel": kernel, "stride": stride, "padding": pad, "groups": 1,
                                 "relu": 0, "bits": bits},
                          params={"weight": weight, "mul": np.ones(o, np.int64),
                                  "bias": np.zeros(o, np.int64), "shift": np.zeros(o, np.int64)})
            sums = weight.reshape(o, -1).sum(axis=1)
            a_out = v.a[0] * ws
            b_out = v.b[0] * ws * sums + (0 if bias is None else bias)
            return _Ints(out, a_out, b_out, (o, oh, ow), self.bld.ops[-1])
        self.fail(node, "a convolution of the unquantized input (quantize it first)")

    def name(self, node):
        return node.name if node.name and node.name not in self.bld.tensors \
            else f"{node.op_type}.{len(self.bld.ops)}"

    def _dense(self, node, w, bias):
        v = self.value(node, node.input[0])
        if not isinstance(v, _Bits):
            self.fail(node, "a fully connected layer of anything but binary activations")
        if len(v.shape) != 1:
            self.fail(node, f"activations of shape {v.shape} (flatten them first)")
        wbits, ws = self.binary_weight(node, w)
        src = self.bits_tensor(node, v)
        c, h, wd = self.bld.shape(src)
        if h != wd or v.pad:
            self.fail(node, f"a {c}x{h}x{wd} map flattened (only square maps, as a kernel)")
        if wbits.shape[1] != c * h * wd:
            self.fail(node, f"weights of {wbits.shape[1]} inputs for {c * h * wd} activations")
        out = self.bld.bconv(self.name(node), src, wbits, h, 1, 0)
        fan_in = wbits.shape[1]
        a_out = 2 * v.scale * ws
        b_out = -fan_in * v.scale * ws + (0 if bias is None else bias)
        return _Ints(out, a_out, b_out, (wbits.shape[0],), self.bld.ops[-1])

    def _Gemm(self, node):
        a = _attrs(node)
        if a.get("transA", 0):
            self.fail(node, "transA = 1")
        w = np.asarray(self.const(node, node.input[1]), dtype=np.float64) * a.get("alpha", 1.0)
        if not a.get("transB", 0):
            w = w.T
        bias = None
        if len(node.input) > 2 and node.input[2]:
            bias = np.asarray(self.const(node, node.input[2]), dtype=np.float64).reshape(-1)
            bias = np.broadcast_to(bias * a.get("beta", 1.0), (w.shape[0],)).copy()
        return self._dense(node, w, bias)

    def _MatMul(self, node):
        w = np.asarray(self.const(node, node.input[1]), dtype=np.float64)
        if w.ndim != 2:
            self.fail(node, f"a weight of shape {w.shape} (a 2-D matrix compiles)")
        return self._dense(node, w.T, None)

    # -- the end -------------------------------------------------------------------------------

    def finish(self, v, out_name):
        last = self.graph.node[-1]
        if not isinstance(v, _Ints):
            self.fail(last, f"the graph output {out_name!r} must be the sums or counts of a "
                            f"layer (optionally scaled), not {type(v).__name__[1:].lower()}")
        a, b = v.a, v.b
        if np.any(a != a[0]) or np.any(b != b[0]):
            self.fail(last, "the output's scale or offset differs between classes, so the "
                            "argmax of the counts is not the argmax of the output")
        if a[0] < 0:
            a, b = self.flip(last, v, np.ones(a.size, bool))
        if self.image is None:
            self.fail(last, "the input is never quantized")
        logits = v.src.tensor
        self.bld.tensors[logits].scale[:] = a
        program = self.bld.finish("image", logits)
        return program, {"scale": float(a[0]), "offset": float(b[0])}


def _fit_codes(codes, bits, relu):
    """``(mul, bias, shift)`` with ``sat(rq(p * mul + bias))`` (``bits`` bits, unsigned when
    ``relu``, round half up) equal to ``codes[p]`` for every pixel value ``p``, or ``None``;
    ``mul`` fits the device's PARAM multiplier field. Each candidate is checked on every pixel
    value with :func:`.golden.requantize`."""
    pixels = np.arange(codes.size, dtype=np.int64)
    low, high = q.integer_range(bits, relu)
    inner = (codes > low) & (codes < high)
    mul_low, mul_high = isa.PARAM.range("mul")
    if not inner.any():
        inner = np.ones_like(codes, bool)
    slope = np.polyfit(pixels[inner], codes[inner], 1)[0] if inner.sum() > 1 else 0.0
    for shift in range(q.MAX_SHIFT + 1):
        factor = 1 << shift
        centre = int(np.floor(slope * factor + 0.5))
        for mul in sorted(range(centre - 2, centre + 3), key=lambda m: abs(m - centre)):
            if not mul_low <= mul <= mul_high:
                continue
            # Round half up: code - 1/2 <= (p mul + bias) / 2**shift < code + 1/2.
            lo = np.max((2 * codes[inner] - 1) * factor // 2 - pixels[inner] * mul
                        + ((2 * codes[inner] - 1) * factor % 2 != 0))
            hi = np.min(-(-((2 * codes[inner] + 1) * factor) // 2) - pixels[inner] * mul) - 1
            for bias in (lo, hi, (lo + hi) // 2):
                if lo > hi:
                    break
                v = torch.as_tensor(pixels * mul + bias).view(1, -1, 1, 1)
                y = requantize(v, np.array([shift]), relu, bits).view(-1).numpy()
                if np.array_equal(y, codes):
                    return int(mul), int(bias), int(shift)
    return None


def graph_input(raw, pixel_max=PIXEL_MAX):
    """The float32 graph input for raw pixels: ``float32(raw) / float32(pixel_max)``."""
    return np.asarray(raw, dtype=np.float32) / np.float32(pixel_max)


def raw_to_input(artifact, raw):
    """Raw images ``(N, C, H, W)`` reshaped to the program's input (``(C*H*W, 1, 1)`` for a
    network that flattens its input before the first quantizer)."""
    program = getattr(artifact, "program", artifact)
    shape = program.tensors[program.input].shape
    raw = np.asarray(raw)
    return raw.reshape(raw.shape[0], *shape)


def lower_onnx(model, config, *, pixel_max=PIXEL_MAX):
    """``(program, info)`` for a QONNX model (an ``onnx.ModelProto`` or a path); ``info`` holds
    the input shape, the input quantizer, the logits' ``scale`` and ``offset`` and
    ``activations``: per ``threshold`` op of the program the graph tensor it equals (``onnx``,
    +-scale where the bit is 1/0, flattened alike) and the ``a``, ``b`` per channel of
    ``real = a * stored + b`` that the bit is the sign of (``None`` for the input's).
    """
    onnx = _onnx()
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    low = _Lowering(model, config, pixel_max)
    program, logits = low.run()
    return program, {"input_shape": list(low.input_shape), "input_quant": low.input_quant,
                     "logits": logits, "activations": low.activations}


def compile_onnx(model, config, *, pixel_max=PIXEL_MAX, class_names=None):
    """Compile a QONNX model (a path or an ``onnx.ModelProto``) for ``config``.

    The graph input is taken to be ``float32(raw) / float32(pixel_max)`` for raw pixels
    ``0 .. pixel_max`` (mean 0, std ``pixel_max`` in the artifact's preprocessing). The
    artifact's ``preprocessing["qonnx"]`` records the graph's input shape, the input quantizer
    and the logits' scale and offset (``real = scale * logit + offset``); the program's input
    is ``(C*H*W, 1, 1)`` when the graph flattens the image before quantizing it
    (:func:`raw_to_input` reshapes raw images).

    Raises
    ------
    CompileError
        A node cannot be mapped (the message names it, its op type and why), or the program
        does not fit ``config``.
    """
    program, info = lower_onnx(model, config, pixel_max=pixel_max)
    total = check_hardware(program, config)
    offsets, _ = plan_memory(program)
    stats = layer_stats(program, config)
    channels, size, _ = info["input_shape"]
    classes = program.tensors[program.logits].shape[0]
    hardware = {
        "rows": config.rows, "cols": config.cols, "lane": config.lane,
        "max_depth": max((s.k_bits for s in stats), default=0),
        "activation_bytes": total,
        "weight_bytes": max((s.weight_bytes for s in stats), default=0),
    }
    pre = {"mean": [0.0] * channels, "std": [float(pixel_max)] * channels,
           "pixel_range": [0, int(pixel_max)], "input_size": int(size),
           "in_channels": int(channels), "layout": "NCHW",
           "qonnx": {"graph_input": f"float32(raw) / {int(pixel_max)}",
                     "program_input_shape": list(program.tensors[program.input].shape),
                     **info}}
    names = [str(i) for i in range(classes)] if class_names is None else list(class_names)
    if len(names) != classes:
        raise CompileError(f"{len(names)} class names for {classes} classes")
    return Artifact(program, hardware, pre, names,
                    {name: list(v) for name, v in offsets.items()})


#: A threshold compare is a tie where ``|a x + b| <= TIE_TOLERANCE * (|a x| + |b|)``: the
#: reference's float32 pre-activation sits on the threshold up to its rounding.
TIE_TOLERANCE = 2.0 ** -20


def compare_with_reference(artifact, model, raw, *, pixel_max=PIXEL_MAX):
    """Run ``artifact`` (the golden model) and qonnx's ``execute_onnx`` on ``model`` (a path or
    a ``ModelWrapper``) for raw images ``(N, C, H, W)``, one image at a time for qonnx.

    Returns a dict: ``images``; ``top1_agreements`` (our argmax of the logits equal to the
    reference's argmax of the graph output); ``predictions`` and ``reference_predictions``
    (int arrays); ``activations``: per threshold op ``{op, onnx, elements, mismatches, ties,
    mismatches_at_ties}`` comparing our bits with the reference's tensor (+1 where positive)
    elementwise; a tie is a position whose exact pre-activation ``a x + b`` (``x`` our stored
    integer) is 0 up to :data:`TIE_TOLERANCE`; and the totals ``bits_compared``,
    ``bit_mismatches``, ``ties``, ``mismatches_at_ties``.
    """
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx

    from . import golden
    wrapper = model if isinstance(model, ModelWrapper) else ModelWrapper(str(model))
    program = artifact.program
    qinfo = artifact.preprocessing["qonnx"]
    raw = np.asarray(raw)
    logits, steps = golden.run(program, torch.as_tensor(raw_to_input(artifact, raw)),
                               return_intermediates=True)
    ours = logits.numpy().argmax(axis=1)
    by_name = {op.name: op for op in program.ops}
    writer = {op.output.tensor: op.name for op in program.ops}
    records = []
    for act in qinfo["activations"]:
        op = by_name[act["op"]]
        x = None
        if act["a"] is not None:
            x = steps[writer[op.inputs[0].tensor]].numpy()
            a = np.asarray(act["a"]).reshape(1, -1, 1, 1)
            b = np.asarray(act["b"]).reshape(1, -1, 1, 1)
            tie = np.abs(a * x + b) <= TIE_TOLERANCE * (np.abs(a * x) + np.abs(b))
        else:
            tie = np.zeros(steps[op.name].shape, bool)
        records.append({"op": act["op"], "onnx": act["onnx"], "ours": steps[op.name].numpy(),
                        "tie": tie, "elements": 0, "mismatches": 0, "ties": int(tie.sum()),
                        "mismatches_at_ties": 0})
    in_name = wrapper.graph.input[0].name
    out_name = wrapper.graph.output[0].name
    reference = np.zeros(len(raw), np.int64)
    for i in range(len(raw)):
        context = execute_onnx(wrapper, {in_name: graph_input(raw[i:i + 1], pixel_max)},
                               return_full_exec_context=True)
        reference[i] = int(np.argmax(context[out_name].reshape(-1)))
        for rec in records:
            ref = context[rec["onnx"]].reshape(-1) > 0
            mine = rec["ours"][i].reshape(-1) == 1
            wrong = ref != mine
            rec["elements"] += ref.size
            rec["mismatches"] += int(wrong.sum())
            rec["mismatches_at_ties"] += int((wrong & rec["tie"][i].reshape(-1)).sum())
    for rec in records:
        del rec["ours"], rec["tie"]
    return {
        "images": len(raw), "top1_agreements": int((ours == reference).sum()),
        "predictions": ours, "reference_predictions": reference, "activations": records,
        "bits_compared": sum(r["elements"] for r in records),
        "bit_mismatches": sum(r["mismatches"] for r in records),
        "ties": sum(r["ties"] for r in records),
        "mismatches_at_ties": sum(r["mismatches_at_ties"] for r in records),
    }
