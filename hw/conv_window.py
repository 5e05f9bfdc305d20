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
"""

from amaranth import Module, Mux, Signal, signed
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

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
        Largest map the unit addresses; the memory holds
        ``depth = max_height * max_width * max_channel_words`` words.

    Members
    -------
    config : ``In(config_layout)``
        ``height``, ``width`` (``H``, ``W``), ``channels`` (``C``), ``channel_words``
        (must be ``ceil(C / lane)``), ``kernel`` (1 or 3), ``stride`` (1 or 2), ``padding``
        (0 or 1). Requires ``H + 2p >= k`` and ``W + 2p >= k``; other values are unsupported.
        Hold it stable from ``start`` until ``busy`` falls.
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
    more output channels than array rows, run one pass per row tile of the weights.

    Implementation: the tile's first pixel ``(oy0, ox0)`` is a register; the other columns'
    pixels follow by a chain of raster increments; addresses are ``(iy * W + ix) *
    channel_words + cw`` (two runtime multiplications per column). The read issue and the
    output register advance together (``advance = ~o.valid | o.ready``); reads are disabled
    while stalled so the memory data holds; ``o.activations`` is the memory data after a
    mask (padding, channel tail).
    """

    def __init__(self, cols, lane, max_width, max_height, max_channel_words):
        _check_positive(cols=cols, lane=lane, max_width=max_width, max_height=max_height,
                        max_channel_words=max_channel_words)
        self.cols = cols
        self.lane = lane
        self.max_width = max_width
        self.max_height = max_height
        self.max_channel_words = max_channel_words
        self.depth = max_height * max_width * max_channel_words
        self.addr_width = max(1, (self.depth - 1).bit_length())
        self.config_layout = data.StructLayout({
            "height": range(max_height + 1),
            "width": range(max_width + 1),
            "channels": range(max_channel_words * lane + 1),
            "channel_words": range(max_channel_words + 1),
            "kernel": range(4),
            "stride": range(3),
            "padding": range(2),
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

    def elaborate(self, platform):
        m = Module()
        cfg, cols, lane = self.config, self.cols, self.lane
        k3 = cfg.kernel == 3
        s2 = cfg.stride == 2
        p = cfg.padding
        km1 = Mux(k3, 2, 0)

        # Output geometry.
        out_h = Signal(range(self.max_height + 3))
        out_w = Signal(range(self.max_width + 3))
        span_h = Signal(range(self.max_height + 3))             # H + 2p - k
        span_w = Signal(range(self.max_width + 3))
        m.d.comb += [
            span_h.eq(cfg.height + 2 * p - km1 - 1),
            span_w.eq(cfg.width + 2 * p - km1 - 1),
            out_h.eq(Mux(s2, span_h >> 1, span_h) + 1),
            out_w.eq(Mux(s2, span_w >> 1, span_w) + 1),
        ]

        # Channel tail: bits b >= tail of the last channel word are forced to 1.
        tail = Signal(range(lane + 1))
        tail_mask = Signal(lane)
        m.d.comb += tail.eq(cfg.channels - (cfg.channel_words - 1) * lane)
        for b in range(lane):
            m.d.comb += tail_mask[b].eq(b >= tail)

        # Counters.
        running = Signal()
        oy0 = Signal(range(self.max_height + cols + 3))
        ox0 = Signal(range(self.max_width + 3))
        ky = Signal(2)
        kx = Signal(2)
        cw = Signal(range(self.max_channel_words + 1))
        cw_last = cw == cfg.channel_words - 1
        kx_last = kx == Mux(k3, 2, 0)
        ky_last = ky == Mux(k3, 2, 0)

        # The tile's pixels: a chain of raster increments from (oy0, ox0).
        pos = [(oy0, ox0)]
        for c in range(cols):
            oy, ox = pos[-1]
            ny = Signal.like(oy0, name=f"oy_{c + 1}")
            nx = Signal.like(ox0, name=f"ox_{c + 1}")
            wrap = ox == out_w - 1
            m.d.comb += [ny.eq(Mux(wrap, oy + 1, oy)), nx.eq(Mux(wrap, 0, ox + 1))]
            pos.append((ny, nx))

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
        coord = signed(max(self.max_height, self.max_width).bit_length() + cols.bit_length() + 4)
        for c in range(cols):
            oy, ox = pos[c]
            iy = Signal(coord, name=f"iy_{c}")
            ix = Signal(coord, name=f"ix_{c}")
            pad = Signal(name=f"pad_{c}")
            m.d.comb += [
                iy.eq(Mux(s2, oy << 1, oy) + ky - p),
                ix.eq(Mux(s2, ox << 1, ox) + kx - p),
                pad.eq((iy < 0) | (iy >= cfg.height) | (ix < 0) | (ix >= cfg.width)
                       | (oy >= out_h)),
                self.rd[c].en.eq(advance),
                self.rd[c].addr.eq(Mux(pad, 0,
                                       (iy * cfg.width + ix) * cfg.channel_words + cw)),
            ]
            with m.If(advance):
                m.d.sync += pad1[c].eq(pad)
            word = Mux(pad1[c], 0, self.rd[c].data) | Mux(tail1, tail_mask, 0)
            m.d.comb += self.o.payload.activations[c * lane:(c + 1) * lane].eq(word)

        with m.If(advance):
            m.d.sync += [
                valid1.eq(running),
                tail1.eq(cw_last),
                first1.eq((ky == 0) & (kx == 0) & (cw == 0)),
                last1.eq(ky_last & kx_last & cw_last),
            ]
            with m.If(running):
                with m.If(~cw_last):
                    m.d.sync += cw.eq(cw + 1)
                with m.Else():
                    m.d.sync += cw.eq(0)
                    with m.If(~kx_last):
                        m.d.sync += kx.eq(kx + 1)
                    with m.Else():
                        m.d.sync += kx.eq(0)
                        with m.If(~ky_last):
                            m.d.sync += ky.eq(ky + 1)
                        with m.Else():
                            ny, nx = pos[cols]
                            m.d.sync += [ky.eq(0), oy0.eq(ny), ox0.eq(nx)]
                            with m.If(ny >= out_h):
                                m.d.sync += running.eq(0)
        with m.If(~self.busy & self.start):
            m.d.sync += [running.eq(1), oy0.eq(0), ox0.eq(0), ky.eq(0), kx.eq(0), cw.eq(0)]
        m.d.comb += [
            self.o.valid.eq(valid1),
            self.o.payload.first.eq(first1),
            self.o.payload.last.eq(last1),
        ]
        return m
