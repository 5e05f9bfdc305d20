"""The GEMM engine: walks the tiles of a binary matrix product through the systolic array."""

from amaranth import Module, Signal
from amaranth.lib import data, memory, stream, wiring
from amaranth.lib.wiring import In, Out

from .array import XnorArray

__all__ = ["GemmEngine", "GemmRequest"]


#: The tiling of an (M x K) by (K x N) product: ``m_tiles = ceil(M / rows)``,
#: ``n_tiles = ceil(N / cols)``, ``k_words = ceil(K / lane)``.
GemmRequest = data.StructLayout({"m_tiles": 16, "n_tiles": 16, "k_words": 16})


class GemmEngine(wiring.Component):
    """Computes a binary GEMM from the weight and activation memories into the result memory.

    The memory layouts are those of :mod:`sw.packing`: weight tile ``mt`` occupies words
    ``[mt * k_words, (mt + 1) * k_words)`` of the weight memory, activation tile ``nt`` words
    ``[nt * k_words, (nt + 1) * k_words)`` of the activation memory, and row ``r`` of output tile
    ``(mt, nt)`` is written to word ``(mt * n_tiles + nt) * rows + r`` of the result memory.
    Tiles run in the order ``mt`` outer, ``nt`` inner.

    Parameters
    ----------
    config : :class:`hw.config.DeviceConfig`
    own_array : bool
        Whether the engine holds its own :class:`~hw.array.XnorArray` (default) or drives one
        through ``array_port``.

    Members
    -------
    start : ``In(stream.Signature(GemmRequest))``
        Accepted while idle. The request must fit the memories and ``max_depth``; the engine
        does not check it (the command executor does).
    busy : ``Out(1)``
        High from the cycle after ``start`` is accepted until the last result is written.
    cycles : ``Out(32)``
        Cycles the last run took (from ``start`` accepted to the last result written).
    weights, activations : ``In(memory.ReadPort.Signature(...))``
        Read ports of the weight and activation memories (one cycle read latency; the engine
        uses ``en`` to hold the data while the array stalls).
    results : ``In(memory.WritePort.Signature(...))``
        Write port of the result memory.
    array_port : ``Out(XnorArray.port_signature)``
        Only with ``own_array=False``: the engine drives an array it shares with other units
        (:func:`hw.array.share_array`); otherwise it holds its own.

    Throughput: one lane-word per PE per cycle; a tile of ``k_words`` words takes
    ``max(k_words, rows)`` cycles, so a run of ``T = m_tiles * n_tiles`` tiles takes
    ``(T - 1) * max(k_words, rows) + k_words + 2 * rows + cols + 3`` cycles (measured by
    ``tests/test_device_core.py``): the last tile drains through the array and the result rows
    are written one per cycle.
    """

    def __init__(self, config, *, own_array=True):
        self.config = config
        self.own_array = own_array
        self.array = XnorArray(config.rows, config.cols, config.lane, config.max_depth)
        ports = {} if own_array else {"array_port": Out(self.array.port_signature)}
        super().__init__({
            **ports,
            "start": In(stream.Signature(GemmRequest)),
            "busy": Out(1),
            "cycles": Out(32),
            "weights": In(memory.ReadPort.Signature(
                addr_width=(config.weight_depth - 1).bit_length(),
                shape=config.rows * config.lane)),
            "activations": In(memory.ReadPort.Signature(
                addr_width=(config.activation_depth - 1).bit_length(),
                shape=config.cols * config.lane)),
            "results": In(memory.WritePort.Signature(
                addr_width=(config.result_depth - 1).bit_length(),
                shape=config.cols * self.array.acc_width)),
        })

    def elaborate(self, platform):
        m = Module()
        if self.own_array:
            m.submodules.array = array = self.array
        else:
            array = self.array_port
        rows = self.config.rows

        request = Signal(GemmRequest)
        issuing = Signal()          # words remain to be read from the memories
        fetched = Signal()          # the read ports hold a word the array has not taken yet
        fetched_first = Signal()
        fetched_last = Signal()
        mt = Signal(16)
        nt = Signal(16)
        kw = Signal(16)
        w_base = Signal(len(self.weights.addr))
        w_addr = Signal(len(self.weights.addr))
        a_addr = Signal(len(self.activations.addr))
        tiles_issued = Signal(32)
        tiles_done = Signal(32)
        cycles = Signal(32)

        m.d.comb += self.start.ready.eq(~self.busy)
        with m.If(self.start.valid & self.start.ready):
            m.d.sync += [
                request.eq(self.start.payload),
                issuing.eq(1),
                self.busy.eq(1),
                mt.eq(0), nt.eq(0), kw.eq(0),
                w_base.eq(0), w_addr.eq(0), a_addr.eq(0),
                tiles_issued.eq(0), tiles_done.eq(0),
                cycles.eq(1),
            ]

        # Read-ahead of one word: a new word is read whenever the array takes the word held in
        # the read ports (or none is held); otherwise the read ports keep their data.
        advance = ~fetched | array.i.ready
        m.d.comb += [
            self.weights.addr.eq(w_addr),
            self.activations.addr.eq(a_addr),
            self.weights.en.eq(advance),
            self.activations.en.eq(advance),
            array.i.valid.eq(fetched),
            array.i.payload.weights.eq(self.weights.data),
            array.i.payload.activations.eq(self.activations.data),
            array.i.payload.first.eq(fetched_first),
            array.i.payload.last.eq(fetched_last),
        ]
        with m.If(advance):
            m.d.sync += fetched.eq(issuing)
            with m.If(issuing):
                last_word = kw + 1 == request.k_words
                last_n = nt + 1 == request.n_tiles
                m.d.sync += [
                    fetched_first.eq(kw == 0),
                    fetched_last.eq(last_word),
                    kw.eq(kw + 1),
                    w_addr.eq(w_addr + 1),
                    a_addr.eq(a_addr + 1),
                ]
                with m.If(last_word):
                    m.d.sync += [kw.eq(0), nt.eq(nt + 1), tiles_issued.eq(tiles_issued + 1)]
                    # Same weight tile against the next activation tile, or the next weight tile
                    # against the first activation tile.
                    m.d.sync += w_addr.eq(w_base)
                    with m.If(last_n):
                        m.d.sync += [
                            nt.eq(0),
                            mt.eq(mt + 1),
                            w_base.eq(w_base + request.k_words),
                            w_addr.eq(w_base + request.k_words),
                            a_addr.eq(0),
                        ]
                        with m.If(mt + 1 == request.m_tiles):
                            m.d.sync += issuing.eq(0)

        m.d.comb += [
            self.results.en.eq(array.o.valid),
            self.results.data.eq(array.o.payload.counts),
        ]
        with m.If(array.o.valid):
            m.d.sync += self.results.addr.eq(self.results.addr + 1)
            with m.If(array.o.payload.row == rows - 1):
                m.d.sync += tiles_done.eq(tiles_done + 1)
        with m.If(self.start.valid & self.start.ready):
            m.d.sync += self.results.addr.eq(0)

        with m.If(self.busy):
            m.d.sync += cycles.eq(cycles + 1)
            with m.If(~issuing & ~fetched & (tiles_done == tiles_issued)):
                m.d.sync += [self.busy.eq(0), self.cycles.eq(cycles)]
        return m
