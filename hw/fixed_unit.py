"""The fixed-point unit: executes one fixed-point op of the layer program (every kind but bconv).

One op is a loop nest over output pixels and channels; each output element reduces a window of
terms (a sum of products for conv/combine, a maximum for max pool, a single term for the
element-wise ops) and post-processes it (nothing, requantize, or threshold to a bit). The op's
settings are one :data:`sw.isa.FIXED_FIELDS` record and one :data:`sw.isa.PARAM` record per
output channel; :mod:`hw.isa` builds the hardware layouts from those field lists, so the
compiler's code generator and this unit cannot disagree.
"""

import itertools

from amaranth import Array, Const, Module, Mux, Signal, signed
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from sw import isa

from .isa import FIXED_LAYOUT, PARAM_LAYOUT
from .rotate import rotate_up

__all__ = ["FixedUnit"]


def _delay(m, value, cycles, name):
    """``value`` delayed by ``cycles`` registers: returns ``[value, d1, ..., d<cycles>]``."""
    line = [value]
    for i in range(cycles):
        reg = Signal(value.shape(), name=f"{name}_d{i + 1}")
        m.d.sync += reg.eq(line[-1])
        line.append(reg)
    return line


def _partial_products(a, b, name):
    """Split ``a * b`` (``b`` at most 18 bits) into products that each fit one 18 x 18 signed
    DSP multiplier: 17-bit unsigned slices of ``a`` and a signed top slice of at most 18 bits.
    Returns ``[(shift, register, product)]``; ``a * b == sum(product << shift)``. Registering
    the products leaves no wide adder behind the DSPs in the same cycle."""
    parts, low = [], 0
    while len(a) - low > 18:
        parts.append((low, a[low:low + 17]))
        low += 17
    parts.append((low, a[low:].as_signed() if low else a))
    return [(shift, Signal(signed(len(piece) + len(b) + 1), name=f"{name}_pp{shift}"),
             piece * b) for shift, piece in parts]



def _sum_shifted(parts):
    total = 0
    for shift, reg, _ in parts:
        total = total + (reg << shift)
    return total


class FixedUnit(wiring.Component):
    """Executes one fixed-point op, one term of up to ``lanes`` output pixels per cycle, fully
    pipelined.

    The op (``config`` holds the :data:`sw.isa.FIXED_FIELDS` settings; ``P`` is the
    :data:`sw.isa.PARAM` record of output channel ``o``) computes, in some order::

        for oy in range(out_h): for ox in range(out_w): for o in range(out_channels):
            pix = oy * out_w + ox;  P = PARAMS[param_base + o]
            for tc in range(terms_c): for ky in range(kernel_h): for kx in range(kernel_w):
                t = (tc * kernel_h + ky) * kernel_w + kx
                iy = oy * stride - pad + ky;  ix = ox * stride - pad + kx
                if 0 <= iy < in_h and 0 <= ix < in_w:        # a real term
                    x = INTS[P.in_offset + tc * term_stride + iy * in_w + ix]
                    term = x * COEFS[coef_base + o * coef_ostride + t] if multiply else x
                else: padding: adds 0 (reduce SUM) or is skipped (reduce MAX)
            acc = sum (SUM) or max (MAX, starting from the most negative value) of the terms
            post NONE:      INTS[out_base + o * out_plane + pix] = acc
            post REQUANT:   v = acc * P.mul + P.bias [+ P.res_mul * INTS[res_base + o * out_plane
                                + pix] if residual]
                            y = v if P.shift == 0 else (v + 2**(P.shift - 1)) >> P.shift
                            y = clamp(y, 0, 2**bits - 1) if relu
                                else clamp(y, -2**(bits - 1), 2**(bits - 1) - 1)
                            INTS[out_base + o * out_plane + pix] = y
            post THRESHOLD: bit = acc >= P.threshold (P.direction > 0),
                                  acc <= P.threshold (P.direction < 0), P.threshold != 0 (0)
                            bit o % lane of BITS word out_base + pix * out_words + o // lane

    ``>>`` is arithmetic (round half up). Values written to INTS are truncated to
    ``element_width`` bits (the compiler guarantees they fit). The bits of one BITS word are
    collected and the word is written once, after channel ``o`` with ``o % lane == lane - 1``
    or ``o == out_channels - 1``; bits of channels ``>= out_channels`` in it are 0. The
    arithmetic is exact (no intermediate overflows) for every PARAM value and every op of at
    most ``max_terms`` terms. A MAX window made only of padding (which the compiler never
    emits) writes the accumulator's most negative value, truncated. Addresses wrap modulo the
    memory sizes; a term that is padding in every lane reads nothing (``int_rd_en`` low), and
    COEFS are read only when ``multiply`` is set.

    Schedule (lanes)
    ----------------
    The unit computes ``L`` consecutive output pixels of one output channel at once, each in
    its own lane (own accumulator and threshold compare; PARAMS and COEFS are shared; a
    requantizer serves ``lanes // requant_pipes`` lanes, see below), where
    ``L`` is (:func:`sw.isa.fixed_lanes`):

    * ``lanes`` for stride 1. THRESHOLD lanes set bits of ``L`` different BITS words, which
      leave through a queue, one word per cycle, so THRESHOLD uses the lanes only when every
      word takes at least ``lanes`` channels (``out_channels - (out_words - 1) * lane >=
      lanes``: the queue is empty again before the next group's words arrive), else ``L = 1``;
    * ``lanes // 2`` for stride 2 (the terms of consecutive pixels are every second element
      of one run of ``lanes`` elements), but 1 for THRESHOLD;
    * 1 for other strides (one pixel at a time)::

        for oy in range(out_h): for ox0 in range(0, out_w, L): for o in range(out_channels):
            for each term t (tc, ky, kx) in the order above: lanes i < min(L, out_w - ox0)
            (pixel ox0 + i of row oy) take their term t at once
            [residual slot], then the group's results are written

    Groups never cross a row end: the last group of a row is partial, its extra lanes masked.
    With ``L > 1`` a term is ONE run read of INTS: lane ``i``'s element is at the run start
    ``+ i * stride``; lanes whose column ``ix + i * stride`` lies outside ``[0, in_w)`` are
    padding (a row outside ``[0, in_h)`` pads all lanes). The run starts at column
    ``max(ix, 0)`` (``ix``: lane 0's column), the first lane's that is not left of the row,
    and the data are rotated back into lane order, so a run never reaches below the input row
    (no reliance on the memory wrapping around below address 0; lanes past the row end may
    read past it, and their values are ignored). The residual is a run read at
    ``res_base + o * out_plane + pix0`` (``pix0 = oy * out_w + ox0``), and the results of
    posts NONE and REQUANT are one run write at ``out_base + o * out_plane + pix0`` with
    ``int_wr_mask`` bit ``i`` set for each pixel of the group. Runs are consecutive addresses
    modulo ``2**int_addr_width`` as far as the unit is concerned;
    :class:`~hw.int_memory.IntMemory` does not wrap a run around its end (reads there give 0,
    writes are dropped), so with it a tensor must lie inside the memory, not wrap around its
    end.

    Parameters
    ----------
    lane : int
        Bits of a BITS word.
    int_addr_width, bits_addr_width, coef_addr_width, param_addr_width : int
        Address widths of the INTS, BITS, COEFS and PARAMS memories.
    max_terms : int
        Largest ``terms_c * kernel_h * kernel_w`` of an op; sizes the accumulator
        (``element_width + 8 + max_terms.bit_length()`` signed bits) so it never overflows.
        Larger ops give wrong sums.
    element_width : int
        INTS elements are signed integers of this width (2 to 63: ``bits`` is a 6-bit field).
    lanes : int
        Output pixels computed at once (a power of two, default 1): the INTS ports are runs of
        this many elements (the core passes its :class:`~hw.int_memory.IntMemory`'s
        ``banks``). Each lane costs a term multiplier and an accumulator.
    requant_pipes : int, optional
        Requantizers (``acc * mul + res * res_mul + bias``, shift and saturation), a power
        of two dividing ``lanes``; default :func:`sw.isa.requant_pipes` ``(lanes)``, as the
        device and its timing model have. Each costs 5 multipliers and a wide datapath.
    channels : int
        Output channels of a ``parallel`` op computed at once (a power of two, default 1; the
        device's ``fixed_channels``): each lane gets ``channels - 1`` more multipliers (of
        ``min(element_width, 18)``-bit x, one DSP each) and accumulators. With 1 the
        ``parallel`` field is ignored.

    Members
    -------
    config : ``In(hw.isa.FIXED_LAYOUT)``
        The op. Must be valid in the cycle ``start`` is taken and stay stable while ``busy``.
    start : ``In(1)``
        While ``busy`` is low, a high ``start`` begins the op (ignored while ``busy``).
    busy : ``Out(1)``
        High from the cycle after ``start`` until (including) the cycle the op's last write is
        issued; low again the cycle after. An op with a zero ``out_h``, ``out_w``,
        ``out_channels``, ``terms_c``, ``kernel_h`` or ``kernel_w`` does nothing (``busy`` stays
        low).
    int_rd_addr, int_rd_en : ``Out(int_addr_width)``, ``Out(1)``; int_rd_data : ``In(
    data.ArrayLayout(signed(element_width), lanes))``
        INTS run read port: ``int_rd_data[i]`` is ``INTS[int_rd_addr + i]`` of the previous
        cycle's request (latency exactly 1, as IntMemory's); read only while ``int_rd_en``.
    int_wr_addr, int_wr_en, int_wr_mask, int_wr_data : ``Out(int_addr_width)``, ``Out(1)``,
    ``Out(lanes)``, ``Out(data.ArrayLayout(signed(element_width), lanes))``
        INTS run write port (outputs of posts NONE and REQUANT), driven from registers:
        ``INTS[int_wr_addr + i] = int_wr_data[i]`` for each ``i`` with ``int_wr_mask[i]`` set
        (at least bit 0 in every write).
    coef_rd_addr, coef_rd_en : ``Out(coef_addr_width)``, ``Out(1)``; coef_rd_data :
    ``In(data.ArrayLayout(signed(8), channels))``
        COEFS run read port, latency 1: ``coef_rd_data[j]`` is ``COEFS[coef_rd_addr + j]``
        (:class:`~hw.int_memory.IntMemory` of ``channels`` banks). Only element 0 is used
        but by parallel ops.
    param_rd_addr, param_rd_en : ``Out(param_addr_width)``, ``Out(1)``; param_rd_data :
    ``In(hw.isa.PARAM_LAYOUT)``
        PARAMS read port, latency 1, read (``param_base + o``) in every cycle a term or
        residual slot is issued (``param_base + o + j`` in slot ``j < channels`` of a
        parallel element, see below).
    bits_wr_addr, bits_wr_en, bits_wr_data : ``Out(bits_addr_width)``, ``Out(1)``, ``Out(lane)``
        BITS write port (post THRESHOLD), driven from registers.

    Latency and throughput
    ----------------------
    No backpressure: a counter chain issues one term (of all lanes of a group) per cycle with
    no gaps between output elements, groups or rows; an op with ``residual`` (and post
    REQUANT) spends one extra cycle per group and channel reading the residual run through the
    same INTS port. With ``E = terms_c * kernel_h * kernel_w + (1 if post == REQUANT and
    residual else 0)``, ``L`` as above and ``T = out_h * ceil(out_w / L) * out_channels * E``,
    ``busy`` is high for exactly ``T + LATENCY`` cycles (``LATENCY = 13``), plus, for
    THRESHOLD, ``(out_w - 1) % L`` cycles in which the last group's queued words are written
    (:func:`sw.isa.fixed_cycles`): the write of the group whose last term (or residual slot)
    is issued at cycle ``c`` is issued at cycle ``c + LATENCY``.

    REQUANT: the group's ``L`` accumulators go through the ``requant_pipes`` requantizers in
    ``S = max(L // requant_pipes, 1)`` passes (:func:`sw.isa.requant_passes`), one per cycle,
    and the group's write is issued at ``c + LATENCY + S``.

    Parallel (``parallel`` set, ``channels = M > 1``; the requirements of
    :func:`sw.isa.parallel_ok` and its notes, which the unit does not check): the loop over
    ``o`` steps by ``M`` (``o_plane`` by ``M * out_plane``); a term is one INTS run as above
    and one COEFS run of ``M`` coefficients at ``coef_addr`` (which steps by ``M`` per term,
    ``coef_base + (o // M) * coef_ostride`` per element), and lane ``i`` of channel ``o + j``
    accumulates ``x_i * coef_j``. Slot ``j < M`` of an element reads channel ``o + j``'s
    PARAMS record (or channel ``o``'s where ``o + j >= out_channels``): every slot's
    ``in_offset`` is the group's. The element's ``M * L`` accumulators then take ``S' = M *
    S`` passes, channel by channel (``S`` each), and each channel ``o + j < out_channels``
    gets its own run write after its last pass, ``S`` cycles apart. Elements are
    ``out_h * ceil(out_w / L) * ceil(out_channels / M)`` and ``S'`` replaces ``S`` in the
    formula below. An element of fewer than ``S``
    slots (``E < S``) is followed by ``S - E`` padding slots (none after the op's last), so
    ``busy`` is high for ``N * max(E, S) - max(S - E, 0) + LATENCY + S`` cycles (``N``
    elements). A new op can start in the cycle ``busy`` falls.

    Pipeline (cycle ``k`` after a term leaves the counters, every stage a register; the
    per-lane datapath of stages 3-7 is replicated ``lanes`` times):

    0. counters (incremental addresses: no runtime multiply); PARAMS read issued;
    1. ``P`` valid; the lanes' window bounds, the relative address, the rotation and
       ``pix * out_words`` (one registered multiply, for the BITS address) registered;
    2. INTS address ``P.in_offset + relative`` (or the residual's) and COEFS address issued;
       the BITS address registered;
    3. INTS run and COEFS data valid; the run registered as it leaves the block RAMs
       (:attr:`RUN_REGISTERS`: their outputs are not registered), then rotated into lane
       order. Every stage from 4 on comes ``RUN_REGISTERS`` cycles later than its number
       says (the code's names keep the numbers);
    4. the lanes' ``x`` and the coefficient registered (the rotator gets no multiplier
       behind it in the same cycle);
    5. ``x * coef`` registered (per lane one ``element_width x 8`` multiplier, and one
       per further channel);
    6. accumulators (sum or max; further channels: sum); in the residual slot, the residual
       run held; a parallel element's PARAMS records staged;
    7. the threshold compares; for REQUANT the element's accumulators, residuals, ``mul``,
       ``res_mul``, ``bias + half`` and ``shift`` held for the requantizers' passes
       (pass ``t`` at cycle ``7 + t`` takes lanes ``t * requant_pipes + j``);
    8-11. NONE: the accumulators delayed; THRESHOLD: the bits delayed;
    12. BITS word assembly and queue, the write registers (NONE, THRESHOLD).

    A requantizer, from its pass's cycle ``X``: ``X + 1`` ``acc * mul`` and ``res *
    res_mul`` in registered partial products (17-bit slices, each one 18 x 18 DSP with no
    wide adder behind it in the same cycle); ``X + 2`` the products combined, ``res *
    res_mul + bias + half``; ``X + 3`` ``v``; ``X + 4`` ``v >> shift`` (barrel shifter);
    ``X + 5`` the saturation compares; ``X + 6`` the saturation mux into the pass's lanes'
    write registers, and with the last pass the write.

    Resources (Yosys ``synth_ecp5`` and nextpnr ``--85k --out-of-context``, seed 1, for
    ``lane=32, int_addr_width=16, bits_addr_width=14, coef_addr_width=16,
    param_addr_width=10, max_terms=4096``), measured before lanes existed (``lanes=1``,
    ``LATENCY = 11``): 9 ``MULT18X18D``, about 2,200 LUT4, 600 CCU2C and 2,270 FFs (most of
    them the per-element parameters and addresses that travel down the pipeline); Fmax
    121 MHz, the critical path the 66-bit barrel shifter. Each further lane adds its term
    multiplier (2 ``MULT18X18D`` at ``element_width=24``) and accumulator, each further
    requantizer 5 (3 for ``acc * mul``, 2 for ``res * res_mul``), its adders, barrel shifter
    and compares. With a requantizer per lane (before ``requant_pipes``), Yosys
    ``synth_ecp5`` of the ULX3S-85F default's unit (``lanes=8``) counted 9,086 LUT4, 2,652
    CCU2C, 8,538 FFs and 59 ``MULT18X18D``: 43% of the whole device's logic cells, and
    nextpnr's router2 found most of its overused wires there (docs/builds.md). Each further
    channel (``channels > 1``) adds per lane an 18 x 8 multiplier (one ``MULT18X18D``), its
    product register and accumulator, and widens the requantizers' pass multiplexer by the
    channel count (the four-channel ULX3S-85F build did not route: docs/builds.md).

    """

    LATENCY = isa.FIXED_LATENCY
    #: Registers between the INTS memory's read data and the run's rotation (pipeline stage 3).
    RUN_REGISTERS = isa.FIXED_RUN_REGISTERS

    def __init__(self, *, lane, int_addr_width, bits_addr_width, coef_addr_width,
                 param_addr_width, max_terms, element_width=24, lanes=1, requant_pipes=None,
                 channels=1):
        if not isinstance(element_width, int) or not 2 <= element_width <= 63:
            raise ValueError(f"element_width must be an integer in [2, 63], not "
                             f"{element_width!r}")
        if (not isinstance(lanes, int) or isinstance(lanes, bool) or lanes < 1
                or lanes & (lanes - 1)):
            raise ValueError(f"lanes must be a positive power of two, not {lanes!r}")
        if requant_pipes is None:
            requant_pipes = isa.requant_pipes(lanes)
        if (not isinstance(requant_pipes, int) or isinstance(requant_pipes, bool)
                or requant_pipes < 1 or lanes % requant_pipes
                or requant_pipes & (requant_pipes - 1)):
            raise ValueError(f"requant_pipes must be a power of two that divides lanes "
                             f"({lanes}), not {requant_pipes!r}")
        if (not isinstance(channels, int) or isinstance(channels, bool) or channels < 1
                or channels & (channels - 1)):
            raise ValueError(f"channels must be a positive power of two, not {channels!r}")
        for name, value in (("lane", lane), ("int_addr_width", int_addr_width),
                            ("bits_addr_width", bits_addr_width),
                            ("coef_addr_width", coef_addr_width),
                            ("param_addr_width", param_addr_width), ("max_terms", max_terms)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, not {value!r}")
        self.element_width = element_width
        self.lane = lane
        self.lanes = lanes
        self.requant_pipes = requant_pipes
        self.channels = channels
        # The extra channels' multipliers take this many signed bits of x (isa.parallel_ok).
        self.parallel_x_bits = min(element_width, isa.PARALLEL_X_BITS)
        self.int_addr_width = int_addr_width
        self.bits_addr_width = bits_addr_width
        self.coef_addr_width = coef_addr_width
        self.param_addr_width = param_addr_width
        self.max_terms = max_terms
        # A term is at most |-2**(ew-1) * -128| = 2**(ew+6): ew + 8 signed bits.
        self.term_width = element_width + 8
        self.acc_width = self.term_width + max_terms.bit_length()
        self.config_layout = FIXED_LAYOUT
        self.param_layout = PARAM_LAYOUT
        super().__init__({
            "config": In(self.config_layout),
            "start": In(1),
            "busy": Out(1),
            "int_rd_addr": Out(int_addr_width),
            "int_rd_en": Out(1),
            "int_rd_data": In(data.ArrayLayout(signed(element_width), lanes)),
            "int_wr_addr": Out(int_addr_width),
            "int_wr_en": Out(1),
            "int_wr_mask": Out(lanes),
            "int_wr_data": Out(data.ArrayLayout(signed(element_width), lanes)),
            "coef_rd_addr": Out(coef_addr_width),
            "coef_rd_en": Out(1),
            "coef_rd_data": In(data.ArrayLayout(signed(8), channels)),
            "param_rd_addr": Out(param_addr_width),
            "param_rd_en": Out(1),
            "param_rd_data": In(self.param_layout),
            "bits_wr_addr": Out(bits_addr_width),
            "bits_wr_en": Out(1),
            "bits_wr_data": Out(lane),
        })

    def elaborate(self, platform):
        m = Module()
        cfg = self.config
        ew, lane, lanes, chans = self.element_width, self.lane, self.lanes, self.channels
        iaw, baw, caw = self.int_addr_width, self.bits_addr_width, self.coef_addr_width
        is_max = cfg.reduce == isa.Reduce.MAX
        post_requant = cfg.post == isa.Post.REQUANT
        post_threshold = cfg.post == isa.Post.THRESHOLD
        res_mode = post_requant & cfg.residual
        # Lanes compute consecutive pixels only where their terms are consecutive elements (one
        # run read) and their results are consecutive elements (one run write).
        # THRESHOLD lanes set bits of different BITS words; their words, written through a queue
        # one per cycle, must come no faster than one group's every `lanes` cycles: every word
        # (the last, of `last_word` channels, is the smallest) takes at least `lanes` elements.
        last_word = Signal(signed(max(len(cfg.out_channels), len(cfg.out_words)
                                      + lane.bit_length()) + 2))
        m.d.comb += last_word.eq(cfg.out_channels - (cfg.out_words - 1) * lane)
        dense = (cfg.stride == 1) & (~post_threshold | (last_word >= lanes))
        # Stride 2: half the lanes, whose terms are every second element of one run.
        spread = (cfg.stride == 2) & ~post_threshold & (lanes > 1)
        wide = dense | spread
        # Pixels of a group (but the row's last).
        step = Mux(dense, lanes, Mux(spread, max(lanes // 2, 1), 1))
        # Parallel: `chans` output channels of the group at once (sw.isa.parallel_ok); they
        # share the INTS run of each term and take one coefficient each.
        parallel = cfg.parallel if chans > 1 else Const(0)
        chan_bits = (chans - 1).bit_length()
        o_step = Mux(parallel, chans, 1)
        # REQUANT: cycles a group's accumulators take through the shared requantizers
        # (sw.isa.requant_passes), per channel (`chunks`) and in all; an element of fewer
        # slots is followed by padding slots.
        pipes = self.requant_pipes
        max_chunks = isa.requant_passes(lanes, pipes)
        max_passes = chans * max_chunks
        chunks = Mux(dense, max_chunks,
                     Mux(spread, isa.requant_passes(max(lanes // 2, 1), pipes), 1))
        passes = Mux(parallel, chunks << chan_bits, chunks)

        # ---- Stage 0: the counter chain --------------------------------------------------
        running = Signal()
        res_phase = Signal()        # the residual read slot after an element's last term
        kx, ky, tc = Signal(12), Signal(12), Signal(12)
        o, oy = Signal(12), Signal(12)
        rem = Signal(13)            # out_w - ox0: the row's pixels from the group's first on
        obit = Signal(range(lane))
        oword = Signal(12)
        # Window coordinates of lane 0: |iy| <= 4095 * 3 + 4095 < 2**15 for any field values.
        ix, iy, ix0, iy0 = (Signal(signed(16), name=n) for n in ("ix", "iy", "ix0", "iy0"))
        # Address parts, kept modulo the memory size: a real term's address is then right
        # however negative or large the parts of padding terms become.
        iy_row, iy0_row, chan = Signal(iaw), Signal(iaw), Signal(iaw)
        stride_row = Signal(iaw)    # stride * in_w
        o_plane, pix = Signal(iaw), Signal(iaw)     # pix: the group's first pixel
        coef_el, coef_addr = Signal(caw), Signal(caw)
        sat_lo, sat_hi = Signal(signed(65)), Signal(signed(65))

        kx_last = kx == cfg.kernel_w - 1
        ky_last = ky == cfg.kernel_h - 1
        tc_last = tc == cfg.terms_c - 1
        term_last = kx_last & ky_last & tc_last
        o_last = o + o_step >= cfg.out_channels
        group_last = rem <= step
        oy_last = oy == cfg.out_h - 1
        first0 = (kx == 0) & (ky == 0) & (tc == 0) & ~res_phase
        elem_end = res_phase | (term_last & ~res_mode)

        # A slot is issued in every running cycle but the padding slots (`wait` of them left)
        # after a REQUANT element of fewer slots (`slot` + 1 so far) than `passes`.
        slot = Signal(range(max_passes + 1))
        wait = Signal(range(max_passes + 1))
        issue = Signal()
        m.d.comb += issue.eq(running & (wait == 0))
        with m.If(running & (wait != 0)):
            m.d.sync += wait.eq(wait - 1)
        with m.If(issue):
            with m.If(elem_end):
                m.d.sync += slot.eq(0)
                with m.If(post_requant & (slot + 1 < passes)):
                    m.d.sync += wait.eq(passes - 1 - slot)
            with m.Elif(slot < max_passes):
                m.d.sync += slot.eq(slot + 1)

        with m.If(issue):
            with m.If(~res_phase):
                # Parallel: the channels' coefficients of a term are one run.
                m.d.sync += coef_addr.eq(coef_addr + o_step)
                with m.If(kx_last):
                    m.d.sync += [kx.eq(0), ix.eq(ix0)]
                    with m.If(ky_last):
                        m.d.sync += [ky.eq(0), iy.eq(iy0), iy_row.eq(iy0_row)]
                        with m.If(tc_last):
                            m.d.sync += [tc.eq(0), chan.eq(0)]
                            with m.If(res_mode):
                                m.d.sync += res_phase.eq(1)
                        with m.Else():
                            m.d.sync += [tc.eq(tc + 1), chan.eq(chan + cfg.term_stride)]
                    with m.Else():
                        m.d.sync += [ky.eq(ky + 1), iy.eq(iy + 1), iy_row.eq(iy_row + cfg.in_w)]
                with m.Else():
                    m.d.sync += [kx.eq(kx + 1), ix.eq(ix + 1)]
            # Later assignments override the ones above (next element, group, row).
            with m.If(elem_end):
                m.d.sync += res_phase.eq(0)
                with m.If(o_last):
                    m.d.sync += [o.eq(0), obit.eq(0), oword.eq(0), o_plane.eq(0),
                                 coef_el.eq(cfg.coef_base), coef_addr.eq(cfg.coef_base),
                                 pix.eq(pix + Mux(group_last, rem, step))]
                    with m.If(group_last):
                        m.d.sync += [rem.eq(cfg.out_w), ix0.eq(-cfg.pad), ix.eq(-cfg.pad)]
                        with m.If(oy_last):
                            m.d.sync += running.eq(0)
                        with m.Else():
                            m.d.sync += [oy.eq(oy + 1), iy0.eq(iy0 + cfg.stride),
                                         iy.eq(iy0 + cfg.stride),
                                         iy0_row.eq(iy0_row + stride_row),
                                         iy_row.eq(iy0_row + stride_row)]
                    with m.Else():
                        ix_step = Mux(wide, lanes, cfg.stride)     # step * stride
                        m.d.sync += [rem.eq(rem - step), ix0.eq(ix0 + ix_step),
                                     ix.eq(ix0 + ix_step)]
                with m.Else():
                    m.d.sync += [o.eq(o + o_step),
                                 o_plane.eq(o_plane + Mux(parallel, cfg.out_plane << chan_bits,
                                                          cfg.out_plane)),
                                 coef_el.eq(coef_el + cfg.coef_ostride),
                                 coef_addr.eq(coef_el + cfg.coef_ostride)]
                    with m.If(obit == lane - 1):
                        m.d.sync += [obit.eq(0), oword.eq(oword + 1)]
                    with m.Else():
                        m.d.sync += obit.eq(obit + 1)

        nonempty = ((cfg.out_h != 0) & (cfg.out_w != 0) & (cfg.out_channels != 0)
                    & (cfg.terms_c != 0) & (cfg.kernel_h != 0) & (cfg.kernel_w != 0))
        pow_bits = Signal(64)       # 2**bits (bits <= 63)
        m.d.comb += pow_bits.eq(Const(1, 1) << cfg.bits)
        with m.If(self.start & ~self.busy):
            m.d.sync += [
                running.eq(nonempty), res_phase.eq(0), slot.eq(0), wait.eq(0),
                kx.eq(0), ky.eq(0), tc.eq(0), o.eq(0), oy.eq(0), rem.eq(cfg.out_w),
                obit.eq(0), oword.eq(0),
                ix.eq(-cfg.pad), iy.eq(-cfg.pad), ix0.eq(-cfg.pad), iy0.eq(-cfg.pad),
                iy_row.eq(-(cfg.pad * cfg.in_w)), iy0_row.eq(-(cfg.pad * cfg.in_w)),
                stride_row.eq(cfg.stride * cfg.in_w), chan.eq(0),
                o_plane.eq(0), pix.eq(0),
                coef_el.eq(cfg.coef_base), coef_addr.eq(cfg.coef_base),
                sat_lo.eq(Mux(cfg.relu, 0, -(pow_bits >> 1))),
                sat_hi.eq(Mux(cfg.relu, pow_bits - 1, (pow_bits >> 1) - 1)),
            ]

        # Parallel: slot j < chans of an element reads channel o + j's record (the requantizers
        # need every channel's); the others, and those of channels past out_channels (in a
        # partial last group), read channel o's: every slot's in_offset is the group's.
        param_chan = Signal(range(chans))
        m.d.comb += param_chan.eq(Mux(parallel & (slot < chans)
                                      & (o + slot < cfg.out_channels), slot, 0))
        m.d.comb += [
            self.param_rd_addr.eq(cfg.param_base + o + param_chan),
            # Read every cycle rather than on first terms only: no reliance on the port holding
            # its data, which a port muxed by the core might not.
            self.param_rd_en.eq(running),
        ]

        # ---- Stage 1: PARAMS data valid; bounds and relative addresses registered ---------
        # Stages from 4 on come R cycles later than their names (and the docstring's
        # numbers) say: R = RUN_REGISTERS registers hold the INTS run between the block
        # RAMs and the rotator.
        R = self.RUN_REGISTERS
        valid = _delay(m, issue, self.LATENCY, "valid")
        first = _delay(m, issue & first0, 5 + R, "first")
        end = _delay(m, issue & elem_end, 11 + R, "end")
        res = _delay(m, res_phase, 5 + R, "res")
        iy_inside = (iy >= 0) & (iy < cfg.in_h)
        real1 = Signal(lanes)       # per lane: a real term (not padding), or the residual slot
        live1 = Signal(lanes)       # per lane: a pixel of the group (the write mask)
        for i in range(lanes):
            # Lane i's window column is ix + i (stride 1; lanes > 0 are unused otherwise).
            # Lane i's window column is ix + i * stride (lanes beyond the group are unused).
            offset = Mux(spread, 2 * i, i)
            inside = iy_inside & (ix >= -offset) & (ix < cfg.in_w - offset)
            m.d.sync += [
                real1[i].eq(res_phase | inside),
                live1[i].eq((rem > i) & (i < step)),
            ]
        # The run starts at the first lane whose column is not left of the row (ix >= 0): a
        # run then never reaches below the input row, so it needs no wrap-around below
        # address 0 (IntMemory has none). The data are rotated back by the lanes skipped.
        # When ix < -(lanes - 1) every lane is padding and nothing is read.
        rot_width = (lanes - 1).bit_length()
        rot1 = Signal(rot_width)
        rel1, outa1, resa1 = Signal(iaw), Signal(iaw), Signal(iaw)
        coefa1, pixw1, oword1 = Signal(caw), Signal(baw), Signal.like(oword)
        obit1, wlast1 = Signal(range(lane)), Signal()
        m.d.sync += [
            rel1.eq(chan + iy_row + Mux(ix < 0, 0, ix)),
            rot1.eq(Mux(ix < 0, -ix, 0)),
            coefa1.eq(coef_addr),
            outa1.eq(cfg.out_base + o_plane + pix),
            resa1.eq(cfg.res_base + o_plane + pix),
            pixw1.eq(pix * cfg.out_words),      # one registered multiply (a DSP)
            oword1.eq(oword),
            obit1.eq(obit),
            wlast1.eq((obit == lane - 1) | o_last),
        ]
        real = _delay(m, real1, 4 + R, "real")  # real[k] is stage k + 1 (k + 1 - R from 4 on)
        p1 = self.param_rd_data

        # ---- Stage 2: memory addresses ----------------------------------------------------
        addr2, coefa2, rot2, any2 = Signal(iaw), Signal(caw), Signal(rot_width), Signal()
        bitsa2 = Signal(baw)        # the BITS word of the group's first pixel
        m.d.sync += [
            bitsa2.eq(cfg.out_base + pixw1 + oword1),
            addr2.eq(Mux(res[1], resa1, p1.in_offset + rel1)),
            rot2.eq(Mux(res[1], 0, rot1)),
            any2.eq((real1 & live1).any()),
            coefa2.eq(coefa1),
        ]
        m.d.comb += [
            self.int_rd_addr.eq(addr2),
            self.int_rd_en.eq(valid[2] & any2),
            self.coef_rd_addr.eq(coefa2),
            self.coef_rd_en.eq(valid[2] & any2 & ~res[2] & cfg.multiply),
        ]

        # ---- Stage 3 (+ R) -> 4: the run back in lane order, registered ahead of the multiply
        # The run is registered as it leaves IntMemory (whose block RAM outputs are not
        # registered), so that the rotator below starts from a register.
        rot3 = _delay(m, rot2, 1 + R, "rot")[-1]
        run3 = [_delay(m, self.int_rd_data[i], R, f"run_{i}")[-1] for i in range(lanes)]
        x4 = [Signal(signed(ew), name=f"x4_{i}") for i in range(lanes)]
        c4 = [Signal(signed(8), name=f"c4_{j}") for j in range(chans)]
        # Stride 2: lane i's term is element 2 * i of the rotated run (the residual run is
        # consecutive pixels, as for stride 1).
        spread3 = _delay(m, spread & ~res[2], 1 + R, "spread")[-1]
        rotated = rotate_up(m, run3, rot3, "rot")
        for i, reg in enumerate(x4):
            if 2 * i < lanes:
                m.d.sync += reg.eq(Mux(spread3, rotated[2 * i], rotated[i]))
            else:
                m.d.sync += reg.eq(rotated[i])
        # The coefficients (COEFS latency 1) wait for the run's registers.
        for j in range(chans):
            m.d.sync += c4[j].eq(_delay(m, self.coef_rd_data[j], R, f"coef_{j}")[-1])

        # ---- Stage 4 -> 5: the terms (registered multiplies, one per lane) -----------------
        # term5[j][i]: channel j's term of lane i. Channel 0 multiplies the whole x (or takes
        # it as it is); the parallel channels 1.. the low parallel_x_bits of it (one DSP each).
        term5 = [[Signal(signed(self.term_width), name=f"term5_{j}_{i}") for i in range(lanes)]
                 for j in range(chans)]
        xb = self.parallel_x_bits
        for i in range(lanes):
            m.d.sync += term5[0][i].eq(
                Mux(real[3 + R][i], Mux(cfg.multiply, x4[i] * c4[0], x4[i]), 0))
            x_narrow = x4[i][:xb].as_signed() if xb < ew else x4[i]
            for j in range(1, chans):
                m.d.sync += term5[j][i].eq(Mux(real[3 + R][i], x_narrow * c4[j], 0))

        # ---- Stage 6: accumulators ----------------------------------------------------------
        aw = self.acc_width
        # acc6[j][i]: channel j's accumulator of lane i (channels 1.. sum only: parallel).
        acc6 = [[Signal(signed(aw), name=f"acc6_{j}_{i}") for i in range(lanes)]
                for j in range(chans)]
        most_negative = Const(-(1 << (aw - 1)), signed(aw))
        with m.If(valid[5 + R] & ~res[5 + R]):
            for i in range(lanes):
                real5 = real[4 + R][i]
                with m.If(is_max):
                    with m.If(first[5 + R]):
                        # Padding never wins: a padded first term starts from the most negative.
                        m.d.sync += acc6[0][i].eq(Mux(real5, term5[0][i], most_negative))
                    with m.Elif(real5 & (term5[0][i] > acc6[0][i])):
                        m.d.sync += acc6[0][i].eq(term5[0][i])
                with m.Else():
                    # Padding terms are 0 here (stage 5).
                    m.d.sync += acc6[0][i].eq(
                        Mux(first[5 + R], term5[0][i], acc6[0][i] + term5[0][i]))
                for j in range(1, chans):
                    m.d.sync += acc6[j][i].eq(
                        Mux(first[5 + R], term5[j][i], acc6[j][i] + term5[j][i]))
        # The parameters of the element at stage 1 travel with it to stage 6.
        param_line = _delay(m, p1.as_value(), 5 + R, "param")
        p6 = data.View(self.param_layout, param_line[5 + R])

        # ---- Stage 7: the threshold compares (every lane) ---------------------------------
        thr = p6.threshold
        bit7 = Signal(lanes)
        for i in range(lanes):
            m.d.sync += bit7[i].eq(Mux(p6.direction > 0, acc6[0][i] >= thr,
                                       Mux(p6.direction < 0, acc6[0][i] <= thr, thr != 0)))
        bit = _delay(m, bit7, 4, "bit")           # bit[k] is stage k + 7
        outa_line = _delay(m, outa1, 10 + R, "outa")
        outa11 = outa_line[-1]
        bitsa11 = _delay(m, bitsa2, 9 + R, "bitsa")[-1]
        obit11 = _delay(m, obit1, 10 + R, "obit")[-1]
        wlast11 = _delay(m, wlast1, 10 + R, "wlast")[-1]
        live_line = _delay(m, live1, 10 + R, "live")
        live11 = live_line[-1]

        # ---- REQUANT: the requantizers, each shared by lanes // pipes lanes ----------------
        # The element's accumulators, residuals and parameters are held (stage 7, `h*`) when
        # its last slot leaves stage 6; then `passes` passes run, channel by channel (one
        # channel but for parallel ops), `chunks` per channel (pass (c, t): channel c's lanes
        # t * pipes + j in requantizer j), each through six registered stages:
        #   X+1 acc * mul and res * res_mul in partial products (17-bit slices, one 18 x 18
        #       DSP each, no wide adder behind them in the same cycle);
        #   X+2 the products combined: a = acc * mul, b = res * res_mul + bias + half;
        #   X+3 v = a + b;  X+4 v >> shift (round half up: the half is in b);
        #   X+5 the saturation compares (about 66 bits wide: a stage of their own);
        #   X+6 the saturation mux into the lanes' write registers; a channel's last pass
        #       also registers its write (address, mask, enable), so every lane's value is
        #       in place when it is issued (the next channel's first pass lands a cycle
        #       later).
        # The holds are stable for the passes: elements are issued at least `passes` slots
        # apart (stage 0) and a residual is held from its slot (stage 6) until the element
        # ends. The residual run (x4 of the residual slot) is registered alongside term5.
        resv5 = [Signal(signed(ew), name=f"resv5_{i}") for i in range(lanes)]
        m.d.sync += [reg.eq(x) for reg, x in zip(resv5, x4)]
        res6 = [Signal(signed(ew), name=f"res6_{i}") for i in range(lanes)]
        with m.If(valid[5 + R] & res[5 + R]):
            m.d.sync += [reg.eq(x) for reg, x in zip(res6, resv5)]
        # Held per element: the accumulators (channel j's lane i at j * lanes + i), the
        # residuals (channel 0: parallel ops have none) and each channel's parameters. A
        # parallel element's channel j record is read in its slot j (param_chan) and staged
        # here as it passes stage 6 (the element has at least `chans` slots).
        hacc = [Signal(signed(aw), name=f"hacc_{k}") for k in range(chans * lanes)]
        hres = [Signal(signed(ew), name=f"hres_{i}") for i in range(lanes)]
        mul_width = len(p6.mul)
        hres_mul = Signal.like(p6.res_mul)
        bh_shape = signed(max(len(p6.bias), 64) + 1)        # bias + half
        hmul = [Signal.like(p6.mul, name=f"hmul_{j}") for j in range(chans)]
        hbh = [Signal(bh_shape, name=f"hbh_{j}") for j in range(chans)]
        hshift = [Signal.like(p6.shift, name=f"hshift_{j}") for j in range(chans)]
        hlive_chan = Signal(chans)      # channel o + j exists
        hlive = Signal(lanes)
        half6 = (Const(1, 1) << p6.shift)[1:]     # 2**(shift - 1); 0 when shift == 0
        slot6 = _delay(m, slot, 6 + R, "slot")[-1]
        o6 = _delay(m, o, 6 + R, "o")[-1]
        staged = [(Signal.like(p6.mul, name=f"smul_{j}"), Signal(bh_shape, name=f"sbh_{j}"),
                   Signal.like(p6.shift, name=f"sshift_{j}")) for j in range(chans)]
        for j, (smul, sbh, sshift) in enumerate(staged):
            with m.If(valid[6 + R] & (slot6 == j)):
                m.d.sync += [smul.eq(p6.mul), sbh.eq(p6.bias + half6), sshift.eq(p6.shift)]
        pass_valid = Signal()
        pass_chunk = Signal(range(max_chunks))      # the channel's lanes chunk * pipes + ...
        pass_chan = Signal(range(chans))
        pass_addr = Signal(iaw)                     # the channel's run address
        chunk_last = pass_chunk + 1 == chunks
        with m.If(end[6 + R] & post_requant):
            for j, (smul, sbh, sshift) in enumerate(staged):
                # This cycle's record is slot slot6's; slot 0 of a parallel element (at least
                # two slots) was staged before.
                now = (slot6 == j) if j else (~parallel | (slot6 == 0))
                m.d.sync += [hmul[j].eq(Mux(now, p6.mul, smul)),
                             hbh[j].eq(Mux(now, p6.bias + half6, sbh)),
                             hshift[j].eq(Mux(now, p6.shift, sshift)),
                             hlive_chan[j].eq(o6 + j < cfg.out_channels)]
            m.d.sync += [
                *(hacc[j * lanes + i].eq(acc6[j][i]) for j in range(chans) for i in range(lanes)),
                *(h.eq(Mux(cfg.residual, r, 0)) for h, r in zip(hres, res6)),
                hres_mul.eq(p6.res_mul), pass_addr.eq(outa_line[5 + R]),
                hlive.eq(live_line[5 + R]),
                pass_valid.eq(1), pass_chunk.eq(0), pass_chan.eq(0),
            ]
        with m.Elif(pass_valid & chunk_last):
            m.d.sync += pass_chunk.eq(0)
            with m.If(pass_chan + 1 >= Mux(parallel, chans, 1)):
                m.d.sync += pass_valid.eq(0)
            with m.Else():
                m.d.sync += [pass_chan.eq(pass_chan + 1),
                             pass_addr.eq(pass_addr + cfg.out_plane)]
        with m.Elif(pass_valid):
            m.d.sync += pass_chunk.eq(pass_chunk + 1)

        # Pass (pass_chan, pass_chunk) takes accumulator pass_chan * lanes + pass_chunk * pipes
        # + j in requantizer j.
        pass_sel = Signal(range(max_passes))
        m.d.comb += pass_sel.eq(pass_chan * max_chunks + pass_chunk)

        def pass_lane(values, j):
            return Array(values[t * pipes + j] for t in range(len(values) // pipes))[
                pass_sel if len(values) > lanes else pass_chunk]

        sel_mul = Array(hmul)[pass_chan]
        sel_bh = Array(hbh)[pass_chan]
        sel_shift = Array(hshift)[pass_chan]
        pv = _delay(m, pass_valid, 6, "pass_valid")     # pv[k] is stage X + k
        pchunk = _delay(m, pass_chunk, 6, "pass_chunk")
        # A channel's run is written with its last pass (if the channel exists).
        plast = _delay(m, pass_valid & chunk_last & Array(hlive_chan)[pass_chan], 6,
                       "pass_last")
        pshift = _delay(m, sel_shift, 4, "pass_shift")
        paddr = _delay(m, pass_addr, 5, "pass_addr")
        plive = _delay(m, hlive, 5, "pass_live")
        prod_width = aw + mul_width + 1
        v_width = max(prod_width, ew + len(hres_mul) + 1, bh_shape.width) + 2
        for j in range(pipes):
            mul_parts = _partial_products(pass_lane(hacc, j), sel_mul, f"mul_{j}")
            res_parts = _partial_products(pass_lane(hres, j), hres_mul, f"res_mul_{j}")
            m.d.sync += [reg.eq(product) for _, reg, product in mul_parts + res_parts]
            bh1 = Signal(bh_shape, name=f"bh1_{j}")
            a2 = Signal(signed(prod_width), name=f"a2_{j}")
            b2 = Signal(signed(v_width), name=f"b2_{j}")
            v3 = Signal(signed(v_width), name=f"v3_{j}")
            y4 = Signal(signed(v_width), name=f"y4_{j}")
            m.d.sync += [
                bh1.eq(sel_bh),
                a2.eq(_sum_shifted(mul_parts)),
                b2.eq(_sum_shifted(res_parts) + bh1),
                v3.eq(a2 + b2),
                y4.eq(v3 >> pshift[3]),
            ]
            below5, above5 = Signal(name=f"below5_{j}"), Signal(name=f"above5_{j}")
            y5 = Signal(signed(ew), name=f"y5_{j}")
            m.d.sync += [below5.eq(y4 < sat_lo), above5.eq(y4 > sat_hi), y5.eq(y4)]
            sat5 = Mux(below5, sat_lo, Mux(above5, sat_hi, y5))
            for t in range(max_chunks):
                lane_index = t * pipes + j
                acc11 = _delay(m, acc6[0][lane_index], 5, f"acc_{lane_index}")[-1]
                with m.If(~post_requant):
                    m.d.sync += self.int_wr_data[lane_index].eq(acc11)
                with m.Elif(pv[5] & (pchunk[5] == t)):
                    m.d.sync += self.int_wr_data[lane_index].eq(sat5)

        # BITS words (stage 12): each lane collects its pixel's bits; after a word's last channel
        # the group's words go to a queue that writes one per cycle, lane 0's at once (the
        # schedule leaves at least `lanes` cycles between two groups' words, so the queue is
        # empty again before the next).
        words = [Signal(lane, name=f"word_{i}") for i in range(lanes)]
        queue = [Signal(lane, name=f"queue_{i}") for i in range(lanes - 1)]
        queue_left = Signal(range(lanes))       # words in the queue
        queue_addr = Signal(baw)                # BITS address of the queue's first word
        # A word starts at channel bit 0, so bits above out_channels stay 0.
        word_next = [Mux(obit11 == 0, 0, words[i]) | (bit[4][i].as_unsigned() << obit11)
                     for i in range(lanes)]
        live_count = Signal(range(lanes + 1))   # pixels of the group (its lanes are 0, 1, ...)
        m.d.comb += live_count.eq(sum(live11[i] for i in range(lanes)))
        m.d.sync += [
            self.int_wr_en.eq(Mux(post_requant, plast[5], end[11 + R] & ~post_threshold)),
            self.int_wr_addr.eq(Mux(post_requant, paddr[5], outa11)),
            self.int_wr_mask.eq(Mux(post_requant, plive[5], live11)),
            self.bits_wr_en.eq(0),
        ]
        with m.If(end[11 + R] & post_threshold):
            m.d.sync += [word.eq(nxt) for word, nxt in zip(words, word_next)]
        with m.If(end[11 + R] & wlast11 & post_threshold):
            m.d.sync += [
                self.bits_wr_en.eq(1),
                self.bits_wr_addr.eq(bitsa11),
                self.bits_wr_data.eq(word_next[0]),
                queue_left.eq(live_count - 1),
                queue_addr.eq(bitsa11 + cfg.out_words),
            ]
            m.d.sync += [entry.eq(nxt) for entry, nxt in zip(queue, word_next[1:])]
        if queue:               # lanes > 1
            with m.Elif(queue_left != 0):
                m.d.sync += [
                    self.bits_wr_en.eq(1),
                    self.bits_wr_addr.eq(queue_addr),
                    self.bits_wr_data.eq(queue[0]),
                    queue_left.eq(queue_left - 1),
                    queue_addr.eq(queue_addr + cfg.out_words),
                ]
                m.d.sync += [entry.eq(nxt) for entry, nxt in itertools.pairwise(queue)]

        # The queue's writes after the pipeline's last stage keep the unit busy.
        busy = running | self.bits_wr_en
        for v in valid[1:] + pv:
            busy = busy | v
        m.d.comb += self.busy.eq(busy)
        return m
