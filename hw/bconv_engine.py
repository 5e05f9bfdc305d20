"""The binary conv engine: runs one ``bconv`` of the layer program from the on-chip memories.

A ``bconv`` (golden model: :func:`sw.compile.golden.execute_op`, kind ``"bconv"``) is a GEMM
whose activation matrix is the implicit im2col of a bit map: :class:`hw.conv_window.ConvWindow`
reads the windows from BITS memory, the weights come from WEIGHTS memory in the window's K order
(:func:`sw.packing.conv_window_weight_bits`), :class:`hw.array.XnorArray` computes the counts,
and the engine writes (or adds) them as runs of ``cols`` pixels into INTS memory
(:class:`hw.int_memory.IntMemory`), channel planes as :mod:`sw.isa` describes.

With a THRESHOLD ``post`` (the descriptor's FIXED half, :data:`sw.isa.BCONV_POST`) the
engine instead compares each count with its channel's
threshold record (PARAMS, as the fixed-point unit's THRESHOLD post) and writes the bits into
BITS memory: a binary conv followed by a threshold, and optionally a 2x2 max pool between
them (``pool``), is one op whose counts never reach INTS.
"""

import itertools

from amaranth import Cat, Const, Module, Mux, Signal, signed
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from sw import isa

from .array import XnorArray
from .conv_window import ConvWindow
from .isa import BCONV_LAYOUT, BCONV_POST_LAYOUT, PARAM_LAYOUT

__all__ = ["BconvEngine"]


def _setting(value, config, name, default):
    """A constructor argument, else the device configuration's field, else the default."""
    if value is None:
        value = getattr(config, name, default)
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, not {value!r}")
    return value


class BconvEngine(wiring.Component):
    """Computes a binary convolution from BITS and WEIGHTS memory into INTS memory.

    Parameters
    ----------
    config : :class:`hw.config.DeviceConfig`
        ``rows``, ``cols``, ``lane``, ``max_depth`` (the array) and ``weight_depth`` (WEIGHTS
        words).
    element_width, int_depth, bits_depth : int, optional
        INTS element bits, INTS elements and BITS words (PARAMS records: ``config``'s
        ``param_depth``, else 512). Default: the fields of these names of
        ``config`` if it has them, else 24, 4096 and 4096. ``element_width`` must exceed the
        array's ``acc_width`` (a count is written as a non-negative element).
    own_array : bool
        Whether the engine holds its own :class:`~hw.array.XnorArray` (default) or drives one
        through ``array_port``.

    Members
    -------
    config : ``In(hw.isa.BCONV_LAYOUT)``
        The op's settings (see :data:`sw.isa.BCONV_FIELDS`). Hold stable from ``start`` until
        ``busy`` falls. Requirements (not checked): ``channel_words = ceil(channels / lane)``,
        ``k_words = kernel**2 * channel_words``, ``k_words * lane <= max_depth``,
        ``m_tiles = ceil(out_channels / rows) >= 1``, ``out_plane = OH * OW >= 1`` with the
        golden geometry, ``in_h + 2 * pad >= kernel`` and ``in_w + 2 * pad >= kernel``, and
        every address in its memory.
    post : ``In(hw.isa.BCONV_POST_LAYOUT)``
        The FIXED fields of the descriptor that a BCONV reads (:data:`sw.isa.BCONV_POST`),
        held like ``config``: ``post == Post.THRESHOLD`` selects the threshold mode below
        (called *threshold*), ``reduce == Reduce.MAX`` with it the pool (*pool*), and
        ``out_base`` (a BITS word address), ``out_words`` and ``param_base`` its output.
    start : ``In(1)``
        While ``busy`` is low, a high ``start`` begins the op (in that cycle; ``config`` must be
        valid then).
    busy : ``Out(1)``
        High from the cycle after ``start`` until the cycle after the last INTS write.
    rd : ``Out(read_signature).array(cols)``
        BITS read ports, as :class:`~hw.conv_window.ConvWindow`'s ``rd`` (``addr``, ``en``
        out; ``data`` in, one cycle after an ``en`` cycle, held while ``en`` is low), but with
        ``addr`` a BITS word address (``in_base`` added).
    w_rd_addr : ``Out(weight_addr_width)``, w_rd_en : ``Out(1)``, w_rd_data : ``In(rows * lane)``
        WEIGHTS read port, same timing as ``rd``.
    int_rd_addr, int_rd_en, int_rd_data, int_wr_addr, int_wr_en, int_wr_mask, int_wr_data
        The engine's side of :class:`~hw.int_memory.IntMemory`'s ports (directions flipped),
        for a memory with ``banks = cols``. The read port is used only when ``add`` is set,
        neither port with *threshold*.
    param_rd_addr, param_rd_en : ``Out``; param_rd_data : ``In(hw.isa.PARAM_LAYOUT)``
        PARAMS read port (latency 1), used only with *threshold*: ``threshold`` and
        ``direction`` of each channel's record.
    bits_wr_addr : ``Out(bits_addr_width)``, bits_wr_en : ``Out(bits_groups)``, bits_wr_data :
    ``Out(lane)``
        BITS write port with one enable per group of ``rows`` bits (``bits_groups = lane //
        rows``; 1 if ``rows`` does not divide ``lane``, where *threshold* is unsupported),
        driven from registers; used only with *threshold*.
    array_port : ``Out(XnorArray.port_signature)``
        Only with ``own_array=False``: the array the engine shares with other units
        (:func:`hw.array.share_array`); it must own it from ``start`` until ``busy`` falls.

    Semantics
    ---------
    For each row tile ``mt`` in ``range(m_tiles)``, one ConvWindow pass over the map; tile ``t``
    of the pass multiplies WEIGHTS words ``weight_base + mt * k_words + kw`` (``kw`` in
    ``range(k_words)``) with the window words of pixels ``n0 = t * cols .. n0 + cols - 1``.
    Row ``r`` of the result is output channel ``o = mt * rows + r``; its counts are written as a
    run to INTS ``out_base + o * out_plane + n0`` with mask ``(n0 + i < out_plane) & (o <
    out_channels)`` (nothing else is written). With ``add`` set, the value written is the old
    element plus the count (read-modify-write, modulo ``2**element_width``).

    With *threshold* (requirements: ``add`` 0, ``lane % rows == 0``, ``W = bits_words``
    (:func:`sw.isa.bconv_bits_words` ``(cols, pool)``) at most ``max(k_words, rows)``), nothing
    goes to INTS. Row ``r`` of a result beat (channel ``o``) is compared with ``P =
    PARAMS[param_base + o]`` like the fixed-point unit's THRESHOLD: ``count >= P.threshold``
    (``P.direction > 0``), ``count <= P.threshold`` (``< 0``), ``P.threshold != 0`` (0); 0 for
    ``o >= out_channels``. Without ``pool`` the tile's ``cols`` pixels are pixels ``n0 + i``
    (raster order); with ``pool`` (``cols % 4 == 0``) the window runs in pool-window order
    (:class:`~hw.conv_window.ConvWindow`: ``out_plane = 4 * (OH // 2) * (OW // 2)``) and
    columns ``4j .. 4j + 3`` are pooling window ``p = n0 / 4 + j``, whose bit is the OR of
    the four compares for direction +1 (``max >= t``), their AND for -1 (``max <= t``). The
    ``rows`` bits of a slot (pixel or window ``p``) are collected over the tile's rows and
    written as group ``g = (mt * rows) % lane / rows`` of BITS word ``out_base + p * out_words
    + mt * rows // lane`` (``out_base``, ``out_words``, ``param_base``: ``post``'s): the
    enables of that group only, but all of them for ``g = 0`` (the
    word's first row tile, which comes first), with 0 bits above the group. So after the op
    every word of the output holds exactly a FIXED THRESHOLD's bits (0 for channels ``>=
    out_channels``) and nothing else in BITS has changed. Slot 0's word is written when the
    tile's last row is, the others in the next ``W - 1`` cycles (slots past ``out_plane`` are
    not written).

    Throughput and latency
    ----------------------
    The array takes one word per cycle, tiles back to back; tiles shorter than ``rows`` words
    are throttled to ``rows`` cycles by the array's result path; a row tile's pass starts three
    cycles after the previous one's last word. With ``k = k_words``, ``R = rows``, ``C = cols``,
    ``M = m_tiles``, ``N = ceil(out_plane / C)``, ``P = max(k, R)``, ``Q = max(k + 2, R)`` and
    ``S = sw.isa.window_setup_cycles(C)``, an op takes exactly::

        cycles = S + M * (N - 1) * P + (M - 1) * Q + k + 2 * R + C + 5

    cycles (plus ``W - 1 + sw.isa.BCONV_PARAM_REGISTERS`` with *threshold*: the last tile's
    queued words and the PARAMS record's registers before the compares) from the cycle
    ``start`` is seen (cycle 0) to the first cycle with ``busy`` low:
    ``S`` for the window's geometry pipeline to settle on the config, ``k + 1`` until the
    first tile's last word enters the array, ``R + C + 2`` more until its first result row,
    one cycle per row, two for the read-modify-write stages and one for ``busy`` to fall. The
    array does ``M * N * P`` cycles of work, so the overhead is ``(M - 1) * (Q - P) <= 2 *
    (M - 1)`` cycles between row tiles plus a constant.
    """

    @staticmethod
    def cycles(config, *, k_words, m_tiles, out_plane, threshold=0, pool=0):
        """The exact cycles of one op (the formula above, :func:`sw.isa.bconv_cycles`) on a
        ``config``'s array."""
        return isa.bconv_cycles(config.rows, config.cols, k_words, m_tiles, out_plane,
                                threshold, pool)

    def __init__(self, config, *, element_width=None, int_depth=None, bits_depth=None,
                 own_array=True):
        self.device = config
        self.own_array = own_array
        self.element_width = _setting(element_width, config, "element_width", 24)
        self.int_depth = _setting(int_depth, config, "int_depth", 4096)
        self.bits_depth = _setting(bits_depth, config, "bits_depth", 4096)
        self.rows, self.cols, self.lane = config.rows, config.cols, config.lane
        self.acc_width = config.max_depth.bit_length()
        if self.element_width <= self.acc_width:
            raise ValueError(f"element_width must exceed acc_width ({self.acc_width}), "
                             f"not {self.element_width!r}")
        self.int_addr_width = max(1, (self.int_depth - 1).bit_length())
        self.bits_addr_width = max(1, (self.bits_depth - 1).bit_length())
        self.weight_addr_width = max(1, (config.weight_depth - 1).bit_length())
        self.param_depth = _setting(None, config, "param_depth", 512)
        self.param_addr_width = max(1, (self.param_depth - 1).bit_length())
        self.config_layout = BCONV_LAYOUT
        # BITS writes of a threshold op cover one row tile's `rows` channels of a word: the
        # write enable has one bit per group of `rows` bits (one bit if rows does not divide
        # lane: then the threshold mode is unsupported).
        self.bits_groups = self.lane // self.rows if self.lane % self.rows == 0 else 1
        #: BITS words written per tile at most (:func:`sw.isa.bconv_bits_words`).
        self.bits_words = isa.bconv_bits_words(self.cols, 0)

        # The window generator's bounds: the ISA fields' ranges, and no map larger than BITS.
        fields = {name: width for name, width, _ in isa.BCONV_FIELDS}
        self.max_height = min((1 << fields["in_h"]) - 1, self.bits_depth)
        self.max_width = min((1 << fields["in_w"]) - 1, self.bits_depth)
        self.max_channel_words = min((1 << fields["channel_words"]) - 1, self.bits_depth)

        self.read_signature = wiring.Signature({
            "addr": Out(self.bits_addr_width),
            "en": Out(1),
            "data": In(self.lane),
        })
        run = data.ArrayLayout(signed(self.element_width), self.cols)
        self.array = XnorArray(self.rows, self.cols, self.lane, config.max_depth)
        ports = {} if own_array else {"array_port": Out(self.array.port_signature)}
        super().__init__({
            **ports,
            "config": In(self.config_layout),
            "post": In(BCONV_POST_LAYOUT),
            "start": In(1),
            "busy": Out(1),
            "rd": Out(self.read_signature).array(self.cols),
            "w_rd_addr": Out(self.weight_addr_width),
            "w_rd_en": Out(1),
            "w_rd_data": In(self.rows * self.lane),
            "int_rd_addr": Out(self.int_addr_width),
            "int_rd_en": Out(1),
            "int_rd_data": In(run),
            "int_wr_addr": Out(self.int_addr_width),
            "int_wr_en": Out(1),
            "int_wr_mask": Out(self.cols),
            "int_wr_data": Out(run),
            "param_rd_addr": Out(self.param_addr_width),
            "param_rd_en": Out(1),
            "param_rd_data": In(PARAM_LAYOUT),
            "bits_wr_addr": Out(self.bits_addr_width),
            "bits_wr_en": Out(self.bits_groups),
            "bits_wr_data": Out(self.lane),
        })

    def elaborate(self, platform):
        m = Module()
        rows, cols, lane = self.rows, self.cols, self.lane
        cfg = self.config
        post = self.post
        threshold = Signal()
        m.d.comb += threshold.eq(post.post == isa.Post.THRESHOLD)
        m.submodules.window = window = ConvWindow(
            cols, lane, max_width=self.max_width, max_height=self.max_height,
            max_channel_words=self.max_channel_words, addr_width=self.bits_addr_width)
        if self.own_array:
            m.submodules.array = array = self.array
        else:
            array = self.array_port

        m.d.comb += [
            window.config.base.eq(cfg.in_base),
            window.config.height.eq(cfg.in_h),
            window.config.width.eq(cfg.in_w),
            window.config.channels.eq(cfg.channels),
            window.config.channel_words.eq(cfg.channel_words),
            window.config.kernel.eq(cfg.kernel),
            window.config.stride.eq(cfg.stride),
            window.config.padding.eq(cfg.pad),
            window.config.pool.eq(threshold & (post.reduce == isa.Reduce.MAX)),
        ]
        for c in range(cols):
            m.d.comb += [
                self.rd[c].addr.eq(window.rd[c].addr),
                self.rd[c].en.eq(window.rd[c].en),
                window.rd[c].data.eq(self.rd[c].data),
            ]

        begin = Signal()
        m.d.comb += begin.eq(self.start & ~self.busy)
        with m.If(begin):
            m.d.sync += self.busy.eq(1)

        # Issue: one window pass per row tile, the first once the window's geometry pipeline
        # has settled on this op's config, the others as soon as the previous pass is over.
        setup = Signal(range(window.SETUP_CYCLES + 1))     # cycles of setup left
        passes = Signal.like(cfg.m_tiles)           # passes started
        launch = Signal()
        w_tile = Signal(self.weight_addr_width)     # WEIGHTS address of the pass's row tile
        kw = Signal.like(cfg.k_words)               # K word of the window's next read
        with m.If(begin):
            # The first pass starts in cycle SETUP_CYCLES (begin is cycle 0).
            m.d.sync += setup.eq(window.SETUP_CYCLES - 1)
        with m.Elif(setup != 0):
            m.d.sync += setup.eq(setup - 1)
        m.d.comb += launch.eq(self.busy & (setup == 0) & ~window.busy
                              & (passes != cfg.m_tiles))
        m.d.comb += window.start.eq(launch)

        # The weights are read in lockstep with the window's reads (same enable), so the
        # WEIGHTS data and the window's activations are the same beat and stall together. A
        # pass reads a multiple of k_words words, so kw cycles through the row tile's words.
        advance = Signal()
        m.d.comb += [
            advance.eq(~window.o.valid | array.i.ready),
            self.w_rd_addr.eq(w_tile + kw),
            self.w_rd_en.eq(advance),
        ]
        with m.If(advance):
            m.d.sync += kw.eq(Mux(kw + 1 == cfg.k_words, 0, kw + 1))
        with m.If(launch):
            m.d.sync += [
                kw.eq(0),
                passes.eq(passes + 1),
                w_tile.eq(Mux(passes == 0, cfg.weight_base, w_tile + cfg.k_words)),
            ]
        with m.If(begin):
            m.d.sync += passes.eq(0)

        m.d.comb += [
            array.i.valid.eq(window.o.valid),
            array.i.payload.weights.eq(self.w_rd_data),
            array.i.payload.activations.eq(window.o.payload.activations),
            array.i.payload.first.eq(window.o.payload.first),
            array.i.payload.last.eq(window.o.payload.last),
            array.i.payload.planes.eq(cfg.planes),
            window.o.ready.eq(array.i.ready),
        ]

        # Results, stage 0: the array's row beat, its INTS run address and mask; the old
        # values are read for add (the read port is one cycle ahead of the write).
        aw = self.int_addr_width
        plane = cfg.out_plane
        plane_rows = Signal(aw)
        m.d.comb += plane_rows.eq(plane * rows)
        mt_addr = Signal(aw)        # INTS address of (channel mt * rows, pixel 0)
        tile_addr = Signal(aw)      # ... of (channel mt * rows, pixel n0)
        row_addr = Signal(aw)       # ... of (channel o, pixel n0): this beat's run
        n0 = Signal(len(plane) + 1)
        o_base = Signal(len(cfg.out_channels) + 1)
        o = Signal(len(cfg.out_channels) + 1)
        mt = Signal.like(cfg.m_tiles)

        res = array.o
        last_row = res.payload.row == rows - 1
        last_tile = n0 + cols >= plane
        final = last_row & last_tile & (mt + 1 == cfg.m_tiles)
        mask = Signal(cols)
        for i in range(cols):
            m.d.comb += mask[i].eq((n0 + i < plane) & (o < cfg.out_channels))
        with m.If(res.valid):
            with m.If(~last_row):
                m.d.sync += [row_addr.eq(row_addr + plane), o.eq(o + 1)]
            with m.Elif(~last_tile):
                m.d.sync += [
                    tile_addr.eq(tile_addr + cols),
                    row_addr.eq(tile_addr + cols),
                    n0.eq(n0 + cols),
                    o.eq(o_base),
                ]
            with m.Else():
                m.d.sync += [
                    mt_addr.eq(mt_addr + plane_rows),
                    tile_addr.eq(mt_addr + plane_rows),
                    row_addr.eq(mt_addr + plane_rows),
                    n0.eq(0),
                    o_base.eq(o_base + rows),
                    o.eq(o_base + rows),
                    mt.eq(mt + 1),
                ]
        with m.If(begin):
            m.d.sync += [
                mt_addr.eq(cfg.out_base), tile_addr.eq(cfg.out_base), row_addr.eq(cfg.out_base),
                n0.eq(0), o_base.eq(0), o.eq(0), mt.eq(0),
            ]
        m.d.comb += [
            self.int_rd_addr.eq(row_addr),
            self.int_rd_en.eq(res.valid & cfg.add & ~threshold),
        ]

        # Threshold mode, stage 0: the beat's channel record is read from PARAMS; the BITS
        # address of the tile's first word (pixel n0, or pooling window n0 / 4, word o // lane)
        # and the row tile's group of `rows` bits in that word are counted alongside.
        bw = self.bits_addr_width
        groups = self.bits_groups
        words = self.bits_words
        pool = threshold & (post.reduce == isa.Reduce.MAX) & (self.cols % 4 == 0)
        tile_words = Signal(bw)     # BITS distance between two tiles' first words
        bm_addr = Signal(bw)        # BITS address of (pixel 0, word of row tile mt)
        bt_addr = Signal(bw)        # ... of the tile's first pixel
        group = Signal(range(groups))
        m.d.comb += [
            self.param_rd_addr.eq(post.param_base + o),
            self.param_rd_en.eq(res.valid & threshold),
        ]
        with m.If(res.valid & last_row):
            with m.If(~last_tile):
                m.d.sync += bt_addr.eq(bt_addr + tile_words)
            with m.Elif(group == groups - 1):
                m.d.sync += [group.eq(0), bm_addr.eq(bm_addr + 1), bt_addr.eq(bm_addr + 1)]
            with m.Else():
                m.d.sync += [group.eq(group + 1), bt_addr.eq(bm_addr)]
        with m.If(begin):
            m.d.sync += [
                tile_words.eq(Mux(pool, post.out_words * (self.cols // 4),
                                  post.out_words * self.cols)),
                bm_addr.eq(post.out_base), bt_addr.eq(post.out_base), group.eq(0),
            ]

        # Stage 1: the old values arrive (for add) and the sums are registered; stage 2 writes
        # them. The sum is registered so that no path runs from the INTS block RAMs through
        # the read rotation, the adder and the write rotation back into them in one cycle (the
        # critical path of the routed ULX3S build, docs/builds.md). An op writes each element
        # (o, pixel) exactly once, so a read never needs a write still in the pipeline.
        valid1 = Signal()
        final1 = Signal()
        addr1 = Signal(aw)
        mask1 = Signal(cols)
        counts1 = Signal.like(res.payload.counts)
        m.d.sync += [
            valid1.eq(res.valid),
            final1.eq(res.valid & final),
            addr1.eq(row_addr),
            mask1.eq(mask),
            counts1.eq(res.payload.counts),
        ]
        # Threshold mode, stage 1: the record arrives from PARAMS. It and the beat are
        # registered (isa.BCONV_PARAM_REGISTERS times: the block RAM's output straight into the
        # compares, the pooling reduction and the BITS write data was the routed build's
        # critical path), then the counts are compared with the record, each pooling window's
        # four compares reduced (OR for direction +1, AND for -1: max >= t is any count >= t,
        # max <= t is every count <= t), and the bit of each word slot shifted into its
        # `rows`-bit collector (channel r of the row tile ends in bit r). After the last row
        # the slots' words go to the write queue, slot 0's at once.
        rec = self.param_rd_data
        pix1 = Signal(cols)        # traversed pixel i of the tile exists
        for i in range(cols):
            m.d.sync += pix1[i].eq(n0 + i < plane)
        channel1 = Signal()        # the row's channel exists
        row1 = Signal.like(res.payload.row)
        baddr1 = Signal(bw)
        group1 = Signal.like(group)
        m.d.sync += [channel1.eq(o < cfg.out_channels), row1.eq(res.payload.row),
                     baddr1.eq(bt_addr), group1.eq(group)]

        def staged(value, name):
            for i in range(isa.BCONV_PARAM_REGISTERS):
                register = Signal.like(value, name=f"{name}_t{i}")
                m.d.sync += register.eq(value)
                value = register
            return value

        rec_threshold = staged(rec.threshold, "rec_threshold")
        rec_direction = staged(rec.direction, "rec_direction")
        valid_t = staged(valid1 & threshold, "valid_t")
        final_t = staged(final1, "final_t")
        counts_t = staged(counts1, "counts_t")
        pix_t = staged(pix1, "pix_t")
        channel_t = staged(channel1, "channel_t")
        row_t = staged(row1, "row_t")
        baddr_t = staged(baddr1, "baddr_t")
        group_t = staged(group1, "group_t")
        ge = [Signal(name=f"ge_{i}") for i in range(cols)]
        le = [Signal(name=f"le_{i}") for i in range(cols)]
        for i in range(cols):
            m.d.comb += [ge[i].eq(counts_t[i] >= rec_threshold),
                         le[i].eq(counts_t[i] <= rec_threshold)]
        slot_bits = []
        for j in range(words):
            if self.cols % 4 == 0 and j < self.cols // 4:
                window = range(4 * j, 4 * j + 4)
                any_ge = Cat(*(ge[i] for i in window)).any()
                all_le = Cat(*(le[i] for i in window)).all()
                up, down = Mux(pool, any_ge, ge[j]), Mux(pool, all_le, le[j])
            else:
                up, down = ge[j], le[j]
            bit = Signal(name=f"slot_bit_{j}")
            m.d.comb += bit.eq(channel_t & Mux(
                rec_direction > 0, up, Mux(rec_direction < 0, down, rec_threshold != 0)))
            slot_bits.append(bit)
        collect = [Signal(rows, name=f"collect_{j}") for j in range(words)]
        slot_words = [Cat(c[1:], b) for c, b in zip(collect, slot_bits)]
        slot_live = [Mux(pool, pix_t[4 * j] if 4 * j < cols else 0, pix_t[j])
                     for j in range(words)]
        # The queue: words 1.. of the last tile (slot 0's is written from stage 2 directly).
        queue = [Signal(rows, name=f"queue_{j}") for j in range(1, words)]
        queue_live = Signal(max(words - 1, 1))
        queue_left = Signal(range(words))
        queue_addr = Signal(bw)
        queue_group = Signal.like(group)
        draining = Signal()         # the op's last words are in the queue

        def bits_write(en, addr, vector, grp):
            # Row tile `grp`'s rows bits in their place; the word's first group writes the
            # whole word (0 above), so bits of channels >= out_channels end 0 as a FIXED
            # THRESHOLD leaves them.
            mask = Mux(grp == 0, (1 << groups) - 1, Const(1, groups) << grp)
            return [self.bits_wr_en.eq(Mux(en, mask, 0)), self.bits_wr_addr.eq(addr),
                    self.bits_wr_data.eq(vector << (grp * rows))]

        m.d.sync += self.bits_wr_en.eq(0)
        with m.If(valid_t):
            m.d.sync += [c.eq(w) for c, w in zip(collect, slot_words)]
        with m.If(valid_t & (row_t == rows - 1)):
            m.d.sync += bits_write(slot_live[0], baddr_t, slot_words[0], group_t)
            m.d.sync += [q.eq(w) for q, w in zip(queue, slot_words[1:])]
            m.d.sync += [
                queue_live.eq(Cat(*slot_live[1:]) if words > 1 else 0),
                queue_left.eq(Mux(pool, self.cols // 4 - 1 if self.cols >= 4 else 0,
                                  words - 1)),
                queue_addr.eq(baddr_t + post.out_words),
                queue_group.eq(group_t),
                draining.eq(final_t),
            ]
        if words > 1:
            with m.Elif(queue_left != 0):
                m.d.sync += bits_write(queue_live[0], queue_addr, queue[0], queue_group)
                m.d.sync += [a.eq(b) for a, b in itertools.pairwise(queue)]
                m.d.sync += [
                    queue_live.eq(queue_live >> 1),
                    queue_left.eq(queue_left - 1),
                    queue_addr.eq(queue_addr + post.out_words),
                ]
        with m.If(draining & (queue_left == 0)):
            m.d.sync += [self.busy.eq(0), draining.eq(0)]
        with m.If(begin):
            m.d.sync += [draining.eq(0), queue_left.eq(0)]

        valid2 = Signal()
        final2 = Signal()
        addr2 = Signal(aw)
        mask2 = Signal(cols)
        m.d.sync += [
            valid2.eq(valid1),
            final2.eq(valid1 & final1),
            addr2.eq(addr1),
            mask2.eq(mask1),
        ]
        for i in range(cols):
            m.d.sync += self.int_wr_data[i].eq(
                counts1[i] + Mux(cfg.add, self.int_rd_data[i], 0))
        m.d.comb += [
            self.int_wr_addr.eq(addr2),
            self.int_wr_en.eq(valid2 & (mask2 != 0) & ~threshold),
            self.int_wr_mask.eq(mask2),
        ]
        with m.If(valid2 & final2 & ~threshold):
            m.d.sync += self.busy.eq(0)
        return m
