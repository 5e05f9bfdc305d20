"""Code generation: a compiled :class:`~.ir.Program` -> the descriptors and memory images that
the device executes (the instruction set of :mod:`sw.isa`).

:func:`generate` allocates every tensor in the device's memories, maps each op onto one
:data:`sw.isa.DESCRIPTOR` (``FIXED`` or ``BCONV``), and lays out the op's data (binary weights in
WEIGHTS, fixed-point weights and coefficients in COEFS, one :data:`sw.isa.PARAM` record per
output channel in PARAMS). :mod:`sim.isa_model` executes the result; it must equal
:func:`sw.compile.golden.run` bit for bit.

Memories (attributes of a :class:`hw.config.DeviceConfig`, or of a device's INFO reply)
-----------------------------------------------------------------------------------------
* INTS (``int_depth`` elements of ``element_width`` signed bits): every ``int`` tensor, channel
  planes (:mod:`sw.isa`). Each tensor must fit ``element_width`` signed bits (its
  :attr:`~.ir.TensorSpec.bits`, plus a sign bit when it is unsigned).
* BITS (``bits_depth`` words of ``lane`` bits): every ``bits`` tensor, pixel major,
  ``ceil(C / lane)`` words per pixel.
* Both are allocated like :func:`.plan.plan_memory`: a tensor lives from the op that first
  writes it to the last op that reads it (the input from the start, the logits to the end);
  first fit in order of first write, so tensors with disjoint lifetimes share addresses.
* WEIGHTS (``weight_depth`` words of ``rows * lane`` bits), COEFS (``coef_depth`` signed
  :data:`COEF_WIDTH`-bit words) and PARAMS (``param_depth`` :data:`~sw.isa.PARAM` records) hold
  the ops' data. When it does not all fit, the program is split into **segments** of
  consecutive ops whose data fits; each segment's data starts at address 0 and the host loads
  it before the segment runs (weight streaming). Binary convs of one segment with identical
  weights (ABC-Net's activation bases) share one WEIGHTS block. An op whose own data does not
  fit is first split along its output channels into ops that do (:mod:`.split`).
* PROGRAM (``program_depth`` descriptors): all ops' descriptors, loaded once.

Memory images are lists of unsigned words as the host writes them: WEIGHTS words of
:func:`sw.packing.pack_weights`, COEFS words as ``COEF_WIDTH``-bit two's complement, PARAMS words
of :meth:`sw.isa.PARAM.pack`.
"""

import dataclasses
import typing

import numpy as np

from sw import isa, packing

from .lower import CompileError
from .plan import first_fit, lifetimes
from .split import split_activation, split_for_memories

__all__ = [
    "COEF_WIDTH", "DeviceProgram", "Geometry", "OpInfo", "Segment",
    "encode_threshold", "fit_requant", "generate",
]

#: Signed width of a COEFS word (int8 conv weights and ABC-Net coefficients).
COEF_WIDTH = 8
#: Memories a segment loads, in the order its writes list them.
SEGMENT_MEMORIES = ("WEIGHTS", "COEFS", "PARAMS")


def _ceil_div(a, b):
    return -(-a // b)


@dataclasses.dataclass(frozen=True)
class Geometry:
    """The device parameters code generation depends on (see the module documentation)."""
    rows: int
    cols: int
    lane: int
    max_depth: int
    weight_depth: int
    element_width: int
    int_depth: int
    bits_depth: int
    coef_depth: int
    param_depth: int
    program_depth: int
    #: At least this many fixed-point lanes (0: as many as the columns need; the unit has
    #: :func:`sw.isa.int_banks` ``(cols, fixed_lanes)``); only cycle counts depend on it.
    fixed_lanes: int = 0
    #: Output channels a ``parallel`` FIXED op computes at once (:func:`sw.isa.parallel_ok`;
    #: its COEFS are laid out for it): convs that allow it are generated parallel.
    fixed_channels: int = 1

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            least = 0 if field.name == "fixed_lanes" else 1
            if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
                    or value < least):
                what = "a positive integer" if least else "an integer >= 0"
                raise ValueError(f"{field.name} must be {what}, not {value!r}")
        # Encoded thresholds lie in the element range and must fit PARAM's 32-bit field; the
        # reference model computes in int64, so elements times multipliers stay far below
        # 2**63 (hw.config.DeviceConfig allows 8..32 as well).
        if not 2 <= self.element_width <= 32:
            raise ValueError(f"element_width must be between 2 and 32, not {self.element_width}")

    @classmethod
    def from_config(cls, config):
        """Read a :class:`hw.config.DeviceConfig`-like object."""
        values = {}
        for field in dataclasses.fields(cls):
            if hasattr(config, field.name):
                values[field.name] = getattr(config, field.name)
            elif field.name != "fixed_channels":
                # (A device from before fixed_channels computes one channel at a time.)
                raise ValueError(f"config has no attribute {field.name!r}")
        return cls(**values)

    @property
    def weight_width(self):
        return self.rows * self.lane


class Segment(typing.NamedTuple):
    """Consecutive ops ``first .. first + count - 1`` and the data the host loads before them:
    ``writes`` is a list of ``(memory name, address, list of words)``."""
    first: int
    count: int
    writes: list


@dataclasses.dataclass
class OpInfo:
    """One op as generated.

    Members
    -------
    name, kind : str
        The program op's.
    opcode : sw.isa.Opcode
    fields : dict
        The descriptor's fields (``DESCRIPTOR`` names; the others are 0).
    segment : int
        Index into :attr:`DeviceProgram.segments`.
    weight_words, coef_words, param_words : int
        The data the op needs in each memory (``weight_words`` 0 when it shares the previous
        op's block).
    cycles : int
        The op's cycle counter on the device (:func:`sw.isa.op_cycles`: the units' exact
        timing plus the sequencer's cycles).
    """
    name: str
    kind: str
    opcode: isa.Opcode
    fields: dict
    segment: int
    weight_words: int
    coef_words: int
    param_words: int
    cycles: int


@dataclasses.dataclass
class DeviceProgram:
    """What the device executes.

    Members
    -------
    geometry : Geometry
    descriptors : list of int
        One :data:`sw.isa.DESCRIPTOR` per op, for PROGRAM addresses ``0 ..``.
    ops : list of OpInfo
    segments : list of Segment
        In execution order, covering every op once.
    input_base : int
        Address of the raw image, ``input_shape = (C, H, W)``: in INTS as channel planes, or
        with ``input_memory`` ``"BITS"`` a BITS word address of the image as bit-planes
        (:func:`sw.packing.pack_bitplanes`; :meth:`input_words` makes either).
    input_shape : tuple
    logits_base, logits_count : int
        INTS addresses of the logits.
    allocation : dict
        ``{tensor: (memory name, base, size)}`` (INTS elements or BITS words).
    ints_used, bits_used : int
        Peak addresses used in INTS and BITS.
    input_memory : str
        ``"INTS"``, or ``"BITS"`` when the first layer runs as bit-planes (``bitplanes``).
    bitplanes : str or None
        The ``conv`` op that runs on the array as bit-planes (its ``input`` op is a NOP and
        the raw image goes to BITS), or None.
    bitplane_fallback : str or None
        Why no ``conv`` runs as bit-planes, where the program has an ``input`` op followed by
        a conv (None when one does or there is none).
    program : sw.compile.ir.Program
        The program generated: the one given, with the ops whose data did not fit a memory
        split along their output channels (:mod:`.split`); :attr:`ops` follow its ops.
    split : dict
        ``{op name: [piece names]}`` of the ops split.
    convs_to_bits : tuple of str
        The fixed-point ``conv`` ops that write their threshold's bits themselves (post
        THRESHOLD on the accumulator; the threshold op is a NOP and the conv's output is not
        stored).
    fused : dict
        ``{conv: (threshold, maxpool or None)}``: the binary convs (a ``bconv`` or the
        bit-plane conv) that write their threshold's bits themselves (a BCONV with a THRESHOLD
        post, :data:`sw.isa.BCONV_POST`, pooling with a 2x2 max pool between them); the
        threshold and the pool are NOP descriptors and their inputs are not stored.
    fusion_fallback : dict
        ``{conv: reason}``: why a binary conv whose counts reach a threshold or a max pool
        still writes them to INTS.
    requants_after_pools : dict
        ``{requant: maxpool}``: the requant ops whose max pool reads their input and
        requantizes its maxima instead (post REQUANT); the requant is a NOP descriptor and its
        output is not stored.
    lifetimes : dict
        ``{tensor: (first op, last op)}`` as allocated (:func:`.plan.lifetimes`, the raw image
        living until the bit-plane conv reads it): the tensors live across a segment start
        are those a batch carries (:class:`sw.runtime.Accelerator`).
    """
    geometry: Geometry
    descriptors: list
    ops: list
    segments: list
    input_base: int
    input_shape: tuple
    logits_base: int
    logits_count: int
    allocation: dict
    ints_used: int
    bits_used: int
    input_memory: str = "INTS"
    bitplanes: str = None
    bitplane_fallback: str = None
    lifetimes: dict = None
    program: object = None
    split: dict = dataclasses.field(default_factory=dict)
    convs_to_bits: tuple = ()
    fused: dict = None
    fusion_fallback: dict = None
    requants_after_pools: dict = dataclasses.field(default_factory=dict)

    def input_words(self, image):
        """The words of one raw image ``(C, H, W)`` for ``input_memory`` at ``input_base``:
        bit-plane BITS words, or INTS elements as unsigned ``element_width``-bit words.

        Raises
        ------
        ValueError
            If the image has the wrong shape or pixels the memory cannot hold (bit-planes:
            outside ``0 .. 255``; INTS: outside the signed element range).
        """
        image = np.asarray(image)
        if image.shape != tuple(self.input_shape):
            raise ValueError(f"image must have shape {tuple(self.input_shape)}, not "
                             f"{image.shape}")
        if image.dtype.kind == "f" and not np.array_equal(image, np.round(image)):
            raise ValueError("image must hold raw integer pixels, not normalized values")
        flat = image.astype(np.int64)
        if self.input_memory == "BITS":
            if flat.size and (flat.min() < 0 or flat.max() > 255):
                raise ValueError(f"image pixels must lie in [0, 255] (the first layer, "
                                 f"{self.bitplanes}, runs as bit-planes)")
            return packing.pack_bitplanes(flat, self.geometry.lane)
        width = self.geometry.element_width
        low, high = -(1 << (width - 1)), (1 << (width - 1)) - 1
        if flat.size and (flat.min() < low or flat.max() > high):
            raise ValueError(f"image pixels must lie in [{low}, {high}]")
        return [int(v) & ((1 << width) - 1) for v in flat.reshape(-1)]

    def summary(self):
        """A per-op table (index, name, kind, opcode, segment, data words, cycles)."""
        header = f"{'#':>3}  {'op':<28} {'kind':<9} {'opcode':<6} {'seg':>3} {'weights':>7} " \
                 f"{'coefs':>6} {'params':>6} {'cycles':>9}"
        lines = [header, "-" * len(header)]
        for index, op in enumerate(self.ops):
            lines.append(f"{index:>3}  {op.name:<28} {op.kind:<9} {op.opcode.name:<6} "
                         f"{op.segment:>3} {op.weight_words:>7} {op.coef_words:>6} "
                         f"{op.param_words:>6} {op.cycles:>9}")
        lines.append("-" * len(header))
        lines.append(f"{len(self.ops)} ops in {len(self.segments)} segment(s); INTS "
                     f"{self.ints_used}/{self.geometry.int_depth} elements, BITS "
                     f"{self.bits_used}/{self.geometry.bits_depth} words; "
                     f"{sum(op.cycles for op in self.ops)} cycles")
        return "\n".join(lines)


def encode_threshold(threshold, direction, value_width):
    """Map a golden ``(threshold, direction)`` to an equivalent pair for signed
    ``value_width``-bit values whose threshold lies in that range (or is the constant 0/1).

    A threshold beyond the range of the stored values (:func:`sw.compile.quantize.thresholds`
    clips bounds to +-2**40) makes the compare constant, so it becomes direction 0 with the
    constant bit. Direction 0 keeps its constant bit (``threshold != 0``).
    """
    threshold, direction = int(threshold), int(direction)
    lo, hi = -(1 << (value_width - 1)), (1 << (value_width - 1)) - 1
    if direction > 0:
        if threshold <= lo:
            return 1, 0
        if threshold > hi:
            return 0, 0
        return threshold, 1
    if direction < 0:
        if threshold >= hi:
            return 1, 0
        if threshold < lo:
            return 0, 0
        return threshold, -1
    return int(threshold != 0), 0


def fit_requant(mul, bias, shift, res_mul=0):
    """An equivalent ``(mul, bias, shift, res_mul)`` whose bias fits the PARAM ``bias`` field.

    :func:`sw.compile.quantize.requant_params` gives a channel without a multiplier (a
    BatchNorm gamma of 0) the largest shift, 40, which scales its bias past the field. Both
    rewrites are exact for every accumulator ``acc`` (``>>`` floors):

    * ``mul == res_mul == 0``: the output is the constant ``(bias + 2**(shift-1)) >> shift``, so
      it becomes the bias with shift 0;
    * ``mul``, ``res_mul`` and ``bias`` all multiples of ``2**j`` (``j <= shift``):
      ``(2**j v + 2**(shift-1)) >> shift == (v + 2**(shift-1-j)) >> (shift - j)``.

    Parameters whose bias fits are returned unchanged.
    """
    low, high = isa.PARAM.range("bias")
    if low <= bias <= high:
        return mul, bias, shift, res_mul
    if mul == 0 and res_mul == 0:
        return 0, (bias + (1 << (shift - 1)) >> shift) if shift else bias, 0, 0
    j = 0
    while j < shift and not (mul | res_mul | bias) & ((2 << j) - 1):
        j += 1
    return mul >> j, bias >> j, shift - j, res_mul >> j


# -- bit-plane first layer ---------------------------------------------------------------------

@dataclasses.dataclass
class _BitPlanes:
    """An ``input`` op and the ``conv`` reading it that run as one bit-plane BCONV.

    The array counts ``a = dot(w, raw) + 255 * n_neg[o]`` (``raw``: the 8-bit image, padding
    0); ``thresholds[op name]`` are the ``(threshold, direction)`` per channel of each
    ``threshold`` op reading the conv's output, rewritten to compare ``a`` instead of the
    golden conv's requantized output (exact: see :func:`_plan_bitplanes`)."""
    input_op: str
    conv: str
    image: str              # the raw image tensor (in BITS as bit-planes)
    x: str                  # the input op's output (not stored)
    y: str                  # the conv's output (the counts in INTS)
    conv_index: int
    count_max: int
    thresholds: dict


def _step(bits):
    """``(threshold, direction)`` of a monotone step ``bits[a]`` over ``a = 0, 1, ...``, or
    None when ``bits`` is not a step."""
    if bits.all() or not bits.any():
        return int(bits[0]), 0
    rising = np.flatnonzero(bits)
    if (np.diff(bits.astype(np.int8)) >= 0).all():
        return int(rising[0]), 1
    if (np.diff(bits.astype(np.int8)) <= 0).all():
        return int(rising[-1]), -1
    return None


def _plan_bitplanes(program, geo):
    """``(plan, reason)``: a :class:`_BitPlanes` when the program's first layer can run on the
    array as bit-planes, else None and why not (None when there is no ``input`` op followed
    by a ``conv``).

    The pattern: the ``input`` op (``x = (raw << shift) - zero``) is the only reader of the
    raw image, an unsigned int tensor of at most 8 bits; its output is read only by one
    ``conv`` with +-1 weights, one group, kernel 1 or 3, stride 1 or 2, padding 0 or 1 (zero
    padding only with ``zero == 0``, since the array pads the raw image with 0), writing a
    whole tensor that no other op writes, that is not the logits and that only ``threshold``
    ops read. The lane must be a multiple of 8, and the largest count ``255 * C * k * k``
    must fit the array's ``max_depth.bit_length()``-bit accumulators.

    The golden conv computes ``acc = 2**shift * (a - 255 * n_neg[o]) - sum(w[o] * zero)``
    (the sum over the kernel, constant without padding), then ``y = rq(acc * mul + bias)``;
    a threshold of ``y`` is a monotone function of ``a`` (``rq`` is monotone and the map
    affine), evaluated at every ``a`` in ``0 .. 255 * C * k * k`` with
    :func:`sw.compile.golden.requantize` itself and rewritten as a compare of ``a`` (or a
    constant bit).
    """
    import torch

    from .golden import requantize

    inputs = [op for op in program.ops if op.kind == "input"]
    if len(inputs) != 1:
        return None, None
    inp = inputs[0]
    index = program.ops.index(inp)
    readers = {}
    writers = {}
    for i, op in enumerate(program.ops):
        for sl in op.inputs:
            readers.setdefault(sl.tensor, []).append(i)
        writers.setdefault(op.output.tensor, []).append(i)
    x = inp.output.tensor
    convs = [i for i in readers.get(x, []) if program.ops[i].kind == "conv"]
    if not convs:
        return None, None
    conv_index = convs[0]
    conv = program.ops[conv_index]

    def no(reason):
        return None, f"{conv.name} runs on the fixed-point unit: {reason}"

    image = program.tensors[program.input]
    if inp.inputs[0].tensor != program.input or readers.get(program.input) != [index]:
        return no("the raw image is read by other ops than the input op")
    if image.kind != "int" or image.signed or image.bits > 8:
        return no(f"the raw image is not unsigned 8-bit ({image.bits} bits"
                  f"{', signed' if image.signed else ''})")
    if geo.lane % packing.PLANES:
        return no(f"the lane ({geo.lane} bits) is not a multiple of {packing.PLANES}")
    if readers[x] != [conv_index] or writers.get(x) != [index]:
        return no(f"the input op's output {x!r} has other readers or writers")
    c = image.shape[0]
    if any(sl.start != 0 or sl.stop != program.tensors[sl.tensor].shape[0]
           for sl in (inp.inputs[0], inp.output, conv.inputs[0])):
        return no("the input op or the conv uses a channel slice")
    a = conv.attrs
    weight = np.asarray(conv.params["weight"]).astype(np.int64)
    k, stride, pad = int(a["kernel"]), int(a["stride"]), int(a["padding"])
    if int(a["groups"]) != 1:
        return no(f"{a['groups']} groups")
    if k not in (1, 3) or stride not in (1, 2) or pad not in (0, 1):
        return no(f"kernel {k}, stride {stride}, padding {pad} (the array's binary conv: "
                  f"kernel 1 or 3, stride 1 or 2, padding 0 or 1)")
    if weight.shape != (conv.output.channels, c, k, k) or not np.isin(weight, (-1, 1)).all():
        return no("its weights are not all +1 or -1")
    zero = np.asarray(inp.params["zero"]).astype(np.int64).reshape(-1)
    shift = int(inp.attrs["shift"])
    if pad and zero.any():
        return no("it pads with zero while the input op subtracts a nonzero mean")
    y = conv.output.tensor
    spec = program.tensors[y]
    if conv.mode != "write" or conv.output.start != 0 or conv.output.stop != spec.shape[0] \
            or writers[y] != [conv_index] or y == program.logits:
        return no(f"its output {y!r} is a slice, added to, written by another op or the logits")
    consumers = readers.get(y, [])
    if not consumers or any(program.ops[i].kind != "threshold" for i in consumers):
        return no(f"its output {y!r} is read by ops other than thresholds")
    count_max = 255 * c * k * k
    acc_width = geo.max_depth.bit_length()
    if count_max >= 1 << acc_width:
        return no(f"its bit-plane counts reach {count_max}, more than the array's {acc_width}-"
                  f"bit accumulators hold (max_depth {geo.max_depth})")

    out_c = weight.shape[0]
    counts = torch.arange(count_max + 1, dtype=torch.int64).view(1, 1, -1, 1)
    n_neg = torch.as_tensor((weight < 0).reshape(out_c, -1).sum(axis=1)).view(1, -1, 1, 1)
    offset = torch.as_tensor((weight * zero.reshape(1, c, 1, 1)).reshape(out_c, -1)
                             .sum(axis=1)).view(1, -1, 1, 1)
    acc = ((counts - 255 * n_neg) << shift) - offset
    p = conv.params
    mul = torch.as_tensor(np.asarray(p["mul"], np.int64)).view(1, -1, 1, 1)
    bias = torch.as_tensor(np.asarray(p["bias"], np.int64)).view(1, -1, 1, 1)
    y_of = requantize(acc * mul + bias, p["shift"], a["relu"], a["bits"])[0, :, :, 0].numpy()
    thresholds = {}
    for i in consumers:
        op = program.ops[i]
        sl = op.inputs[0]
        thr = np.asarray(op.params["threshold"]).reshape(-1)
        direction = np.asarray(op.params["direction"]).reshape(-1)
        rewritten = []
        for ch in range(sl.channels):
            t, d = int(thr[ch]), int(direction[ch])
            if d == 0:
                rewritten.append((t, 0))
                continue
            values = y_of[sl.start + ch]
            step = _step(values >= t if d > 0 else values <= t)
            if step is None:
                return no(f"{op.name}: channel {ch} is not a step of the counts")
            rewritten.append(step)
        thresholds[op.name] = rewritten
    plan = _BitPlanes(inp.name, conv.name, program.input, x, y, conv_index, count_max,
                      thresholds)
    return plan, None


# -- fixed-point conv straight to bits ---------------------------------------------------------

@dataclasses.dataclass
class _ConvToBits:
    """A fixed-point ``conv`` whose requantized output only a ``threshold`` reads: the two run
    as one FIXED op that compares the conv's accumulator (post THRESHOLD) and writes the bits,
    so the requantized values never go to INTS and the threshold op is a NOP.

    ``thresholds``: per output channel ``(threshold, direction)`` of the accumulator, rewritten
    from the threshold op's compare of the requantized value (exact: see
    :func:`_plan_conv_to_bits`)."""
    conv: str
    threshold: str
    y: str                  # the conv's output (not stored)
    bits: object            # the threshold op's output Slice (the fused op writes it)
    conv_index: int
    thresholds: list


def _edge(predicate, low, high, rising):
    """The smallest (``rising``) or largest ``a`` in ``[low, high]`` where the monotone
    ``predicate`` (vectorized over int64 arrays) holds, or None: binary search."""
    if rising:
        if not predicate(np.array([high]))[0]:
            return None
        lo, hi = low, high          # predicate(hi) holds
        while lo < hi:
            mid = (lo + hi) // 2
            if predicate(np.array([mid]))[0]:
                hi = mid
            else:
                lo = mid + 1
        return lo
    if not predicate(np.array([low]))[0]:
        return None
    lo, hi = low, high              # predicate(lo) holds
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if predicate(np.array([mid]))[0]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _plan_conv_to_bits(program, geo, skip=()):
    """``{conv name: _ConvToBits}`` for each fixed-point ``conv`` (not in ``skip``) that can
    write its threshold's bits itself.

    The pattern: the conv writes its whole int tensor ``y`` (mode write, not the logits, no
    other writer), and exactly one op reads ``y``: a ``threshold`` of all of it that writes a
    whole bits tensor no other op writes. The fixed-point unit must compute as many pixels at
    once for the fused op as for the conv alone (:func:`sw.isa.fixed_lanes`: a THRESHOLD
    with stride 2, or with a last BITS word of fewer channels than lanes, runs one pixel at
    a time), so that fusing never makes the conv slower.

    The golden conv computes ``y = rq(acc * mul[o] + bias[o])`` (:func:`.golden.requantize`:
    round half up, saturation), a monotone function of the accumulator ``acc`` (non-decreasing
    for ``mul >= 0``, else non-increasing), so the threshold's bit, ``y >= t`` or ``y <= t``, is
    a monotone step of ``acc`` over the range ``acc`` can take (from the weights and the input
    tensor's width, padding adding 0). The step's edge is found by binary search with
    ``requantize`` itself, and becomes the FIXED op's compare of ``acc`` (or a constant bit).
    """
    import torch

    from .golden import requantize

    readers, writers = program.uses()
    whole = program.is_whole

    plans = {}
    for index, conv in enumerate(program.ops):
        if conv.kind != "conv" or conv.name in skip:
            continue
        y = conv.output.tensor
        users = readers.get(y, [])
        if conv.mode != "write" or not whole(conv.output) or writers[y] != [index] \
                or y == program.logits or len(users) != 1:
            continue
        thr_op = program.ops[users[0]]
        out = thr_op.output.tensor
        if thr_op.kind != "threshold" or users[0] < index or not whole(thr_op.inputs[0]) \
                or thr_op.inputs[0].tensor != y or not whole(thr_op.output) \
                or writers[out] != [users[0]] or program.tensors[out].kind != "bits" \
                or any(index < r < users[0] for r in readers.get(out, [])):
            continue
        src = program.tensors[conv.inputs[0].tensor]
        if src.kind != "int":
            continue
        out_c = conv.output.channels
        shape = {"stride": int(conv.attrs["stride"]), "out_channels": out_c}
        lanes = isa.int_banks(geo.cols, geo.fixed_lanes)
        if isa.fixed_lanes(lanes, geo.lane, dict(shape, post=isa.Post.THRESHOLD,
                                                 out_words=_ceil_div(out_c, geo.lane))) \
                < isa.fixed_lanes(lanes, geo.lane, dict(shape, post=isa.Post.REQUANT,
                                                        out_words=0)):
            continue
        x_low = -(1 << (src.bits - 1)) if src.signed else 0
        x_high = (1 << (src.bits - (1 if src.signed else 0))) - 1
        weight = np.asarray(conv.params["weight"]).astype(np.int64)
        w = weight.reshape(weight.shape[0], -1)
        # Padding terms add 0, so each term lies between 0 and w * x at either end.
        acc_high = np.maximum(np.maximum(w * x_low, w * x_high), 0).sum(axis=1)
        acc_low = np.minimum(np.minimum(w * x_low, w * x_high), 0).sum(axis=1)
        p, a = conv.params, conv.attrs
        thr = np.asarray(thr_op.params["threshold"]).reshape(-1)
        direction = np.asarray(thr_op.params["direction"]).reshape(-1)
        rewritten = []
        for o in range(weight.shape[0]):
            t, d = int(thr[o]), int(direction[o])
            if d == 0:
                rewritten.append((int(t != 0), 0))
                continue
            mul, bias = int(p["mul"][o]), int(p["bias"][o])
            shift = np.asarray([int(p["shift"][o])])

            def bit(acc, mul=mul, bias=bias, shift=shift, t=t, d=d, relu=a["relu"],
                    bits=a["bits"]):
                v = torch.as_tensor(acc * mul + bias).view(1, 1, -1, 1)
                y_of = requantize(v, shift, relu, bits).view(-1).numpy()
                return y_of >= t if d > 0 else y_of <= t

            # The bit as acc grows: rising where y grows towards the compare's side.
            rising = (mul >= 0) == (d > 0)
            edge = _edge(bit, int(acc_low[o]), int(acc_high[o]), rising)
            if edge is None:
                rewritten.append((0, 0))
            else:
                rewritten.append((edge, 1 if rising else -1))
        plans[conv.name] = _ConvToBits(conv.name, thr_op.name, y, thr_op.output, index,
                                       rewritten)
    return plans


# -- binary conv straight to bits -------------------------------------------------------------

@dataclasses.dataclass
class _PoolRequant:
    """A ``requant`` run after the max pool that reads it, as the pool's REQUANT post."""
    requant: str        # the requant op (a NOP descriptor)
    pool: str           # the maxpool op, which reads ``x`` and requantizes its maxima
    x: str              # the requant's input tensor, read by the pool
    y: str              # the requant's output, never stored
    pool_index: int


def _plan_pool_requant(program):
    """``{maxpool name: _PoolRequant}`` for each ``requant`` whose output only a max pool reads.

    The pattern: a ``requant`` (no residual) writes a whole int tensor ``y`` (mode write, not
    the logits, no other writer) from a whole input tensor ``x``, every channel's ``mul`` is
    at least 0, and exactly one op reads ``y``: a ``maxpool`` of all of it (mode write). The
    golden requantization (:func:`.golden.requantize` of ``acc * mul + bias``: round half up,
    saturation, ReLU) is then a non-decreasing function ``f`` of its input, so the maximum of
    ``f`` over a window is ``f`` of the window's maximum (padding never wins either way): the
    pool reads ``x`` and requantizes its maxima (post REQUANT), and the requant op, which
    took one slot per element of the whole map, becomes a NOP. MeliusNet's transitions
    (BatchNorm, then a 2x2 max pool) have this shape.
    """
    readers, writers = program.uses()
    whole = program.is_whole

    plans = {}
    for index, op in enumerate(program.ops):
        if op.kind != "requant" or op.mode != "write" or len(op.inputs) != 1:
            continue
        y = op.output.tensor
        users = readers.get(y, [])
        if not whole(op.output) or writers.get(y) != [index] or y == program.logits \
                or len(users) != 1 or "res_mul" in op.params \
                or np.any(np.asarray(op.params["mul"]) < 0):
            continue
        pool = program.ops[users[0]]
        if pool.kind != "maxpool" or pool.mode != "write" or users[0] < index \
                or len(pool.inputs) != 1 or not whole(pool.inputs[0]):
            continue
        plans[pool.name] = _PoolRequant(requant=op.name, pool=pool.name,
                                        x=op.inputs[0].tensor, y=y, pool_index=users[0])
    return plans


@dataclasses.dataclass
class _Fused:
    """A ``bconv`` (or the bit-plane conv) whose counts only a threshold reads, directly or
    through a 2x2 stride-2 max pool: one BCONV with ``threshold`` (and ``pool``) writes the
    threshold's bits; the threshold and the pool become NOPs and the counts (and the pooled
    counts) are never stored."""
    conv: str
    threshold: str
    pool: str               # the maxpool op, or None
    bits: str               # the threshold's output (written by the BCONV)
    skipped: tuple          # tensors not stored: the counts, the pooled counts
    conv_index: int


def _plan_fusion(program, geo, planes):
    """``(fused, fallback)``: ``{conv name: _Fused}`` for each binary conv the device can run
    straight to bits, and ``{conv name: reason}`` for each one whose counts reach a
    ``threshold`` or a ``maxpool`` but that keeps them in INTS.

    The pattern: a ``bconv`` (or the bit-plane conv of ``planes``) writing (not adding) a
    whole tensor that is not the logits and that no other op writes, read by exactly one op:
    a ``threshold`` of the whole tensor, or a ``maxpool`` (kernel 2, stride 2, no padding) of
    the whole tensor into a whole tensor that only one ``threshold`` reads (whole) and no
    other op writes; the threshold writes a whole bits tensor that no other op writes. The
    device's conditions (``sw.isa.BCONV_FIELDS``): ``rows`` divides ``lane``; with a pool
    ``cols`` is a multiple of 4 and the pooled map at least 1 x 1; the BITS words of a tile
    (:func:`sw.isa.bconv_bits_words`) at most ``max(k_words, rows)``; ``ceil(C / lane)``
    words per pixel fit the 8-bit ``out_words``.
    """
    readers, writers = program.uses()
    whole = program.is_whole

    index_of = {op.name: i for i, op in enumerate(program.ops)}
    fused, fallback = {}, {}
    for i, op in enumerate(program.ops):
        bitplane = planes is not None and op.name == planes.conv
        if op.kind != "bconv" and not bitplane:
            continue
        y = op.output.tensor
        consumers = readers.get(y, [])
        if not any(program.ops[j].kind in ("threshold", "maxpool") for j in consumers):
            continue

        def no(reason, name=op.name):
            fallback[name] = f"{name} writes its counts to INTS: {reason}"

        if op.mode != "write" or writers.get(y) != [i]:
            no(f"its output {y!r} is added to or written by other ops too")
            continue
        if not whole(op.output) or y == program.logits:
            no(f"it writes a channel slice of {y!r} or the logits")
            continue
        if len(consumers) != 1:
            no(f"its counts {y!r} are read by {len(consumers)} ops")
            continue
        j = consumers[0]
        nxt, pool, skipped = program.ops[j], None, [y]
        if not whole(nxt.inputs[0]) or len(nxt.inputs) != 1:
            no(f"{nxt.name} reads a channel slice of {y!r}")
            continue
        if nxt.kind == "maxpool":
            a = nxt.attrs
            if (int(a["kernel"]), int(a["stride"]), int(a["padding"])) != (2, 2, 0):
                no(f"{nxt.name} is not a 2x2 stride-2 max pool without padding (kernel "
                   f"{a['kernel']}, stride {a['stride']}, padding {a['padding']})")
                continue
            pooled = nxt.output.tensor
            if nxt.mode != "write" or not whole(nxt.output) or writers.get(pooled) != [j] \
                    or pooled == program.logits or len(readers.get(pooled, [])) != 1:
                no(f"the pooled counts {pooled!r} are a slice, written by another op, the "
                   f"logits or read by several ops")
                continue
            pool, skipped = nxt, [y, pooled]
            nxt = program.ops[readers[pooled][0]]
            if nxt.kind != "threshold" or not whole(nxt.inputs[0]):
                no(f"the pooled counts {pooled!r} are read by {nxt.name} ({nxt.kind}), not a "
                   f"threshold of the whole tensor")
                continue
        if nxt.kind != "threshold":
            no(f"its counts are read by {nxt.name} ({nxt.kind})")
            continue
        z = nxt.output.tensor
        spec = program.tensors[z]
        if spec.kind != "bits" or not whole(nxt.output) or writers.get(z) != [
                index_of[nxt.name]]:
            no(f"{nxt.name} writes a slice of {z!r}, or {z!r} has other writers")
            continue
        _, oh, ow = program.tensors[y].shape
        if geo.lane % geo.rows:
            no(f"the array's rows ({geo.rows}) do not divide the lane ({geo.lane})")
            continue
        if pool is not None and geo.cols % 4:
            no(f"{pool.name}: pooling inside a tile needs a multiple of 4 columns, not "
               f"{geo.cols}")
            continue
        if pool is not None and (oh < 2 or ow < 2):
            no(f"{pool.name}: a {oh}x{ow} map has no 2x2 pooling window")
            continue
        if bitplane:
            k_words = op.attrs["kernel"] ** 2 * packing.bitplane_channel_words(
                program.tensors[planes.image].shape[0], geo.lane)
        else:
            c = program.tensors[op.inputs[0].tensor].shape[0]
            k_words = op.attrs["kernel"] ** 2 * _ceil_div(c, geo.lane)
        words = isa.bconv_bits_words(geo.cols, pool is not None)
        if words > max(k_words, geo.rows):
            no(f"a tile's {words} BITS words do not leave before the next tile's "
               f"({max(k_words, geo.rows)} cycles)")
            continue
        out_words = _ceil_div(spec.shape[0], geo.lane)
        if out_words >= 1 << {n: w for n, w, _ in isa.FIXED_FIELDS}["out_words"]:
            no(f"{out_words} BITS words per pixel exceed the out_words field")
            continue
        fused[op.name] = _Fused(op.name, nxt.name, pool.name if pool else None, z,
                                tuple(skipped), i)
    return fused, fallback


def _allocate_fused(program, geo, spans, planes, fused, fallback, unstored=()):
    """``(allocation, peaks, spans)`` with the ``fused`` convs' lifetimes: their bits live from
    the conv on (the conv reads its input while it writes them, in every row tile's pass, so
    the two never share addresses), their counts not at all (nor the ``unstored`` tensors).
    Where that overflows BITS (the bits now live beside the conv's input), the first fused
    conv falls back to its INTS counts, with the reason in ``fallback``, until it fits
    (``fused`` is updated); other overflows are raised."""
    while True:
        adjusted = dict(spans)
        for f in fused.values():
            adjusted[f.bits] = (f.conv_index, adjusted[f.bits][1])
            for name in f.skipped:
                adjusted.pop(name, None)
        try:
            allocation, peaks = _allocate(program, geo, adjusted, planes, unstored)
            return allocation, peaks, adjusted
        except _Overflow as error:
            if not fused or error.memory != "BITS":
                raise
            first = min(fused.values(), key=lambda f: f.conv_index)
            del fused[first.conv]
            fallback[first.conv] = (f"{first.conv} writes its counts to INTS: straight to "
                                    f"bits the memories overflow ({error})")


# -- allocation --------------------------------------------------------------------------------

class _Overflow(CompileError):
    """A tensor does not fit its activation memory (``memory``, ``tensor``) after ``placed``
    tensors did (in order of first write)."""

    def __init__(self, message, memory, tensor, placed):
        super().__init__(message)
        self.memory, self.tensor, self.placed = memory, tensor, placed


def _allocate(program, geo, spans, planes=None, unstored=()):
    """``{tensor: (memory, base, size)}`` and the peak of each memory. With a bit-plane plan
    the raw image is a bit-plane tensor in BITS, the input op's output is not stored and the
    conv's output holds the array's counts. The ``unstored`` tensors (outputs of convs that
    write their threshold's bits themselves) get no memory."""
    writer = {}
    for op in program.ops:
        writer.setdefault(op.output.tensor, op.name)
    writer.setdefault(program.input, "input")
    skip = ({planes.x} if planes else set()) | set(unstored)
    for name, spec in program.tensors.items():
        if name not in spans or name in skip:
            continue
        if planes and name == planes.y:
            need = planes.count_max.bit_length() + 1
            if need > geo.element_width:
                raise CompileError(f"{planes.conv}: bit-plane counts up to {planes.count_max} "
                                   f"need {need} signed bits, more than the INTS element_width "
                                   f"of {geo.element_width}")
        elif spec.kind == "int":
            need = spec.bits + (0 if spec.signed else 1)
            if need > geo.element_width:
                raise CompileError(
                    f"{writer.get(name, name)}: tensor {name!r} needs {need} signed bits "
                    f"({spec.bits} {'signed' if spec.signed else 'unsigned'}), more than the "
                    f"INTS element_width of {geo.element_width}")
        elif spec.kind != "bits":
            raise CompileError(f"tensor {name!r}: unknown kind {spec.kind!r}")
    placed = {"INTS": [], "BITS": []}
    depth = {"INTS": geo.int_depth, "BITS": geo.bits_depth}
    allocation = {}
    for name in sorted(spans, key=lambda n: (spans[n][0], n)):
        if name in skip:
            continue
        spec = program.tensors[name]
        start, end = spans[name]
        c, h, w = spec.shape
        if planes and name == program.input:
            memory, size = "BITS", h * w * packing.bitplane_channel_words(c, geo.lane)
        elif spec.kind == "int":
            memory, size = "INTS", c * h * w
        else:
            memory, size = "BITS", h * w * _ceil_div(c, geo.lane)
        offset = first_fit(placed[memory], start, end, size)
        if offset + size > depth[memory]:
            unit = "elements" if memory == "INTS" else "words"
            raise _Overflow(
                f"{writer.get(name, name)}: tensor {name!r} ({size} {unit}) overflows the "
                f"{memory} memory: it would end at {offset + size}, the device has "
                f"{depth[memory]} {unit}", memory, name, len(allocation))
        placed[memory].append((start, end, offset, size))
        allocation[name] = (memory, offset, size)
    peaks = {m: max((off + sz for _, _, off, sz in placed[m]), default=0) for m in placed}
    return allocation, peaks


# -- op mapping --------------------------------------------------------------------------------

@dataclasses.dataclass
class _Lowered:
    opcode: isa.Opcode
    fields: dict            # without the prefixes, without the data bases
    coefs: list = dataclasses.field(default_factory=list)
    params: list = dataclasses.field(default_factory=list)   # PARAM field dicts
    weights: tuple = None   # (key, words) of a bconv
    cycles: int = 0
    post: dict = None       # a bconv straight to bits: its FIXED fields (isa.BCONV_POST)


#: Largest value of the FIXED fields in_w and out_w, plus one.
_FIELD_LIMIT = 1 << min(width for name, width, _ in isa.FIXED_FIELDS
                        if name in ("in_w", "out_w"))


class _Mapper:
    def __init__(self, program, geo, allocation, planes=None, to_bits=None, fused=None,
                 pool_requant=None):
        self.program = program
        self.geo = geo
        self.allocation = allocation
        self.planes = planes
        #: {conv name: _ConvToBits}, and the threshold ops they absorb.
        self.to_bits = to_bits or {}
        self.absorbed = {plan.threshold for plan in self.to_bits.values()}
        #: {conv name: _Fused}, and the threshold and pool ops they absorb.
        self.fused = fused or {}
        self.nops = {name for f in self.fused.values() for name in (f.threshold, f.pool)
                     if name}
        #: {maxpool name: _PoolRequant}, and the requant ops the pools run after them.
        self.pool_requant = pool_requant or {}
        self.hoisted = {plan.requant for plan in self.pool_requant.values()}
        self.ops = {op.name: op for op in program.ops}

    def spec(self, s):
        return self.program.tensors[s.tensor]

    def plane(self, s):
        _, h, w = self.spec(s).shape
        return h * w

    def ints(self, op, s):
        """INTS address of channel ``s.start`` of an int slice."""
        memory, base, _ = self.allocation[s.tensor]
        if memory != "INTS":
            raise CompileError(f"{op.name}: {s.tensor!r} must be an int tensor")
        return base + s.start * self.plane(s)

    def check_shape(self, op, s, oh, ow):
        _, h, w = self.spec(s).shape
        if (h, w) != (oh, ow):
            raise CompileError(f"{op.name}: tensor {s.tensor!r} is {h}x{w}, the op makes "
                               f"{oh}x{ow}")

    def fixed(self, op, *, kernel=1, stride=1, pad=0, terms_c=1, term_stride=None,
              reduce=isa.Reduce.SUM, multiply=0, post=isa.Post.NONE, relu=0, bits=0,
              residual=0, res_base=0, coef_ostride=0, in_offsets, src=None, whole=False):
        """The FIXED fields of an op reading ``src`` (default its first input) and writing its
        output slice (INTS, or BITS for THRESHOLD); ``whole``: a kernel as large as the map."""
        src = src or op.inputs[0]
        _, in_h, in_w = self.spec(src).shape
        kh, kw = (in_h, in_w) if whole else (kernel, kernel)
        out_h = (in_h + 2 * pad - kh) // stride + 1
        out_w = (in_w + 2 * pad - kw) // stride + 1
        if out_h < 1 or out_w < 1:
            raise CompileError(f"{op.name}: a {kh}x{kw} kernel does not fit a {in_h}x{in_w} map")
        self.check_shape(op, op.output, out_h, out_w)
        if (kh, kw, stride, pad) == (1, 1, 1, 0) and 1 < in_h and in_h * in_w < _FIELD_LIMIT:
            # Element-wise over channel planes: the map's pixels are consecutive elements in
            # INTS (and pixel-major words in BITS), so the op may see it as one row. The
            # fixed-point unit's lane groups never cross a row end; one long row keeps its
            # lanes busy on maps narrower than (or not a multiple of) the lanes.
            in_h, in_w, out_h, out_w = 1, in_h * in_w, 1, in_h * in_w
        out_c = op.output.channels
        if post == isa.Post.THRESHOLD:
            out_base = self.allocation[op.output.tensor][1]
            out_words = _ceil_div(out_c, self.geo.lane)
        else:
            out_base, out_words = self.ints(op, op.output), 0
        fields = {
            "reduce": int(reduce), "multiply": multiply, "post": int(post), "relu": relu,
            "bits": bits, "residual": residual, "in_h": in_h, "in_w": in_w, "kernel_h": kh,
            "kernel_w": kw, "stride": stride, "pad": pad, "terms_c": terms_c,
            "term_stride": self.plane(src) if term_stride is None else term_stride,
            "out_channels": out_c, "out_h": out_h, "out_w": out_w, "out_base": out_base,
            "out_plane": out_h * out_w, "out_words": out_words, "coef_ostride": coef_ostride,
            "res_base": res_base, "parallel": 0,
        }
        params = [{"in_offset": int(offset)} for offset in in_offsets]
        return _Lowered(isa.Opcode.FIXED, fields, params=params,
                        cycles=self.fixed_cycles(fields))

    def fixed_cycles(self, fields):
        """A FIXED op's cycle counter on this geometry (:func:`sw.isa.op_cycles`)."""
        geo = self.geo
        return (isa.fixed_cycles(isa.int_banks(geo.cols, geo.fixed_lanes), geo.lane, fields,
                                 channels=geo.fixed_channels)
                + isa.SEQUENCER_CYCLES)

    def parallel(self, op, src, fields, groups):
        """Whether a conv (``fields``, ``groups``) reading ``src`` may compute the device's
        ``fixed_channels`` output channels at once (:func:`sw.isa.parallel_ok`): besides its
        fields, each group of that many channels must lie in one conv group (they share
        ``in_offset``) and, on a device whose elements are wider than the extra channels'
        multipliers take, every input value must fit :data:`sw.isa.PARALLEL_X_BITS`."""
        together = self.geo.fixed_channels
        if not isa.parallel_ok(fields, together):
            return False
        if groups != 1 and (fields["out_channels"] // groups) % together:
            return False
        spec = self.spec(src)
        signed_bits = spec.bits + (0 if spec.signed else 1)
        return (self.geo.element_width <= isa.PARALLEL_X_BITS
                or signed_bits <= isa.PARALLEL_X_BITS)

    @staticmethod
    def requant_params(low, op, channels):
        p = op.params
        for o in range(channels):
            res_mul = int(p["res_mul"][o]) if "res_mul" in p else 0
            mul, bias, shift, res_mul = fit_requant(int(p["mul"][o]), int(p["bias"][o]),
                                                    int(p["shift"][o]), res_mul)
            low.params[o].update(mul=mul, bias=bias, shift=shift, res_mul=res_mul)

    def lower(self, op):
        kind = op.kind
        if op.mode != "write" and not (kind == "bconv" and op.mode == "add"):
            raise CompileError(f"{op.name}: mode {op.mode!r} is not supported for a {kind} "
                               f"(only a bconv may add into its output)")
        if self.planes is not None:
            if op.name == self.planes.input_op:
                # The host writes the raw image as bit-planes; nothing to compute.
                return _Lowered(isa.Opcode.NOP, {}, cycles=isa.SEQUENCER_CYCLES - 1)
            if op.name == self.planes.conv:
                return self._bitplane_conv(op)
        if op.name in self.to_bits:
            return self._conv(op, self.to_bits[op.name])
        if op.name in self.absorbed:
            # The conv before it wrote its bits (_plan_conv_to_bits).
            return _Lowered(isa.Opcode.NOP, {}, cycles=isa.SEQUENCER_CYCLES - 1)
        if op.name in self.nops:
            # Fused into the binary conv before it, which writes the threshold's bits.
            return _Lowered(isa.Opcode.NOP, {}, cycles=isa.SEQUENCER_CYCLES - 1)
        if op.name in self.hoisted:
            # The max pool after it requantizes its maxima (_plan_pool_requant).
            return _Lowered(isa.Opcode.NOP, {}, cycles=isa.SEQUENCER_CYCLES - 1)
        method = getattr(self, f"_{kind}", None)
        if method is None:
            raise CompileError(f"{op.name}: the device has no operation {kind!r}")
        if kind not in ("combine",) and len(op.inputs) != 1:
            raise CompileError(f"{op.name}: a {kind} takes one input, not {len(op.inputs)}")
        if kind not in ("threshold",) and self.spec(op.output).kind != "int":
            raise CompileError(f"{op.name}: the output of a {kind} must be an int tensor")
        return method(op)

    def _elementwise_offsets(self, op):
        src = op.inputs[0]
        if src.channels != op.output.channels:
            raise CompileError(f"{op.name}: {src.channels} input channels, "
                               f"{op.output.channels} output channels")
        base, plane = self.ints(op, src), self.plane(src)
        return [base + o * plane for o in range(src.channels)]

    def _input(self, op):
        low = self.fixed(op, post=isa.Post.REQUANT, bits=self.geo.element_width,
                         in_offsets=self._elementwise_offsets(op))
        zero = np.asarray(op.params["zero"]).reshape(-1)
        for o, param in enumerate(low.params):
            # (x << shift) - zero as a requantization without rounding: mul 2**shift, shift 0.
            param.update(mul=1 << int(op.attrs["shift"]), bias=-int(zero[o]), shift=0)
        return low

    def _conv(self, op, to_bits=None):
        """A fixed-point conv; with ``to_bits`` (a :class:`_ConvToBits`) it compares its
        accumulator with the rewritten thresholds and writes the threshold op's bits."""
        a, src = op.attrs, op.inputs[0]
        weight = np.asarray(op.params["weight"])
        out_c, per_group, k, k2 = weight.shape
        groups = int(a["groups"])
        if k != k2 or k != a["kernel"]:
            raise CompileError(f"{op.name}: weights of shape {weight.shape} do not match kernel "
                               f"{a['kernel']}")
        if out_c != op.output.channels or src.channels != per_group * groups \
                or out_c % groups:
            raise CompileError(f"{op.name}: weights of shape {weight.shape} do not match "
                               f"{src.channels} -> {op.output.channels} channels in {groups} "
                               f"groups")
        base, plane = self.ints(op, src), self.plane(src)
        offsets = [base + (o // (out_c // groups)) * per_group * plane for o in range(out_c)]
        common = {"kernel": k, "stride": int(a["stride"]), "pad": int(a["padding"]),
                  "terms_c": per_group, "multiply": 1, "coef_ostride": per_group * k * k,
                  "in_offsets": offsets}
        if to_bits is None:
            low = self.fixed(op, post=isa.Post.REQUANT, relu=int(a["relu"]),
                             bits=int(a["bits"]), **common)
            self.requant_params(low, op, out_c)
        else:
            low = self.fixed(dataclasses.replace(op, output=to_bits.bits),
                             post=isa.Post.THRESHOLD, src=src, **common)
            thr, direction = np.array(to_bits.thresholds, np.int64).reshape(-1, 2).T
            # The accumulator's compare (no element_width clipping: it is not stored).
            self.threshold_params(low, op, thr, direction, width=None)
        # Flattened (o, tc, ky, kx): term t = (tc * k + ky) * k + kx of output o.
        terms = weight.reshape(out_c, -1)
        if to_bits is None and self.parallel(op, src, low.fields, groups):
            # A term's coefficients of a group of `together` channels are one COEFS run
            # (channels past out_c in the last group: 0, never written).
            together = self.geo.fixed_channels
            n_terms = terms.shape[1]
            padded = np.zeros((_ceil_div(out_c, together) * together, n_terms), np.int64)
            padded[:out_c] = terms
            low.fields.update(parallel=1, coef_ostride=together * n_terms)
            low.cycles = self.fixed_cycles(low.fields)
            terms = padded.reshape(-1, together, n_terms).transpose(0, 2, 1)
        low.coefs = [int(v) for v in terms.reshape(-1)]
        return low

    def _requant(self, op):
        low = self.fixed(op, post=isa.Post.REQUANT, relu=int(op.attrs["relu"]),
                         bits=int(op.attrs["bits"]), in_offsets=self._elementwise_offsets(op))
        self.requant_params(low, op, op.output.channels)
        return low

    def _threshold(self, op):
        spec = self.spec(op.output)
        if spec.kind != "bits" or op.output.start != 0 or op.output.stop != spec.shape[0]:
            raise CompileError(f"{op.name}: a threshold must write a whole bits tensor")
        low = self.fixed(op, post=isa.Post.THRESHOLD, in_offsets=self._elementwise_offsets(op))
        thr = np.asarray(op.params["threshold"]).reshape(-1)
        direction = np.asarray(op.params["direction"]).reshape(-1)
        if self.planes is not None and op.name in self.planes.thresholds:
            # It compares the bit-plane conv's counts (_plan_bitplanes).
            thr, direction = np.array(self.planes.thresholds[op.name], np.int64).T
        self.threshold_params(low, op, thr, direction, width=self.geo.element_width)
        return low

    @staticmethod
    def threshold_params(low, op, thr, direction, width):
        """PARAM ``threshold``/``direction`` per channel; ``width``: the compared values'
        signed width (thresholds beyond it become constants), None for an accumulator."""
        low_t, high_t = isa.PARAM.range("threshold")
        for o, param in enumerate(low.params):
            t, d = int(thr[o]), int(direction[o])
            if d == 0:
                t = int(t != 0)
            elif width is not None:
                t, d = encode_threshold(t, d, width)
            if not low_t <= t <= high_t:
                raise CompileError(f"{op.name}: channel {o}'s threshold {t} does not fit the "
                                   f"PARAM threshold field [{low_t}, {high_t}]")
            param.update(threshold=t, direction=d)

    def fuse(self, op, fields, weights):
        """The BCONV of a binary conv (``fields``: its BCONV fields but ``out_base``); for a
        fused one (:func:`_plan_fusion`) straight to its threshold's bits: the threshold's
        settings in the descriptor's FIXED half (:data:`sw.isa.BCONV_POST`, ``param_base``
        added by :func:`_generate`) and one PARAMS record per channel, the threshold op's
        compare encoded as for the fixed-point unit (the counts, below ``2**acc_width``, are
        inside the ``element_width`` range; the bit-plane conv's rewritten thresholds)."""
        geo = self.geo
        f = self.fused.get(op.name)
        low = _Lowered(isa.Opcode.BCONV, fields, weights=weights)
        threshold = pool = 0
        if f is None:
            fields["out_base"] = self.ints(op, op.output)
        else:
            out_c = fields["out_channels"]
            _, oh, ow = self.spec(op.output).shape
            pool = int(f.pool is not None)
            threshold = 1
            thr_op = self.ops[f.threshold]
            thr = np.asarray(thr_op.params["threshold"]).reshape(-1)
            direction = np.asarray(thr_op.params["direction"]).reshape(-1)
            if self.planes is not None and thr_op.name in self.planes.thresholds:
                thr, direction = np.array(self.planes.thresholds[thr_op.name], np.int64).T
            low.params = [{} for _ in range(out_c)]
            self.threshold_params(low, thr_op, thr, direction, width=geo.element_width)
            fields.update(out_base=0, out_plane=4 * (oh // 2) * (ow // 2) if pool else oh * ow)
            low.post = {"post": int(isa.Post.THRESHOLD),
                        "reduce": int(isa.Reduce.MAX if pool else isa.Reduce.SUM),
                        "out_base": self.allocation[f.bits][1],
                        "out_words": _ceil_div(out_c, geo.lane)}
        low.cycles = isa.bconv_cycles(geo.rows, geo.cols, fields["k_words"], fields["m_tiles"],
                                      fields["out_plane"], threshold, pool) \
            + isa.SEQUENCER_CYCLES - 1
        return low

    def _maxpool(self, op):
        a = op.attrs
        window = {"kernel": int(a["kernel"]), "stride": int(a["stride"]),
                  "pad": int(a["padding"]), "reduce": isa.Reduce.MAX}
        plan = self.pool_requant.get(op.name)
        if plan is None:
            return self.fixed(op, **window, in_offsets=self._elementwise_offsets(op))
        # The requant before it, on the window's maximum of its input (_plan_pool_requant).
        requant = self.ops[plan.requant]
        low = self.fixed(op, **window, post=isa.Post.REQUANT, relu=int(requant.attrs["relu"]),
                         bits=int(requant.attrs["bits"]), src=requant.inputs[0],
                         in_offsets=self._elementwise_offsets(requant))
        self.requant_params(low, requant, op.output.channels)
        return low

    def _gap(self, op):
        return self.fixed(op, whole=True, in_offsets=self._elementwise_offsets(op))

    def _shuffle(self, op):
        src = op.inputs[0]
        g, c = int(op.attrs["groups"]), src.channels
        if c % g or c != op.output.channels:
            raise CompileError(f"{op.name}: cannot shuffle {c} channels in {g} groups")
        base, plane = self.ints(op, src), self.plane(src)
        offsets = [base + ((o % g) * (c // g) + o // g) * plane for o in range(c)]
        return self.fixed(op, in_offsets=offsets)

    def _combine(self, op):
        a, p = op.attrs, op.params
        m_bases, n_bases, residual = int(a["M"]), int(a["N"]), int(a["residual"])
        out_c = op.output.channels
        if len(op.inputs) != n_bases + residual:
            raise CompileError(f"{op.name}: {len(op.inputs)} inputs for N={n_bases} bases"
                               f"{' and a residual' if residual else ''}")
        first = op.inputs[0]
        per_base = m_bases * out_c
        for n, s in enumerate(op.inputs[:n_bases]):
            # One term stride addresses every (n, m): the bases' counts must be consecutive
            # slices of one tensor (sw.compile.lower stores them so).
            if s.tensor != first.tensor or s.start != first.start + n * per_base \
                    or s.channels != per_base:
                raise CompileError(
                    f"{op.name}: the counts of base {n} ({s.tensor}[{s.start}:{s.stop}]) do not "
                    f"follow base 0's ({first.tensor}[{first.start}:{first.stop}]) with a "
                    f"stride of {per_base} channels")
        plane = self.plane(first)
        base = self.ints(op, first)
        res_base = 0
        if residual:
            res = op.inputs[-1]
            _, oh, ow = self.spec(op.output).shape
            self.check_shape(op, res, oh, ow)
            if res.channels != out_c:
                raise CompileError(f"{op.name}: a residual of {res.channels} channels for "
                                   f"{out_c} outputs")
            res_base = self.ints(op, res)
        low = self.fixed(op, terms_c=n_bases * m_bases, term_stride=out_c * plane, multiply=1,
                         post=isa.Post.REQUANT, relu=int(a["relu"]), bits=int(a["bits"]),
                         residual=residual, res_base=res_base, coef_ostride=0,
                         in_offsets=[base + o * plane for o in range(out_c)], src=first)
        self.requant_params(low, op, out_c)
        coef = np.asarray(p["coef"])
        if coef.shape != (n_bases, m_bases):
            raise CompileError(f"{op.name}: coefficients of shape {coef.shape}, not "
                               f"{(n_bases, m_bases)}")
        low.coefs = [int(v) for v in coef.reshape(-1)]   # t = n * M + m
        return low

    def _bconv(self, op):
        geo, a, src = self.geo, op.attrs, op.inputs[0]
        spec = self.spec(src)
        if spec.kind != "bits" or src.start != 0 or src.stop != spec.shape[0]:
            raise CompileError(f"{op.name}: a bconv must read a whole bits tensor")
        k, stride, pad = int(a["kernel"]), int(a["stride"]), int(a["padding"])
        if k not in (1, 3) or stride not in (1, 2) or pad not in (0, 1):
            raise CompileError(f"{op.name}: the device's binary conv supports kernel 1 or 3, "
                               f"stride 1 or 2, padding 0 or 1, not {k}, {stride}, {pad}")
        c, h, w = spec.shape
        if h + 2 * pad < k or w + 2 * pad < k:
            raise CompileError(f"{op.name}: a {k}x{k} kernel does not fit a {h}x{w} map")
        oh, ow = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
        self.check_shape(op, op.output, oh, ow)
        weight_bits = np.asarray(op.params["weight_bits"], dtype=bool)
        out_c = weight_bits.shape[0]
        if out_c != op.output.channels or weight_bits.shape[1] != c * k * k:
            raise CompileError(f"{op.name}: weights of shape {weight_bits.shape} do not match "
                               f"{c} -> {op.output.channels} channels")
        cw = _ceil_div(c, geo.lane)
        k_words = k * k * cw
        if k_words > geo.max_depth // geo.lane:
            raise CompileError(f"{op.name}: a dot product of {k_words} words of {geo.lane} bits "
                               f"exceeds the array's max_depth of {geo.max_depth} bits")
        m_tiles = _ceil_div(out_c, geo.rows)
        words = packing.pack_weights(packing.conv_window_weight_bits(weight_bits, c, k, geo.lane),
                                     geo.rows, geo.lane, encoding="bit")
        key = (c, k, weight_bits.shape, weight_bits.tobytes())
        fields = {
            "in_base": self.allocation[src.tensor][1], "in_h": h, "in_w": w, "channels": c,
            "channel_words": cw, "kernel": k, "stride": stride, "pad": pad, "k_words": k_words,
            "m_tiles": m_tiles, "out_channels": out_c, "out_plane": oh * ow,
            "add": int(op.mode == "add"),
        }
        return self.fuse(op, fields, (key, words))


    def _bitplane_conv(self, op):
        """The plan's conv as a bit-plane BCONV of the raw image in BITS (``channels`` is
        ``channel_words * lane``: the unused bits are 0 in the image and +1 in the weights,
        which the window must not force)."""
        geo, a = self.geo, op.attrs
        c, h, w = self.program.tensors[self.planes.image].shape
        k, stride, pad = int(a["kernel"]), int(a["stride"]), int(a["padding"])
        oh, ow = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
        if oh < 1 or ow < 1:
            raise CompileError(f"{op.name}: a {k}x{k} kernel does not fit a {h}x{w} map")
        self.check_shape(op, op.output, oh, ow)
        weight = np.asarray(op.params["weight"])
        out_c = weight.shape[0]
        cw = packing.bitplane_channel_words(c, geo.lane)
        k_words = k * k * cw
        if k_words > geo.max_depth // geo.lane:
            raise CompileError(f"{op.name}: a dot product of {k_words} words of {geo.lane} bits "
                               f"exceeds the array's max_depth of {geo.max_depth} bits")
        m_tiles = _ceil_div(out_c, geo.rows)
        words = packing.pack_weights(packing.bitplane_weight_bits(weight, geo.lane), geo.rows,
                                     geo.lane, encoding="bit")
        fields = {
            "in_base": self.allocation[self.planes.image][1], "in_h": h, "in_w": w,
            "channels": cw * geo.lane, "channel_words": cw, "kernel": k, "stride": stride,
            "pad": pad, "k_words": k_words, "m_tiles": m_tiles, "out_channels": out_c,
            "out_plane": oh * ow, "add": 0, "planes": 1,
        }
        key = ("planes", weight.shape, weight.tobytes())
        return self.fuse(op, fields, (key, words))


# -- segments and descriptors ------------------------------------------------------------------

def _pack(op, record, what, **values):
    try:
        return record.pack(**values)
    except ValueError as error:
        raise CompileError(f"{op.name}: {what} does not fit the instruction set: {error}") \
            from None


def generate(program, config):
    """Turn ``program`` (a :class:`~.ir.Program`, or an artifact holding one) into a
    :class:`DeviceProgram` for a device of ``config`` (a :class:`hw.config.DeviceConfig`-like
    object with the fields of :class:`Geometry`).

    Raises
    ------
    CompileError
        Naming the op or tensor and the resource: a tensor wider than ``element_width``, a
        memory that overflows, an op whose own data does not fit WEIGHTS/COEFS/PARAMS, more
        ops than ``program_depth``, a field out of its descriptor range, an op the device does
        not run.
    """
    program = getattr(program, "program", program)
    geo = Geometry.from_config(config)
    program, split = split_for_memories(program, geo)
    while True:
        try:
            return _generate(program, geo, split)
        except _Overflow as error:
            if error.memory != "INTS":
                raise
            smaller = _split_to_fit(program, geo, error)
            if smaller is None:
                raise
            program, split = smaller[0], {**split, **smaller[1]}


def _split_to_fit(program, geo, error):
    """``(program, split)`` with one int tensor live beside the one that overflowed INTS
    (``error``; itself included, the largest first) run piece by piece through a smaller one
    (:func:`.split.split_activation`, as few pieces as needed), such that the allocation gets
    further than it did; or None."""
    spans = lifetimes(program)
    first, last = spans[error.tensor]
    live = [name for name, (start, end) in spans.items()
            if program.tensors[name].kind == "int" and not (end < first or last < start)]
    for name in sorted(live, key=lambda n: -program.tensors[n].elements):
        for pieces in (2, 4, 8, 16, 32, 64):
            smaller = split_activation(program, name, pieces, geo)
            if smaller is None:
                break
            try:
                _place(smaller[0], geo)
            except _Overflow as again:
                if again.memory != "INTS" or again.placed > error.placed:
                    return smaller
                continue
            return smaller
    return None


def _place(program, geo):
    """The bit-plane, conv-to-bits, binary-conv-to-bits and pool-requant plans, the lifetimes
    and the activation memories' allocation: ``(planes, fallback, to_bits, spans, allocation,
    peaks, fused, fusion_fallback, pool_requant)``."""
    planes, fallback = _plan_bitplanes(program, geo)
    to_bits = _plan_conv_to_bits(program, geo, skip={planes.conv} if planes else ())
    spans = lifetimes(program)
    if planes is not None:
        # The BCONV reads the raw image where the golden conv read the input op's output.
        spans[program.input] = (spans[program.input][0],
                                max(spans[program.input][1], planes.conv_index))
    for plan in to_bits.values():
        # The conv writes the threshold's bits, and its own output is never stored.
        first, last = spans[plan.bits.tensor]
        spans[plan.bits.tensor] = (min(first, plan.conv_index), last)
        del spans[plan.y]
    pool_requant = _plan_pool_requant(program)
    for plan in pool_requant.values():
        # The pool reads the requant's input, and the requant's output is never stored.
        first, last = spans[plan.x]
        spans[plan.x] = (first, max(last, plan.pool_index))
        del spans[plan.y]
    fused, fusion_fallback = _plan_fusion(program, geo, planes)
    allocation, peaks, spans = _allocate_fused(
        program, geo, spans, planes, fused, fusion_fallback,
        unstored=[plan.y for plan in to_bits.values()]
        + [plan.y for plan in pool_requant.values()])
    return (planes, fallback, to_bits, spans, allocation, peaks, fused, fusion_fallback,
            pool_requant)


def _generate(program, geo, split):
    """:func:`generate` for a program whose ops' own data fit (``split``: the pieces)."""
    if len(program.ops) > geo.program_depth:
        raise CompileError(f"program: {len(program.ops)} ops do not fit the PROGRAM memory "
                           f"({geo.program_depth} descriptors)")
    planes, fallback, to_bits, spans, allocation, peaks, fused, fusion_fallback, \
        pool_requant = _place(program, geo)
    mapper = _Mapper(program, geo, allocation, planes, to_bits, fused, pool_requant)
    lowered = [mapper.lower(op) for op in program.ops]

    capacity = {"WEIGHTS": geo.weight_depth, "COEFS": geo.coef_depth,
                "PARAMS": geo.param_depth}
    segments, infos, descriptors = [], [], []
    state = None

    def open_segment(first):
        return {"first": first, "count": 0, "used": dict.fromkeys(capacity, 0),
                "data": {m: [] for m in capacity}, "shared": {}}

    coef_low, coef_high = -(1 << (COEF_WIDTH - 1)), (1 << (COEF_WIDTH - 1)) - 1
    for index, (op, low) in enumerate(zip(program.ops, lowered)):
        weight_words = len(low.weights[1]) if low.weights else 0
        need = {"WEIGHTS": weight_words, "COEFS": len(low.coefs), "PARAMS": len(low.params)}
        for memory, words in need.items():
            if words > capacity[memory]:
                raise CompileError(f"{op.name}: its {words} {memory} words do not fit the "
                                   f"{memory} memory ({capacity[memory]} words)")
        for value in low.coefs:
            if not coef_low <= value <= coef_high:
                raise CompileError(f"{op.name}: coefficient {value} does not fit the "
                                   f"{COEF_WIDTH}-bit COEFS word")
        if state is not None:
            shared = low.weights is not None and low.weights[0] in state["shared"]
            extra = dict(need, WEIGHTS=0 if shared else weight_words)
            if any(state["used"][m] + extra[m] > capacity[m] for m in capacity):
                segments.append(state)
                state = None
        if state is None:
            state = open_segment(index)
        bases = {}
        for memory in capacity:
            bases[memory] = state["used"][memory]
        if low.weights is not None:
            key, words = low.weights
            if key in state["shared"]:
                # ABC-Net runs the same weights for each activation base: load them once.
                bases["WEIGHTS"], weight_words = state["shared"][key], 0
            else:
                state["shared"][key] = bases["WEIGHTS"]
                state["data"]["WEIGHTS"].extend(words)
                state["used"]["WEIGHTS"] += len(words)
        state["data"]["COEFS"].extend(v & ((1 << COEF_WIDTH) - 1) for v in low.coefs)
        state["used"]["COEFS"] += len(low.coefs)
        for param in low.params:
            state["data"]["PARAMS"].append(_pack(op, isa.PARAM, "a parameter", **param))
        state["used"]["PARAMS"] += len(low.params)
        state["count"] += 1

        if low.opcode == isa.Opcode.FIXED:
            fields = dict(low.fields, coef_base=bases["COEFS"], param_base=bases["PARAMS"])
            prefix = "fixed_"
        elif low.opcode == isa.Opcode.NOP:
            fields, prefix = {}, ""
        else:
            fields = dict(low.fields, weight_base=bases["WEIGHTS"])
            prefix = "bconv_"
        named = {"opcode": int(low.opcode)}
        named.update({prefix + name: int(value) for name, value in fields.items()})
        if low.post is not None:
            # A BCONV straight to bits: its threshold in the FIXED half (isa.BCONV_POST).
            named.update({f"fixed_{name}": int(value) for name, value in
                          dict(low.post, param_base=bases["PARAMS"]).items()})
        descriptors.append(_pack(op, isa.DESCRIPTOR, "the descriptor", **named))
        infos.append(OpInfo(op.name, op.kind, low.opcode, named, len(segments), weight_words,
                            len(low.coefs), len(low.params), low.cycles))
    if state is not None:
        segments.append(state)

    segments = [Segment(s["first"], s["count"],
                        [(m, 0, s["data"][m]) for m in SEGMENT_MEMORIES if s["data"][m]])
                for s in segments]
    image = program.tensors[program.input]
    logits = program.tensors[program.logits]
    input_memory = "BITS" if planes is not None else "INTS"
    if allocation[program.input][0] != input_memory or allocation[program.logits][0] != "INTS":
        raise CompileError("program: the input and the logits must be int tensors")
    return DeviceProgram(
        geometry=geo, descriptors=descriptors, ops=infos, segments=segments,
        input_base=allocation[program.input][1], input_shape=tuple(image.shape),
        logits_base=allocation[program.logits][1], logits_count=logits.elements,
        allocation=allocation, ints_used=peaks["INTS"], bits_used=peaks["BITS"],
        input_memory=input_memory, bitplanes=planes.conv if planes else None,
        bitplane_fallback=fallback, lifetimes=spans, program=program, split=split,
        convs_to_bits=tuple(to_bits),
        fused={name: (f.threshold, f.pool) for name, f in fused.items()},
        fusion_fallback=fusion_fallback,
        requants_after_pools={plan.requant: plan.pool for plan in pool_requant.values()})
