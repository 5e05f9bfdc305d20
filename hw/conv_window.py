"""Implicit-im2col window generator: feeds :class:`hw.array.XnorArray` a binary convolution.

The generator reads a bit-packed binary feature map from a memory and emits, for tiles of
``cols`` output pixels, the activation words of the golden model's ``bconv`` windows
(:mod:`sw.compile.golden`: ``k x k`` kernel, ``k`` 1 or 3, stride 1 or 2, padding 0 or 1 with
the value -1), so that the array computes the ``bconv`` counts directly, without an unfolded
copy of the map.

Conventions (bit 1 = +1, bit 0 = -1, as :mod:`sw.packing`)
--------------------------------------------------------
* Feature-map memory: words of ``lane`` bits; pixel ``(y, x)``, channel ``c`` is bit
  ``c % lane`` of the word at address ``(y * W + x) * channel_words + c // lane``, with
  ``channel_words = ceil(C / lane)``. The bits of channels ``c >= C`` in a pixel's last word
  are don't-care: the generator forces them to 1.
* K order of a tile (the order of the emitted words, and the order in which the weights of the
  same layer must be packed): word ``kw = (ky * k + kx) * channel_words + cw``; K index
  ``kw * lane + b`` holds channel ``c = cw * lane + b`` at kernel position ``(ky, kx)``. This
  is *not* the order of the artifact's ``weight_bits`` (``c * k * k + ky * k + kx``): the
  weight packer permutes ``weight_bits[o, c * k * k + ky * k + kx]`` to
  ``w[o, ((ky * k + kx) * channel_words) * lane + c]``.
* Weights of channels ``c >= C`` are 0 bits; the activations there are 1 bits (forced), so
  ``xnor = 0`` and they add nothing, as :mod:`sw.packing`'s K padding.
* Spatial padding positions are emitted as 0 bits (-1) for real channels (golden pads the
  binarized map with -1, and these positions count in ``N = C * k * k``), again with 1 bits
  for channels ``c >= C``. The count of output pixel ``n``, channel ``o`` is then exactly the
  golden ``bconv`` count ``(dot + C * k * k) / 2``.
* Output pixels are numbered in raster order ``n = oy * OW + ox``,
  ``OH = (H + 2p - k) // s + 1``, ``OW = (W + 2p - k) // s + 1`` (floor, as golden); tile
  ``t`` holds pixels ``t * cols + c`` in column ``c``. In the last tile, columns with
  ``n >= OH * OW`` carry meaningless words (their counts must be dropped).
* With ``pool`` set (only where ``cols % 4 == 0``, else ignored) the pass visits, instead, the
  pixels a 2x2 stride-2 max pool (floor) of the conv's output reads, in **pool-window order**:
  traversal index ``n = t * cols + c`` is pixel ``q = c % 4`` (``(2 * py + q // 2, 2 * px +
  q % 2)``) of pooling window ``j = t * cols // 4 + c // 4``, ``(py, px) = divmod(j, OW // 2)``:
  the four pixels of a window are four neighbouring columns of one tile, so a consumer pools
  inside the tile. ``4 * (OH // 2) * (OW // 2)`` pixels (the odd last row and column of the
  conv output are never computed), ``ceil((OH // 2) * (OW // 2) / (cols // 4))`` tiles.
"""

from amaranth import Module, Mux, Signal, signed
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from sw import isa

__all__ = ["ConvWindow"]


def _check_positive(**values):
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, not {value!r}")


class ConvWindow(wiring.Component):
    """Window generator: a map in memory to a stream of ``XnorArray`` activation words.

    Parameters
    ----------
    cols : int
        Output pixels per tile (the array's columns).
    lane : int
        Bits of a memory word and of one K word of a column.
    max_width, max_height, max_channel_words : int
        Largest map the unit addresses: ``depth = max_height * max_width * max_channel_words``
        words.
    addr_width : int, optional
        Bits of the read ports' addresses (default: enough for ``depth``). Addresses are
        computed modulo ``2**addr_width``.

    Members
    -------
    config : ``In(config_layout)``
        ``base`` (the map's first word: the word of pixel (0, 0), channel word 0),
        ``height``, ``width`` (``H``, ``W``), ``channels`` (``C``), ``channel_words``
        (must be ``ceil(C / lane)``), ``kernel`` (1 or 3), ``stride`` (1 or 2), ``padding``
        (0 or 1), ``pool`` (pool-window order, above; needs ``OH, OW >= 2``). Requires ``H + 2p >= k`` and ``W + 2p >= k``; other values are unsupported.
        Hold it stable from :attr:`SETUP_CYCLES` cycles before ``start`` until ``busy``
        falls.
    start : ``In(1)``
        While ``busy`` is low, a high ``start`` begins one pass over the map (all tiles).
    busy : ``Out(1)``
        High from the cycle after ``start`` until the pass's last beat has been accepted.
    rd : ``Out(read_signature).array(cols)``
        ``cols`` synchronous read ports (``addr``, ``en`` out; ``data`` in, the word at the
        ``addr`` of the previous cycle whose ``en`` was high; data must hold while ``en`` is
        low, as :class:`amaranth.lib.memory.ReadPort` with ``transparent_for=()``). Port ``c``
        serves column ``c``. A memory with ``cols`` read ports, or ``cols`` copies of the map.
    o : ``Out(stream.Signature(o_layout))``
        ``activations``: column ``c`` in bits ``[c * lane, (c + 1) * lane)``, the layout of
        :class:`hw.array.XnorArray`'s ``activations``; ``first``/``last``: the first and last
        word of a tile (``k * k * channel_words`` words). Honours ``ready``.

    Throughput and latency
    ----------------------
    One beat per cycle while ``o.ready`` is high, with no gaps between tiles: a pass takes
    ``ceil(OH * OW / cols) * k * k * channel_words`` cycles plus one. The first beat is valid
    two cycles after ``start`` is seen (one address cycle, one memory read). For a layer with
    more output channels than array rows, run one pass per row tile of the weights; a new
    ``config`` needs :attr:`SETUP_CYCLES` (:func:`sw.isa.window_setup_cycles`) cycles before
    its first pass, later passes over the same ``config`` none.

    Implementation: nothing on the per-cycle path multiplies. A free-running registered
    pipeline derives the config's constants (output size, the address steps of one pixel, of
    one tile of ``cols`` pixels and of a kernel row) and, one stage per column, the first
    tile's pixels. Each column keeps its pixel as registers (``ox``, ``oy``, the window's
    top-left ``ix0``, ``iy0`` and its word address) and steps them by ``cols`` pixels per tile
    (``divmod(cols, OW)`` rows and columns, one carry into the next row); the kernel offset
    ``(ky * W + kx) * channel_words + cw`` is one counter shared by the columns. A read address
    is one addition; the padding test compares small coordinates. The read issue and the
    output register advance together (``advance = ~o.valid | o.ready``); reads are disabled
    while stalled so the memory data holds; ``o.activations`` is the memory data after a mask
    (padding, channel tail).
    """

    def __init__(self, cols, lane, max_width, max_height, max_channel_words, addr_width=None):
        _check_positive(cols=cols, lane=lane, max_width=max_width, max_height=max_height,
                        max_channel_words=max_channel_words)
        self.cols = cols
        self.lane = lane
        self.max_width = max_width
        self.max_height = max_height
        self.max_channel_words = max_channel_words
        #: Whether ``config.pool`` is honoured (``cols`` a multiple of 4); else it is ignored.
        self.pool_capable = cols % 4 == 0
        self.depth = max_height * max_width * max_channel_words
        if addr_width is None:
            addr_width = max(1, (self.depth - 1).bit_length())
        _check_positive(addr_width=addr_width)
        self.addr_width = addr_width
        self.config_layout = data.StructLayout({
            "base": addr_width,
            "height": range(max_height + 1),
            "width": range(max_width + 1),
            "channels": range(max_channel_words * lane + 1),
            "channel_words": range(max_channel_words + 1),
            "kernel": range(4),
            "stride": range(3),
            "padding": range(2),
            "pool": range(2),
        })
        self.read_signature = wiring.Signature({
            "addr": Out(self.addr_width),
            "en": Out(1),
            "data": In(lane),
        })
        self.o_layout = data.StructLayout({"activations": cols * lane, "first": 1, "last": 1})
        super().__init__({
            "config": In(self.config_layout),
            "start": In(1),
            "busy": Out(1),
            "rd": Out(self.read_signature).array(cols),
            "o": Out(stream.Signature(self.o_layout)),
        })

    @property
    def SETUP_CYCLES(self):
        """Cycles a new ``config`` must be stable before ``start``."""
        return isa.window_setup_cycles(self.cols)

    def elaborate(self, platform):
        m = Module()
        cfg, cols, lane, aw = self.config, self.cols, self.lane, self.addr_width
        size = max(self.max_height, self.max_width)
        # Pixel coordinates reach past the map by a tile (the last tile's unused columns).
        pix_shape = range(2 * (size + cols) + 4)
        coord = signed(pix_shape.stop.bit_length() + 2)

        def reg(shape, name):
            return Signal(shape, name=name)

        # ---- Geometry pipeline, stage 1: registered functions of config ------------------
        # With pool the pipeline works on the *virtual* grid of 2x2 pooling windows: its
        # "pixels" are the windows (OH // 2 x OW // 2), a step between them is two conv
        # pixels (2 * stride input pixels), and columns 4j + q add the fixed offset of the
        # window's pixel q (q // 2 rows and q % 2 columns of the conv) to window j's position.
        pooling = self.pool_capable
        k3, s2, pad = reg(1, "g_k3"), reg(1, "g_s2"), reg(1, "g_pad")
        pool = reg(1, "g_pool")
        sub_x = reg(aw, "g_sub_x")              # s * channel_words: one conv pixel right
        height, width = reg(range(self.max_height + 1), "g_h"), reg(range(self.max_width + 1),
                                                                     "g_w")
        out_h, out_w = reg(pix_shape, "g_out_h"), reg(pix_shape, "g_out_w")
        cw_last_value = reg(range(self.max_channel_words + 1), "g_cw_last")
        step_x = reg(aw, "g_step_x")            # s * channel_words: one pixel to the right
        row_words = reg(aw, "g_row_words")      # W * channel_words: one map row down
        kernel_words = reg(aw, "g_kernel_words")  # k * channel_words: one kernel row
        tail_mask = reg(lane, "g_tail_mask")
        base1 = reg(aw, "g_base")
        span_h = cfg.height + 2 * cfg.padding - Mux(cfg.kernel == 3, 3, 1)    # H + 2p - k
        span_w = cfg.width + 2 * cfg.padding - Mux(cfg.kernel == 3, 3, 1)
        tail = cfg.channels - (cfg.channel_words - 1) * lane
        conv_h = Mux(cfg.stride == 2, span_h >> 1, span_h) + 1
        conv_w = Mux(cfg.stride == 2, span_w >> 1, span_w) + 1
        pool_cfg = cfg.pool if pooling else 0
        sub_x_value = Mux(cfg.stride == 2, cfg.channel_words << 1, cfg.channel_words)
        m.d.sync += [
            k3.eq(cfg.kernel == 3), s2.eq(cfg.stride == 2), pad.eq(cfg.padding),
            pool.eq(pool_cfg),
            height.eq(cfg.height), width.eq(cfg.width),
            out_h.eq(Mux(pool_cfg, conv_h >> 1, conv_h)),
            out_w.eq(Mux(pool_cfg, conv_w >> 1, conv_w)),
            cw_last_value.eq(cfg.channel_words - 1),
            sub_x.eq(sub_x_value),
            step_x.eq(Mux(pool_cfg, sub_x_value << 1, sub_x_value)),
            row_words.eq(cfg.width * cfg.channel_words),
            kernel_words.eq(Mux(cfg.kernel == 3, cfg.channel_words * 3, cfg.channel_words)),
            base1.eq(cfg.base),
        ]
        for b in range(lane):
            m.d.sync += tail_mask[b].eq(b >= tail)

        # ---- Stage 2 ------------------------------------------------------------------------
        step_y = reg(aw, "g_step_y")            # s * W * channel_words: one output row down
        row_jump = reg(aw, "g_row_jump")        # kernel offset from a row's last word to the next
        out_w_words = reg(aw, "g_out_w_words")  # OW * step_x
        base2 = reg(aw, "g_base2")              # word address of pixel 0's window top-left
        tile_rows = reg(range(cols + 1), "g_tile_rows")     # divmod(cols, OW)
        tile_cols = reg(range(cols + 1), "g_tile_cols")
        sub_y = reg(aw, "g_sub_y")              # s * W * channel_words: one conv row down
        vshift = Mux(pool, Mux(s2, 2, 1), Mux(s2, 1, 0))    # log2 of the virtual stride
        m.d.sync += [
            sub_y.eq(Mux(s2, row_words << 1, row_words)),
            step_y.eq(row_words << vshift),
            row_jump.eq(row_words - kernel_words + 1),
            out_w_words.eq(out_w * step_x),
            base2.eq(base1 - Mux(pad, row_words + cw_last_value + 1, 0)),
        ]
        # divmod(cols, OW) for the OW that make it nontrivial, (0, cols) for the others; with
        # pool divmod(cols // 4, OW // 2): a tile holds cols // 4 pooling windows.
        for vcols, mode in ((cols, ~pool), (cols // 4, pool)):
            if vcols == 0 or (vcols != cols and not pooling):
                continue
            with m.If(mode), m.Switch(out_w):
                for w in range(1, vcols + 1):
                    with m.Case(w):
                        m.d.sync += [tile_rows.eq(vcols // w), tile_cols.eq(vcols % w)]
                with m.Default():
                    m.d.sync += [tile_rows.eq(0), tile_cols.eq(vcols)]

        # ---- Stage 3: the address steps of a tile and of the next pixel across a row end ---
        tile_rows_words = reg(aw, "g_tile_rows_words")
        tile_cols_words = reg(aw, "g_tile_cols_words")
        wrap_one = reg(aw, "g_wrap_one")        # from a row's last pixel to the next row's first
        # The same steps in input coordinates, without and with the row carry.
        dx_step, dx_wrap = reg(coord, "g_dx_step"), reg(coord, "g_dx_wrap")
        dy_step, dy_wrap = reg(coord, "g_dy_step"), reg(coord, "g_dy_wrap")
        m.d.sync += [
            dx_step.eq(tile_cols << vshift),
            dx_wrap.eq((tile_cols - out_w) << vshift),
            dy_step.eq(tile_rows << vshift),
            dy_wrap.eq((tile_rows + 1) << vshift),
            tile_rows_words.eq(tile_rows * step_y),
            tile_cols_words.eq(tile_cols * step_x),
            wrap_one.eq(step_y - out_w_words + step_x),
        ]
        # ---- Stage 4 -------------------------------------------------------------------------
        tile_step = reg(aw, "g_tile_step")      # a tile without a row carry ...
        tile_wrap = reg(aw, "g_tile_wrap")      # ... and with one
        m.d.sync += [
            tile_step.eq(tile_rows_words + tile_cols_words),
            tile_wrap.eq(tile_rows_words + tile_cols_words + step_y - out_w_words),
        ]

        # A column's pixel: output coordinates, its window's top-left input coordinates (with
        # padding) and that position's word address.
        def pixel(name):
            return {"ox": Signal(pix_shape, name=f"{name}_ox"),
                    "oy": Signal(pix_shape, name=f"{name}_oy"),
                    "ix": Signal(coord, name=f"{name}_ix"),
                    "iy": Signal(coord, name=f"{name}_iy"),
                    "addr": Signal(aw, name=f"{name}_addr")}

        s = Mux(s2, 2, 1)
        vs = 1 << vshift

        def step_one(px):
            """The next pixel in raster order."""
            wrap = px["ox"] == out_w - 1
            return {"ox": Mux(wrap, 0, px["ox"] + 1),
                    "oy": Mux(wrap, px["oy"] + 1, px["oy"]),
                    "ix": Mux(wrap, -pad, px["ix"] + vs),
                    "iy": Mux(wrap, px["iy"] + vs, px["iy"]),
                    "addr": px["addr"] + Mux(wrap, wrap_one, step_x)}

        # The first tile's pixels, column c at stage 2 + c (column 0 from stage-2 values).
        # With pool, column 4j + q is window j's pixel q: window j steps from window j - 1
        # (column 4j - 4), pixel q adds its offset to column 4j.
        first_tile = [{"ox": 0, "oy": 0, "ix": -pad, "iy": -pad, "addr": base2}]
        for c in range(1, cols):
            px = pixel(f"init{c}")
            value = step_one(first_tile[-1])
            if pooling:
                q = c % 4
                if q == 0:
                    pooled = step_one(first_tile[c - 4])
                else:
                    origin = first_tile[c - q]
                    dy, dx = divmod(q, 2)
                    pooled = {"ox": origin["ox"], "oy": origin["oy"],
                              "ix": origin["ix"] + (s if dx else 0),
                              "iy": origin["iy"] + (s if dy else 0),
                              "addr": origin["addr"] + (sub_x if dx else 0)
                              + (sub_y if dy else 0)}
                value = {key: Mux(pool, pooled[key], value[key]) for key in value}
            m.d.sync += [px[key].eq(v) for key, v in value.items()]
            first_tile.append(px)

        # ---- Pass state ----------------------------------------------------------------------
        running = Signal()
        ky, kx = Signal(2), Signal(2)
        cw = Signal(range(self.max_channel_words + 1))
        koff = Signal(aw)                       # (ky * W + kx) * channel_words + cw
        cw_last = cw == cw_last_value
        kx_last = kx == Mux(k3, 2, 0)
        ky_last = ky == Mux(k3, 2, 0)
        tile_end = ky_last & kx_last & cw_last
        columns = [pixel(f"col{c}") for c in range(cols)]

        valid1 = Signal()
        advance = Signal()
        m.d.comb += [
            advance.eq(~valid1 | self.o.ready),
            self.busy.eq(running | valid1),
        ]

        pad1 = Signal(cols)
        tail1 = Signal()
        first1 = Signal()
        last1 = Signal()
        for c, px in enumerate(columns):
            iy = Signal(coord, name=f"iy_{c}")
            ix = Signal(coord, name=f"ix_{c}")
            outside = Signal(name=f"outside_{c}")
            m.d.comb += [
                iy.eq(px["iy"] + ky),
                ix.eq(px["ix"] + kx),
                outside.eq((iy < 0) | (iy >= height) | (ix < 0) | (ix >= width)
                           | (px["oy"] >= out_h)),
                self.rd[c].en.eq(advance),
                # Padding reads word 0 (its data is masked): addresses stay inside the memory.
                self.rd[c].addr.eq(Mux(outside, 0, px["addr"] + koff)),
            ]
            with m.If(advance):
                m.d.sync += pad1[c].eq(outside)
            word = Mux(pad1[c], 0, self.rd[c].data) | Mux(tail1, tail_mask, 0)
            m.d.comb += self.o.payload.activations[c * lane:(c + 1) * lane].eq(word)

        # The next tile's pixel of each column: divmod(cols, OW) rows and columns further, plus
        # a carry into the next row when the column index passes the row's end.
        next_tile = []
        for c, px in enumerate(columns):
            ox_sum = Signal(pix_shape, name=f"ox_sum_{c}")
            carry = Signal(name=f"carry_{c}")
            m.d.comb += [ox_sum.eq(px["ox"] + tile_cols), carry.eq(ox_sum >= out_w)]
            next_tile.append({
                "ox": Mux(carry, ox_sum - out_w, ox_sum),
                "oy": px["oy"] + tile_rows + carry,
                "ix": px["ix"] + Mux(carry, dx_wrap, dx_step),
                "iy": px["iy"] + Mux(carry, dy_wrap, dy_step),
                "addr": px["addr"] + Mux(carry, tile_wrap, tile_step),
            })

        with m.If(advance):
            m.d.sync += [
                valid1.eq(running),
                tail1.eq(cw_last),
                first1.eq((ky == 0) & (kx == 0) & (cw == 0)),
                last1.eq(tile_end),
            ]
            with m.If(running):
                with m.If(~cw_last):
                    m.d.sync += [cw.eq(cw + 1), koff.eq(koff + 1)]
                with m.Else():
                    m.d.sync += cw.eq(0)
                    with m.If(~kx_last):
                        m.d.sync += [kx.eq(kx + 1), koff.eq(koff + 1)]
                    with m.Else():
                        m.d.sync += kx.eq(0)
                        with m.If(~ky_last):
                            m.d.sync += [ky.eq(ky + 1), koff.eq(koff + row_jump)]
                        with m.Else():
                            m.d.sync += [ky.eq(0), koff.eq(0)]
                            for px, nxt in zip(columns, next_tile):
                                m.d.sync += [px[key].eq(value) for key, value in nxt.items()]
                            with m.If(next_tile[0]["oy"] >= out_h):
                                m.d.sync += running.eq(0)
        with m.If(~self.busy & self.start):
            m.d.sync += [running.eq(1), ky.eq(0), kx.eq(0), cw.eq(0), koff.eq(0)]
            for px, init in zip(columns, first_tile):
                m.d.sync += [px[key].eq(value) for key, value in init.items()]
        m.d.comb += [
            self.o.valid.eq(valid1),
            self.o.payload.first.eq(first1),
            self.o.payload.last.eq(last1),
        ]
        return m
