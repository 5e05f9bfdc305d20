"""The threshold unit: turns stored integers into bits by per-channel integer compares.

This is the hardware form of the golden model's ``threshold`` operation (``docs/compiler.md``,
:func:`sw.compile.quantize.thresholds`): a BatchNorm followed by ``sign`` folds, per channel
``ch``, into a threshold ``T[ch]`` and a direction ``D[ch]``:

* ``D = +1``: ``bit = x >= T`` (equality gives 1);
* ``D = -1``: ``bit = x <= T`` (equality gives 1);
* ``D = 0``: ``bit = T`` (a constant; ``T`` is 0 or 1, the hardware outputs ``T != 0``).

Bit 1 stands for +1, bit 0 for -1 (the packing of binary layers).
"""

from amaranth import Module, Signal, signed, unsigned
from amaranth.lib import data, memory, stream, wiring
from amaranth.lib.wiring import In, Out

__all__ = ["ThresholdUnit", "encode_parameter"]


def encode_parameter(threshold, direction, value_width, is_signed):
    """Map a golden ``(threshold, direction)`` to an equivalent pair that fits the unit.

    The unit stores ``threshold`` as ``signed(value_width + 1)``. Every threshold inside the
    range of the stored values fits unchanged; one outside it (:func:`sw.compile.quantize.
    thresholds` clips bounds to +-2**40) makes the compare constant, so it is encoded as
    direction 0 with the constant bit. Returns ``(threshold, direction)`` as Python ints.
    """
    threshold, direction = int(threshold), int(direction)
    if is_signed:
        lo, hi = -(1 << (value_width - 1)), (1 << (value_width - 1)) - 1
    else:
        lo, hi = 0, (1 << value_width) - 1
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


class ThresholdUnit(wiring.Component):
    """Per-channel threshold compares of ``lanes`` values per cycle.

    Parameters
    ----------
    lanes : int
        Values (and output bits) per beat.
    value_width : int
        Bits of a stored value.
    signed : bool
        Whether the stored values are two's complement (e.g. fixed-point features before a
        BatchNorm -> sign) or unsigned (e.g. xnor-popcount counts of :class:`hw.array.XnorArray`).
    channels : int
        Depth of the per-channel parameter memory.
    lane_channels : ``"consecutive"`` or ``"shared"``
        Channel addressing of a beat. ``"consecutive"`` (default): lane ``i`` belongs to channel
        ``channel + i`` (a beat carries ``lanes`` channels of one pixel); the producer must keep
        ``channel + lanes - 1 < channels``. ``"shared"``: every lane belongs to ``channel`` (a
        beat carries one channel of ``lanes`` pixels, as an :class:`~hw.array.XnorArray` result
        row does: one output channel over ``cols`` activation columns).

    Members
    -------
    param : ``In(stream.Signature(param_layout))``
        Parameter load port, always ready (``ready`` is tied high, so the component converts to
        Verilog as a top level): a valid beat writes ``threshold`` (``signed(value_width + 1)``) and
        ``direction`` (``signed(2)``: +1 ``0b01``, -1 ``0b11``, 0 ``0b00``; the unused code
        ``0b10`` (-2) behaves like -1) of channel ``channel``. Use :func:`encode_parameter` to
        bring any golden pair into range. The write takes effect for beats accepted on ``i``
        from the next cycle on; do not rewrite a channel while beats using it are in flight.
    i : ``In(stream.Signature(i_layout))``
        ``values``: ``lanes`` values of ``value_width`` bits (``data.ArrayLayout``, lane ``i`` in
        bits ``[i*value_width, (i+1)*value_width)``), ``channel``: the channel of lane 0 (see
        ``lane_channels``), ``last``: passed through. Gaps (``valid`` low) are allowed anywhere.
    o : ``Out(stream.Signature(o_layout))``
        ``bits``: bit ``i`` is lane ``i``'s result; ``last``: the input beat's ``last``. Honours
        ``ready``: one output beat per accepted input beat, in order.

    Latency and throughput
    ----------------------
    A two-stage pipeline (parameter read, then compare into the output register). With
    ``o.ready`` high, an input beat accepted at clock edge ``n`` is presented on ``o`` (``valid``
    high) after edge ``n + 2``, i.e. two cycles later. One beat per cycle: ``i.ready`` is high
    whenever the output register is empty or being read (``i.ready = ~o.valid | o.ready``, a
    combinational path from ``o.ready``); while ``o`` is stalled the whole pipeline holds.
    """

    def __init__(self, lanes, value_width, signed, channels, lane_channels="consecutive"):
        for name, value in (("lanes", lanes), ("value_width", value_width),
                            ("channels", channels)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, not {value!r}")
        if lane_channels not in ("consecutive", "shared"):
            raise ValueError(f"lane_channels must be 'consecutive' or 'shared', not "
                             f"{lane_channels!r}")
        self.lanes = lanes
        self.value_width = value_width
        self.signed = bool(signed)
        self.channels = channels
        self.lane_channels = lane_channels
        self.value_shape = _signed(value_width) if self.signed else unsigned(value_width)
        self.param_layout = data.StructLayout({
            "channel": range(channels),
            "threshold": _signed(value_width + 1),
            "direction": _signed(2),
        })
        self.i_layout = data.StructLayout({
            "values": data.ArrayLayout(self.value_shape, lanes),
            "channel": range(channels),
            "last": 1,
        })
        self.o_layout = data.StructLayout({"bits": lanes, "last": 1})
        super().__init__({
            "param": In(stream.Signature(self.param_layout)),
            "i": In(stream.Signature(self.i_layout)),
            "o": Out(stream.Signature(self.o_layout)),
        })

    def elaborate(self, platform):
        m = Module()
        lanes = self.lanes
        entry = data.StructLayout({
            "threshold": _signed(self.value_width + 1),
            "direction": _signed(2),
        })
        m.submodules.params = params = memory.Memory(shape=entry, depth=self.channels, init=[])
        write = params.write_port()
        m.d.comb += [
            self.param.ready.eq(1),
            write.en.eq(self.param.valid),
            write.addr.eq(self.param.payload.channel),
            write.data.threshold.eq(self.param.payload.threshold),
            write.data.direction.eq(self.param.payload.direction),
        ]

        # The pipeline advances when the output register is empty or being emptied.
        advance = Signal()
        m.d.comb += [
            advance.eq(~self.o.valid | self.o.ready),
            self.i.ready.eq(advance),
        ]

        # Stage 1: the values and the parameters (synchronous reads, held while stalled).
        ports = []
        for lane in range(lanes if self.lane_channels == "consecutive" else 1):
            port = params.read_port(domain="sync", transparent_for=(write,))
            m.d.comb += [
                port.en.eq(advance),
                port.addr.eq(self.i.payload.channel + lane),
            ]
            ports.append(port)
        s1_valid = Signal()
        s1_values = Signal(self.i_layout.members["values"])
        s1_last = Signal()
        with m.If(advance):
            m.d.sync += [
                s1_valid.eq(self.i.valid),
                s1_values.eq(self.i.payload.values),
                s1_last.eq(self.i.payload.last),
            ]

        # Stage 2: the compares into the output register.
        bits = Signal(lanes)
        for lane in range(lanes):
            p = ports[lane if self.lane_channels == "consecutive" else 0].data
            x = s1_values[lane]
            compare = Signal(name=f"lane{lane}_bit")
            with m.If(p.direction == 0):
                m.d.comb += compare.eq(p.threshold != 0)
            with m.Elif(p.direction > 0):
                m.d.comb += compare.eq(x >= p.threshold)
            with m.Else():
                m.d.comb += compare.eq(x <= p.threshold)
            m.d.comb += bits[lane].eq(compare)
        with m.If(advance):
            m.d.sync += [
                self.o.valid.eq(s1_valid),
                self.o.payload.bits.eq(bits),
                self.o.payload.last.eq(s1_last),
            ]
        return m


def _signed(width):
    return signed(width)
