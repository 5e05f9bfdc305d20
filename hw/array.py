"""The XNOR-popcount systolic array: the binary matrix engine of the accelerator.

The array computes a tile of a binary matrix product. Row ``r`` of the array holds one row of the
weight matrix, column ``c`` one column of the activation matrix; processing element ``(r, c)``
accumulates ``popcount(xnor(w, a))`` over the lane-words of K, which is the xnor-popcount count
``(dot + K) / 2`` of the +1/-1 vectors (bit 1 = +1, bit 0 = -1). The array is output stationary:
weights flow left to right, activations top to bottom, each skewed by one cycle per row/column,
so the array reads ``(rows + cols) * lane`` bits per cycle and performs ``rows * cols * lane``
bit-MACs per cycle.

**Bit-plane mode** (``planes`` set on the beats; needs ``lane % 8 == 0``): the lane is eight
groups of ``g = lane / 8`` bits, group ``b`` being bit-plane ``b`` of ``g`` 8-bit values, and a
PE adds the *weighted* count ``sum_b 2**b * popcount(xnor(w, a)`` restricted to group ``b``)``
per word. With bit ``i`` of every group of ``w`` the same (the +1/-1 weight of value ``i``)
and ``a`` the planes of unsigned 8-bit values ``x``, a value adds ``x`` where its weight is +1
and ``255 - x`` where it is -1: a dot product counts ``dot(w, x) + 255 * n_neg(w)``. This runs
layers with 8-bit inputs and binary weights (the first layer of CNV-W1A1) on the array
(:mod:`sw.compile.codegen`, docs/accelerator.md).
"""

from amaranth import Module, Mux, Signal, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

__all__ = ["PLANES", "XnorArray", "plane_popcount", "popcount", "share_array"]

#: Bit-planes of the bit-plane mode (8-bit values).
PLANES = 8


def popcount(value):
    """Return an expression counting the ones of ``value`` (a balanced adder tree)."""
    terms = [value[i] for i in range(len(value))]
    if not terms:
        return unsigned(1)(0)
    while len(terms) > 1:
        paired = [terms[i] + terms[i + 1] for i in range(0, len(terms) - 1, 2)]
        if len(terms) % 2:
            paired.append(terms[-1])
        terms = paired
    return terms[0]


def plane_popcount(value, planes):
    """Return an expression for the count of ``value`` (a lane of ``PLANES * g`` bits): its
    popcount, or with ``planes`` high the weighted count ``sum_b 2**b * popcount(value[b*g :
    (b+1)*g])``.

    The group popcounts are the lower levels of :func:`popcount`'s tree; the three levels
    above them add pairs of partial sums, the upper one shifted by 1, 2 and 4 groups' weight
    when ``planes`` is high (a multiplexer per level).
    """
    lane = len(value)
    if lane % PLANES:
        raise ValueError(f"a lane of {lane} bits is not {PLANES} bit-plane groups")
    g = lane // PLANES
    terms = [popcount(value[b * g:(b + 1) * g]) for b in range(PLANES)]
    span = 1
    while len(terms) > 1:
        terms = [terms[i] + Mux(planes, terms[i + 1] << span, terms[i + 1])
                 for i in range(0, len(terms), 2)]
        span *= 2
    return terms[0]


class XnorArray(wiring.Component):
    """Output-stationary XNOR-popcount systolic array.

    Parameters
    ----------
    rows, cols : int
        Array shape: a tile is ``rows`` dot products' weight rows by ``cols`` activation columns.
    lane : int
        Bits of K consumed per processing element per cycle.
    max_depth : int
        Largest K in bits of one dot product. Counts are ``acc_width = max_depth.bit_length()``
        bits wide; a longer tile wraps around (as does a bit-plane count above
        ``2**acc_width - 1``: the compiler checks that its counts fit).

    Members
    -------
    i : ``In(stream.Signature(i_layout))``
        One beat carries one lane-word of K for every row (``weights``, row ``r`` in bits
        ``[r*lane, (r+1)*lane)``) and every column (``activations``, column ``c`` in bits
        ``[c*lane, (c+1)*lane)``). ``first`` marks the first word of a tile (the accumulators
        restart), ``last`` its final word. A tile is the beats from ``first`` to ``last``;
        a one-word tile has both set. Gaps (``valid`` low) are allowed anywhere.
        ``planes`` selects the bit-plane mode (see the module documentation; ignored unless
        ``lane % 8 == 0``, :attr:`supports_planes`). The array takes it from each accepted
        beat and applies it to every PE at once, so all tiles in the array at the same time
        must carry the same value: change it only once the previous tile's results have left
        (the device runs one op at a time; a unit stays busy until its last result is out).
        ``ready`` is low only while a ``last`` beat is offered less than ``rows`` cycles after
        the previous accepted ``last`` beat: the result path drains one row per cycle, so tiles
        shorter than ``rows`` words are throttled to ``rows`` cycles each.
    o : ``Out(stream.Signature(o_layout, always_ready=True))``
        Results, one array row per beat: ``counts[c]`` is the count of PE ``(row, c)``. A tile
        produces ``rows`` beats on consecutive cycles, ``row`` counting up from 0. The consumer
        must always accept (results cannot be stalled).

    Latency and throughput
    ----------------------
    The beat of row 0 of a tile appears ``rows + cols + 2`` cycles after the tile's ``last`` beat
    was accepted. At full rate the array accepts one beat per cycle: a tile of ``k`` words takes
    ``max(k, rows)`` cycles of input.
    """

    def __init__(self, rows, cols, lane, max_depth):
        for name, value in (("rows", rows), ("cols", cols), ("lane", lane),
                            ("max_depth", max_depth)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, not {value!r}")
        self.rows = rows
        self.cols = cols
        self.lane = lane
        self.max_depth = max_depth
        self.acc_width = max_depth.bit_length()
        self.i_layout = data.StructLayout({
            "weights": rows * lane,
            "activations": cols * lane,
            "first": 1,
            "last": 1,
            "planes": 1,
        })
        self.o_layout = data.StructLayout({
            "counts": data.ArrayLayout(self.acc_width, cols),
            "row": range(rows),
        })
        super().__init__({
            "i": In(stream.Signature(self.i_layout)),
            "o": Out(stream.Signature(self.o_layout, always_ready=True)),
        })

    @property
    def supports_planes(self):
        """Whether the bit-plane mode exists (``lane % 8 == 0``)."""
        return self.lane % PLANES == 0

    @property
    def port_signature(self):
        """The signature of a unit that drives this array without owning it: ``i`` out to the
        array, ``o`` in from it (see :func:`share_array`)."""
        return self.signature.flip()

    def elaborate(self, platform):
        m = Module()
        rows, cols, lane, width = self.rows, self.cols, self.lane, self.acc_width

        # Throttle `last` beats so that a tile's results have left the result chain before the
        # next tile's results are captured (see the class docstring).
        cooldown = Signal(range(rows))
        m.d.comb += self.i.ready.eq(~self.i.payload.last | (cooldown == 0))
        accepted = self.i.valid & self.i.ready
        with m.If(accepted & self.i.payload.last):
            m.d.sync += cooldown.eq(rows - 1)
        with m.Elif(cooldown != 0):
            m.d.sync += cooldown.eq(cooldown - 1)

        # Input register, then skew: row r's weights and control and column c's activations are
        # delayed by r and c cycles so that matching words meet in PE (r, c).
        in_valid = Signal()
        in_beat = Signal(self.i_layout)
        m.d.sync += [in_valid.eq(accepted), in_beat.eq(self.i.payload)]
        # The mode of the tiles in flight (one op's tiles at a time): one register for all PEs.
        planes = Signal()
        if self.supports_planes:
            with m.If(accepted):
                m.d.sync += planes.eq(self.i.payload.planes)

        def delayed(value, cycles, name):
            for stage in range(cycles):
                reg = Signal.like(value, name=f"{name}_d{stage + 1}")
                m.d.sync += reg.eq(value)
                value = reg
            return value

        control_layout = data.StructLayout({"valid": 1, "first": 1, "last": 1})
        row_weights, row_control = [], []
        for r in range(rows):
            control = Signal(control_layout, name=f"row{r}_control")
            m.d.comb += [
                control.valid.eq(in_valid),
                control.first.eq(in_beat.first),
                control.last.eq(in_beat.last),
            ]
            row_weights.append(delayed(in_beat.weights[r * lane:(r + 1) * lane], r,
                                       f"row{r}_weights"))
            row_control.append(delayed(control, r, f"row{r}_control"))
        col_activations = [
            delayed(in_beat.activations[c * lane:(c + 1) * lane], c, f"col{c}_activations")
            for c in range(cols)
        ]

        # The processing elements. Each registers the words it passes on to its right and lower
        # neighbours, a popcount stage, and an accumulate stage; a finished dot product is kept
        # in `hold` until the result chain of its column captures it.
        hold = [[None] * cols for _ in range(rows)]
        bottom_last = [None] * cols
        weights_in = list(row_weights)
        control_in = list(row_control)
        activations_in = list(col_activations)
        for r in range(rows):
            for c in range(cols):
                w, a, ctl = weights_in[r], activations_in[c], control_in[r]
                pe = f"pe{r}_{c}"
                w_out = Signal(lane, name=f"{pe}_w")
                a_out = Signal(lane, name=f"{pe}_a")
                ctl_out = Signal(control_layout, name=f"{pe}_control")
                m.d.sync += [w_out.eq(w), a_out.eq(a), ctl_out.eq(ctl)]
                weights_in[r], activations_in[c], control_in[r] = w_out, a_out, ctl_out

                agree = ~(w ^ a)
                if self.supports_planes:
                    most = (2 ** PLANES - 1) * (lane // PLANES)
                    ones = Signal(range(most + 1), name=f"{pe}_ones")
                    count = plane_popcount(agree, planes)
                else:
                    ones = Signal(range(lane + 1), name=f"{pe}_ones")
                    count = popcount(agree)
                ones_ctl = Signal(control_layout, name=f"{pe}_ones_control")
                m.d.sync += [ones.eq(count), ones_ctl.eq(ctl)]

                acc = Signal(width, name=f"{pe}_acc")
                hold[r][c] = Signal(width, name=f"{pe}_hold")
                total = Mux(ones_ctl.first, 0, acc) + ones
                with m.If(ones_ctl.valid):
                    m.d.sync += acc.eq(total)
                    with m.If(ones_ctl.last):
                        m.d.sync += hold[r][c].eq(total)
                if r == rows - 1:
                    bottom_last[c] = ones_ctl.valid & ones_ctl.last

        # Result chains, one per column, shifting up towards row 0. Column c captures all its
        # `hold` registers the cycle after its bottom PE finished, then shifts one row per cycle.
        column_out = []
        for c in range(cols):
            capture = Signal(name=f"col{c}_capture")
            m.d.sync += capture.eq(bottom_last[c])
            chain = [Signal(width, name=f"col{c}_chain{r}") for r in range(rows)]
            chain_valid = [Signal(name=f"col{c}_chain{r}_valid") for r in range(rows)]
            for r in range(rows):
                below = chain[r + 1] if r + 1 < rows else 0
                below_valid = chain_valid[r + 1] if r + 1 < rows else 0
                m.d.sync += [
                    chain[r].eq(Mux(capture, hold[r][c], below)),
                    chain_valid[r].eq(capture | below_valid),
                ]
            # Column c's results leave c cycles after column 0's; delay the earlier columns so a
            # whole array row leaves together.
            column_out.append((delayed(chain[0], cols - 1 - c, f"col{c}_result"),
                               delayed(chain_valid[0], cols - 1 - c, f"col{c}_result_valid")))

        row = Signal(range(rows))
        last_valid = column_out[-1][1]
        with m.If(last_valid):
            m.d.sync += row.eq(Mux(row == rows - 1, 0, row + 1))
        m.d.comb += [
            self.o.valid.eq(last_valid),
            self.o.payload.row.eq(row),
        ]
        for c, (result, _) in enumerate(column_out):
            m.d.comb += self.o.payload.counts[c].eq(result)
        return m


def share_array(m, array, clients):
    """Let several units drive one :class:`XnorArray` in turn.

    ``clients`` is a list of ``(port, selected)``: ``port`` a unit's member of
    ``array.port_signature``, ``selected`` a signal that is high while that unit owns the array.
    At most one ``selected`` may be high at a time, and a unit may own the array only while no
    other unit's tiles are in flight (the device runs one command at a time, and each unit stays
    busy until its last result has left the array). The owner's beats go in; the results go to
    every port but are ``valid`` only at the owner's, and the others see ``ready`` low. The
    switch is combinational: no latency is added.
    """
    for port, selected in clients:
        m.d.comb += [
            port.i.ready.eq(array.i.ready & selected),
            port.o.valid.eq(array.o.valid & selected),
            port.o.payload.eq(array.o.payload),
        ]
    for index, (port, selected) in enumerate(clients):
        with (m.If if index == 0 else m.Elif)(selected):
            m.d.comb += [array.i.valid.eq(port.i.valid), array.i.payload.eq(port.i.payload)]
