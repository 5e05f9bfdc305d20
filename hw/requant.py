"""The requantizer: per-channel fixed-point rescaling of accumulators to narrow activations.

Implements ``rq`` of ``docs/compiler.md`` (and :func:`sw.compile.golden.requantize`) for the
``conv``, ``requant`` and ``combine`` operations::

    v = acc * mul[ch] + bias[ch] [+ res * res_mul[ch]]
    y = sat((v + 2**(shift[ch] - 1)) >> shift[ch])     # v itself when shift[ch] == 0

``>>`` is an arithmetic (floor) shift, so this is round half up (ties towards +infinity, also
for negative ``v``); ``sat`` saturates to ``[0, 2**out_bits - 1]`` when the channel's ``relu``
is set, else to ``[-2**(out_bits - 1), 2**(out_bits - 1) - 1]``.
"""

from amaranth import Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, memory, stream, wiring
from amaranth.lib.wiring import In, Out

__all__ = ["Requantizer"]


class Requantizer(wiring.Component):
    """Pipelined per-channel requantizer, ``lanes`` values per cycle.

    Parameters
    ----------
    lanes : int
        Values per beat. Lane ``i`` of a beat of channel group ``g`` belongs to channel
        ``g * lanes + i`` (the channels of one pixel, ``lanes`` at a time; a layer whose channel
        count is not a multiple of ``lanes`` pads its last group, and the padding lanes' outputs
        are don't-care).
    in_width : int
        Signed width of the accumulators ``acc``.
    out_bits : int
        Width of the outputs (unsigned after ReLU, else signed two's complement).
    channels : int
        Depth of the per-channel parameter memory (channels ``0 .. channels - 1``).
    mul_width : int
        Signed width of ``mul`` and ``res_mul`` (16: :data:`sw.compile.quantize.MUL_BITS`).
    max_shift : int
        Largest ``shift`` (40: :data:`sw.compile.quantize.MAX_SHIFT`).
    bias_width : int
        Signed width of ``bias`` (already scaled by ``2**shift``, so up to about
        ``in_width + mul_width`` bits are meaningful; 48 by default).
    res_width : int or None
        Signed width of the residual input ``res`` (``combine`` with a residual; 9 holds both
        signed and unsigned 8-bit activations). ``None`` (the default): no residual term, and
        neither ``res`` nor ``res_mul`` exist.

    Members
    -------
    params : ``In(stream.Signature(param_layout, always_ready=True))``
        Parameter writes, one channel per beat: ``channel``, ``mul``, ``shift``, ``bias``,
        ``relu`` (and ``res_mul``). A write takes effect for beats accepted on ``i`` from the
        cycle after it; do not write a channel while beats of its group are in flight.
    i : ``In(stream.Signature(i_layout))``
        ``values[l]`` (``lanes`` x ``signed(in_width)``), ``group`` (the channel group, see
        ``lanes``), ``res[l]`` (when ``res_width`` is set), ``last`` (passed through). Gaps
        (``valid`` low) are allowed anywhere.
    o : ``Out(stream.Signature(o_layout))``
        ``values[l]`` (``lanes`` x ``out_bits`` raw bits: unsigned if the lane's channel has
        ``relu``, else signed), ``last``. Beats leave in input order, none lost or duplicated,
        under any ``ready`` pattern.

    Latency and throughput
    ----------------------
    One beat per cycle. A beat accepted on ``i`` at clock edge ``t`` is offered on ``o`` from
    edge ``t + LATENCY`` (``LATENCY = 5``) when ``o.ready`` was high meanwhile. The pipeline has
    no internal buffering: it moves as a whole when its output register is empty or being taken
    (``i.ready = o.ready | ~o.valid``, a combinational path from ``o.ready`` to ``i.ready``), so
    backpressure stalls every stage.

    Pipeline (every stage a register, all enabled together):

    1. the parameter memories are read (synchronous read, block RAM) while the input is
       registered;
    2. ``acc * mul`` and ``res * res_mul``: registered products, to map onto DSPs. An ECP5
       ``MULT18X18D`` multiplies 18 x 18 signed bits; ``mul`` (16 bits) fits one operand, and
       an accumulator wider than 18 bits is split by Yosys into 18-bit slices, each a DSP, with
       their partial products shifted and added (e.g. 24 or 32 bits: two DSPs per lane, 36-bit
       slices would take more). Keep ``in_width`` at most 18 for one DSP per lane;
    3. ``v + half`` with ``half = (1 << shift) >> 1`` (``2**(shift-1)``, 0 when ``shift`` is 0);
    4. the arithmetic right shift by ``shift`` (a barrel shifter);
    5. the saturation, into the output register.

    Resources per lane: one multiplier of ``in_width x mul_width`` (plus
    ``res_width x mul_width`` with a residual), about ``in_width + mul_width + 3`` bits of
    adders and shifter; parameter memories: ``lanes`` banks of ``ceil(channels / lanes)`` words
    of ``mul_width + shift + bias_width + 1 [+ mul_width]`` bits, each written for the channels
    ``ch`` with ``ch % lanes`` equal to its lane (``lanes`` a power of two keeps that decode
    to wires). Measured (Yosys ``synth_ecp5``, ``lanes=4, in_width=18, out_bits=8,
    channels=256``): 4 ``MULT18X18D``, 8 ``DP16KD``, about 2,600 LUT4 and 1,060 FFs, most of
    the logic in the 48-bit-wide (``bias_width``) adders and barrel shifters.
    """

    LATENCY = 5

    def __init__(self, lanes, in_width, out_bits, channels, *, mul_width=16, max_shift=40,
                 bias_width=48, res_width=None):
        for name, value in (("lanes", lanes), ("in_width", in_width), ("out_bits", out_bits),
                            ("channels", channels), ("mul_width", mul_width),
                            ("bias_width", bias_width)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, not {value!r}")
        if not isinstance(max_shift, int) or max_shift < 0:
            raise ValueError(f"max_shift must be a non-negative integer, not {max_shift!r}")
        if res_width is not None and (not isinstance(res_width, int) or res_width < 1):
            raise ValueError(f"res_width must be None or a positive integer, not {res_width!r}")
        self.lanes = lanes
        self.in_width = in_width
        self.out_bits = out_bits
        self.channels = channels
        self.mul_width = mul_width
        self.max_shift = max_shift
        self.bias_width = bias_width
        self.res_width = res_width
        self.groups = -(-channels // lanes)

        entry = {
            "mul": signed(mul_width),
            "shift": range(max_shift + 1),
            "bias": signed(bias_width),
            "relu": 1,
        }
        if res_width is not None:
            entry["res_mul"] = signed(mul_width)
        self.entry_layout = data.StructLayout(entry)
        self.param_layout = data.StructLayout({"channel": range(channels), **entry})
        i_fields = {
            "values": data.ArrayLayout(signed(in_width), lanes),
            "group": range(self.groups),
            "last": 1,
        }
        if res_width is not None:
            i_fields["res"] = data.ArrayLayout(signed(res_width), lanes)
        self.i_layout = data.StructLayout(i_fields)
        self.o_layout = data.StructLayout({
            "values": data.ArrayLayout(unsigned(out_bits), lanes),
            "last": 1,
        })
        super().__init__({
            "params": In(stream.Signature(self.param_layout, always_ready=True)),
            "i": In(stream.Signature(self.i_layout)),
            "o": Out(stream.Signature(self.o_layout)),
        })

    def elaborate(self, platform):
        m = Module()
        lanes, b = self.lanes, self.out_bits
        residual = self.res_width is not None

        # The whole pipeline advances together when the output register is free or taken.
        advance = Signal()
        m.d.comb += [
            advance.eq(~self.o.valid | self.o.ready),
            self.i.ready.eq(advance),
        ]

        # Widths: products, and their sum with the bias and the rounding half (no overflow).
        prod_width = self.in_width + self.mul_width
        res_prod_width = (self.res_width + self.mul_width) if residual else 0
        rnd_width = max(prod_width, res_prod_width, self.bias_width, self.max_shift + 1) + 2

        # Stage valid bits and control.
        valid = [Signal(name=f"s{k}_valid") for k in range(1, 6)]
        last = [Signal(name=f"s{k}_last") for k in range(1, 6)]
        with m.If(advance):
            m.d.sync += [
                valid[0].eq(self.i.valid),
                last[0].eq(self.i.payload.last),
            ]
            for k in range(1, 5):
                m.d.sync += [valid[k].eq(valid[k - 1]), last[k].eq(last[k - 1])]
        m.d.comb += [
            self.o.valid.eq(valid[4]),
            self.o.payload.last.eq(last[4]),
        ]

        # Parameter writes: channel ch lives in bank ch % lanes at address ch // lanes.
        wr = self.params
        for lane in range(lanes):
            mem = memory.Memory(shape=self.entry_layout, depth=self.groups, init=[])
            m.submodules[f"params{lane}"] = mem
            wport = mem.write_port()
            rport = mem.read_port(domain="sync")
            m.d.comb += [
                wport.addr.eq(wr.payload.channel // lanes),
                wport.en.eq(wr.valid & (wr.payload.channel % lanes == lane)),
                rport.addr.eq(self.i.payload.group),
                rport.en.eq(advance),
            ]
            for name in self.entry_layout.members:
                m.d.comb += getattr(wport.data, name).eq(getattr(wr.payload, name))
            p = rport.data

            # Stage 1: input registered (the parameters arrive from the memory read).
            acc1 = Signal(signed(self.in_width), name=f"l{lane}_acc1")
            res1 = Signal(signed(self.res_width), name=f"l{lane}_res1") if residual else None
            # Stage 2: products (DSP), parameters carried along.
            prod2 = Signal(signed(prod_width), name=f"l{lane}_prod2")
            res_prod2 = (Signal(signed(res_prod_width), name=f"l{lane}_res_prod2")
                         if residual else None)
            bias2 = Signal(signed(self.bias_width), name=f"l{lane}_bias2")
            shift2 = Signal(range(self.max_shift + 1), name=f"l{lane}_shift2")
            relu2 = Signal(name=f"l{lane}_relu2")
            # Stage 3: v + half.
            rnd3 = Signal(signed(rnd_width), name=f"l{lane}_rnd3")
            shift3 = Signal(range(self.max_shift + 1), name=f"l{lane}_shift3")
            relu3 = Signal(name=f"l{lane}_relu3")
            # Stage 4: shifted.
            y4 = Signal(signed(rnd_width), name=f"l{lane}_y4")
            relu4 = Signal(name=f"l{lane}_relu4")
            # Stage 5: saturated (the output register).
            out5 = Signal(unsigned(b), name=f"l{lane}_out5")

            half = (Const(1, 1) << shift2)[1:self.max_shift + 1]
            v = prod2 + bias2 + half
            if residual:
                v = v + res_prod2
            low = Mux(relu4, Const(0, signed(b + 1)), Const(-(1 << (b - 1)), signed(b + 1)))
            high = Mux(relu4, Const((1 << b) - 1, signed(b + 1)),
                       Const((1 << (b - 1)) - 1, signed(b + 1)))
            with m.If(advance):
                m.d.sync += [
                    acc1.eq(self.i.payload.values[lane]),
                    prod2.eq(acc1 * p.mul),
                    bias2.eq(p.bias),
                    shift2.eq(p.shift),
                    relu2.eq(p.relu),
                    rnd3.eq(v),
                    shift3.eq(shift2),
                    relu3.eq(relu2),
                    y4.eq(rnd3 >> shift3),
                    relu4.eq(relu3),
                    out5.eq(Mux(y4 < low, low, Mux(y4 > high, high, y4))[:b]),
                ]
                if residual:
                    m.d.sync += [
                        res1.eq(self.i.payload.res[lane]),
                        res_prod2.eq(res1 * p.res_mul),
                    ]
            m.d.comb += self.o.payload.values[lane].eq(out5)
        return m
