"""The device core: frame handling, command executor, memories and the GEMM engine.

:class:`DeviceCore` speaks the protocol of :mod:`sw.protocol` over byte streams. Today it
computes binary GEMMs; its command executor is where the layer program of the full accelerator
will plug in. :class:`hw.device.Device` adds the UART.
"""

from amaranth import Array, Cat, Const, Module, Mux, Signal
from amaranth.hdl import ResetInserter
from amaranth.lib import fifo, memory, stream, wiring
from amaranth.lib.wiring import In, Out

from sw import isa, protocol
from sw.protocol import Command, Memory, Status

from .array import XnorArray, share_array
from .bconv_engine import BconvEngine
from .fixed_unit import FixedUnit
from .gemm import GemmEngine
from .int_memory import IntMemory
from .link import FrameReceiver, FrameTransmitter
from .sequencer import Sequencer

__all__ = ["DeviceCore"]

#: Bytes of the largest request header the executor decodes (READ: memory, address, count).
_ARGS_SIZE = max(protocol.WRITE_HEADER.size, protocol.READ_REQUEST.size,
                 protocol.GEMM_REQUEST.size, protocol.RUN_REQUEST.size)


def _addr_width(depth):
    return max(1, (depth - 1).bit_length())


def _field(args, layout, name):
    """The little-endian field ``name`` of ``layout`` within the decoded argument bytes."""
    offset, size = layout.offsets()[name]
    return Cat(*(args[offset + i] for i in range(size)))


class DeviceCore(wiring.Component):
    """Executes host-link requests on byte streams.

    Parameters
    ----------
    config : :class:`hw.config.DeviceConfig`

    Members
    -------
    rx_data : ``In(stream.Signature(8))``
        Request bytes from the host. Ready unless the receive FIFO is full: it holds
        ``config.rx_buffer`` bytes in a block RAM and two more in registers after it, and
        fills while a request executes or its reply is sent. (Behind a UART, whose receiver
        cannot wait, bytes that find it full are lost: the host keeps at most ``rx_buffer``
        bytes in flight, see :mod:`sw.protocol`.)
    tx_data : ``Out(stream.Signature(8))``
        Reply bytes to the host.

    Every request frame gets exactly one reply (see :mod:`sw.protocol`). Requests are executed
    one at a time, in order; the next frame is parsed once the reply to the previous one has
    been handed to ``tx_data``, and meanwhile its bytes wait in the receive FIFO.
    """

    def __init__(self, config):
        self.config = config
        super().__init__({
            "rx_data": In(stream.Signature(8)),
            "tx_data": Out(stream.Signature(8)),
        })

    def elaborate(self, platform):
        m = Module()
        cfg = self.config
        widths = cfg.word_widths()
        depths = cfg.depths()
        word_bytes = {mem: cfg.word_bytes(mem) for mem in Memory}
        max_word_bytes = max(word_bytes.values())

        # Link: receive FIFO -> frame receiver -> (executor) -> frame transmitter.
        # The FIFO (a block RAM for the default 2,048 bytes) buffers the requests a host
        # pipelines while the executor is busy; a two-entry register FIFO after it keeps the
        # block RAM's read data off the receiver's logic (the CRC, the compares).
        m.submodules.rx_fifo = rx_fifo = fifo.SyncFIFOBuffered(width=8, depth=cfg.rx_buffer)
        m.submodules.rx_stage = rx_stage = fifo.SyncFIFOBuffered(width=8, depth=2)
        m.d.comb += [
            rx_fifo.w_data.eq(self.rx_data.payload),
            rx_fifo.w_en.eq(self.rx_data.valid),
            self.rx_data.ready.eq(rx_fifo.w_rdy),
            rx_stage.w_data.eq(rx_fifo.r_data),
            rx_stage.w_en.eq(rx_fifo.r_rdy),
            rx_fifo.r_en.eq(rx_stage.w_rdy),
        ]
        m.submodules.receiver = receiver = FrameReceiver(cfg.max_payload,
                                                         cfg.byte_timeout_cycles)
        m.d.comb += [
            receiver.i.payload.eq(rx_stage.r_data),
            receiver.i.valid.eq(rx_stage.r_rdy),
            rx_stage.r_en.eq(receiver.i.ready),
        ]
        m.submodules.frame_buffer = frame_buffer = memory.Memory(
            shape=8, depth=cfg.max_payload, init=[])
        wiring.connect(m, receiver.buffer, frame_buffer.write_port())
        buffer_read = frame_buffer.read_port()

        m.submodules.transmitter = transmitter = FrameTransmitter()
        wiring.connect(m, transmitter.o, wiring.flipped(self.tx_data))

        # Memories and the units. A unit owns the ports it uses while it is active (from its
        # start to the fall of its busy); the host's WRITE and READ use them otherwise.
        # With the layer program, the GEMM engine and the binary conv engine take turns on one
        # XNOR array (a GEMM and a RUN never overlap).
        engine = GemmEngine(cfg, own_array=not cfg.layer_program)
        m.submodules.engine = engine
        # The layer program's units (absent from GEMM-only builds).
        sequencer = fixed = bconv = None
        fixed_active = bconv_active = Const(0)
        # A RUN that exceeds its cycle limit is aborted: the sequencer and the units are reset
        # (the memories keep their contents), so no descriptor can hang the device. The reset
        # comes from a register (the cycle after the limit is seen), so that its net, which
        # reaches every flip-flop of the units across the die, starts at a flip-flop and not
        # behind the limit's 32-bit compare (a routed build's critical path).
        run_abort = Signal()
        m.d.sync += run_abort.eq(0)             # one cycle, when the FSM below sets it
        if cfg.layer_program:
            sequencer = Sequencer(cfg.program_depth)
            m.submodules.sequencer = ResetInserter(run_abort)(sequencer)
            fixed = FixedUnit(
                element_width=cfg.element_width, lane=cfg.lane,
                int_addr_width=_addr_width(cfg.int_depth),
                bits_addr_width=_addr_width(cfg.bits_depth),
                coef_addr_width=_addr_width(cfg.coef_depth),
                param_addr_width=_addr_width(cfg.param_depth),
                max_terms=cfg.max_fixed_terms, lanes=cfg.int_banks,
                channels=cfg.fixed_channels)
            bconv = BconvEngine(cfg, own_array=False)
            m.submodules.fixed = ResetInserter(run_abort)(fixed)
            m.submodules.bconv = ResetInserter(run_abort)(bconv)
            # An aborted RUN's tiles in flight are dropped with the engine's state.
            array = XnorArray(cfg.rows, cfg.cols, cfg.lane, cfg.max_depth)
            m.submodules.array = ResetInserter(run_abort)(array)
            share_array(m, array, [(engine.array_port, engine.busy),
                                   (bconv.array_port, ~engine.busy)])
            m.d.comb += [
                fixed.config.eq(sequencer.fixed_config),
                fixed.start.eq(sequencer.fixed_start),
                sequencer.fixed_busy.eq(fixed.busy),
                bconv.config.eq(sequencer.bconv_config),
                # A BCONV's threshold to bits (sw.isa.BCONV_POST) is in the FIXED half.
                *(getattr(bconv.post, name).eq(getattr(sequencer.fixed_config, name))
                  for name in isa.BCONV_POST),
                bconv.start.eq(sequencer.bconv_start),
                sequencer.bconv_busy.eq(bconv.busy),
            ]
            # Which unit the memories' ports serve, from registers: a unit owns them from the
            # cycle after its start until the cycle after its busy falls. Neither touches a
            # memory in its start cycle (the fixed-point unit reads from the next, the binary
            # conv engine after its window's setup), and the sequencer starts the next op at
            # the earliest in the cycle busy falls. Decoded from the units' busy terms (an OR
            # of a dozen pipeline stages) in the same cycle, the select of every memory's
            # address multiplexer was a critical path (docs/builds.md).
            fixed_active, bconv_active = Signal(), Signal()
            m.d.sync += [fixed_active.eq(fixed.busy | sequencer.fixed_start),
                         bconv_active.eq(bconv.busy | sequencer.bconv_start)]

        # Executor state.
        event = Signal.like(receiver.event.payload)
        args = Array(Signal(8, name=f"arg{i}") for i in range(_ARGS_SIZE))
        index = Signal(16)          # byte index into the frame buffer or the reply
        mem_id = Signal(8)
        address = Signal(32)
        words = Signal(17)          # words of a WRITE or READ
        remainder = Signal(16)      # bytes of a WRITE not yet divided into words
        word = Signal(8 * max_word_bytes)
        word_byte = Signal(range(max_word_bytes + 1))
        narrow = Signal()           # a WRITE8: one byte per INTS element
        reply_status = Signal(8)
        reply_length = Signal(16)

        host_addr = Signal(32)
        host_read_en = Signal()
        host_write_en = Signal()
        host_write_data = Signal(8 * max_word_bytes)
        host_reads = {}        # Memory -> the word a host read returns (the cycle after en)

        def host_selected(mem):
            return mem_id == mem

        # A host write reaches its memory one cycle after the executor issues it, from
        # registers: one write enable per memory, the address and the word. Driven straight
        # from the executor's state, the enables of the WEIGHTS block RAMs (which span much of
        # the chip) were the critical path of the 16-row array (docs/builds.md). The executor
        # issues a word at most every third cycle, and nothing reads a memory right behind a
        # write (the next request is a whole frame away), so the delay is invisible.
        host_write_q = {mem: Signal(name=f"host_write_{mem.name.lower()}") for mem in Memory}
        host_write_addr_q = Signal.like(host_addr)
        host_write_data_q = Signal.like(host_write_data)
        m.d.sync += [host_write_addr_q.eq(host_addr), host_write_data_q.eq(host_write_data)]
        for mem, enable in host_write_q.items():
            m.d.sync += enable.eq(host_write_en & host_selected(mem))

        def host_data(mem):
            # The executor's writes land at the top of the word; shift them down.
            return host_write_data_q >> (8 * (max_word_bytes - word_bytes[mem]))

        def plain_memory(mem, reads=1, granularity=None):
            store = memory.Memory(shape=widths[mem], depth=depths[mem], init=[])
            m.submodules[f"{mem.name.lower()}_memory"] = store
            return ([store.read_port() for _ in range(reads)],
                    store.write_port(granularity=granularity))

        def host_writes(write, mem):
            m.d.comb += [
                write.addr.eq(host_write_addr_q),
                write.data.eq(host_data(mem)),
                write.en.eq(host_write_q[mem].replicate(len(write.en))),
            ]

        def host_reads_from(read, mem):
            m.d.comb += [read.addr.eq(host_addr),
                         read.en.eq(host_read_en & host_selected(mem))]

        # GEMM memories; WEIGHTS also holds the binary conv engine's weights.
        for mem in (Memory.WEIGHTS, Memory.ACTIVATIONS, Memory.RESULTS):
            (read,), write = plain_memory(mem)
            host_reads[mem] = read.data
            if mem == Memory.RESULTS:
                host_reads_from(read, mem)
                with m.If(engine.busy):
                    m.d.comb += [write.addr.eq(engine.results.addr),
                                 write.data.eq(engine.results.data),
                                 write.en.eq(engine.results.en)]
                with m.Else():
                    host_writes(write, mem)
                continue
            host_writes(write, mem)
            port = engine.weights if mem == Memory.WEIGHTS else engine.activations
            m.d.comb += port.data.eq(read.data)
            if mem == Memory.WEIGHTS and bconv is not None:
                m.d.comb += bconv.w_rd_data.eq(read.data)
            with m.If(engine.busy):
                m.d.comb += [read.addr.eq(port.addr), read.en.eq(port.en)]
            if mem == Memory.WEIGHTS and bconv is not None:
                with m.Elif(bconv_active):
                    m.d.comb += [read.addr.eq(bconv.w_rd_addr), read.en.eq(bconv.w_rd_en)]
            with m.Else():
                host_reads_from(read, mem)

        if cfg.layer_program:
            # BITS: one read port per array column for the window generator (port 0 also serves
            # the host), written by the fixed-point unit's thresholds, the binary conv engine's
            # (one write enable per group of `rows` bits: a row tile's bits) or the host.
            bits_reads, bits_write = plain_memory(
                Memory.BITS, reads=cfg.cols, granularity=cfg.lane // bconv.bits_groups)
            host_reads[Memory.BITS] = bits_reads[0].data
            for column, read in enumerate(bits_reads):
                m.d.comb += bconv.rd[column].data.eq(read.data)
                with m.If(bconv_active | (column != 0)):
                    m.d.comb += [read.addr.eq(bconv.rd[column].addr),
                                 read.en.eq(bconv.rd[column].en)]
                with m.Else():
                    host_reads_from(read, Memory.BITS)
            with m.If(bconv_active):
                m.d.comb += [bits_write.addr.eq(bconv.bits_wr_addr),
                             bits_write.data.eq(bconv.bits_wr_data),
                             bits_write.en.eq(bconv.bits_wr_en)]
            with m.Elif(fixed_active):
                m.d.comb += [bits_write.addr.eq(fixed.bits_wr_addr),
                             bits_write.data.eq(fixed.bits_wr_data),
                             bits_write.en.eq(fixed.bits_wr_en.replicate(bconv.bits_groups))]
            with m.Else():
                host_writes(bits_write, Memory.BITS)

            # COEFS: banked like INTS, so that the fixed-point unit reads the coefficients
            # of a term's `fixed_channels` output channels (one run) in one cycle.
            m.submodules.coefs_memory = coefs = IntMemory(
                depth=cfg.coef_depth, width=8, banks=cfg.fixed_channels)
            host_reads[Memory.COEFS] = coefs.rd_data[0].as_unsigned()
            m.d.comb += [
                fixed.coef_rd_data.eq(coefs.rd_data),
                coefs.wr_addr.eq(host_write_addr_q), coefs.wr_en.eq(host_write_q[Memory.COEFS]),
                coefs.wr_mask.eq(1), coefs.wr_data[0].eq(host_data(Memory.COEFS)),
            ]
            with m.If(fixed_active):
                m.d.comb += [coefs.rd_addr.eq(fixed.coef_rd_addr),
                             coefs.rd_en.eq(fixed.coef_rd_en)]
            with m.Else():
                m.d.comb += [coefs.rd_addr.eq(host_addr),
                             coefs.rd_en.eq(host_read_en & host_selected(Memory.COEFS))]

            # PARAMS: read by the fixed-point unit and the binary conv engine's thresholds.
            (read,), write = plain_memory(Memory.PARAMS)
            host_reads[Memory.PARAMS] = read.data
            host_writes(write, Memory.PARAMS)
            m.d.comb += [fixed.param_rd_data.eq(read.data), bconv.param_rd_data.eq(read.data)]
            with m.If(fixed_active):
                m.d.comb += [read.addr.eq(fixed.param_rd_addr), read.en.eq(fixed.param_rd_en)]
            with m.Elif(bconv_active):
                m.d.comb += [read.addr.eq(bconv.param_rd_addr), read.en.eq(bconv.param_rd_en)]
            with m.Else():
                host_reads_from(read, Memory.PARAMS)

            # PROGRAM (read by the sequencer) and COUNTERS (written by it).
            (read,), write = plain_memory(Memory.PROGRAM)
            host_reads[Memory.PROGRAM] = read.data
            host_writes(write, Memory.PROGRAM)
            m.d.comb += sequencer.prog_data.eq(read.data)
            with m.If(sequencer.busy):
                m.d.comb += [read.addr.eq(sequencer.prog_addr), read.en.eq(sequencer.prog_en)]
            with m.Else():
                host_reads_from(read, Memory.PROGRAM)
            (read,), write = plain_memory(Memory.COUNTERS)
            host_reads[Memory.COUNTERS] = read.data
            host_reads_from(read, Memory.COUNTERS)
            with m.If(sequencer.busy):
                m.d.comb += [write.addr.eq(sequencer.counter_addr),
                             write.data.eq(sequencer.counter_data),
                             write.en.eq(sequencer.counter_en)]
            with m.Else():
                host_writes(write, Memory.COUNTERS)

            # INTS: banked so that the binary conv engine writes a run of `cols` counts per cycle.
            m.submodules.ints_memory = ints = IntMemory(depth=cfg.int_depth,
                                                        width=cfg.element_width, banks=cfg.int_banks)
            host_reads[Memory.INTS] = ints.rd_data[0].as_unsigned()
            with m.If(bconv_active):
                m.d.comb += [
                    ints.rd_addr.eq(bconv.int_rd_addr), ints.rd_en.eq(bconv.int_rd_en),
                    ints.wr_addr.eq(bconv.int_wr_addr), ints.wr_en.eq(bconv.int_wr_en),
                    ints.wr_mask.eq(bconv.int_wr_mask), ints.wr_data.eq(bconv.int_wr_data),
                ]
            with m.Elif(fixed_active):
                m.d.comb += [
                    ints.rd_addr.eq(fixed.int_rd_addr), ints.rd_en.eq(fixed.int_rd_en),
                    ints.wr_addr.eq(fixed.int_wr_addr), ints.wr_en.eq(fixed.int_wr_en),
                    ints.wr_mask.eq(fixed.int_wr_mask), ints.wr_data.eq(fixed.int_wr_data),
                ]
            with m.Else():
                m.d.comb += [
                    ints.rd_addr.eq(host_addr),
                    ints.rd_en.eq(host_read_en & host_selected(Memory.INTS)),
                    ints.wr_addr.eq(host_write_addr_q),
                    ints.wr_en.eq(host_write_q[Memory.INTS]),
                    ints.wr_mask.eq(1),
                    # A WRITE8's byte (shifted in at the top of the word) is zero-extended.
                    ints.wr_data[0].eq(Mux(narrow, host_write_data_q[-8:],
                                           host_data(Memory.INTS))),
                ]
            m.d.comb += [bconv.int_rd_data.eq(ints.rd_data), fixed.int_rd_data.eq(ints.rd_data)]

        # A READ sends a word a byte at a time through three registers. (1) The word is
        # registered as it leaves its memory, in "Latch word", the cycle its read data appear,
        # and held (the port is not enabled again until the word has been sent): the byte
        # select of a wide word (64 bytes of WEIGHTS on the 16-row array) straight behind a
        # block RAM's output was the critical path. (2) Each memory selects byte `word_byte`
        # of its word into a register next to it, with its own copy of the byte counter: the
        # one counter fanned out to every memory's select across the die was a critical path
        # (the copies count in the same states as `word_byte`, only the selected memory's:
        # copies with equal inputs would be merged back into one). (3) The selected memory's
        # byte goes to the transmitter through one more register. Latching whole words of
        # every memory into one register (as once) drew thousands of wires to one spot of the
        # chip, a hot spot nextpnr's router could not clear (docs/builds.md).
        memory_byte_q = {}
        read_byte_index = {}
        for mem, data in host_reads.items():
            word_q = Signal(8 * word_bytes[mem], name=f"host_read_{mem.name.lower()}")
            memory_byte_q[mem] = Signal(8, name=f"host_read_{mem.name.lower()}_byte")
            read_byte_index[mem] = index_q = Signal.like(word_byte,
                                                         name=f"host_read_{mem.name.lower()}_at")
            m.d.sync += word_q.eq(data)
            m.d.sync += memory_byte_q[mem].eq(word_q.word_select(index_q, 8))
        read_byte_q = Signal(8)
        with m.Switch(mem_id):
            for mem, byte_q in memory_byte_q.items():
                with m.Case(mem):
                    m.d.sync += read_byte_q.eq(byte_q)
        selected_word_bytes = Signal(range(max_word_bytes + 1))
        selected_depth = Signal(32)
        with m.Switch(mem_id):
            for mem in Memory:
                with m.Case(mem):
                    m.d.comb += [
                        selected_word_bytes.eq(word_bytes[mem]),
                        selected_depth.eq(depths[mem]),
                    ]

        info = Array(Const(byte, 8) for byte in cfg.info())

        # A GEMM request and the products its check compares with the memory depths.
        gemm_request = Signal(engine.start.payload.shape())
        gemm_weight_words = Signal(32)
        gemm_activation_words = Signal(32)
        gemm_tiles = Signal(32)
        run_first = Signal(16)
        run_count = Signal(16)
        run_limit = Signal(32)
        run_elapsed = Signal(32)
        # run_elapsed >= run_limit, registered along with run_elapsed.
        run_over = Signal()
        reply_cycles = Signal(32)

        m.d.comb += [
            buffer_read.addr.eq(index),
            receiver.pause.eq(1),
        ]

        def reply(status, length, payload_state):
            m.d.sync += [reply_status.eq(status), reply_length.eq(length), index.eq(0)]
            m.next = "Reply header"
            m.d.sync += payload_state_reg.eq(payload_state)

        payload_states = ["Send error", "Send buffer", "Send info", "Send memory",
                          "Send cycles", "Finish"]
        payload_state_reg = Signal(range(len(payload_states)))

        def fail(status):
            reply(status, 1, payload_states.index("Send error"))

        with m.FSM():
            with m.State("Idle"):
                m.d.comb += [
                    receiver.pause.eq(0),
                    receiver.event.ready.eq(1),
                ]
                with m.If(receiver.event.valid):
                    m.d.sync += [event.eq(receiver.event.payload), index.eq(0)]
                    m.next = "Dispatch"

            with m.State("Dispatch"):
                length = event.length
                with m.If(event.status != Status.OK):
                    fail(event.status)
                with m.Else(), m.Switch(event.command):
                    with m.Case(Command.PING):
                        reply(Status.OK, length, payload_states.index("Send buffer"))
                    with m.Case(Command.INFO):
                        with m.If(length != 0):
                            fail(Status.BAD_LENGTH)
                        with m.Else():
                            reply(Status.OK, len(info), payload_states.index("Send info"))
                    with m.Case(Command.WRITE, Command.WRITE8):
                        with m.If(length <= protocol.WRITE_HEADER.size):
                            fail(Status.BAD_LENGTH)
                        with m.Else():
                            m.next = "Read arguments"
                    with m.Case(Command.READ):
                        with m.If(length != protocol.READ_REQUEST.size):
                            fail(Status.BAD_LENGTH)
                        with m.Else():
                            m.next = "Read arguments"
                    with m.Case(Command.GEMM):
                        with m.If(length != protocol.GEMM_REQUEST.size):
                            fail(Status.BAD_LENGTH)
                        with m.Else():
                            m.next = "Read arguments"
                    with m.Case(Command.RUN):
                        if not cfg.layer_program:
                            fail(Status.UNKNOWN_COMMAND)
                        else:
                            with m.If(length != protocol.RUN_REQUEST.size):
                                fail(Status.BAD_LENGTH)
                            with m.Else():
                                m.next = "Read arguments"
                    with m.Default():
                        fail(Status.UNKNOWN_COMMAND)

            # Copy the fixed-size request header from the frame buffer into `args`, one byte
            # every two cycles (address, then data).
            with m.State("Read arguments"):
                m.next = "Store argument"
            with m.State("Store argument"):
                m.d.sync += [args[index].eq(buffer_read.data), index.eq(index + 1)]
                m.next = "Read arguments"
                with m.If((index + 1 == _ARGS_SIZE) | (index + 1 == event.length)):
                    m.next = "Check arguments"

            with m.State("Check arguments"), m.Switch(event.command):
                with m.Case(Command.WRITE, Command.WRITE8):
                    m.d.sync += [
                        mem_id.eq(_field(args, protocol.WRITE_HEADER, "memory")),
                        address.eq(_field(args, protocol.WRITE_HEADER, "address")),
                        remainder.eq(event.length - protocol.WRITE_HEADER.size),
                        words.eq(0),
                        narrow.eq(event.command == Command.WRITE8),
                    ]
                    m.next = "Count words"
                with m.Case(Command.READ):
                    m.d.sync += [
                        mem_id.eq(_field(args, protocol.READ_REQUEST, "memory")),
                        address.eq(_field(args, protocol.READ_REQUEST, "address")),
                        words.eq(_field(args, protocol.READ_REQUEST, "count")),
                    ]
                    m.next = "Size read"
                with m.Case(Command.GEMM):
                    # Register the request and the products the check needs: the 16 x 16
                    # multiplications would otherwise sit on one path with the comparisons and
                    # the reply multiplexers (the critical path of the first builds).
                    m_tiles = _field(args, protocol.GEMM_REQUEST, "m_tiles")
                    n_tiles = _field(args, protocol.GEMM_REQUEST, "n_tiles")
                    k_words = _field(args, protocol.GEMM_REQUEST, "k_words")
                    m.d.sync += [
                        gemm_request.m_tiles.eq(m_tiles),
                        gemm_request.n_tiles.eq(n_tiles),
                        gemm_request.k_words.eq(k_words),
                        gemm_weight_words.eq(m_tiles * k_words),
                        gemm_activation_words.eq(n_tiles * k_words),
                        gemm_tiles.eq(m_tiles * n_tiles),
                    ]
                    m.next = "Check GEMM"
                if cfg.layer_program:
                    with m.Case(Command.RUN):
                        m.d.sync += [
                            run_first.eq(_field(args, protocol.RUN_REQUEST, "first")),
                            run_count.eq(_field(args, protocol.RUN_REQUEST, "count")),
                            run_limit.eq(_field(args, protocol.RUN_REQUEST, "max_cycles")),
                        ]
                        m.next = "Check RUN"

            # WRITE: divide the data length by the word size by repeated subtraction (at most
            # max_payload cycles), then check the range. A WRITE8 has one byte per word.
            read_only = Cat(*(mem_id == mem for mem in sorted(protocol.READ_ONLY_MEMORIES))).any()
            with m.State("Count words"):
                with m.If(mem_id >= len(Memory)):
                    fail(Status.BAD_ADDRESS)
                with m.Elif(read_only):
                    fail(Status.READ_ONLY)
                with m.Elif(narrow & (mem_id != Memory.INTS)):
                    fail(Status.BAD_ARGUMENT)
                with m.Elif(narrow & (remainder != 0)):
                    m.d.sync += [words.eq(remainder), remainder.eq(0)]
                with m.Elif(~narrow & (remainder >= selected_word_bytes)):
                    m.d.sync += [
                        remainder.eq(remainder - selected_word_bytes),
                        words.eq(words + 1),
                    ]
                with m.Elif(remainder != 0):
                    fail(Status.BAD_LENGTH)
                with m.Elif(address + words > selected_depth):
                    fail(Status.BAD_ADDRESS)
                with m.Else():
                    m.d.sync += [
                        index.eq(protocol.WRITE_HEADER.size),
                        host_addr.eq(address),
                        word_byte.eq(0),
                    ]
                    m.next = "Write fetch"
            with m.State("Write fetch"):
                m.next = "Write byte"
            with m.State("Write byte"):
                # Bytes arrive least significant first: shift them in from the top.
                m.d.sync += [
                    word.eq(Cat(word[8:], buffer_read.data)),
                    index.eq(index + 1),
                    word_byte.eq(word_byte + 1),
                ]
                m.next = "Write fetch"
                with m.If(narrow | (word_byte + 1 == selected_word_bytes)):
                    m.next = "Write word"
            with m.State("Write word"):
                m.d.comb += [host_write_en.eq(1), host_write_data.eq(word)]
                m.d.sync += [host_addr.eq(host_addr + 1), word_byte.eq(0)]
                m.next = "Write fetch"
                with m.If(index == event.length):
                    reply(Status.OK, 0, payload_states.index("Finish"))

            # The reply's size is registered before the checks use it: the multiply, the
            # compare and the state decision in one cycle limited Fmax.
            reply_bytes = Signal(32)
            with m.State("Size read"):
                m.d.sync += reply_bytes.eq(words * selected_word_bytes)
                m.next = "Check read"
            with m.State("Check read"):
                with m.If(mem_id >= len(Memory)):
                    fail(Status.BAD_ADDRESS)
                with m.Elif((words == 0) | (reply_bytes > cfg.max_payload)):
                    fail(Status.BAD_LENGTH)
                with m.Elif(address + words > selected_depth):
                    fail(Status.BAD_ADDRESS)
                with m.Else():
                    m.d.sync += host_addr.eq(address)
                    reply(Status.OK, reply_bytes, payload_states.index("Send memory"))

            with m.State("Check GEMM"):
                request = gemm_request
                fits = Signal()
                # m_tiles * n_tiles * rows <= result_depth, without the third multiplication.
                m.d.comb += fits.eq(
                    (request.m_tiles != 0) & (request.n_tiles != 0) & (request.k_words != 0)
                    & (request.k_words <= cfg.max_k_words)
                    & (gemm_weight_words <= cfg.weight_depth)
                    & (gemm_activation_words <= cfg.activation_depth)
                    & (gemm_tiles <= cfg.result_depth // cfg.rows))
                with m.If(~fits):
                    fail(Status.BAD_ARGUMENT)
                with m.Else():
                    m.d.comb += [engine.start.valid.eq(1), engine.start.payload.eq(request)]
                    m.next = "Run GEMM"
            with m.State("Run GEMM"), m.If(~engine.busy):
                m.d.sync += reply_cycles.eq(engine.cycles)
                reply(Status.OK, protocol.GEMM_REPLY.size,
                      payload_states.index("Send cycles"))

            if cfg.layer_program:
                with m.State("Check RUN"):
                    with m.If((run_count == 0) | (run_limit == 0)
                              | (run_first + run_count > cfg.program_depth)):
                        fail(Status.BAD_ARGUMENT)
                    with m.Else():
                        m.d.comb += [
                            sequencer.start.eq(1),
                            sequencer.first.eq(run_first),
                            sequencer.count.eq(run_count),
                        ]
                        m.d.sync += [run_elapsed.eq(0), run_over.eq(0)]  # run_limit > 0
                        m.next = "Run program"
                # The sequencer raises busy the cycle after its start.
                with m.State("Run program"):
                    m.d.sync += [run_elapsed.eq(run_elapsed + 1),
                                 run_over.eq(run_elapsed + 1 >= run_limit)]
                    with m.If(~sequencer.busy):
                        m.d.sync += reply_cycles.eq(sequencer.cycles)
                        reply(Status.OK, protocol.RUN_REPLY.size,
                              payload_states.index("Send cycles"))
                    with m.Elif(run_over):
                        m.d.sync += run_abort.eq(1)
                        fail(Status.ABORTED)

            with m.State("Reply header"):
                m.d.comb += [
                    transmitter.start.valid.eq(1),
                    transmitter.start.payload.status.eq(reply_status),
                    transmitter.start.payload.length.eq(reply_length),
                ]
                with m.If(transmitter.start.ready), m.Switch(payload_state_reg):
                    for number, state in enumerate(payload_states):
                        with m.Case(number):
                            m.next = state

            # Reply payloads. Each presents one byte on the transmitter's payload stream and
            # advances `index` when it is taken.
            taken = transmitter.payload.valid & transmitter.payload.ready
            with m.State("Send error"):
                m.d.comb += [
                    transmitter.payload.valid.eq(1),
                    transmitter.payload.payload.eq(event.command),
                ]
                with m.If(taken):
                    m.next = "Finish"
            with m.State("Send info"):
                m.d.comb += [
                    transmitter.payload.valid.eq(1),
                    transmitter.payload.payload.eq(info[index]),
                ]
                with m.If(taken):
                    m.d.sync += index.eq(index + 1)
                    with m.If(index + 1 == len(info)):
                        m.next = "Finish"
            with m.State("Send cycles"):
                cycles_bytes = Array(reply_cycles.word_select(i, 8) for i in range(4))
                m.d.comb += [
                    transmitter.payload.valid.eq(1),
                    transmitter.payload.payload.eq(cycles_bytes[index[:2]]),
                ]
                with m.If(taken):
                    m.d.sync += index.eq(index + 1)
                    with m.If(index + 1 == protocol.GEMM_REPLY.size):
                        m.next = "Finish"
            with m.State("Send buffer"):
                # The frame buffer is read one cycle ahead: `index` has been on its address
                # since the previous cycle when "Send buffer byte" presents the data.
                with m.If(index == reply_length):
                    m.next = "Finish"
                with m.Else():
                    m.next = "Send buffer byte"
            with m.State("Send buffer byte"):
                m.d.comb += [
                    transmitter.payload.valid.eq(1),
                    transmitter.payload.payload.eq(buffer_read.data),
                ]
                with m.If(taken):
                    m.d.sync += index.eq(index + 1)
                    m.next = "Send buffer"
            with m.State("Send memory"):
                with m.If(words == 0):
                    m.next = "Finish"
                with m.Else():
                    m.d.comb += host_read_en.eq(1)
                    m.next = "Latch word"
            with m.State("Latch word"):
                for mem, index_q in read_byte_index.items():
                    with m.If(host_selected(mem)):
                        m.d.sync += index_q.eq(0)
                m.d.sync += [
                    word_byte.eq(0),
                    host_addr.eq(host_addr + 1),
                    words.eq(words - 1),
                ]
                m.next = "Select byte"
            with m.State("Select byte"):
                # The memory's word register took the word at the end of "Latch word"; its
                # byte register takes byte `word_byte` at the end of this cycle, read_byte_q at
                # the end of the next.
                m.next = "Select memory"
            with m.State("Select memory"):
                m.next = "Send word"
            with m.State("Send word"):
                m.d.comb += [
                    transmitter.payload.valid.eq(1),
                    transmitter.payload.payload.eq(read_byte_q),
                ]
                with m.If(taken):
                    m.d.sync += word_byte.eq(word_byte + 1)
                    for mem, index_q in read_byte_index.items():
                        with m.If(host_selected(mem)):
                            m.d.sync += index_q.eq(index_q + 1)
                    m.next = "Select byte"
                    with m.If(word_byte + 1 == selected_word_bytes):
                        m.next = "Send memory"

            with m.State("Finish"):
                # Accept the next frame only when this reply has left completely.
                with m.If(~transmitter.busy):
                    m.next = "Idle"
        return m
