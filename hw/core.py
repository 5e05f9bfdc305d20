"""The device core: frame handling, command executor, memories and the GEMM engine.

:class:`DeviceCore` speaks the protocol of :mod:`sw.protocol` over byte streams. Today it
computes binary GEMMs; its command executor is where the layer program of the full accelerator
will plug in. :class:`hw.device.Device` adds the UART.
"""

from amaranth import Array, Cat, Const, Module, Mux, Signal
from amaranth.lib import fifo, memory, stream, wiring
from amaranth.lib.wiring import In, Out

from sw import protocol
from sw.protocol import Command, Memory, Status

from .gemm import GemmEngine
from .link import FrameReceiver, FrameTransmitter

__all__ = ["DeviceCore"]

#: Bytes of the largest request header the executor decodes (READ: memory, address, count).
_ARGS_SIZE = max(protocol.WRITE_HEADER.size, protocol.READ_REQUEST.size,
                 protocol.GEMM_REQUEST.size)


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
        Request bytes from the host. Always ready unless the receive FIFO (``rx_fifo_depth``
        bytes, filled while a request executes) is full; ``overrun`` then counts the bytes the
        producer could not deliver.
    tx_data : ``Out(stream.Signature(8))``
        Reply bytes to the host.

    Every request frame gets exactly one reply (see :mod:`sw.protocol`). Requests are executed
    one at a time; the next frame is parsed once the reply to the previous one has been sent.
    """

    rx_fifo_depth = 64

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
        m.submodules.rx_fifo = rx_fifo = fifo.SyncFIFOBuffered(width=8, depth=self.rx_fifo_depth)
        m.d.comb += [
            rx_fifo.w_data.eq(self.rx_data.payload),
            rx_fifo.w_en.eq(self.rx_data.valid),
            self.rx_data.ready.eq(rx_fifo.w_rdy),
        ]
        m.submodules.receiver = receiver = FrameReceiver(cfg.max_payload,
                                                         cfg.byte_timeout_cycles)
        m.d.comb += [
            receiver.i.payload.eq(rx_fifo.r_data),
            receiver.i.valid.eq(rx_fifo.r_rdy),
            rx_fifo.r_en.eq(receiver.i.ready),
        ]
        m.submodules.frame_buffer = frame_buffer = memory.Memory(
            shape=8, depth=cfg.max_payload, init=[])
        wiring.connect(m, receiver.buffer, frame_buffer.write_port())
        buffer_read = frame_buffer.read_port()

        m.submodules.transmitter = transmitter = FrameTransmitter()
        wiring.connect(m, transmitter.o, wiring.flipped(self.tx_data))

        # Memories and the engine. The executor and the engine share each memory's ports; the
        # engine owns them while it runs.
        mems, reads, writes = {}, {}, {}
        for mem in Memory:
            mems[mem] = memory.Memory(shape=widths[mem], depth=depths[mem], init=[])
            m.submodules[f"{mem.name.lower()}_memory"] = mems[mem]
            reads[mem] = mems[mem].read_port()
            writes[mem] = mems[mem].write_port()
        m.submodules.engine = engine = GemmEngine(cfg)

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
        reply_status = Signal(8)
        reply_length = Signal(16)

        host_addr = Signal(32)
        host_read_en = Signal()
        host_write_en = Signal()
        host_write_data = Signal(8 * max_word_bytes)
        for mem in Memory:
            read, write = reads[mem], writes[mem]
            selected = mem_id == mem
            if mem == Memory.RESULTS:
                m.d.comb += [
                    read.addr.eq(host_addr),
                    read.en.eq(host_read_en & selected),
                ]
                # The executor's writes land at the top of the word; shift them down.
                host_data = host_write_data >> (8 * (max_word_bytes - word_bytes[mem]))
                m.d.comb += [
                    write.addr.eq(Mux(engine.busy, engine.results.addr, host_addr)),
                    write.data.eq(Mux(engine.busy, engine.results.data, host_data)),
                    write.en.eq(Mux(engine.busy, engine.results.en,
                                    host_write_en & selected)),
                ]
            else:
                port = engine.weights if mem == Memory.WEIGHTS else engine.activations
                host_data = host_write_data >> (8 * (max_word_bytes - word_bytes[mem]))
                m.d.comb += [
                    read.addr.eq(Mux(engine.busy, port.addr, host_addr)),
                    read.en.eq(Mux(engine.busy, port.en, host_read_en & selected)),
                    port.data.eq(read.data),
                    write.addr.eq(host_addr),
                    write.data.eq(host_data),
                    write.en.eq(host_write_en & selected),
                ]
        read_data = Signal(8 * max_word_bytes)
        with m.Switch(mem_id):
            for mem in Memory:
                with m.Case(mem):
                    m.d.comb += read_data.eq(reads[mem].data)
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
                    with m.Case(Command.WRITE):
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
                with m.Case(Command.WRITE):
                    m.d.sync += [
                        mem_id.eq(_field(args, protocol.WRITE_HEADER, "memory")),
                        address.eq(_field(args, protocol.WRITE_HEADER, "address")),
                        remainder.eq(event.length - protocol.WRITE_HEADER.size),
                        words.eq(0),
                    ]
                    m.next = "Count words"
                with m.Case(Command.READ):
                    m.d.sync += [
                        mem_id.eq(_field(args, protocol.READ_REQUEST, "memory")),
                        address.eq(_field(args, protocol.READ_REQUEST, "address")),
                        words.eq(_field(args, protocol.READ_REQUEST, "count")),
                    ]
                    m.next = "Check read"
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

            # WRITE: divide the data length by the word size by repeated subtraction (at most
            # max_payload cycles), then check the range.
            with m.State("Count words"):
                with m.If(mem_id >= len(Memory)):
                    fail(Status.BAD_ADDRESS)
                with m.Elif(remainder >= selected_word_bytes):
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
                with m.If(word_byte + 1 == selected_word_bytes):
                    m.next = "Write word"
            with m.State("Write word"):
                m.d.comb += [host_write_en.eq(1), host_write_data.eq(word)]
                m.d.sync += [host_addr.eq(host_addr + 1), word_byte.eq(0)]
                m.next = "Write fetch"
                with m.If(index == event.length):
                    reply(Status.OK, 0, payload_states.index("Finish"))

            with m.State("Check read"):
                reply_bytes = Signal(32)
                m.d.comb += reply_bytes.eq(words * selected_word_bytes)
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
                reply(Status.OK, protocol.GEMM_REPLY.size,
                      payload_states.index("Send cycles"))

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
                cycles_bytes = Array(engine.cycles.word_select(i, 8) for i in range(4))
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
                m.d.sync += [
                    word.eq(read_data),
                    word_byte.eq(0),
                    host_addr.eq(host_addr + 1),
                    words.eq(words - 1),
                ]
                m.next = "Send word"
            with m.State("Send word"):
                m.d.comb += [
                    transmitter.payload.valid.eq(1),
                    transmitter.payload.payload.eq(word[:8]),
                ]
                with m.If(taken):
                    m.d.sync += [word.eq(word >> 8), word_byte.eq(word_byte + 1)]
                    with m.If(word_byte + 1 == selected_word_bytes):
                        m.next = "Send memory"

            with m.State("Finish"):
                # Accept the next frame only when this reply has left completely.
                with m.If(~transmitter.busy):
                    m.next = "Idle"
        return m
