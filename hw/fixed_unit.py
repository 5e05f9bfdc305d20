"""The fixed-point unit: executes one fixed-point op of the layer program (every kind but bconv).

One op is a loop nest over output pixels and channels; each output element reduces a window of
terms (a sum of products for conv/combine, a maximum for max pool, a single term for the
element-wise ops) and post-processes it (nothing, requantize, or threshold to a bit). The op's
settings are one :data:`sw.isa.FIXED_FIELDS` record and one :data:`sw.isa.PARAM` record per
output channel; :mod:`hw.isa` builds the hardware layouts from those field lists, so the
compiler's code generator and this unit cannot disagree.
"""

from amaranth import Const, Module, Mux, Signal, signed
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from sw import isa

from .isa import FIXED_LAYOUT, PARAM_LAYOUT

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
    """Executes one fixed-point op, one term per cycle, fully pipelined.

    The op (``config`` holds the :data:`sw.isa.FIXED_FIELDS` settings; ``P`` is the
    :data:`sw.isa.PARAM` record of output channel ``o``)::

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
    memory sizes; padding terms read nothing (``int_rd_en`` low), and COEFS are read only
    when ``multiply`` is set.

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
    int_rd_addr, int_rd_en : ``Out(int_addr_width)``, ``Out(1)``; int_rd_data : ``In(signed(
    element_width))``
        INTS read port: ``int_rd_data`` is ``INTS[int_rd_addr]`` of the previous cycle's
        request (latency exactly 1, as a block RAM's synchronous read).
    int_wr_addr, int_wr_en, int_wr_data : ``Out(int_addr_width)``, ``Out(1)``,
    ``Out(signed(element_width))``
        INTS write port (outputs of posts NONE and REQUANT), driven from registers.
    coef_rd_addr, coef_rd_en : ``Out(coef_addr_width)``, ``Out(1)``; coef_rd_data :
    ``In(signed(8))``
        COEFS read port, latency 1.
    param_rd_addr, param_rd_en : ``Out(param_addr_width)``, ``Out(1)``; param_rd_data :
    ``In(hw.isa.PARAM_LAYOUT)``
        PARAMS read port, latency 1, read (``param_base + o``) in every cycle a term or
        residual slot is issued.
    bits_wr_addr, bits_wr_en, bits_wr_data : ``Out(bits_addr_width)``, ``Out(1)``, ``Out(lane)``
        BITS write port (post THRESHOLD), driven from registers.

    Latency and throughput
    ----------------------
    No backpressure: a counter chain issues one term per cycle with no gaps between output
    elements, pixels or rows; an op with ``residual`` (and post REQUANT) spends one extra cycle
    per output element reading the residual through the same INTS port. With
    ``E = terms_c * kernel_h * kernel_w + (1 if post == REQUANT and residual else 0)`` and
    ``T = out_h * out_w * out_channels * E``, ``busy`` is high for exactly ``T + LATENCY``
    cycles (``LATENCY = 11``): the write of the element whose last term (or residual slot) is
    issued at cycle ``c`` is issued at cycle ``c + LATENCY``. A new op can start in the cycle
    ``busy`` falls.

    Pipeline (cycle ``k`` after a term leaves the counters, every stage a register):

    0. counters (incremental addresses: no runtime multiply); PARAMS read issued;
    1. ``P`` valid; window bounds and the relative address registered;
    2. INTS address ``P.in_offset + relative`` (or the residual's) and COEFS address issued;
    3. INTS and COEFS data valid;
    4. ``x * coef`` registered (one ``element_width x 8`` multiplier, a DSP);
    5. accumulator (sum or max); in the residual slot, ``res * res_mul`` in registered
       partial products (as ``acc * mul`` below);
    6. ``acc * mul`` in registered partial products (17-bit slices of ``acc``, each one
       18 x 18 DSP with no wide adder behind it in the same cycle), ``res * res_mul``
       combined, ``bias + half``, the threshold compare;
    7. partial products combined; ``res * res_mul + bias + half``;
    8. ``v``; 9. ``v >> shift`` (barrel shifter); 10. the saturation compares;
    11. the saturation mux, BITS word assembly, the write registers.

    Resources (Yosys ``synth_ecp5`` and nextpnr ``--85k --out-of-context``, seed 1, for
    ``lane=32, int_addr_width=16, bits_addr_width=14, coef_addr_width=16,
    param_addr_width=10, max_terms=4096``): 9 ``MULT18X18D``, about 2,200 LUT4, 600 CCU2C and
    2,270 FFs (most of them the per-element parameters and addresses that travel down the
    pipeline); Fmax 121 MHz, the critical path the 66-bit barrel shifter of stage 9.
    """

    LATENCY = 11

    def __init__(self, *, lane, int_addr_width, bits_addr_width, coef_addr_width,
                 param_addr_width, max_terms, element_width=24):
        if not isinstance(element_width, int) or not 2 <= element_width <= 63:
            raise ValueError(f"element_width must be an integer in [2, 63], not "
                             f"{element_width!r}")
        for name, value in (("lane", lane), ("int_addr_width", int_addr_width),
                            ("bits_addr_width", bits_addr_width),
                            ("coef_addr_width", coef_addr_width),
                            ("param_addr_width", param_addr_width), ("max_terms", max_terms)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, not {value!r}")
        self.element_width = element_width
        self.lane = lane
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
            "int_rd_data": In(signed(element_width)),
            "int_wr_addr": Out(int_addr_width),
            "int_wr_en": Out(1),
            "int_wr_data": Out(signed(element_width)),
            "coef_rd_addr": Out(coef_addr_width),
            "coef_rd_en": Out(1),
            "coef_rd_data": In(signed(8)),
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
        ew, lane = self.element_width, self.lane
        iaw, baw, caw = self.int_addr_width, self.bits_addr_width, self.coef_addr_width
        is_max = cfg.reduce == isa.Reduce.MAX
        post_requant = cfg.post == isa.Post.REQUANT
        post_threshold = cfg.post == isa.Post.THRESHOLD
        res_mode = post_requant & cfg.residual

        # ---- Stage 0: the counter chain --------------------------------------------------
        running = Signal()
        res_phase = Signal()        # the residual read slot after an element's last term
        kx, ky, tc = Signal(12), Signal(12), Signal(12)
        o, ox, oy = Signal(12), Signal(12), Signal(12)
        obit = Signal(range(lane))
        oword = Signal(12)
        # Window coordinates: |iy| <= 4095 * 3 + 4095 < 2**15 for any field values.
        ix, iy, ix0, iy0 = (Signal(signed(16), name=n) for n in ("ix", "iy", "ix0", "iy0"))
        # Address parts, kept modulo the memory size: a real term's address is then right
        # however negative or large the parts of padding terms become.
        iy_row, iy0_row, chan = Signal(iaw), Signal(iaw), Signal(iaw)
        stride_row = Signal(iaw)    # stride * in_w
        o_plane, pix = Signal(iaw), Signal(iaw)
        pixw = Signal(baw)          # pix * out_words
        coef_el, coef_addr = Signal(caw), Signal(caw)
        sat_lo, sat_hi = Signal(signed(65)), Signal(signed(65))

        kx_last = kx == cfg.kernel_w - 1
        ky_last = ky == cfg.kernel_h - 1
        tc_last = tc == cfg.terms_c - 1
        term_last = kx_last & ky_last & tc_last
        o_last = o == cfg.out_channels - 1
        ox_last = ox == cfg.out_w - 1
        oy_last = oy == cfg.out_h - 1
        first0 = (kx == 0) & (ky == 0) & (tc == 0) & ~res_phase
        elem_end = res_phase | (term_last & ~res_mode)

        with m.If(running):
            with m.If(~res_phase):
                m.d.sync += coef_addr.eq(coef_addr + 1)
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
            # Later assignments override the ones above (next element, pixel, row).
            with m.If(elem_end):
                m.d.sync += res_phase.eq(0)
                with m.If(o_last):
                    m.d.sync += [o.eq(0), obit.eq(0), oword.eq(0), o_plane.eq(0),
                                 coef_el.eq(cfg.coef_base), coef_addr.eq(cfg.coef_base),
                                 pix.eq(pix + 1), pixw.eq(pixw + cfg.out_words)]
                    with m.If(ox_last):
                        m.d.sync += [ox.eq(0), ix0.eq(-cfg.pad), ix.eq(-cfg.pad)]
                        with m.If(oy_last):
                            m.d.sync += running.eq(0)
                        with m.Else():
                            m.d.sync += [oy.eq(oy + 1), iy0.eq(iy0 + cfg.stride),
                                         iy.eq(iy0 + cfg.stride),
                                         iy0_row.eq(iy0_row + stride_row),
                                         iy_row.eq(iy0_row + stride_row)]
                    with m.Else():
                        m.d.sync += [ox.eq(ox + 1), ix0.eq(ix0 + cfg.stride),
                                     ix.eq(ix0 + cfg.stride)]
                with m.Else():
                    m.d.sync += [o.eq(o + 1), o_plane.eq(o_plane + cfg.out_plane),
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
                running.eq(nonempty), res_phase.eq(0),
                kx.eq(0), ky.eq(0), tc.eq(0), o.eq(0), ox.eq(0), oy.eq(0),
                obit.eq(0), oword.eq(0),
                ix.eq(-cfg.pad), iy.eq(-cfg.pad), ix0.eq(-cfg.pad), iy0.eq(-cfg.pad),
                iy_row.eq(-(cfg.pad * cfg.in_w)), iy0_row.eq(-(cfg.pad * cfg.in_w)),
                stride_row.eq(cfg.stride * cfg.in_w), chan.eq(0),
                o_plane.eq(0), pix.eq(0), pixw.eq(0),
                coef_el.eq(cfg.coef_base), coef_addr.eq(cfg.coef_base),
                sat_lo.eq(Mux(cfg.relu, 0, -(pow_bits >> 1))),
                sat_hi.eq(Mux(cfg.relu, pow_bits - 1, (pow_bits >> 1) - 1)),
            ]

        m.d.comb += [
            self.param_rd_addr.eq(cfg.param_base + o),
            # Read every cycle rather than on first terms only: no reliance on the port holding
            # its data, which a port muxed by the core might not.
            self.param_rd_en.eq(running),
        ]

        # ---- Stage 1: PARAMS data valid; bounds and relative addresses registered ---------
        valid = _delay(m, running, self.LATENCY, "valid")
        first = _delay(m, running & first0, 4, "first")
        end = _delay(m, running & elem_end, 10, "end")
        res = _delay(m, res_phase, 4, "res")
        inside = (iy >= 0) & (iy < cfg.in_h) & (ix >= 0) & (ix < cfg.in_w)
        pad1 = Signal()
        rel1, outa1, resa1 = Signal(iaw), Signal(iaw), Signal(iaw)
        coefa1, bitsa1 = Signal(caw), Signal(baw)
        obit1, wlast1 = Signal(range(lane)), Signal()
        m.d.sync += [
            pad1.eq(~res_phase & ~inside),
            rel1.eq(chan + iy_row + ix),
            coefa1.eq(coef_addr),
            outa1.eq(cfg.out_base + o_plane + pix),
            resa1.eq(cfg.res_base + o_plane + pix),
            bitsa1.eq(cfg.out_base + pixw + oword),
            obit1.eq(obit),
            wlast1.eq((obit == lane - 1) | o_last),
        ]
        pad = _delay(m, pad1, 3, "pad")     # pad[k] is stage k + 1
        p1 = self.param_rd_data

        # ---- Stage 2: memory addresses ----------------------------------------------------
        addr2, coefa2 = Signal(iaw), Signal(caw)
        m.d.sync += [
            addr2.eq(Mux(res[1], resa1, p1.in_offset + rel1)),
            coefa2.eq(coefa1),
        ]
        m.d.comb += [
            self.int_rd_addr.eq(addr2),
            self.int_rd_en.eq(valid[2] & ~pad[1]),
            self.coef_rd_addr.eq(coefa2),
            self.coef_rd_en.eq(valid[2] & ~pad[1] & ~res[2] & cfg.multiply),
        ]

        # ---- Stage 3 -> 4: the term (registered multiply) ---------------------------------
        x3, c3 = self.int_rd_data, self.coef_rd_data
        term4 = Signal(signed(self.term_width))
        resv4 = Signal(signed(ew))
        m.d.sync += [
            term4.eq(Mux(pad[2], 0, Mux(cfg.multiply, x3 * c3, x3))),
            resv4.eq(x3),
        ]

        # ---- Stage 5: accumulator ----------------------------------------------------------
        aw = self.acc_width
        acc5 = Signal(signed(aw))
        most_negative = Const(-(1 << (aw - 1)), signed(aw))
        with m.If(valid[4] & ~res[4]):
            with m.If(is_max):
                with m.If(first[4]):
                    # Padding never wins: a padded first term starts from the most negative.
                    m.d.sync += acc5.eq(Mux(pad[3], most_negative, term4))
                with m.Elif(~pad[3] & (term4 > acc5)):
                    m.d.sync += acc5.eq(term4)
            with m.Else():
                # Padding terms are 0 here (stage 4).
                m.d.sync += acc5.eq(Mux(first[4], term4, acc5 + term4))
        # The parameters of the element at stage 1 travel with it to stage 5.
        param_line = _delay(m, p1.as_value(), 4, "param")
        p4 = data.View(self.param_layout, param_line[3])
        p5 = data.View(self.param_layout, param_line[4])

        # res * res_mul in partial products like acc * mul (below): the residual slot is the
        # element's last, so they are ready when the accumulator is.
        res_parts5 = _partial_products(resv4, p4.res_mul, "res_mul5")
        with m.If(valid[4] & res[4]):
            m.d.sync += [reg.eq(product) for _, reg, product in res_parts5]

        # ---- Stage 6: products, bias + half, threshold compare -----------------------------
        mul_width = len(p5.mul)
        mul_parts6 = _partial_products(acc5, p5.mul, "mul6")
        m.d.sync += [reg.eq(product) for _, reg, product in mul_parts6]
        rp6 = Signal(signed(ew + len(p5.res_mul) + 1))
        bh6 = Signal(signed(max(len(p5.bias), 64) + 1))
        bit6 = Signal()
        half5 = (Const(1, 1) << p5.shift)[1:]     # 2**(shift - 1); 0 when shift == 0
        thr = p5.threshold
        m.d.sync += [
            rp6.eq(Mux(cfg.residual, _sum_shifted(res_parts5), 0)),
            bh6.eq(p5.bias + half5),
            bit6.eq(Mux(p5.direction > 0, acc5 >= thr,
                        Mux(p5.direction < 0, acc5 <= thr, thr != 0))),
        ]
        shift = _delay(m, p5.shift, 4, "shift")   # shift[k] is stage k + 5
        acc = _delay(m, acc5, 5, "acc")           # acc[k] is stage k + 5
        bit = _delay(m, bit6, 4, "bit")           # bit[k] is stage k + 6

        # ---- Stage 7, 8: v = acc * mul + res * res_mul + bias + half -----------------------
        prod_width = aw + mul_width + 1
        v_width = max(prod_width, len(rp6), len(bh6)) + 2
        a7, b7, v8 = Signal(signed(prod_width)), Signal(signed(v_width)), Signal(signed(v_width))
        m.d.sync += [
            a7.eq(_sum_shifted(mul_parts6)),
            b7.eq(rp6 + bh6),
            v8.eq(a7 + b7),
        ]

        # ---- Stage 9: arithmetic shift (round half up with the half added above) ----------
        y9 = Signal(signed(v_width))
        m.d.sync += y9.eq(v8 >> shift[3])

        # ---- Stage 10: the saturation compares (66 bits wide: a stage of their own) -------
        below10, above10 = Signal(), Signal()
        y10 = Signal(signed(ew))
        m.d.sync += [
            below10.eq(y9 < sat_lo),
            above10.eq(y9 > sat_hi),
            y10.eq(y9),
        ]

        # ---- Stage 11: saturation, BITS word assembly, the write registers ----------------
        outa10 = _delay(m, outa1, 9, "outa")[-1]
        bitsa10 = _delay(m, bitsa1, 9, "bitsa")[-1]
        obit10 = _delay(m, obit1, 9, "obit")[-1]
        wlast10 = _delay(m, wlast1, 9, "wlast")[-1]
        sat10 = Mux(below10, sat_lo, Mux(above10, sat_hi, y10))
        word = self.bits_wr_data
        # A word starts at channel bit 0, so bits above out_channels stay 0.
        word_next = Mux(obit10 == 0, 0, word) | (bit[4].as_unsigned() << obit10)
        m.d.sync += [
            self.int_wr_en.eq(end[10] & ~post_threshold),
            self.int_wr_addr.eq(outa10),
            self.int_wr_data.eq(Mux(post_requant, sat10, acc[5])),
            self.bits_wr_en.eq(end[10] & wlast10 & post_threshold),
            self.bits_wr_addr.eq(bitsa10),
        ]
        with m.If(end[10] & post_threshold):
            m.d.sync += word.eq(word_next)

        busy = running
        for v in valid[1:]:
            busy = busy | v
        m.d.comb += self.busy.eq(busy)
        return m
