"""Pooling units: a streaming max pool and a global (sum) pool.

These are the hardware forms of the golden model's ``maxpool`` and ``gap`` operations
(:mod:`sw.compile.golden`):

* ``maxpool``: ``k x k`` windows with stride ``s`` over the map padded by ``p`` on every side;
  padding never wins (the golden model pads with ``INT64_MIN``), output size
  ``(H + 2p - k) // s + 1`` by ``(W + 2p - k) // s + 1`` (floor: trailing rows and columns
  no window reaches are read and dropped).
* ``gap``: the plain per-channel sum over ``H * W`` pixels (the ``1 / (H W)`` of the average is
  folded into the next layer's scale).

Streaming contract (both units): a beat carries ``lanes`` channels of one pixel; pixels come in
raster order (row by row, left to right), one frame after the other. A map with more channels
than ``lanes`` is processed as several passes of ``lanes`` channels.
"""

from amaranth import Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, memory, stream, wiring
from amaranth.lib.wiring import In, Out

__all__ = ["GlobalSum", "MaxPool"]


def _check_positive(**values):
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, not {value!r}")


def _max(a, b):
    return Mux(a > b, a, b)


class MaxPool(wiring.Component):
    """Max pool of a raster-order pixel stream with runtime kernel, stride and padding.

    Parameters
    ----------
    lanes : int
        Channels per beat (one pixel).
    value_width : int
        Bits of a value.
    signed : bool
        Whether values are two's complement.
    max_width, max_height : int
        Largest map width and height the unit accepts. The line buffer holds
        ``max_width + 1`` entries (the most output columns: ``k = 2, s = 1, p = 1``).

    Members
    -------
    config : ``In(config_layout)``
        ``height``, ``width`` (the input map), ``kernel`` (2 or 3), ``stride`` (1 or 2),
        ``padding`` (0 or 1). Requires ``height + 2 * padding >= kernel`` and the same for
        ``width``; other values are unsupported (undefined output). Change it only while
        ``busy`` is low; it applies to every following frame.
    busy : ``Out(1)``
        High while a frame is partly read or pooled pixels are still inside the unit.
    i : ``In(stream.Signature(i_layout))``
        ``values``: ``lanes`` values of pixel ``(r, c)``; ``last``: ignored (the frame
        geometry comes from ``config``). Gaps (``valid`` low) are allowed anywhere.
    o : ``Out(stream.Signature(o_layout))``
        ``values``: the window maxima of output pixel ``(oy, ox)``, pixels in raster order;
        ``last``: high on a frame's last output pixel. Honours ``ready``.

    Operation, latency and throughput
    ---------------------------------
    The unit scans the padded positions from the first real pixel to the last position any
    window or real pixel reaches; each scan step consumes one input pixel, or none at a
    position in the right or bottom padding (a *bubble*, value = the smallest representable
    value, which never changes a max because every window holds a real pixel). A step takes
    the horizontal max of the last ``k`` positions of its row (shift registers) and, at a
    window's right edge, combines it with the horizontal maxima of the previous ``k - 1``
    rows from the line buffer (a synchronous-read :class:`~amaranth.lib.memory.Memory`,
    one entry per output column), then writes it back.

    One step per cycle: with ``o.ready`` high the unit accepts a beat every cycle, except for
    the bubbles: one cycle per row when the last window column lies in the right padding, and
    one row of cycles after a frame when the last window row lies in the bottom padding
    (``k = 2, p = 1`` with ``(W + 2 - k)`` divisible by ``s``; ``k = 3, s = 1, p = 1``; ...).
    Latency: two pipeline registers, the timing of :class:`hw.threshold.ThresholdUnit`: the
    input beat (or bubble) that completes a window is captured into stage 1 at the clock edge
    that accepts it, and its output pixel is presented on ``o`` after the next edge (one cycle
    after acceptance, tested). Two pipeline registers; ``i.ready = (~o.valid | o.ready) & ~bubble``, a
    combinational path from ``o.ready``; while ``o`` is stalled the whole pipeline holds.
    """

    def __init__(self, lanes, value_width, signed, max_width, max_height):
        _check_positive(lanes=lanes, value_width=value_width, max_width=max_width,
                        max_height=max_height)
        self.lanes = lanes
        self.value_width = value_width
        self.signed = bool(signed)
        self.max_width = max_width
        self.max_height = max_height
        self.value_shape = _signed(value_width) if self.signed else unsigned(value_width)
        self.config_layout = data.StructLayout({
            "height": range(max_height + 1),
            "width": range(max_width + 1),
            "kernel": range(4),
            "stride": range(3),
            "padding": range(2),
        })
        values = data.ArrayLayout(self.value_shape, lanes)
        self.i_layout = data.StructLayout({"values": values, "last": 1})
        self.o_layout = data.StructLayout({"values": values, "last": 1})
        super().__init__({
            "config": In(self.config_layout),
            "busy": Out(1),
            "i": In(stream.Signature(self.i_layout)),
            "o": Out(stream.Signature(self.o_layout)),
        })

    def elaborate(self, platform):
        m = Module()
        lanes, cfg = self.lanes, self.config
        values = data.ArrayLayout(self.value_shape, lanes)
        low = Const(-(1 << (self.value_width - 1)) if self.signed else 0, self.value_shape)

        # Frame geometry (combinational from config).
        k3 = cfg.kernel == 3
        s2 = cfg.stride == 2
        p = cfg.padding
        km1 = Mux(k3, 2, 1)

        def last_index(size):
            """Padded index of the last window's last row/column; the scan's last index."""
            span = Signal(signed(size.shape().width + 3))
            end = Signal(signed(size.shape().width + 3))
            m.d.comb += [
                span.eq(size + 2 * p - 1 - km1),
                end.eq(Mux(s2, (span >> 1) << 1, span) + km1),
            ]
            scan = Mux(end == size + p, size, size - 1)
            return end, scan

        x = Signal(range(self.max_width + 1))
        y = Signal(range(self.max_height + 1))
        col_end, x_end = last_index(cfg.width)
        row_end, y_end = last_index(cfg.height)

        def window_end(index, end):
            """Whether padded ``index`` is a window's last row/column, and the window's number."""
            rel = Signal(signed(index.shape().width + 3))
            m.d.comb += rel.eq(index - km1)
            ok = (rel >= 0) & (~s2 | ~rel[0]) & (index <= end)
            return ok, Mux(s2, rel >> 1, rel)

        px = Signal(x.shape().width + 1)
        py = Signal(y.shape().width + 1)
        m.d.comb += [px.eq(x + p), py.eq(y + p)]
        col_ok, ox = window_end(px, col_end)
        row_ok, _ = window_end(py, row_end)
        bubble = (x >= cfg.width) | (y >= cfg.height)

        s1_valid = Signal()
        advance = Signal()
        step = Signal()
        m.d.comb += [
            advance.eq(~self.o.valid | self.o.ready),
            self.i.ready.eq(advance & ~bubble),
            step.eq(advance & (bubble | self.i.valid)),
            self.busy.eq((x != 0) | (y != 0) | s1_valid | self.o.valid),
        ]

        # Stage 0: the horizontal max of the row's last k positions.
        v = Signal(values)
        h1 = Signal(values)
        h2 = Signal(values)
        hm = Signal(values)
        for lane in range(lanes):
            m.d.comb += v[lane].eq(Mux(bubble, low, self.i.payload.values[lane]))
            a = _max(v[lane], Mux(x >= 1, h1[lane], low))
            m.d.comb += hm[lane].eq(_max(a, Mux(k3 & (x >= 2), h2[lane], low)))
        with m.If(step):
            m.d.sync += [h1.eq(v), h2.eq(h1)]
            with m.If(x == x_end):
                m.d.sync += x.eq(0)
                with m.If(y == y_end):
                    m.d.sync += y.eq(0)
                with m.Else():
                    m.d.sync += y.eq(y + 1)
            with m.Else():
                m.d.sync += x.eq(x + 1)

        # The line buffer: per output column, the horizontal maxima of the last two rows.
        entry = data.StructLayout({"l1": values, "l2": values})
        m.submodules.lines = lines = memory.Memory(shape=entry, depth=self.max_width + 1,
                                                   init=[])
        write = lines.write_port()
        read = lines.read_port(domain="sync", transparent_for=(write,))
        m.d.comb += [read.en.eq(advance), read.addr.eq(ox)]

        # Stage 1 register.
        s1_hm = Signal(values)
        s1_ox = Signal(range(self.max_width + 1))
        s1_out = Signal()
        s1_use1 = Signal()
        s1_use2 = Signal()
        s1_last = Signal()
        with m.If(advance):
            m.d.sync += [
                s1_valid.eq(step & col_ok),
                s1_hm.eq(hm),
                s1_ox.eq(ox),
                s1_out.eq(row_ok),
                s1_use1.eq(y >= 1),
                s1_use2.eq(k3 & (y >= 2)),
                s1_last.eq((px == col_end) & (py == row_end)),
            ]

        # Stage 2: the vertical max into the output register; the line buffer shifts.
        vm = Signal(values)
        for lane in range(lanes):
            a = _max(s1_hm[lane], Mux(s1_use1, read.data.l1[lane], low))
            m.d.comb += vm[lane].eq(_max(a, Mux(s1_use2, read.data.l2[lane], low)))
        m.d.comb += [
            write.en.eq(advance & s1_valid),
            write.addr.eq(s1_ox),
            write.data.l1.eq(s1_hm),
            write.data.l2.eq(read.data.l1),
        ]
        with m.If(advance):
            m.d.sync += [
                self.o.valid.eq(s1_valid & s1_out),
                self.o.payload.values.eq(vm),
                self.o.payload.last.eq(s1_last),
            ]
        return m


class GlobalSum(wiring.Component):
    """Per-channel sum of a frame of ``pixels`` beats (the golden ``gap``).

    Parameters
    ----------
    lanes, value_width, signed
        As :class:`MaxPool`.
    max_pixels : int
        Largest ``H * W``. Sums are ``value_width + (max_pixels - 1).bit_length()`` bits wide
        (signed when the values are), which holds every sum exactly.

    Members
    -------
    config : ``In(config_layout)``
        ``pixels``: ``H * W`` (1 .. ``max_pixels``). Change it only while ``busy`` is low.
    busy : ``Out(1)``
        High while a frame is partly summed or its sum waits on ``o``.
    i : ``In(stream.Signature(i_layout))``
        ``values`` of one pixel (``last`` ignored; frames are counted). Gaps allowed.
    o : ``Out(stream.Signature(o_layout))``
        ``sums``: one beat per frame. Honours ``ready``.

    Latency and throughput
    ----------------------
    One beat per cycle. The sum of the frame whose last beat is accepted at edge ``n`` is on
    ``o`` after edge ``n``. ``i.ready`` is low only for a frame's last beat while the previous
    frame's sum still waits on ``o`` (``i.ready = ~final | ~o.valid | o.ready``).
    """

    def __init__(self, lanes, value_width, signed, max_pixels):
        _check_positive(lanes=lanes, value_width=value_width, max_pixels=max_pixels)
        self.lanes = lanes
        self.value_width = value_width
        self.signed = bool(signed)
        self.max_pixels = max_pixels
        self.value_shape = _signed(value_width) if self.signed else unsigned(value_width)
        self.sum_width = value_width + (max_pixels - 1).bit_length()
        self.sum_shape = _signed(self.sum_width) if self.signed else unsigned(self.sum_width)
        self.config_layout = data.StructLayout({"pixels": range(max_pixels + 1)})
        self.i_layout = data.StructLayout({
            "values": data.ArrayLayout(self.value_shape, lanes), "last": 1})
        self.o_layout = data.StructLayout({"sums": data.ArrayLayout(self.sum_shape, lanes)})
        super().__init__({
            "config": In(self.config_layout),
            "busy": Out(1),
            "i": In(stream.Signature(self.i_layout)),
            "o": Out(stream.Signature(self.o_layout)),
        })

    def elaborate(self, platform):
        m = Module()
        sums = data.ArrayLayout(self.sum_shape, self.lanes)
        count = Signal(range(self.max_pixels + 1))
        acc = Signal(sums)
        total = Signal(sums)
        final = count == self.config.pixels - 1
        m.d.comb += [
            self.i.ready.eq(~final | ~self.o.valid | self.o.ready),
            self.busy.eq((count != 0) | self.o.valid),
        ]
        for lane in range(self.lanes):
            m.d.comb += total[lane].eq(Mux(count == 0, 0, acc[lane])
                                       + self.i.payload.values[lane])
        with m.If(self.o.ready):
            m.d.sync += self.o.valid.eq(0)
        with m.If(self.i.valid & self.i.ready):
            with m.If(final):
                m.d.sync += [
                    count.eq(0),
                    self.o.valid.eq(1),
                    self.o.payload.sums.eq(total),
                ]
            with m.Else():
                m.d.sync += [count.eq(count + 1), acc.eq(total)]
        return m


def _signed(width):
    return signed(width)
