"""The core clock: the ``sync`` domain of a board build, from the FPGA's PLL.

A board's oscillator feeds the PLL; the accelerator runs at the frequency the routed design
meets, not at the oscillator's (DESIGN.md, "Clock"). :func:`ecp5_pll` computes the ECP5's
``EHXPLLL`` settings for an exact output frequency (the UART's bit timer divides the core clock
by the baud rate exactly, so the clock must be the integer number of hertz the configuration
says); :class:`CoreClock` instantiates the PLL and makes the ``sync`` domain from it, held in
reset until the PLL has locked.

The ECP5 PLL with the output fed back (``FEEDBK_PATH="CLKOP"``)::

    f_pfd = f_in / CLKI_DIV          3.125 .. 400 MHz
    f_out = f_pfd * CLKFB_DIV        3.125 .. 400 MHz
    f_vco = f_out * CLKOP_DIV        400 .. 800 MHz

with ``CLKI_DIV`` and ``CLKOP_DIV`` in 1..128 and ``CLKFB_DIV`` in 1..80 (Lattice TN1263, "ECP5
and ECP5-5G sysCLOCK PLL/DLL Design and Usage Guide"; prjtrellis' ``ecppll`` uses the same
limits, and ``tests/test_clock.py`` checks our choice against it where it is installed).

The iCE40 PLL (``SB_PLL40_PAD``) in its SIMPLE feedback mode (:func:`ice40_pll`)::

    f_pfd = f_in / (DIVR + 1)        10 .. 133 MHz
    f_vco = f_pfd * (DIVF + 1)       533 .. 1066 MHz
    f_out = f_vco / 2**DIVQ          16 .. 275 MHz

with ``DIVR`` in 0..15, ``DIVF`` in 0..127, ``DIVQ`` in 1..6 and the loop filter's
``FILTER_RANGE`` chosen from ``f_pfd`` (Lattice TN1251, "iCE40 sysCLOCK PLL Design and Usage
Guide"; icestorm's ``icepll`` uses the same limits and ``tests/test_clock.py`` checks our
choice against it).
"""

import dataclasses
from fractions import Fraction

from amaranth import ClockDomain, ClockSignal, Elaboratable, Instance, Module, Signal
from amaranth.lib import io
from amaranth.lib.cdc import ResetSynchronizer

__all__ = ["CoreClock", "Ecp5Pll", "Ice40Pll", "core_pll", "ecp5_frequencies", "ecp5_pll",
           "ice40_frequencies", "ice40_pll"]

_MHZ = 1_000_000
#: EHXPLLL limits (see the module docstring), in Hz and divider values.
_ECP5_PFD = (3_125_000, 400 * _MHZ)
_ECP5_VCO = (400 * _MHZ, 800 * _MHZ)
_ECP5_OUT = (3_125_000, 400 * _MHZ)
_ECP5_CLKI_DIV = 128
_ECP5_CLKFB_DIV = 80
_ECP5_CLKOP_DIV = 128
#: Among settings that make the same frequency, the one whose VCO is nearest this (the middle
#: of its range), as ecppll prefers.
_ECP5_VCO_PREFERRED = 600 * _MHZ


@dataclasses.dataclass(frozen=True)
class Ecp5Pll:
    """Settings of an ECP5 ``EHXPLLL`` with ``CLKOP`` fed back.

    ``output_hz`` is exact: ``input_hz * clkfb_div / clki_div``.
    """
    input_hz: int
    clki_div: int
    clkfb_div: int
    clkop_div: int

    @property
    def output_hz(self):
        return Fraction(self.input_hz * self.clkfb_div, self.clki_div)

    @property
    def vco_hz(self):
        return self.output_hz * self.clkop_div

    @property
    def clkop_cphase(self):
        """Coarse phase of CLKOP in VCO cycles: half an output period, as Lattice's tools and
        ecppll set it (the output's phase does not matter to a design clocked by it alone)."""
        return self.clkop_div // 2

    def parameters(self):
        """The ``EHXPLLL`` parameters and attributes, as :class:`amaranth.hdl.Instance`
        keyword arguments (``p_``: parameters, ``a_``: attributes)."""
        mhz = f"{float(self.output_hz) / _MHZ:g}"
        return {
            "p_PLLRST_ENA": "DISABLED", "p_INTFB_WAKE": "DISABLED",
            "p_STDBY_ENABLE": "DISABLED", "p_DPHASE_SOURCE": "DISABLED",
            "p_OUTDIVIDER_MUXA": "DIVA", "p_OUTDIVIDER_MUXB": "DIVB",
            "p_OUTDIVIDER_MUXC": "DIVC", "p_OUTDIVIDER_MUXD": "DIVD",
            "p_CLKI_DIV": self.clki_div, "p_CLKFB_DIV": self.clkfb_div,
            "p_CLKOP_ENABLE": "ENABLED", "p_CLKOP_DIV": self.clkop_div,
            "p_CLKOP_CPHASE": self.clkop_cphase, "p_CLKOP_FPHASE": 0,
            "p_FEEDBK_PATH": "CLKOP",
            # The loop filter settings Lattice's tools give for these dividers (and ecppll
            # copies); nextpnr writes them into the bitstream.
            "a_FREQUENCY_PIN_CLKI": f"{self.input_hz / _MHZ:g}",
            "a_FREQUENCY_PIN_CLKOP": mhz,
            "a_ICP_CURRENT": "12", "a_LPF_RESISTOR": "8",
            "a_MFG_ENABLE_FILTEROPAMP": "1", "a_MFG_GMCREF_SEL": "2",
        }

    def as_dict(self):
        """The settings for a build report."""
        return {"primitive": "EHXPLLL", "input_hz": self.input_hz,
                "output_hz": float(self.output_hz), "vco_hz": float(self.vco_hz),
                "clki_div": self.clki_div, "clkfb_div": self.clkfb_div,
                "clkop_div": self.clkop_div, "clkop_cphase": self.clkop_cphase}


def _ecp5_settings(input_hz):
    """Every valid ``Ecp5Pll`` for ``input_hz``, as ``{output frequency: best settings}``
    (best: VCO nearest 600 MHz)."""
    best = {}
    for clki_div in range(1, _ECP5_CLKI_DIV + 1):
        pfd = Fraction(input_hz, clki_div)
        if not _ECP5_PFD[0] <= pfd <= _ECP5_PFD[1]:
            continue
        for clkfb_div in range(1, _ECP5_CLKFB_DIV + 1):
            out = pfd * clkfb_div
            if not _ECP5_OUT[0] <= out <= _ECP5_OUT[1]:
                continue
            for clkop_div in range(1, _ECP5_CLKOP_DIV + 1):
                vco = out * clkop_div
                if vco > _ECP5_VCO[1]:
                    break
                if vco < _ECP5_VCO[0]:
                    continue
                settings = Ecp5Pll(input_hz, clki_div, clkfb_div, clkop_div)
                known = best.get(out)
                if known is None or (abs(vco - _ECP5_VCO_PREFERRED)
                                     < abs(known.vco_hz - _ECP5_VCO_PREFERRED)):
                    best[out] = settings
    return best


def ecp5_frequencies(input_hz, low_hz, high_hz):
    """The whole-hertz frequencies in ``[low_hz, high_hz]`` an ECP5 PLL makes from
    ``input_hz``, ascending."""
    return _whole(_ecp5_settings(input_hz), low_hz, high_hz)


def _whole(settings, low_hz=0, high_hz=float("inf")):
    """The whole-hertz frequencies of ``settings`` (``{frequency: settings}``) in
    ``[low_hz, high_hz]``, ascending."""
    return sorted(int(f) for f in settings if f.denominator == 1 and low_hz <= f <= high_hz)


def _exact(settings, family, input_hz, output_hz):
    """The settings of ``settings`` (``{frequency: settings}``) that make ``output_hz``, or a
    ``ValueError`` naming the nearest whole-hertz frequencies made."""
    exact = settings.get(Fraction(output_hz))
    if exact is not None:
        return exact
    whole = _whole(settings)
    below = [f for f in whole if f < output_hz][-2:]
    above = [f for f in whole if f > output_hz][:2]
    nearest = ", ".join(f"{f / _MHZ:g}" for f in below + above)
    raise ValueError(f"the {family} PLL cannot make exactly {output_hz / _MHZ:g} MHz from the "
                     f"{input_hz / _MHZ:g} MHz oscillator; the nearest frequencies it makes "
                     f"are {nearest} MHz")


def ecp5_pll(input_hz, output_hz):
    """The ``EHXPLLL`` settings that make exactly ``output_hz`` from ``input_hz``.

    Raises
    ------
    ValueError
        If no setting makes exactly ``output_hz``; the message names the nearest frequencies
        that can be made (whole hertz).
    """
    return _exact(_ecp5_settings(input_hz), "ECP5", input_hz, output_hz)


#: SB_PLL40 limits in SIMPLE feedback mode (see the module docstring).
_ICE40_PFD = (10 * _MHZ, 133 * _MHZ)
_ICE40_VCO = (533 * _MHZ, 1066 * _MHZ)
_ICE40_OUT = (16 * _MHZ, 275 * _MHZ)
_ICE40_DIVR = 15
_ICE40_DIVF = 127
_ICE40_DIVQ = (1, 6)
#: FILTER_RANGE by the phase detector's frequency: the first whose bound exceeds it.
_ICE40_FILTER = ((17 * _MHZ, 1), (26 * _MHZ, 2), (44 * _MHZ, 3), (66 * _MHZ, 4),
                 (101 * _MHZ, 5))


@dataclasses.dataclass(frozen=True)
class Ice40Pll:
    """Settings of an iCE40 PLL (``SB_PLL40_PAD``/``SB_PLL40_CORE``) in SIMPLE feedback mode.

    ``output_hz`` is exact: ``input_hz * (divf + 1) / ((divr + 1) * 2**divq)``.
    """
    input_hz: int
    divr: int
    divf: int
    divq: int

    @property
    def pfd_hz(self):
        return Fraction(self.input_hz, self.divr + 1)

    @property
    def vco_hz(self):
        return self.pfd_hz * (self.divf + 1)

    @property
    def output_hz(self):
        return self.vco_hz / (1 << self.divq)

    @property
    def filter_range(self):
        return next((value for bound, value in _ICE40_FILTER if self.pfd_hz < bound), 6)

    def parameters(self):
        """The PLL's parameters, as :class:`amaranth.hdl.Instance` keyword arguments."""
        return {"p_FEEDBACK_PATH": "SIMPLE", "p_PLLOUT_SELECT": "GENCLK",
                "p_DIVR": self.divr, "p_DIVF": self.divf, "p_DIVQ": self.divq,
                "p_FILTER_RANGE": self.filter_range}

    def as_dict(self):
        """The settings for a build report."""
        return {"primitive": "SB_PLL40_PAD", "input_hz": self.input_hz,
                "output_hz": float(self.output_hz), "vco_hz": float(self.vco_hz),
                "divr": self.divr, "divf": self.divf, "divq": self.divq,
                "filter_range": self.filter_range}


def _ice40_settings(input_hz):
    """Every valid :class:`Ice40Pll` for ``input_hz``, as ``{output frequency: settings}``
    (the first in the order DIVR, DIVF, DIVQ ascending, as icepll keeps the first exact
    one)."""
    best = {}
    for divr in range(_ICE40_DIVR + 1):
        if not _ICE40_PFD[0] <= Fraction(input_hz, divr + 1) <= _ICE40_PFD[1]:
            continue
        for divf in range(_ICE40_DIVF + 1):
            settings = Ice40Pll(input_hz, divr, divf, _ICE40_DIVQ[0])
            if not _ICE40_VCO[0] <= settings.vco_hz <= _ICE40_VCO[1]:
                continue
            for divq in range(_ICE40_DIVQ[0], _ICE40_DIVQ[1] + 1):
                settings = Ice40Pll(input_hz, divr, divf, divq)
                if _ICE40_OUT[0] <= settings.output_hz <= _ICE40_OUT[1]:
                    best.setdefault(settings.output_hz, settings)
    return best


def ice40_frequencies(input_hz, low_hz, high_hz):
    """The whole-hertz frequencies in ``[low_hz, high_hz]`` an iCE40 PLL makes from
    ``input_hz``, ascending."""
    return _whole(_ice40_settings(input_hz), low_hz, high_hz)


def ice40_pll(input_hz, output_hz):
    """The iCE40 PLL settings that make exactly ``output_hz`` from ``input_hz``.

    Raises
    ------
    ValueError
        If no setting makes exactly ``output_hz``; the message names the nearest frequencies
        that can be made (whole hertz).
    """
    return _exact(_ice40_settings(input_hz), "iCE40", input_hz, output_hz)


def core_pll(family, oscillator_hz, clock_hz):
    """The PLL settings that make the core clock ``clock_hz`` from ``oscillator_hz``: ``None``
    when they are equal (no PLL), an :class:`Ecp5Pll` on the ECP5, an :class:`Ice40Pll` on the
    iCE40.

    Raises
    ------
    ValueError
        If the PLL cannot make ``clock_hz`` exactly (naming the nearest frequencies it makes),
        or the family has no PLL support yet.
    """
    if clock_hz == oscillator_hz:
        return None
    if family == "ecp5":
        return ecp5_pll(oscillator_hz, clock_hz)
    if family == "ice40":
        return ice40_pll(oscillator_hz, clock_hz)
    raise ValueError(f"no PLL for the {family} yet: the core clock must be the "
                     f"oscillator's {oscillator_hz} Hz, not {clock_hz}")


class CoreClock(Elaboratable):
    """The ``sync`` domain of a board build, at ``clock_hz``.

    Parameters
    ----------
    family : str
        ``"ecp5"`` or ``"ice40"``.
    oscillator_hz : int
        The board's oscillator (the platform's default clock).
    clock_hz : int
        The core clock. Equal to ``oscillator_hz``: the platform's own ``sync`` domain (the
        oscillator, no PLL) is used and this module adds nothing. Otherwise an ``EHXPLLL``
        (ECP5) or an ``SB_PLL40_PAD`` (iCE40, on the oscillator's pad) makes it (:func:`core_pll`; a frequency it
        cannot make exactly raises
        ``ValueError``) and clocks the ``sync`` domain, which the parent defines from
        :meth:`domains` (Amaranth wants a domain defined where it is used or above). ``sync``
        is held in reset from configuration until two cycles after the PLL reports lock (a
        :class:`~amaranth.lib.cdc.ResetSynchronizer`); the clock gets a constraint of
        ``clock_hz`` for nextpnr.

    Members
    -------
    pll : :class:`Ecp5Pll`, :class:`Ice40Pll` or None
        The PLL's settings, ``None`` without a PLL.
    locked : Signal
        The PLL's lock output (constant 1 without a PLL).
    """

    def __init__(self, family, oscillator_hz, clock_hz):
        self.family = family
        self.oscillator_hz = oscillator_hz
        self.clock_hz = clock_hz
        self.locked = Signal(init=1)
        self.pll = core_pll(family, oscillator_hz, clock_hz)

    def domains(self):
        """The clock domains the parent defines: ``[]`` without a PLL (the platform makes
        ``sync`` from the oscillator), else the ``sync`` domain this module clocks."""
        return [] if self.pll is None else [ClockDomain("sync")]

    def elaborate(self, platform):
        m = Module()
        if self.pll is None:
            return m
        oscillator = platform.request(platform.default_clk, dir="-")
        # The PLL's output net, named so that its constraint says what it is.
        core = Signal(name="core_clk")
        if isinstance(self.pll, Ice40Pll):
            # The UP5K's oscillator input (the iCEBreaker's pin 35) is the PLL's own pad,
            # which cannot also feed an input buffer: the PLL takes the pad (SB_PLL40_PAD)
            # and drives a global net.
            m.submodules.pll = Instance(
                "SB_PLL40_PAD",
                io_PACKAGEPIN=oscillator.io, o_PLLOUTGLOBAL=core, o_LOCK=self.locked,
                i_RESETB=1, i_BYPASS=0, **self.pll.parameters())
        else:
            m.submodules.oscillator = oscillator_buffer = io.Buffer("i", oscillator)
            m.submodules.pll = Instance(
                "EHXPLLL",
                i_CLKI=oscillator_buffer.i, o_CLKOP=core, i_CLKFB=core, o_LOCK=self.locked,
                i_RST=0, i_STDBY=0, i_PHASESEL0=0, i_PHASESEL1=0, i_PHASEDIR=1,
                i_PHASESTEP=1, i_PHASELOADREG=1, i_PLLWAKESYNC=0, i_ENCLKOP=0,
                **self.pll.parameters())
        m.d.comb += ClockSignal("sync").eq(core)
        platform.add_clock_constraint(core, self.clock_hz)
        m.submodules.reset = ResetSynchronizer(~self.locked, domain="sync")
        return m
