"""The accelerator's instruction set: layer-program descriptors and per-channel parameter records.

This module is the single definition of the bit layouts that the compiler's code generator
(:mod:`sw.compile.codegen`) writes and the hardware (:mod:`hw.sequencer`, :mod:`hw.fixed_unit`,
:mod:`hw.bconv_engine`) decodes. Like :mod:`sw.protocol` it depends only on the standard
library: the hardware builds :class:`amaranth.lib.data.StructLayout` s from the same field
lists (:mod:`hw.isa`), so both sides cannot disagree.

A record is a little-endian bit field: the first field occupies the lowest bits. The host sees
a record as a memory word of ``ceil(width / 8)`` bytes (see :class:`sw.protocol.Memory`).

Execution model (details in ``docs/accelerator.md``)
----------------------------------------------------
* **INTS** memory: signed integers of ``element_width`` bits, one per address. A tensor of
  shape ``(C, H, W)`` at element address ``base`` holds element ``(c, y, x)`` at
  ``base + (c * H + y) * W + x`` (channel planes).
* **BITS** memory: words of ``lane`` bits. A bit tensor at word address ``base`` holds channel
  ``c`` of pixel ``(y, x)`` in bit ``c % lane`` of word ``base + (y * W + x) * cw + c // lane``,
  ``cw = ceil(C / lane)`` (the layout :class:`hw.conv_window.ConvWindow` reads). An 8-bit
  image for a BCONV with ``planes`` is stored as bit-planes instead, ``lane / 8`` channels per
  word (:func:`sw.packing.pack_bitplanes`).
* **WEIGHTS** memory: the binary weights of a ``bconv``, ``rows * lane`` bits per word; row tile
  ``t`` (output channels ``t * rows + r``), K word ``kw`` at ``weight_base + t * k_words + kw``,
  in ConvWindow's K order (:func:`sw.packing.conv_window_weight_bits`).
* **COEFS** memory: signed 8-bit fixed-point weights (conv weights, ABC-Net coefficients).
* **PARAMS** memory: one :data:`PARAM` record per output channel of a fixed-point op.
* **PROGRAM** memory: one :data:`DESCRIPTOR` per op; **COUNTERS**: the cycles each op took.
"""

import enum

__all__ = [
    "BCONV_FIELDS", "BCONV_PARAM_REGISTERS", "BCONV_POST", "DESCRIPTOR", "FIXED_FIELDS",
    "FIXED_LATENCY", "PARALLEL_X_BITS", "PARAM", "SEQUENCER_CYCLES", "BitRecord", "Opcode",
    "Post", "Reduce", "bconv_bits_words", "bconv_cycles", "bconv_post", "fixed_cycles",
    "fixed_lanes", "int_banks", "op_cycles", "parallel_ok", "requant_passes", "requant_pipes",
    "window_setup_cycles",
]


class Opcode(enum.IntEnum):
    """What a descriptor runs."""
    #: Do nothing (the cycle counter still records the dispatch).
    NOP = 0
    #: A fixed-point op on :class:`hw.fixed_unit.FixedUnit` (the ``fixed_*`` fields).
    FIXED = 1
    #: A binary conv on :class:`hw.bconv_engine.BconvEngine` (the ``bconv_*`` fields).
    BCONV = 2


class Reduce(enum.IntEnum):
    """How a fixed-point op combines its terms."""
    SUM = 0
    MAX = 1


class Post(enum.IntEnum):
    """What a fixed-point op does with a finished sum."""
    #: Write the sum unchanged (max pool, global sum pool, channel shuffle).
    NONE = 0
    #: ``sat((acc * mul + bias [+ res * res_mul] + half) >> shift)`` (round half up).
    REQUANT = 1
    #: Per-channel threshold compare; the bit goes to BITS memory.
    THRESHOLD = 2


class BitRecord:
    """A little-endian bit-field record: ``fields`` is a sequence of ``(name, width, signed)``.

    :meth:`pack` checks that each value fits its field and raises ``ValueError`` naming the
    field otherwise; nothing is silently truncated.
    """

    def __init__(self, fields):
        self.fields = tuple((name, int(width), bool(signed)) for name, width, signed in fields)
        names = [name for name, _, _ in self.fields]
        if len(set(names)) != len(names):
            raise ValueError("field names must be unique")
        self.width = sum(width for _, width, _ in self.fields)
        self.nbytes = (self.width + 7) // 8

    @property
    def names(self):
        return tuple(name for name, _, _ in self.fields)

    def offsets(self):
        """Return ``{name: (bit offset, width, signed)}``."""
        result, offset = {}, 0
        for name, width, signed in self.fields:
            result[name] = (offset, width, signed)
            offset += width
        return result

    def range(self, name):
        """``(low, high)`` of the values field ``name`` holds."""
        _, width, signed = self.offsets()[name]
        if signed:
            return -(1 << (width - 1)), (1 << (width - 1)) - 1
        return 0, (1 << width) - 1

    def pack(self, **values):
        """Return the record as an ``int``; fields not given are 0."""
        unknown = set(values) - set(self.names)
        if unknown:
            raise TypeError(f"unknown fields: {sorted(unknown)}")
        word = 0
        for name, (offset, width, _) in self.offsets().items():
            value = int(values.get(name, 0))
            low, high = self.range(name)
            if not low <= value <= high:
                raise ValueError(f"field {name!r} must be in [{low}, {high}], not {value}")
            word |= (value & ((1 << width) - 1)) << offset
        return word

    def pack_bytes(self, **values):
        return self.pack(**values).to_bytes(self.nbytes, "little")

    def unpack(self, word):
        """Return ``{name: value}`` of an ``int`` or bytes record."""
        if isinstance(word, (bytes, bytearray)):
            word = int.from_bytes(word, "little")
        result = {}
        for name, (offset, width, signed) in self.offsets().items():
            value = (word >> offset) & ((1 << width) - 1)
            if signed and value >> (width - 1):
                value -= 1 << width
            result[name] = value
        return result


#: Per-output-channel parameters of a fixed-point op (one PARAMS word).
PARAM = BitRecord([
    # INTS address of the first term's input plane for this output channel (tensor base plus
    # channel offset: the group's first input channel of a conv, the source channel of a
    # shuffle, the channel itself for element-wise ops).
    ("in_offset", 24, False),
    ("mul", 18, True),
    ("res_mul", 18, True),
    ("shift", 6, False),
    ("bias", 48, True),
    ("threshold", 32, True),
    # +1: bit = x >= threshold; -1: bit = x <= threshold; 0: bit = threshold != 0.
    ("direction", 2, True),
])

#: Settings of a fixed-point op (:class:`hw.fixed_unit.FixedUnit`'s ``config``).
FIXED_FIELDS = (
    ("reduce", 1, False),        # Reduce
    ("multiply", 1, False),      # 1: term = x * coef; 0: term = x
    ("post", 2, False),          # Post
    ("relu", 1, False),          # REQUANT saturates to [0, 2**bits - 1], else signed bits
    ("bits", 6, False),          # REQUANT output width (1..element_width)
    ("residual", 1, False),      # REQUANT adds res_mul * INTS[res_base + o * out_plane + pix]
    ("in_h", 12, False),
    ("in_w", 12, False),
    ("kernel_h", 12, False),
    ("kernel_w", 12, False),
    ("stride", 2, False),
    ("pad", 3, False),
    ("terms_c", 12, False),      # term channels per output (conv: in_channels / groups)
    ("term_stride", 24, False),  # INTS distance between term channels
    ("out_channels", 12, False),
    ("out_h", 12, False),
    ("out_w", 12, False),
    ("out_base", 24, False),     # INTS element address, or BITS word address for THRESHOLD
    ("out_plane", 24, False),    # out_h * out_w
    ("out_words", 8, False),     # THRESHOLD: ceil(out_channels / lane)
    ("coef_base", 20, False),
    ("coef_ostride", 16, False),  # COEFS distance between output channels (0: shared)
    ("param_base", 16, False),
    ("res_base", 24, False),
    # 1: the unit's `fixed_channels` output channels at once (parallel_ok; COEFS in
    # channel-group order), 0: one output channel at a time.
    ("parallel", 1, False),
)

# A FIXED op with ``parallel`` set computes ``M = fixed_channels`` output channels (the device's
# :class:`hw.config.DeviceConfig` field, in its INFO record) of each lane group at once: one
# INTS run of terms feeds ``M`` multipliers per lane, each with its own coefficient. It
# needs (the compiler checks, :func:`parallel_ok`; the hardware does not): ``multiply``,
# ``reduce`` SUM, ``post`` REQUANT, no ``residual``, at least ``M`` terms per output, the
# ``M`` channels ``g * M .. g * M + M - 1`` of every group sharing ``in_offset``, and (with
# ``element_width`` above :data:`PARALLEL_X_BITS`) every input value fitting that many signed
# bits. Channel ``o``'s coefficient of term ``t`` is at COEFS ``coef_base + (o // M) *
# coef_ostride + t * M + o % M`` (the ``M`` coefficients of a term are one run), and
# ``out_channels`` need not be a multiple of ``M`` (the last group's extra channels are not
# written).
#: Signed bits of an input value a parallel op's extra channels multiply (one 18 x 18 DSP).
PARALLEL_X_BITS = 18


def parallel_ok(fields, channels):
    """Whether a FIXED op (``fields``: FIXED_FIELDS names, ``parallel`` aside) may run with
    ``parallel`` on a unit of ``channels`` output channels at once, as far as its fields tell
    (the compiler also checks the inputs' ``in_offset`` and value range)."""
    terms = fields["terms_c"] * fields["kernel_h"] * fields["kernel_w"]
    return (channels > 1 and fields["multiply"] == 1 and fields["reduce"] == Reduce.SUM
            and fields["post"] == Post.REQUANT and not fields["residual"]
            and terms >= channels)


#: Settings of a binary conv (:class:`hw.bconv_engine.BconvEngine`'s ``config``).
BCONV_FIELDS = (
    ("in_base", 20, False),      # BITS word address of the input map (bit-planes: see planes)
    ("in_h", 12, False),
    ("in_w", 12, False),
    ("channels", 16, False),     # input channels C (planes: channel_words * lane)
    ("channel_words", 8, False),  # ceil(C / lane)
    ("kernel", 2, False),        # 1 or 3
    ("stride", 2, False),        # 1 or 2
    ("pad", 1, False),           # 0 or 1
    ("weight_base", 20, False),  # WEIGHTS word address of row tile 0
    ("k_words", 16, False),      # kernel * kernel * channel_words
    ("m_tiles", 12, False),      # ceil(out_channels / rows)
    ("out_channels", 12, False),
    ("out_base", 24, False),     # INTS element address of output channel 0 (not with post)
    ("out_plane", 24, False),    # OH * OW (pool: 4 * (OH // 2) * (OW // 2), see BCONV_POST)
    ("add", 1, False),           # 1: add the counts into INTS (ImprovementBlock), 0: write
    # 1: bit-plane mode (lane % 8 == 0): the map holds 8-bit values as bit-planes, a word of
    # lane / 8 channels (sw.packing.pack_bitplanes); the array adds each word's weighted count
    # sum_b 2**b * popcount(xnor) of plane group b (hw.array). Same timing as a plain BCONV.
    ("planes", 1, False),
)

#: The FIXED fields a BCONV descriptor also uses: with ``post == Post.THRESHOLD`` the binary conv
#: runs straight to bits (a bconv fused with the threshold op reading its counts; the
#: descriptor's FIXED half holds that threshold's settings, which the fixed-point unit does not
#: see on a BCONV). The count of channel ``o`` is compared with ``PARAMS[param_base + o]``
#: (``threshold``, ``direction``, as a FIXED THRESHOLD) and the bit goes to BITS, ``out_base``
#: being a BITS word address: bit ``o % lane`` of word ``out_base + pix * out_words + o //
#: lane`` (``out_words = ceil(out_channels / lane)``); nothing goes to INTS. With ``reduce ==
#: Reduce.MAX`` as well (``cols % 4 == 0``), a 2x2 stride-2 max pool (floor) comes between
#: the counts and the threshold: the window visits the conv's output pixels in pool-window
#: order (:class:`hw.conv_window.ConvWindow`), ``bconv_out_plane = 4 * (OH // 2) * (OW //
#: 2)``, and the bit of pooled pixel ``pix = py * (OW // 2) + px`` is the OR (direction +1)
#: or AND (direction -1) of its four counts' compares: ``max >= t``, ``max <= t``. Needs
#: ``bconv_add == 0``, ``lane % rows == 0`` and ``bconv_bits_words(cols, pool) <=
#: max(k_words, rows)``. Any other ``post`` or ``reduce`` of a BCONV: counts to INTS.
BCONV_POST = ("post", "reduce", "out_base", "out_words", "param_base")


def bconv_post(descriptor):
    """``(threshold, pool)`` of a BCONV descriptor (a dict of :data:`DESCRIPTOR` fields)."""
    threshold = int(descriptor.get("fixed_post", 0) == Post.THRESHOLD)
    return threshold, int(threshold and descriptor.get("fixed_reduce", 0) == Reduce.MAX)


#: One op of the layer program (one PROGRAM word).
DESCRIPTOR = BitRecord(
    [("opcode", 4, False)]
    + [(f"fixed_{name}", width, signed) for name, width, signed in FIXED_FIELDS]
    + [(f"bconv_{name}", width, signed) for name, width, signed in BCONV_FIELDS])


# -- Timing ---------------------------------------------------------------------------------------
# The hardware's cycle counts, exactly (the unit tests and the device tests check them against
# the hardware; code generation uses them for its per-op figures).

#: Registers of :class:`hw.fixed_unit.FixedUnit` between the INTS block RAMs' (unregistered)
#: outputs and its run rotator.
FIXED_RUN_REGISTERS = 1
#: Pipeline latency of :class:`hw.fixed_unit.FixedUnit` (posts NONE and THRESHOLD; a REQUANT
#: write comes :func:`requant_passes` cycles later): its 12 stages and the run registers.
FIXED_LATENCY = 12 + FIXED_RUN_REGISTERS
#: Registers of :class:`hw.bconv_engine.BconvEngine` between the PARAMS block RAM's (unregistered)
#: output and its threshold compares (a BCONV with ``threshold``): the record's path through
#: the compare, the pooling OR and the BITS write data was the routed ULX3S build's critical
#: path (docs/builds.md).
BCONV_PARAM_REGISTERS = 1
#: Cycles the sequencer adds to an op's unit time in its counter: fetch, decode, dispatch,
#: the cycle that sees the unit idle again and the record cycle.
SEQUENCER_CYCLES = 5


def int_banks(cols, fixed_lanes=0):
    """Banks of INTS memory, which is also the number of output pixels the fixed-point unit
    computes per cycle (its lanes): the power of two at least ``cols`` (a binary conv writes
    the ``cols`` counts of a result row in one cycle), or ``fixed_lanes`` if that is more."""
    return max(1 << (cols - 1).bit_length(), fixed_lanes)


def window_setup_cycles(cols):
    """Cycles :class:`hw.conv_window.ConvWindow` needs a new config to be stable before its
    first pass starts: its registered geometry pipeline (tile steps, then one stage per
    column for the first tile's pixels)."""
    return max(4, cols + 2)


def bconv_bits_words(cols, pool):
    """BITS words a BCONV with ``threshold`` writes per tile of ``cols`` traversed pixels: one
    per pixel, or one per 2x2 pooling window with ``pool``. They leave one per cycle, the
    last tile's after its last result row (:class:`hw.bconv_engine.BconvEngine`)."""
    return cols // 4 if pool else cols


def bconv_cycles(rows, cols, k_words, m_tiles, out_plane, threshold=0, pool=0):
    """Cycles from the start of a BCONV op to its engine's first idle cycle (``threshold``,
    ``pool``: :func:`bconv_post` of its descriptor)."""
    n_tiles = -(-out_plane // cols)
    p, q = max(k_words, rows), max(k_words + 2, rows)
    drain = bconv_bits_words(cols, pool) - 1 + BCONV_PARAM_REGISTERS if threshold else 0
    return (window_setup_cycles(cols) + m_tiles * (n_tiles - 1) * p + (m_tiles - 1) * q
            + k_words + 2 * rows + cols + 5 + drain)


def fixed_lanes(lanes, lane, fields):
    """Output pixels the fixed-point unit computes at once for a FIXED op (``lane``: bits of a
    BITS word): ``lanes`` for stride 1, but for a THRESHOLD only if its every BITS word takes
    at least ``lanes`` channels; ``lanes // 2`` for stride 2 but THRESHOLD; else 1."""
    threshold = fields["post"] == Post.THRESHOLD
    if fields["stride"] == 1:
        last_word = fields["out_channels"] - (fields["out_words"] - 1) * lane
        return lanes if not threshold or last_word >= lanes else 1
    if fields["stride"] == 2 and not threshold:
        return max(lanes // 2, 1)
    return 1


def requant_pipes(lanes):
    """Requantizers of a fixed-point unit of ``lanes`` lanes: one per two lanes (one for a
    single lane). A requantizer (``acc * mul + res * res_mul + bias``, the shift and the
    saturation, about 67 bits wide) costs five DSP multipliers and most of a lane's logic,
    while an output element of a convolution takes several cycles of terms: two lanes share
    one, and only ops of fewer terms than passes wait for it (:func:`requant_passes`)."""
    return max(lanes // 2, 1)


def requant_passes(group, pipes):
    """Cycles the ``group`` accumulators of an output element take through ``pipes``
    requantizers (``group`` and ``pipes`` powers of two): a REQUANT op's elements are issued
    at least this many cycles apart."""
    return max(group // pipes, 1)


def fixed_cycles(lanes, lane, fields, pipes=None, channels=1):
    """Cycles the fixed-point unit is busy for a FIXED op (``fields``: FIXED_FIELDS names) on
    a unit of ``lanes`` lanes, ``lane``-bit BITS words, ``pipes`` requantizers (default
    :func:`requant_pipes` ``(lanes)``, as the device has) and ``channels`` output channels at
    once for ops with ``parallel`` set (:class:`hw.config.DeviceConfig`'s ``fixed_channels``)."""
    terms = fields["terms_c"] * fields["kernel_h"] * fields["kernel_w"]
    if fields["post"] == Post.REQUANT and fields["residual"]:
        terms += 1
    group = fixed_lanes(lanes, lane, fields)
    together = channels if fields.get("parallel", 0) else 1
    per_row = -(-fields["out_w"] // group)
    elements = fields["out_h"] * per_row * -(-fields["out_channels"] // together)
    if fields["post"] == Post.REQUANT and elements * terms > 0:
        # Elements of fewer terms than passes wait (padding slots, but after the last);
        # the last element's requantizer passes follow its last term. Each of the channels
        # computed together takes its own passes.
        passes = together * requant_passes(group, requant_pipes(lanes) if pipes is None
                                           else pipes)
        pad = max(passes - terms, 0)
        return elements * (terms + pad) - pad + FIXED_LATENCY + passes
    cycles = elements * terms + FIXED_LATENCY
    if fields["post"] == Post.THRESHOLD and fields["out_h"] * fields["out_w"] > 0:
        # The last group's words leave the write queue one per cycle.
        cycles += (fields["out_w"] - 1) % group
    return cycles


def op_cycles(rows, cols, lane, descriptor, fixed_lanes=0, fixed_channels=1):
    """An op's cycle counter on a device with a ``rows x cols x lane`` array,
    ``int_banks(cols, fixed_lanes)`` fixed-point lanes and ``fixed_channels`` output channels
    at once (``parallel`` ops): ``descriptor`` is a dict of :data:`DESCRIPTOR` fields."""
    opcode = descriptor["opcode"]
    if opcode == Opcode.FIXED:
        fields = {name: descriptor[f"fixed_{name}"] for name, _, _ in FIXED_FIELDS}
        return (fixed_cycles(int_banks(cols, fixed_lanes), lane, fields,
                             channels=fixed_channels)
                + SEQUENCER_CYCLES)
    if opcode == Opcode.BCONV:
        return bconv_cycles(rows, cols, descriptor["bconv_k_words"],
                            descriptor["bconv_m_tiles"], descriptor["bconv_out_plane"],
                            *bconv_post(descriptor)) \
            + SEQUENCER_CYCLES - 1
    return SEQUENCER_CYCLES - 1
