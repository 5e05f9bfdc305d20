"""Build parameters of a device, shared by the generator, the builds and the simulations."""

import dataclasses
import math

from sw import protocol

__all__ = ["DeviceConfig"]


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

    def __post_init__(self):
        for name in ("rows", "cols", "lane", "max_depth", "weight_depth", "activation_depth",
                     "result_depth", "max_payload", "clock_hz", "baud", "byte_timeout_us"):
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
        if not 16 <= self.max_payload <= protocol.MAX_LENGTH:
            raise ValueError(f"max_payload must be between 16 and {protocol.MAX_LENGTH}, "
                             f"not {self.max_payload}")
        for memory, width in self.word_widths().items():
            if _words_bytes(width) > self.max_payload - protocol.WRITE_HEADER.size:
                raise ValueError(f"a {memory.name} word ({_words_bytes(width)} bytes) must fit "
                                 f"one WRITE payload (max_payload {self.max_payload})")

    @property
    def acc_width(self):
        """Bits of one result count: enough for any count in ``0..max_depth``."""
        return self.max_depth.bit_length()

    @property
    def max_k_words(self):
        return self.max_depth // self.lane

    def word_widths(self):
        """Return ``{Memory: bits per word}``."""
        return {
            protocol.Memory.WEIGHTS: self.rows * self.lane,
            protocol.Memory.ACTIVATIONS: self.cols * self.lane,
            protocol.Memory.RESULTS: self.cols * self.acc_width,
        }

    def depths(self):
        """Return ``{Memory: words}``."""
        return {
            protocol.Memory.WEIGHTS: self.weight_depth,
            protocol.Memory.ACTIVATIONS: self.activation_depth,
            protocol.Memory.RESULTS: self.result_depth,
        }

    def word_bytes(self, memory):
        return _words_bytes(self.word_widths()[memory])

    @property
    def peak_bit_macs_per_cycle(self):
        return self.rows * self.cols * self.lane

    def memory_bits(self):
        """Total bits in the three memories and the frame buffer."""
        return (sum(self.word_widths()[m] * self.depths()[m] for m in protocol.Memory)
                + 8 * self.max_payload)

    def info(self):
        """Return the INFO reply payload (bytes) of a device built with this configuration."""
        return protocol.INFO.pack(
            protocol_version=protocol.PROTOCOL_VERSION, rows=self.rows, cols=self.cols,
            acc_width=self.acc_width, lane=self.lane, max_payload=self.max_payload,
            max_depth=self.max_depth, weight_depth=self.weight_depth,
            activation_depth=self.activation_depth, result_depth=self.result_depth,
            clock_hz=self.clock_hz, baud=self.baud)

    @property
    def byte_timeout_cycles(self):
        return math.ceil(self.byte_timeout_us * self.clock_hz / 1_000_000)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)
