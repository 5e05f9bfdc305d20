"""The fixed-point MAC array: the integer dot products of the ``conv`` operation.

Computes the accumulators of the golden model's fixed-point ``conv`` (``docs/compiler.md``,
``_conv`` of :mod:`sw.compile.golden`): for each output channel ``o``, the exact integer sum
``acc[o] = sum_k weight[o, k] * x[k]`` over the ``k`` of one output pixel's window (stem convs,
1x1 transitions, the classifier). The requantization that follows is
:class:`hw.requant.Requantizer`'s.

Operand ranges (``sw.compile``): weights are int8 per output channel; activations are 8-bit
(unsigned after a ReLU: zero-extend into ``act_width``, or signed), or the ``input`` op's
``(raw << 4) - zero`` with ``raw`` in ``0 .. 255`` and ``zero = round(mean * 16)`` in
``0 .. 4080``, so ``-4080 .. 4080``: 13 signed bits, the default ``act_width``.
"""

from amaranth import Module, Mux, Signal, signed
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

__all__ = ["MacArray", "accumulator_width"]


def accumulator_width(weight_width, act_width, max_terms):
    """Smallest signed width holding every sum of at most ``max_terms`` products of a
    ``signed(weight_width)`` weight and a ``signed(act_width)`` activation."""
    w_lo, w_hi = -(1 << (weight_width - 1)), (1 << (weight_width - 1)) - 1
    a_lo, a_hi = -(1 << (act_width - 1)), (1 << (act_width - 1)) - 1
    corners = [w * a for w in (w_lo, w_hi) for a in (a_lo, a_hi)]
    lo, hi = max_terms * min(corners), max_terms * max(corners)
    width = 1
    while not (-(1 << (width - 1)) <= lo and hi <= (1 << (width - 1)) - 1):
        width += 1
    return width


class MacArray(wiring.Component):
    """``lanes`` parallel multiply-accumulate lanes, one output channel per lane.

    Parameters
    ----------
    lanes : int
        Lanes (output channels computed together).
    weight_width : int
        Signed width of the weights (8: int8).
    act_width : int
        Signed width of the activations (13 holds the ``input`` op's values and 8-bit signed or
        unsigned activations; 9 holds only the latter).
    acc_width : int or None
        Signed width of the accumulators. ``None`` (the default): the smallest width that cannot
        overflow, :func:`accumulator_width` of ``max_terms``; a given width narrower than that
        is refused (``ValueError``).
    max_terms : int
        The longest dot product (input beats from ``first`` to ``last``, both included) the
        unit must sum without overflow, e.g. ``in_channels / groups * kernel**2`` of the
        largest conv. Longer dot products are the caller's error (not detected).

    Members
    -------
    i : ``In(stream.Signature(i_layout))``
        One term per beat: ``activation`` (``signed(act_width)``, broadcast to every lane),
        ``weights[l]`` (``lanes`` x ``signed(weight_width)``, lane ``l``'s weight), ``first``
        (this beat starts a dot product: the lane accumulators restart from this term),
        ``last`` (this beat ends a dot product: the sums are emitted). A one-term dot product
        has both set. Gaps (``valid`` low) are allowed anywhere, also inside a dot product.
    o : ``Out(stream.Signature(o_layout))``
        One beat per dot product: ``acc[l]`` (``lanes`` x ``signed(acc_width)``), in input
        order, none lost or duplicated, under any ``ready`` pattern.

    Latency and throughput
    ----------------------
    One input beat per cycle. The sums of a dot product whose ``last`` beat is accepted on
    ``i`` at clock edge ``t`` are offered on ``o`` from edge ``t + LATENCY - 1`` and taken at
    edge ``t + LATENCY`` (``LATENCY = 3``) at the earliest.

    Pipeline (every stage a register, all enabled together by ``advance``):

    1. the input beat is registered (the multiplier's input registers);
    2. ``activation * weights[l]``: the registered product (the multiplier's output register).
       An ECP5 ``MULT18X18D`` takes 18 x 18 signed bits; the default 13 x 8 bits needs the
       18 x 18 mode, one multiplier per lane (a sysDSP slice holds two). With
       ``act_width <= 9`` (8-bit activations only) the product fits the 9 x 9 mode, four per
       slice; Yosys maps either form (a registered ``*`` with registered operands) onto one
       ``MULT18X18D`` with its input and output registers (their clock enables driven by
       ``advance``);
    3. the accumulator: ``acc = (first ? 0 : acc) + product``, an ``acc_width``-bit adder in
       LUT carry chains (Yosys does not infer the ``ALU54B``). On ``last`` the new sum also
       goes into the output register (``o.payload``).

    Backpressure: the output register holds one result. The pipeline stops (``advance`` low,
    so ``i.ready`` low, a combinational path from ``o.ready``) only when a ``last`` beat
    reaches stage 3 while the previous result is still offered and not taken
    (``o.valid & ~o.ready``); beats of a dot product in progress keep accumulating while a
    result waits. No beat is dropped or duplicated: a stopped pipeline holds every stage.

    Resources per lane: one ``act_width x weight_width`` multiplier, an ``acc_width``-bit
    adder and about ``act_width + weight_width + 3 * acc_width`` flip-flops (product,
    accumulator, output), the activation register shared by the lanes.
    """

    LATENCY = 3

    def __init__(self, lanes, weight_width=8, act_width=13, acc_width=None, *,
                 max_terms=4608):
        for name, value in (("lanes", lanes), ("weight_width", weight_width),
                            ("act_width", act_width), ("max_terms", max_terms)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, not {value!r}")
        need = accumulator_width(weight_width, act_width, max_terms)
        if acc_width is None:
            acc_width = need
        elif not isinstance(acc_width, int) or acc_width < need:
            raise ValueError(f"acc_width must be an integer of at least {need} (sums of "
                             f"{max_terms} products of {weight_width} x {act_width} bits), "
                             f"not {acc_width!r}")
        self.lanes = lanes
        self.weight_width = weight_width
        self.act_width = act_width
        self.acc_width = acc_width
        self.max_terms = max_terms
        self.prod_width = weight_width + act_width

        self.i_layout = data.StructLayout({
            "activation": signed(act_width),
            "weights": data.ArrayLayout(signed(weight_width), lanes),
            "first": 1,
            "last": 1,
        })
        self.o_layout = data.StructLayout({
            "acc": data.ArrayLayout(signed(acc_width), lanes),
        })
        super().__init__({
            "i": In(stream.Signature(self.i_layout)),
            "o": Out(stream.Signature(self.o_layout)),
        })

    def elaborate(self, platform):
        m = Module()

        # Stage valid bits and control.
        valid1, first1, last1 = Signal(), Signal(), Signal()
        valid2, first2, last2 = Signal(), Signal(), Signal()
        act1 = Signal(signed(self.act_width))

        # Stop only when a result would land in an occupied, untaken output register.
        advance = Signal()
        m.d.comb += [
            advance.eq(~(valid2 & last2 & self.o.valid & ~self.o.ready)),
            self.i.ready.eq(advance),
        ]

        with m.If(self.o.ready):
            m.d.sync += self.o.valid.eq(0)
        with m.If(advance):
            m.d.sync += [
                valid1.eq(self.i.valid),
                first1.eq(self.i.payload.first),
                last1.eq(self.i.payload.last),
                act1.eq(self.i.payload.activation),
                valid2.eq(valid1),
                first2.eq(first1),
                last2.eq(last1),
            ]
            with m.If(valid2 & last2):
                m.d.sync += self.o.valid.eq(1)

        for lane in range(self.lanes):
            w1 = Signal(signed(self.weight_width), name=f"l{lane}_w1")
            prod2 = Signal(signed(self.prod_width), name=f"l{lane}_prod2")
            acc3 = Signal(signed(self.acc_width), name=f"l{lane}_acc3")
            total = Signal(signed(self.acc_width), name=f"l{lane}_total")
            m.d.comb += total.eq(Mux(first2, 0, acc3) + prod2)
            with m.If(advance):
                m.d.sync += [
                    w1.eq(self.i.payload.weights[lane]),
                    prod2.eq(act1 * w1),
                ]
                with m.If(valid2):
                    m.d.sync += acc3.eq(total)
                    with m.If(last2):
                        m.d.sync += self.o.payload.acc[lane].eq(total)
        return m
