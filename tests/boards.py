"""Simulated boards for the device tests: a board process per fixture, and the driver's
connection to it."""

from sim.board import BoardProcess
from sw.driver import Device

__all__ = ["open_device", "serving"]


def serving(config, limits):
    """Generator for a pytest fixture: a :class:`sim.board.BoardProcess` of ``config`` (with
    ``limits``: idle_timeout, time_limit, startup_timeout) serving successive connections; its
    figures (simulated cycles/s and bytes/s) are printed at the end (``pytest -s`` shows
    them)."""
    with BoardProcess(config, **limits) as process:
        yield process
        print("".join(line for line in process.output().splitlines(keepends=True)
                      if line.startswith("sim.board:")))


def open_device(board, timeout):
    """A :class:`sw.driver.Device` connected to ``board``, with its time scale."""
    return Device.open(board.url, timeout=timeout, time_scale=board.time_scale)
