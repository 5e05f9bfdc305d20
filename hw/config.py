"""Build parameters of a device, shared by the generator, the builds and the simulations."""

import dataclasses
import math

from sw import isa, protocol

__all__ = ["DeviceConfig"]

_LAYER_PROGRAM_MEMORIES = (protocol.Memory.BITS, protocol.Memory.INTS, protocol.Memory.COEFS,
                           protocol.Memory.PARAMS, protocol.Memory.PROGRAM,
                           protocol.Memory.COUNTERS)


def _words_bytes(width):
    return (width + 7) // 8


@dataclasses.dataclass(frozen=True)
class DeviceConfig:
    """Parameters of one accelerator build.

    Parameters
    ----------
    rows, cols : int
        Shape of the XNOR-popcount systolic array. A GEMM tile is ``rows`` rows of the weight
        matrix by ``cols`` columns of the activation matrix.
    lane : int
        Bits of K each processing element consumes per cycle.
    max_depth : int
        Largest K (in bits) of one dot product; sets ``acc_width``.
    weight_depth, activation_depth, result_depth : int
        Words in each memory (see :class:`sw.protocol.Memory` for the word widths).
    max_payload : int
        Largest request payload in bytes (the size of the device's frame buffer).
    clock_hz : int
        System clock frequency; the UART divides it down to ``baud``.
    baud : int
        UART baud rate.
    byte_timeout_us : int
        A frame that stalls for longer than this is dropped with ``Status.TIMEOUT``.
    rx_buffer : int
        Bytes of the receive FIFO, which holds the requests that arrive while the device is
        busy (a host that pipelines keeps at most this many bytes in flight, see
        :mod:`sw.protocol`); reported by INFO. 64 .. 65536. 2048 is one ECP5 block RAM and
        holds a ``max_payload`` WRITE of 1,024 bytes with room for more.
    element_width : int
        Bits of one signed integer of the layer program's integer tensors (INTS memory).
    bits_depth, int_depth, coef_depth, param_depth, program_depth : int
        Words in the layer program's memories (see :class:`sw.protocol.Memory` and
        :mod:`sw.isa`); ``int_depth`` must be a multiple of :attr:`int_banks`;
        ``program_depth`` is also the number of cycle counters.
    fixed_lanes : int
        At least this many fixed-point lanes: 0 or a power of two. The unit computes
        :attr:`int_banks` output pixels per cycle (the INTS banks): the power of two at least
        ``cols``, or ``fixed_lanes`` if that is more. More lanes speed up the fixed-point ops
        (stems, transitions, pools) without widening the XNOR array, at about 7 multipliers
        per lane.
    fixed_channels : int
        Output channels the fixed-point unit computes at once for convs that allow it (the
        ``parallel`` ops of :func:`sw.isa.parallel_ok`): a power of two, 1 to 16. Each lane
        gets ``fixed_channels - 1`` more multipliers and accumulators, and COEFS is banked
        so that a term's coefficients of all of them are read in one cycle.
    layer_program : bool
        Whether the build runs layer programs (the sequencer, the fixed-point unit, the binary
        conv engine and their memories). ``False`` gives a GEMM-only device for FPGAs too
        small for the rest; it reports zero words for the layer program's memories.
    """
    rows: int = 4
    cols: int = 4
    lane: int = 32
    max_depth: int = 4096
    weight_depth: int = 512
    activation_depth: int = 512
    result_depth: int = 512
    max_payload: int = 1024
    clock_hz: int = 25_000_000
    baud: int = 3_000_000
    byte_timeout_us: int = 20_000
    rx_buffer: int = 2048
    element_width: int = 24
    bits_depth: int = 1024
    int_depth: int = 8192
    coef_depth: int = 4096
    param_depth: int = 512
    program_depth: int = 256
    fixed_lanes: int = 0
    fixed_channels: int = 1
    layer_program: bool = True

    def __post_init__(self):
        for name in ("rows", "cols", "lane", "max_depth", "weight_depth", "activation_depth",
                     "result_depth", "max_payload", "clock_hz", "baud", "byte_timeout_us",
                     "rx_buffer",
                     "element_width", "bits_depth", "int_depth", "coef_depth", "param_depth",
                     "program_depth"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, not {value!r}")
        if self.rows > 255 or self.cols > 255:
            raise ValueError(f"rows and cols must be at most 255, not {self.rows}x{self.cols}")
        if self.lane > 0xFFFF:
            raise ValueError(f"lane must be at most 65535, not {self.lane}")
        if self.max_depth < self.lane:
            raise ValueError(f"max_depth must be at least lane ({self.lane}), "
                             f"not {self.max_depth}")
        if self.max_depth // self.lane > 0xFFFF:
            raise ValueError(f"max_depth / lane must fit 16 bits, not {self.max_depth}")
        if self.clock_hz < 4 * self.baud:
            raise ValueError(f"clock_hz must be at least 4 * baud ({4 * self.baud}) for the "
                             f"UART to sample each bit, not {self.clock_hz}")
        if not 64 <= self.rx_buffer <= 1 << 16:
            raise ValueError(f"rx_buffer must be between 64 and 65536, not {self.rx_buffer}")
        if not 16 <= self.max_payload <= protocol.MAX_LENGTH:
            raise ValueError(f"max_payload must be between 16 and {protocol.MAX_LENGTH}, "
                             f"not {self.max_payload}")
        if not 8 <= self.element_width <= 32:
            raise ValueError(f"element_width must be between 8 and 32, not "
                             f"{self.element_width}")
        if (not isinstance(self.fixed_lanes, int) or isinstance(self.fixed_lanes, bool)
                or not 0 <= self.fixed_lanes <= 64
                or self.fixed_lanes & (self.fixed_lanes - 1)):
            raise ValueError(f"fixed_lanes must be 0 or a power of two up to 64, not "
                             f"{self.fixed_lanes!r}")
        if (not isinstance(self.fixed_channels, int) or isinstance(self.fixed_channels, bool)
                or not 1 <= self.fixed_channels <= 16
                or self.fixed_channels & (self.fixed_channels - 1)):
            raise ValueError(f"fixed_channels must be a power of two from 1 to 16, not "
                             f"{self.fixed_channels!r}")
        if self.coef_depth % self.fixed_channels:
            raise ValueError(f"coef_depth must be a multiple of fixed_channels "
                             f"({self.fixed_channels}, the COEFS banks), not {self.coef_depth}")
        if self.int_depth % self.int_banks or self.int_depth > 1 << 24:
            raise ValueError(f"int_depth must be a multiple of {self.int_banks} (the INTS "
                             f"banks) and at most 2**24, not {self.int_depth}")
        for name, limit in (("bits_depth", 1 << 20), ("coef_depth", 1 << 20),
                            ("param_depth", 1 << 16), ("program_depth", 1 << 16),
                            ("weight_depth", 1 << 20)):
            if getattr(self, name) > limit:
                raise ValueError(f"{name} must be at most {limit}, not {getattr(self, name)}")
        if not isinstance(self.layer_program, bool):
            raise TypeError(f"layer_program must be True or False, not {self.layer_program!r}")
        depths = self.depths()
        for memory, width in self.word_widths().items():
            if not depths[memory]:
                continue
            if _words_bytes(width) > self.max_payload - protocol.WRITE_HEADER.size:
                raise ValueError(f"a {memory.name} word ({_words_bytes(width)} bytes) must fit "
                                 f"one WRITE payload (max_payload {self.max_payload})")

    @property
    def acc_width(self):
        """Bits of one result count: enough for any count in ``0..max_depth``."""
        return self.max_depth.bit_length()

    @property
    def int_banks(self):
        """Banks of INTS memory and lanes of the fixed-point unit: the power of two at least
        ``cols`` (so that the binary conv engine writes the ``cols`` counts of a result row in
        one cycle at any address), or ``fixed_lanes`` if that is more."""
        return isa.int_banks(self.cols, self.fixed_lanes)

    #: Largest number of terms (``terms_c * kernel_h * kernel_w``) of one output value of the
    #: fixed-point unit; sets its accumulator width.
    max_fixed_terms = 1 << 16

    @property
    def max_k_words(self):
        return self.max_depth // self.lane

    def word_widths(self):
        """Return ``{Memory: bits per word}`` (:func:`sw.protocol.memory_word_widths`)."""
        return protocol.memory_word_widths(self)

    def depths(self):
        """Return ``{Memory: words}`` (:func:`sw.protocol.memory_depths`); the layer program's
        memories have 0 words in a GEMM-only build."""
        depths = protocol.memory_depths(self)
        if not self.layer_program:
            for memory in _LAYER_PROGRAM_MEMORIES:
                depths[memory] = 0
        return depths

    def word_bytes(self, memory):
        return _words_bytes(self.word_widths()[memory])

    @property
    def peak_bit_macs_per_cycle(self):
        return self.rows * self.cols * self.lane

    def memory_bits(self):
        """Total bits in the memories, the frame buffer and the receive FIFO."""
        return (sum(self.word_widths()[m] * self.depths()[m] for m in protocol.Memory)
                + 8 * (self.max_payload + self.rx_buffer))

    def info(self):
        """Return the INFO reply payload (bytes) of a device built with this configuration."""
        depths, M = self.depths(), protocol.Memory
        return protocol.INFO.pack(
            protocol_version=protocol.PROTOCOL_VERSION, rows=self.rows, cols=self.cols,
            acc_width=self.acc_width, lane=self.lane, max_payload=self.max_payload,
            max_depth=self.max_depth, weight_depth=self.weight_depth,
            activation_depth=self.activation_depth, result_depth=self.result_depth,
            clock_hz=self.clock_hz, baud=self.baud, element_width=self.element_width,
            bits_depth=depths[M.BITS], int_depth=depths[M.INTS], coef_depth=depths[M.COEFS],
            param_depth=depths[M.PARAMS], program_depth=depths[M.PROGRAM],
            fixed_lanes=self.int_banks if self.layer_program else 0, rx_buffer=self.rx_buffer,
            fixed_channels=self.fixed_channels if self.layer_program else 0)

    @property
    def byte_timeout_cycles(self):
        return math.ceil(self.byte_timeout_us * self.clock_hz / 1_000_000)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)
