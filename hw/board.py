"""Boards the accelerator is built for: platforms, capacities, default builds and the top level.

A :class:`Board` ties an ``amaranth-boards`` platform to what the build needs to know about it:
its oscillator (which feeds the PLL that makes the core clock, :mod:`hw.clock`), the FPGA's
capacity, the default :class:`~hw.config.DeviceConfig` that fits it (its ``clock_hz`` is the core
clock), and how openFPGALoader programs it.
:func:`estimate_resources` and :func:`check_fits` reject a configuration that cannot fit before
any synthesis runs. :class:`BoardTop` places a device on a board's UART.
"""

import dataclasses
import math

from amaranth import Elaboratable, Module, Signal
from amaranth.lib import io, wiring
from amaranth.lib.cdc import FFSynchronizer
from amaranth.lib.wiring import In, Out

from .clock import CoreClock, core_pll
from .config import DeviceConfig

__all__ = [
    "BOARDS",
    "ULX3S_SIZES",
    "Board",
    "BoardTop",
    "Capacity",
    "Loopback",
    "board_names",
    "check_fits",
    "estimate_resources",
    "get_board",
]


@dataclasses.dataclass(frozen=True)
class Capacity:
    """What one FPGA offers, counted the way nextpnr counts its cells.

    Parameters
    ----------
    part : str
        The FPGA, as in error messages (``"LFE5U-85F"``).
    luts : int
        ECP5: LUT4s (nextpnr ``TRELLIS_COMB``; a carry cell takes two). iCE40: logic cells
        (``ICESTORM_LC``: a LUT4, a flip-flop and a carry each).
    ffs : int
        Flip-flops (``TRELLIS_FF``; on the iCE40 the flip-flops of the logic cells).
    brams : int
        Block RAMs (ECP5 ``DP16KD`` of 18 Kbit, iCE40 ``ICESTORM_RAM`` of 4 Kbit).
    bram_bits : int
        Bits in one block RAM (with the parity bits of the ECP5's 18-bit-wide modes).
    dsps : int
        Multipliers (ECP5 ``MULT18X18D``, iCE40 ``ICESTORM_DSP``).
    sprams, spram_bits : int
        iCE40 UltraPlus single-port RAMs (``ICESTORM_SPRAM``) and their size; 0 elsewhere.
    """
    part: str
    luts: int
    ffs: int
    brams: int
    bram_bits: int
    dsps: int
    sprams: int = 0
    spram_bits: int = 0


# ECP5 figures: the LUT4 and flip-flop counts are the "available" numbers nextpnr-ecp5 0.11
# reports for each --12k/--25k/--45k/--85k build (TRELLIS_COMB, TRELLIS_FF); EBR and multiplier
# counts are from the ECP5 family data sheet (FPGA-DS-02012, table 1.1), which nextpnr agrees
# with. The 12F is a 25F die on which the data sheet promises only "12K" LUTs, 32 EBR and
# 28 multipliers; nextpnr lets a design use the whole die (it reports 24,288 LUT4 and 56 EBR),
# but we hold the 12F to the data sheet.
_ECP5 = {
    "12F": Capacity("LFE5U-12F", luts=12_000, ffs=12_000, brams=32, bram_bits=18_432, dsps=28),
    "25F": Capacity("LFE5U-25F", luts=24_288, ffs=24_288, brams=56, bram_bits=18_432, dsps=28),
    "45F": Capacity("LFE5U-45F", luts=43_848, ffs=43_848, brams=108, bram_bits=18_432, dsps=72),
    "85F": Capacity("LFE5U-85F", luts=83_640, ffs=83_640, brams=208, bram_bits=18_432,
                    dsps=156),
}
# iCE40 UltraPlus UP5K (iCE40 UltraPlus family data sheet FPGA-DS-02008, table 1.1).
_UP5K = Capacity("iCE40UP5K", luts=5_280, ffs=5_280, brams=30, bram_bits=4_096, dsps=8,
                 sprams=4, spram_bits=262_144)

#: ULX3S FPGA sizes, smallest first.
ULX3S_SIZES = tuple(_ECP5)


@dataclasses.dataclass(frozen=True)
class Board:
    """A board the accelerator is built for.

    Parameters
    ----------
    name : str
        Board name on the command line and under ``bitstreams/``.
    size : str or None
        FPGA size variant (``"85F"``), ``None`` for boards that come in one size.
    family : str
        ``"ecp5"`` or ``"ice40"``: selects the toolchain and the estimate's coefficients.
    platform_class : type
        The ``amaranth-boards`` platform.
    oscillator_hz : int
        The board's oscillator frequency. It feeds the PLL that makes the core clock
        (``config.clock_hz``, :class:`hw.clock.CoreClock`); a configuration whose clock is the
        oscillator's runs from it directly.
    capacity : Capacity
    default_config : DeviceConfig
        A build that fits this board and meets timing at its ``clock_hz``.
    bitstream_suffix : str
        File name suffix of the bitstream the toolchain writes (``".bit"``, ``".bin"``).
    loader_args : tuple of str
        openFPGALoader arguments that select the board (the bitstream file follows).
    leds : dict
        LED indices (``platform.request("led", index)``) for ``"heartbeat"``, ``"rx"`` and
        ``"tx"``; two roles may share an LED.
    nextpnr_options : tuple of str
        nextpnr options every build for this board gets (before the caller's own).
    seed : int
        nextpnr's placement seed unless the caller gives one.
    """
    name: str
    size: str | None
    family: str
    platform_class: type
    oscillator_hz: int
    capacity: Capacity
    default_config: DeviceConfig
    bitstream_suffix: str
    loader_args: tuple
    leds: dict
    nextpnr_options: tuple = ()
    seed: int = 1

    @property
    def label(self):
        """Human-readable name: ``"ulx3s (LFE5U-85F)"``."""
        return f"{self.name} ({self.capacity.part})"

    def platform(self):
        """Return a new instance of the board's platform."""
        return self.platform_class()


#: Core clock of the ULX3S defaults that have been routed with the PLL (hw.clock.ecp5_pll makes
#: it exactly from the 25 MHz oscillator: 25 MHz * 9 / 5). The 85F default (16 x 4 x 32) was
#: routed with 45 MHz as its constraint and met it (47.87 MHz); with 50 MHz it reached 48.98
#: (docs/builds.md).
_ULX3S_CLOCK_HZ = {"85F": 45_000_000}


def _ulx3s(size):
    from amaranth_boards import ulx3s
    # Defaults per size: the array grows with the LUTs, the memories with the EBRs, each
    # leaving about two thirds of the block RAMs free (the estimate's figures: 12F 6.1K LUT4
    # and 11 EBR; 25F 15.2K and 20; 45F 15.2K and 37; 85F 15.2K and 71). Each default is
    # checked against check_fits in the tests.
    config = {
        # The layer program's memories (INTS banks, a BITS copy per column, 456-bit
        # descriptors) do not fit the 12F's and 25F's block RAMs: GEMM-only builds there.
        "12F": DeviceConfig(rows=4, cols=4, lane=32, weight_depth=512, activation_depth=512,
                            result_depth=512, layer_program=False),
        "25F": DeviceConfig(rows=8, cols=8, lane=32, weight_depth=512, activation_depth=512,
                            result_depth=512, layer_program=False),
        # 45F: four columns, so four fixed-point lanes fit its 72 multipliers.
        "45F": DeviceConfig(rows=8, cols=4, lane=32, weight_depth=1024, activation_depth=128,
                            result_depth=128, int_depth=16384, bits_depth=512,
                            coef_depth=8192, param_depth=1024, program_depth=128),
        # 85F: every weight of CNV-W1A1 and of MeliusNet-small at 28x28 is resident (one
        # segment): WEIGHTS 3,072 words of 16 rows (CNV's 1.56 Mbit need 3,052; 86 of the 208
        # block RAMs), BITS 3,072 (CNV's bit-plane image and conv1's bits: 2,824), COEFS and PARAMS
        # MeliusNet's 16,912 and 1,931 words. INTS holds MeliusNet's peak (26,656 elements)
        # in 18-bit elements: two 2048 x 9 block RAMs wide where 24 bits took three, so the
        # INTS banks take 32 block RAMs, not 72 (every count, activation and logit of both
        # networks fits 18 signed bits; the compiler refuses a tensor that does not). 193
        # block RAMs in all; the static placer legalises them. 16 rows, four columns: more
        # rows cost no block RAM (WEIGHTS keeps its bits), while each column needs a BITS copy
        # (6 block RAMs), and nextpnr's router has not converged on 8 x 8 x 32 (`--cols 8`);
        # docs/builds.md. Eight fixed-point lanes: the fixed-point ops (stem, transitions) take
        # most of MeliusNet's cycles, and the lanes' multipliers are plentiful; with 16 lanes
        # as well (47,180 LUT4) router2 still had 6,351 overused wires after 20 iterations
        # (docs/builds.md). Two output channels at a time (fixed_channels 2: MeliusNet 81,409
        # cycles, not 131,894 with one); with four (56,247) router2 diverged (docs/builds.md).
        "85F": DeviceConfig(rows=16, cols=4, lane=32, weight_depth=3072, activation_depth=256,
                            result_depth=256, int_depth=32768, element_width=18,
                            bits_depth=3072, coef_depth=24576, param_depth=2048,
                            program_depth=128, fixed_lanes=8, fixed_channels=2),
    }[size]
    return Board(
        name="ulx3s", size=size, family="ecp5",
        platform_class=getattr(ulx3s, f"ULX3S_{size}_Platform"),
        oscillator_hz=25_000_000, capacity=_ECP5[size],
        # The FT231X runs up to 3 Mbaud. The core clock is the PLL's, at a frequency the routed
        # default build meets (docs/builds.md); the smaller sizes' builds have not been routed
        # at it and run from the oscillator.
        default_config=config.replace(clock_hz=_ULX3S_CLOCK_HZ.get(size, 25_000_000),
                                      baud=3_000_000),
        bitstream_suffix=".bit",
        # -m: load the FPGA's SRAM (lost at power-off); flashing is a deliberate, separate act.
        loader_args=("-b", "ulx3s", "-m"),
        leds={"heartbeat": 0, "rx": 1, "tx": 2},
        # nextpnr's electrostatic placer spreads the design over the die; after HeAP's
        # placement router2 did not converge on the full accelerator (overuse plateau near
        # 25,000) nor on the GEMM-only device of commit 83b96c8. Seed 3: the 85F default of
        # commit 624f16d (PLL, bit-plane PEs, protocol 4) routed with it (44.17 MHz), while
        # with seed 5, the seed of the builds before, router2's overuse fell to 637 and rose
        # again; some seeds of earlier commits did not converge either. Seed 5: the committed
        # 16 x 4 x 32 build of commit cea969b met 45 MHz with it (47.87 MHz), while seeds 3 and
        # 1 did not route or met less (docs/builds.md).
        nextpnr_options=("--placer", "static"),
        seed=5,
    )


def _icebreaker(size):
    from amaranth_boards import icebreaker
    return Board(
        name="icebreaker", size=None, family="ice40",
        platform_class=icebreaker.ICEBreakerPlatform,
        oscillator_hz=12_000_000, capacity=_UP5K,
        # The core clock comes from the SB_PLL40 at 18 MHz: the GEMM-only build routes at
        # 21.41 MHz with it (docs/builds.md). The FT2232H would do 3 Mbaud, but that leaves 6
        # clocks per bit; 1 Mbaud gives the UART's sampler 18.
        # GEMM-only: the layer program's units and memories exceed the UP5K.
        # A 512-byte receive FIFO: one of the 30 block RAMs (2,048 bytes would take four).
        default_config=DeviceConfig(
            rows=2, cols=2, lane=16, weight_depth=512, activation_depth=512,
            result_depth=512, clock_hz=18_000_000, baud=1_000_000, layer_program=False,
            rx_buffer=512),
        bitstream_suffix=".bin",
        # The iCEBreaker boots from its SPI flash; openFPGALoader writes it over the FT2232H.
        loader_args=("-b", "ice40_generic"),
        # LED 0 is the red LED, 1 the green one.
        leds={"heartbeat": 1, "rx": 0, "tx": 0},
    )


#: Board name -> (function of the size, sizes or None, default size).
BOARDS = {
    "ulx3s": (_ulx3s, ULX3S_SIZES, "85F"),
    "icebreaker": (_icebreaker, None, None),
}


def board_names():
    return tuple(BOARDS)


def get_board(name, size=None):
    """Return the :class:`Board` called ``name`` (with FPGA ``size`` where it has sizes).

    Raises
    ------
    ValueError
        If there is no such board, or the size does not exist for it.
    """
    if name not in BOARDS:
        raise ValueError(f"board must be one of {', '.join(BOARDS)}, not {name!r}")
    make, sizes, default_size = BOARDS[name]
    if sizes is None:
        if size is not None:
            raise ValueError(f"board {name} comes in one size; no size may be given, "
                             f"not {size!r}")
        return make(None)
    size = default_size if size is None else size.upper()
    if size not in sizes:
        raise ValueError(f"size of board {name} must be one of {', '.join(sizes)}, "
                         f"not {size!r}")
    return make(size)


# Resource estimate
# -----------------
#
# The logic is a linear model in the features of _features (a base; per processing element:
# lane bits, accumulator bits and a constant; per memory word: the weight and activation lanes
# and the result counts) plus the array's skew registers, whose number grows with the square
# of rows and columns and which is known exactly (one flip-flop per bit; on the iCE40 one logic
# cell, as no LUT feeds them). Block RAMs are counted exactly: each memory tiled with the
# primitive's best shape, as yosys' memory_libmap chooses.
#
# How the coefficients were measured (yosys 0.70 and nextpnr 0.11 from yowasp, Nov 2026): for
# each configuration below, hw.core.DeviceCore alone was synthesized (synth_ecp5; synth_ice40
# -dsp) and packed by nextpnr (--pack-only --report, which counts TRELLIS_COMB, TRELLIS_FF and
# ICESTORM_LC exactly as a full build does), and the coefficients are the least-squares fit.
#   ecp5 (rows x cols x lane, 13-bit counts unless noted): 2x2x16, 4x4x32, 4x4x64, 4x8x32,
#     8x4x32, 6x6x32, 8x8x16, 8x8x32 (also with 17-bit counts), 8x8x64, 16x8x32, 16x16x32;
#     residuals within 2.5% (16x16x32: 50,364 LUT4 and 40,448 FF for the core).
#   ice40: 1x1x16, 1x1x32, 2x2x8, 2x2x16 (also 9- and 17-bit counts), 2x2x32, 1x4x16, 4x1x16,
#     2x4x16, 4x2x16, 3x3x16, 1x4x32, 4x4x8, 4x4x16, 4x4x32; residuals within 2.5%.
# iCE40 flip-flops are yosys' count of SB_DFF* cells. The base then gets what hw.uart and
# BoardTop add, measured as the difference between full builds (python -m hw.build) of the
# default configurations and the core alone: 147 LUT4 and 121 FF on the ULX3S, 201 logic cells
# on the iCEBreaker. Every build report puts this estimate
# next to the cells nextpnr used, so a change of the design that invalidates it shows there.

def _features(config):
    rows, cols, lane, acc = config.rows, config.cols, config.lane, config.acc_width
    pes = rows * cols
    return (1, pes * lane, pes * acc, pes, (rows + cols) * lane, cols * acc)


def _skew_bits(config):
    """Flip-flops of the array's skew: row r's weights are delayed r cycles, column c's
    activations c cycles, and column c's results cols - 1 - c cycles."""
    rows, cols, lane, acc = config.rows, config.cols, config.lane, config.acc_width
    return (lane * (rows * (rows - 1) // 2 + cols * (cols - 1) // 2)
            + (acc + 1) * cols * (cols - 1) // 2)


# Coefficients in the order of _features; "skew": per skew flip-flop.
_MODELS = {
    "ecp5": {
        "luts": (2649.8 + 147, 5.63, 3.62, -47.16, 1.52, 0.62), "luts_skew": 0,
        "ffs": (702.4 + 121, 1.83, 3.18, 8.19, 2.75, -0.50), "ffs_skew": 1,
        # DP16KD shapes, widest first (512x36 is the one-read-one-write PDPW16KD).
        "bram_shapes": ((36, 512), (18, 1024), (9, 2048), (4, 4096), (2, 8192), (1, 16384)),
        # The ECP5 keeps a receive FIFO of up to 64 bytes in LUT RAM.
        "fifo_brams": 0,
        # The request checks' multiplications; a product by a row count that is not a power of
        # two takes more.
        "dsps": (4, 6),
    },
    "ice40": {
        "luts": (2033.6 + 201, 3.64, 4.38, 18.77, 4.79, 4.05), "luts_skew": 1,
        # Flip-flops from yosys' count of SB_DFF* cells (nextpnr reports none of their own).
        "ffs": (682.8 + 121, 1.47, 3.02, 7.93, 3.04, 2.46), "ffs_skew": 1,
        # SB_RAM40_4K shapes.
        "bram_shapes": ((16, 256), (8, 512), (4, 1024), (2, 2048)),
        # The iCE40 has no LUT RAM: even a 64-byte receive FIFO takes a block RAM.
        "fifo_brams": 1,
        "dsps": (4, 5),
    },
}


def estimate_resources(config, family):
    """Estimate the cells a board build of :class:`hw.device.Device` with ``config`` uses.

    Parameters
    ----------
    config : DeviceConfig
    family : str
        ``"ecp5"`` or ``"ice40"``.

    Returns
    -------
    dict
        ``{"luts", "ffs", "brams", "dsps"}`` in the units of :class:`Capacity`: LUT4s (ECP5) or
        logic cells (iCE40), flip-flops, block RAMs, multipliers. Logic comes from a model
        fitted to measured builds (see the comment above; within a few percent over the
        measured range: arrays from 1x1 to 16x16, lanes 8 to 64; the layer program's units
        from two builds only, 4 and 8 lanes); block RAMs and multipliers are exact. On the iCE40 the flip-flops sit in the logic cells, and
        ``luts`` counts the cells.
    """
    if family not in _MODELS:
        raise ValueError(f"family must be one of {', '.join(_MODELS)}, not {family!r}")
    model = _MODELS[family]
    features = _features(config)
    skew = _skew_bits(config)

    def linear(name):
        return (sum(c * f for c, f in zip(model[name], features))
                + model[f"{name}_skew"] * skew)

    luts = math.ceil(linear("luts"))
    ffs = math.ceil(linear("ffs"))
    # The receive FIFO keeps rx_buffer - 1 bytes in its memory (one more in its output
    # register); beyond 64 bytes it is a block RAM on both families.
    fifo_brams = (_brams(8, config.rx_buffer - 1, model["bram_shapes"])
                  if config.rx_buffer > 64 else model["fifo_brams"])
    brams = sum(_brams(width, depth, model["bram_shapes"])
                for width, depth in _memories(config)) + fifo_brams
    power_of_two = config.rows & (config.rows - 1) == 0
    dsps = model["dsps"][0 if power_of_two else 1]
    if config.layer_program:
        # The sequencer, the binary conv engine (which shares the GEMM engine's XNOR array),
        # the window generator and the fixed-point unit, fitted to two builds with Yosys 0.69:
        # ULX3S-45F 8x4x32 with 4 fixed-point lanes (+12,310 LUT4, +8,071 FFs over the
        # GEMM-only estimate) and ULX3S-85F 8x8x32 with 8 lanes (+24,443, +12,392). Both have
        # as many lanes as columns, so the slope covers both. Multipliers are exact (Yosys's
        # per-module counts): 5 in the window generator, 7 per fixed-point lane and 3 shared
        # by the lanes.
        lanes = config.int_banks
        luts += math.ceil(177 + 3_033 * lanes)
        ffs += math.ceil(3_751 + 1_080 * lanes)
        dsps += 7 * lanes + 8
    return {"luts": luts, "ffs": ffs, "brams": brams, "dsps": dsps}


def _memories(config):
    """(width, depth) of every memory the device maps to block RAM: the host-visible memories
    (INTS as its banks, BITS once per read port) and the frame buffer."""
    from sw.protocol import Memory
    widths, depths = config.word_widths(), config.depths()
    result = [(8, config.max_payload)]
    for memory in depths:
        width, depth = widths[memory], depths[memory]
        if not depth:
            continue
        if memory == Memory.INTS:
            result += [(width, depth // config.int_banks)] * config.int_banks
        elif memory == Memory.BITS:
            result += [(width, depth)] * config.cols
        else:
            result.append((width, depth))
    return result


def _brams(width, depth, shapes):
    """Block RAMs for a ``width`` x ``depth`` memory: the best of the primitive's
    ``(width, depth)`` shapes, tiled."""
    return min(math.ceil(width / w) * math.ceil(depth / d) for w, d in shapes)


def check_fits(config, board):
    """Raise :exc:`ValueError` if ``config`` cannot fit ``board``'s FPGA.

    Runs before synthesis from :func:`estimate_resources`; the message names the resource, the
    estimate and the capacity. Also checks that the board's PLL makes ``config.clock_hz`` from
    its oscillator exactly (or that it is the oscillator's frequency).

    Returns
    -------
    dict
        The estimate, for the build report.
    """
    # Raises ValueError, naming the frequencies that can be made, if the PLL cannot make it.
    core_pll(board.family, board.oscillator_hz, config.clock_hz)
    estimate = estimate_resources(config, board.family)
    capacity = board.capacity
    shape = f"{config.rows}x{config.cols}x{config.lane}"
    memories = (f"memories of {config.weight_depth}/{config.activation_depth}/"
                f"{config.result_depth} words")
    checks = [
        ("luts", f"array {shape}", "LUT4" if board.family == "ecp5" else "logic cells",
         capacity.luts),
        ("ffs", f"array {shape}", "flip-flops", capacity.ffs),
        ("brams", f"array {shape} with {memories}",
         "block RAMs" + (" (18 Kbit)" if board.family == "ecp5" else " (4 Kbit)"),
         capacity.brams),
        ("dsps", f"array {shape}", "multipliers", capacity.dsps),
    ]
    for key, what, unit, available in checks:
        if estimate[key] > available:
            raise ValueError(f"{what} needs about {estimate[key]:,} {unit} but "
                             f"{capacity.part} has {available:,}")
    return estimate


# Top level
# ---------

class Loopback(wiring.Component):
    """Stand-in device for board bring-up: ``tx`` repeats ``rx`` one cycle later.

    Has the ports of :class:`hw.device.Device`, so a loopback bitstream checks the toolchain,
    the pins and the host's serial port without the accelerator.

    Parameters
    ----------
    config : DeviceConfig
        Accepted for the interface of a device factory; unused.

    Members
    -------
    rx : ``In(1)``
    tx : ``Out(1)``, idle high.
    """
    rx: In(1)
    tx: Out(1, init=1)

    def __init__(self, config=None):
        self.config = config
        super().__init__()

    def elaborate(self, platform):
        m = Module()
        m.d.sync += self.tx.eq(self.rx)
        return m


class BoardTop(Elaboratable):
    """Top level of a board build: ``device`` on the board's UART, with status LEDs.

    Parameters
    ----------
    board : Board
    device : wiring.Component
        Signature ``rx: In(1)``, ``tx: Out(1)``, clocked by ``sync`` at ``clock_hz``
        (a :class:`hw.device.Device`).
    clock_hz : int, optional
        The core clock (default: the board's oscillator frequency).

    The ``sync`` domain is :class:`hw.clock.CoreClock`'s: at the oscillator's frequency the
    platform's default (the oscillator; on the ECP5 without a reset signal, flip-flops start
    at their ``init`` values; on the iCE40 held in reset for 15 us after configuration), at
    any other the PLL's output, held in reset until the PLL locks. ``rx`` reaches the device through a
    two-flip-flop synchronizer (idle high), so the device sees it 2 cycles late. ``tx`` drives
    the pin directly. LEDs: a 1 Hz heartbeat (the clock runs and the bitstream is loaded), and
    ``rx``/``tx`` activity stretched to 50 ms.

    On the ULX3S, the ``uart_tx_enable`` resource (ball L3) is left alone: it is the FT231X's
    TXDEN output (the board's constraint file lists it as "FPGA receives"); driving it would
    fight the FTDI chip, and the FPGA's ``tx`` reaches the FT231X without it.
    """

    def __init__(self, board, device, clock_hz=None):
        self.board = board
        self.device = device
        self.clock = CoreClock(board.family, board.oscillator_hz,
                               board.oscillator_hz if clock_hz is None else clock_hz)

    def elaborate(self, platform):
        m = Module()
        m.submodules.clock = self.clock
        m.domains += self.clock.domains()
        m.submodules.device = device = self.device
        uart = platform.request("uart", 0, dir="-")
        m.submodules.rx_buffer = rx_buffer = io.Buffer("i", uart.rx)
        m.submodules.tx_buffer = tx_buffer = io.Buffer("o", uart.tx)
        m.submodules.rx_sync = FFSynchronizer(rx_buffer.i, device.rx, init=1)
        m.d.comb += tx_buffer.o.eq(device.tx)

        clock_hz = self.clock.clock_hz
        heartbeat = Signal()
        half_period = Signal(range(clock_hz // 2))
        with m.If(half_period == clock_hz // 2 - 1):
            m.d.sync += [half_period.eq(0), heartbeat.eq(~heartbeat)]
        with m.Else():
            m.d.sync += half_period.eq(half_period + 1)

        def stretched(line, name):
            # Any low bit (a start bit or data) lights the LED for 50 ms.
            timer = Signal(range(clock_hz // 20 + 1), name=f"{name}_activity")
            with m.If(~line):
                m.d.sync += timer.eq(clock_hz // 20)
            with m.Elif(timer != 0):
                m.d.sync += timer.eq(timer - 1)
            return timer != 0

        activity = {"heartbeat": heartbeat, "rx": stretched(device.rx, "rx"),
                    "tx": stretched(device.tx, "tx")}
        led_values = {}
        for role, index in self.board.leds.items():
            led_values[index] = led_values.get(index, 0) | activity[role]
        for index, value in sorted(led_values.items()):
            # The port applies the board's LED polarity (the iCEBreaker's are active low).
            led = io.Buffer("o", platform.request("led", index, dir="-"))
            m.submodules[f"led{index}_buffer"] = led
            m.d.comb += led.o.eq(value)
        return m
