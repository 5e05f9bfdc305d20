"""The INTS memory: signed integers, read and written in runs of ``banks`` consecutive elements.

The fixed-point unit and the binary conv engine produce and consume integer feature maps as
runs of consecutive elements at arbitrary element addresses (a tile of ``cols`` output pixels
starts at ``out_base + o * out_plane + n0``, which need not be aligned). A single wide memory
would need aligned runs, so the elements are spread over ``banks`` single-element memories:
element ``a`` lives in bank ``a % banks``, row ``a // banks``, and the ``banks`` elements of any
run are in different banks.
"""

from amaranth import Cat, Const, Module, Mux, Signal, signed
from amaranth.lib import data, memory, wiring
from amaranth.lib.wiring import In, Out

from .rotate import rotate_down, rotate_up

__all__ = ["IntMemory"]




class IntMemory(wiring.Component):
    """Banked memory of signed integers with one read and one write port of ``banks`` elements.

    Parameters
    ----------
    depth : int
        Elements; a positive multiple of ``banks``.
    width : int
        Bits of one element (signed).
    banks : int
        Elements of one run, a power of two (the device uses the array's ``cols``).
    init : list of int, optional
        Initial contents (element ``a`` at index ``a``); missing elements are 0.

    Members
    -------
    rd_addr : ``In(addr_width)``
        Element address of the run to read.
    rd_en : ``In(1)``
        Read enable. While low, ``rd_data`` holds its value.
    rd_data : ``Out(data.ArrayLayout(signed(width), banks))``
        ``rd_data[i] = mem[rd_addr + i]`` for the ``rd_addr`` of the last cycle whose ``rd_en``
        was high (:attr:`READ_LATENCY` = 1). Not transparent: a write in the same cycle as the
        read is not seen by it (the old value is read).
    wr_addr : ``In(addr_width)``
    wr_en : ``In(1)``
    wr_mask : ``In(banks)``
    wr_data : ``In(data.ArrayLayout(signed(width), banks))``
        When ``wr_en`` is high, ``mem[wr_addr + i] = wr_data[i]`` for each ``i`` with
        ``wr_mask[i]`` set, at the end of the cycle. A scalar access is a run with mask ``0b1``.

    Elements at addresses ``>= depth`` do not exist (no wrap-around): writes to them are
    dropped and reads of them give 0. ``addr_width = ceil(log2(depth))`` (at least 1).

    Throughput: one run read and one run written every cycle, at any alignment.

    Attributes
    ----------
    bank_data : list of :class:`amaranth.lib.memory.MemoryData`
        The banks' storage (bank ``b``, row ``r`` holds element ``r * banks + b``), for
        simulations to inspect; :meth:`element` names the cell of an element.
    """

    #: Cycles from a read request to its data.
    READ_LATENCY = 1

    def __init__(self, depth, width, banks, init=()):
        for name, value in (("depth", depth), ("width", width), ("banks", banks)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, not {value!r}")
        if banks & (banks - 1):
            raise ValueError(f"banks must be a power of two, not {banks!r}")
        if depth % banks:
            raise ValueError(f"depth must be a multiple of banks ({banks}), not {depth!r}")
        init = [int(v) for v in init]
        if len(init) > depth:
            raise ValueError(f"init must have at most depth ({depth}) elements, "
                             f"not {len(init)}")
        self.depth = depth
        self.width = width
        self.banks = banks
        self.bank_depth = depth // banks
        self.addr_width = max(1, (depth - 1).bit_length())
        self.bank_data = [
            memory.MemoryData(shape=signed(width), depth=self.bank_depth,
                              init=init[b::banks])
            for b in range(banks)]
        run = data.ArrayLayout(signed(width), banks)
        super().__init__({
            "rd_addr": In(self.addr_width),
            "rd_en": In(1),
            "rd_data": Out(run),
            "wr_addr": In(self.addr_width),
            "wr_en": In(1),
            "wr_mask": In(banks),
            "wr_data": In(run),
        })

    def element(self, address):
        """Return ``(bank_data, row)`` holding element ``address``: ``ctx.get(data[row])``."""
        if not 0 <= address < self.depth:
            raise ValueError(f"address must be in [0, {self.depth}), not {address!r}")
        return self.bank_data[address % self.banks], address // self.banks

    def elaborate(self, platform):
        m = Module()
        banks = self.banks
        shift = (banks - 1).bit_length()

        def bank_rows(addr, name):
            """Per bank: the row the run at ``addr`` touches and whether it exists."""
            low = addr[:shift] if shift else Const(0, 1)
            high = addr[shift:]
            rows, exists = [], []
            for b in range(banks):
                # Bank b holds run element (b - low) % banks, whose address is in the next row
                # when the run wrapped around the banks (b < low).
                row = Signal(len(high) + 1, name=f"{name}_row{b}")
                m.d.comb += row.eq(high + (b < low))
                rows.append(row)
                exists.append(row < self.bank_depth)
            return low, rows, exists

        # Read: each bank reads its row; the data are rotated back into run order with the
        # alignment registered alongside the read (it holds, as the data, while rd_en is low).
        rd_low, rd_rows, rd_exists = bank_rows(self.rd_addr, "rd")
        rd_low_q = Signal(len(rd_low), name="rd_low_q")
        bank_out = []
        for b in range(banks):
            m.submodules[f"bank{b}"] = mem = memory.Memory(data=self.bank_data[b])
            rd = mem.read_port(transparent_for=())
            exists_q = Signal(name=f"rd_exists{b}_q")
            m.d.comb += [rd.addr.eq(rd_rows[b]), rd.en.eq(self.rd_en)]
            with m.If(self.rd_en):
                m.d.sync += exists_q.eq(rd_exists[b])
            value = Signal(signed(self.width), name=f"rd_bank{b}")
            m.d.comb += value.eq(Mux(exists_q, rd.data, 0))
            bank_out.append(value)
        with m.If(self.rd_en):
            m.d.sync += rd_low_q.eq(rd_low)
        for i, value in enumerate(rotate_down(m, bank_out, rd_low_q, "rd_rot")):
            m.d.comb += self.rd_data[i].eq(value)

        # Write: the run's elements and mask bits are rotated into bank order.
        wr_low, wr_rows, wr_exists = bank_rows(self.wr_addr, "wr")
        elements = [Cat(self.wr_data[i], self.wr_mask[i]) for i in range(banks)]
        rotated = rotate_up(m, elements, wr_low, "wr_rot")
        for b in range(banks):
            wr = m.submodules[f"bank{b}"].write_port()
            m.d.comb += [
                wr.addr.eq(wr_rows[b]),
                wr.data.eq(rotated[b][:self.width]),
                wr.en.eq(self.wr_en & rotated[b][self.width] & wr_exists[b]),
            ]
        return m
