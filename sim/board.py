"""A simulated board: the device under Verilator, its UART bridged to a TCP socket.

::

    python -m sim.board [--host 127.0.0.1] [--port 5555] [--rows 4 --cols 4 --lane 32 ...]
                        [--connections N] [--idle-timeout S] [--time-limit S]

builds :class:`hw.device.Device` for a :class:`hw.config.DeviceConfig` (every field is an
option; the defaults, :data:`BOARD_CONFIG`, are a small build with 4 clock cycles per UART bit)
with :func:`sim.runner.run` and runs the testbench :mod:`sim.tb_board`, which listens on a TCP
port and bridges it to the device's UART pins: bytes from the client go into ``rx`` as 8N1
frames, frames the device sends on ``tx`` go back to the client. The host driver reaches it
with ``socket://HOST:PORT``, exactly as it reaches a board::

    from sw.driver import Device
    with Device.open("socket://127.0.0.1:5555", timeout=2.0, time_scale=200) as device:
        device.ping(b"hello")

Contract:

* When the socket listens, one line goes to standard output (flushed), matching
  :data:`LISTENING`::

      sim.board: serving socket://127.0.0.1:5555 (4x4x32, 24000000 Hz, 3000000 baud, 8 cycles/bit; time_scale 200)

  ``--port 0`` picks a free port; the line names it. The first run of a configuration builds it
  with Verilator first (about half a minute on two cores); later runs reuse the build.
* One client is served at a time; later ones wait in the listen backlog. After a client
  disconnects, the simulation runs on until every request it started has been answered (a frame
  it left unfinished ends with the device's byte timeout), discarding those replies, so the next
  client finds the device idle. The memories keep their contents across connections, as on a
  board.
* The board exits with status 0 after ``--connections`` clients (default 0: serve forever) or
  after ``--idle-timeout`` seconds without traffic or client; with status 1 when
  ``--time-limit`` seconds (wall clock) have passed, or if the device fails its self-test (a PING
  sent before listening).

Timing. Simulated time runs much slower than real time: Verilator clocks the default design at
some tens of thousands of cycles per second, so its 24 MHz device runs several hundred times
slower than a board (the self-test measures it and the board prints the figure; on the
two-core development machine from 482 to 1,491 times, with the load).
The driver's reply timeouts assume real time; pass ``time_scale`` (which multiplies its
estimates of transfer and computation time) at least ``clock_hz / simulated cycles per second``.
The board measures that speed in its self-test and prints a suggestion with margin (twice the
ratio) as ``time_scale N`` in the listening line; :class:`BoardProcess` parses it. While no
request is in progress the simulation waits for the client in the wall clock instead of
clocking the idle device, so a connected but quiet client costs (almost) no CPU; the device's
byte timeout counts simulated cycles, so a client that stalls in the middle of a frame gets its
``TIMEOUT`` reply late in real time.

Stopping. SIGTERM, SIGHUP or SIGINT (Ctrl-C) stops the board and the simulator process it
runs (the listening port is free when it has exited, with status 128 + the signal's number);
if the board is killed outright (SIGKILL), the simulator, which asks the kernel for a signal
when its parent dies, ends itself.

Two boards with the same configuration run side by side (on different ports): they share one
Verilator build, which :func:`sim.runner.run` locks exclusively only while it is built. A board
that must wait (for another process's build of its configuration) says so at once on standard
error.

:class:`BoardProcess` runs the board in a subprocess for tests and scripts; importing this module
does not import Amaranth or cocotb.
"""

import argparse
import dataclasses
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque

from hw.config import DeviceConfig

__all__ = ["BOARD_CONFIG", "LISTENING", "BoardError", "BoardProcess", "listening_line", "main",
           "simulated_device"]

#: Default configuration: a 4x4x32 array with memories that hold the registry's small models
#: at 8x8 (scikit-learn's digits) in one segment, and the fastest baud rate the UART allows
#: (4 cycles per bit) so that bytes cost few simulated cycles.
BOARD_CONFIG = DeviceConfig(rows=4, cols=4, lane=32, max_depth=2048, weight_depth=2048,
                            activation_depth=64, result_depth=64, max_payload=256,
                            clock_hz=24_000_000, baud=6_000_000, int_depth=16384,
                            bits_depth=1024, coef_depth=32768, param_depth=2048,
                            program_depth=128)

#: The line printed when the socket listens; groups ``url``, ``port`` and ``time_scale``.
LISTENING = re.compile(r"^sim\.board: serving (?P<url>socket://\S+?:(?P<port>\d+)) \(.*"
                       r"time_scale (?P<time_scale>\d+)\)$")



class BoardError(RuntimeError):
    """A board subprocess did not start, ended badly, or did not end in time."""


def listening_line(url, config, time_scale):
    """The line that announces a listening board (see :data:`LISTENING`)."""
    return (f"sim.board: serving {url} ({config.rows}x{config.cols}x{config.lane}, "
            f"{config.clock_hz} Hz, {config.baud} baud, "
            f"{config.clock_hz / config.baud:g} cycles/bit; time_scale {time_scale})")


def simulated_device(**fields):
    """The factory :func:`sim.runner.run` builds: ``Device(DeviceConfig(**fields))``."""
    from hw.device import Device
    return Device(DeviceConfig(**fields))


def _config_arguments(config):
    arguments = []
    for field in dataclasses.fields(DeviceConfig):
        arguments += [f"--{field.name.replace('_', '-')}", str(getattr(config, field.name))]
    return arguments


class BoardProcess:
    """``python -m sim.board`` in a subprocess; a context manager that always ends it.

    Parameters
    ----------
    config : :class:`hw.config.DeviceConfig`, optional
        The device to simulate (default :data:`BOARD_CONFIG`).
    host : str
        Address to listen on; the port is chosen by the board (``--port 0``).
    connections, idle_timeout, time_limit : int or float
        Passed to the board (see :func:`main`); the defaults make an abandoned board end itself.
    startup_timeout : float
        Seconds :meth:`start` waits for the listening line, Verilator build included.
    extra_args : sequence of str
        More command-line arguments.

    Attributes
    ----------
    url : str
        ``socket://HOST:PORT`` once started.
    port : int
    time_scale : int
        The board's suggestion for the driver's ``time_scale``.

    The subprocess and the simulator it starts get their own process group, so :meth:`stop`
    ends both. Their combined output is kept (:meth:`output`) and, with ``echo=True``, also
    printed.
    """

    def __init__(self, config=None, *, host="127.0.0.1", connections=0, idle_timeout=120,
                 time_limit=900, startup_timeout=600, extra_args=(), echo=False):
        self.config = BOARD_CONFIG if config is None else config
        if not isinstance(self.config, DeviceConfig):
            raise TypeError(f"config must be a DeviceConfig, not {self.config!r}")
        self.command = [
            sys.executable, "-m", "sim.board", "--host", host, "--port", "0",
            "--connections", str(connections), "--idle-timeout", str(idle_timeout),
            "--time-limit", str(time_limit), *_config_arguments(self.config), *extra_args,
        ]
        self.startup_timeout = startup_timeout
        self.echo = echo
        self.url = self.port = self.time_scale = None
        self.process = None
        self._lines = deque(maxlen=2000)
        self._listening = threading.Event()
        self._reader = None

    def start(self):
        """Start the board and wait for it to listen.

        Raises
        ------
        BoardError
            If it exits, or does not listen within ``startup_timeout`` seconds (it is then
            stopped); the message ends with its last lines of output.
        """
        from sim.runner import ROOT
        self.process = subprocess.Popen(
            self.command, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self._reader = threading.Thread(target=self._read, name="sim.board output",
                                        daemon=True)
        self._reader.start()
        deadline = time.monotonic() + self.startup_timeout
        while not self._listening.wait(0.1):
            if self.process.poll() is not None:
                self._reader.join(5)
                if self._listening.is_set():
                    break               # it listened, then ended (a limit); wait() tells
                raise BoardError(f"sim.board exited with status {self.process.returncode} "
                                 f"before listening:\n{self.output(40)}")
            if time.monotonic() > deadline:
                self.stop()
                raise BoardError(f"sim.board did not listen within {self.startup_timeout} s:"
                                 f"\n{self.output(40)}")
        return self

    def _read(self):
        for line in self.process.stdout:
            self._lines.append(line)
            if self.echo:
                print(line, end="", flush=True)
            match = LISTENING.match(line.rstrip("\n"))
            if match and not self._listening.is_set():
                self.url = match["url"]
                self.port = int(match["port"])
                self.time_scale = int(match["time_scale"])
                self._listening.set()

    def output(self, last=None):
        """The board's output so far (its ``last`` lines only, if given)."""
        lines = list(self._lines)
        return "".join(lines if last is None else lines[-last:])

    def wait(self, timeout):
        """Wait for the board to exit by itself; return its status.

        Raises
        ------
        BoardError
            If it is still running after ``timeout`` seconds (it is then stopped).
        """
        try:
            status = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise BoardError(f"sim.board did not exit within {timeout} s:\n"
                             f"{self.output(40)}") from None
        if self._reader is not None:
            self._reader.join(5)
        return status

    def stop(self):
        """End the board and its simulator (SIGTERM, then SIGKILL after 5 s); idempotent."""
        if self.process is None:
            return
        # Signal the group only while the board lives: its process group (the board and the
        # simulator it runs) cannot have been reused by anything else then.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if self.process.poll() is not None:
                break
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                continue
        if self._reader is not None:
            self._reader.join(5)
        if self.process.stdout is not None:
            self.process.stdout.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()


def _boolean(text):
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"must be True or False, not {text!r}")


def _positive_number(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, not {text!r}") from None
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, not {text!r}")
    return value


def _count(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, not {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {value}")
    return value


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m sim.board",
        description="Simulate the device under Verilator and serve its UART on a TCP socket "
                    "(socket://HOST:PORT for the host driver).",
        epilog="Simulated time runs several hundred times slower than real time (the board "
               "measures it and prints the figure when it listens): give the driver the "
               "time_scale the listening line suggests (Device.open(url, time_scale=N)). "
               "SIGTERM, SIGHUP or Ctrl-C stops the board and its simulator.")
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: %(default)s)")
    server.add_argument("--port", type=_count, default=5555,
                        help="TCP port; 0 picks a free one (default: %(default)s)")
    server.add_argument("--connections", type=_count, default=0, metavar="N",
                        help="exit after serving N clients; 0 serves forever "
                             "(default: %(default)s)")
    server.add_argument("--idle-timeout", type=_positive_number, default=0, metavar="S",
                        help="exit after S seconds without traffic or client; 0 never "
                             "(default: %(default)s)")
    server.add_argument("--time-limit", type=_positive_number, default=0, metavar="S",
                        help="fail after S seconds in all (wall clock, build excluded); 0 never "
                             "(default: %(default)s)")
    server.add_argument("--poll-cycles", type=_count, default=0, metavar="N",
                        help="clock cycles between polls of the socket; 0 picks 4 byte times "
                             "(default: %(default)s)")
    server.add_argument("--drain-timeout", type=_positive_number, default=30, metavar="S",
                        help="seconds to wait, after a client left, for the replies to its "
                             "requests (default: %(default)s)")
    server.add_argument("--waves", action="store_true",
                        help="record dump.vcd in the build directory (large; default: off)")
    device = parser.add_argument_group(
        "device", "DeviceConfig fields (clock_hz must be at least 4 * baud; a lower "
                  "clock_hz / baud makes bytes cheaper to simulate)")
    for field in dataclasses.fields(DeviceConfig):
        is_flag = isinstance(getattr(BOARD_CONFIG, field.name), bool)
        device.add_argument(f"--{field.name.replace('_', '-')}", dest=field.name,
                            type=_boolean if is_flag else int,
                            default=getattr(BOARD_CONFIG, field.name),
                            metavar="BOOL" if is_flag else "N", help="(default: %(default)s)")
    args = parser.parse_args(argv)
    if args.port > 0xFFFF:
        parser.error(f"--port must be in 0 .. 65535, not {args.port}")
    try:
        config = DeviceConfig(**{field.name: getattr(args, field.name)
                                 for field in dataclasses.fields(DeviceConfig)})
    except ValueError as error:
        parser.error(str(error))

    from sim.runner import CocotbFailure, run
    previous = {sig: signal.signal(sig, _stop) for sig in _STOP_SIGNALS}
    try:
        run(simulated_device, "sim.tb_board", parameters=dataclasses.asdict(config),
            testbench_parameters={
                "host": args.host, "port": args.port, "connections": args.connections,
                "idle_timeout": args.idle_timeout, "time_limit": args.time_limit,
                "poll_cycles": args.poll_cycles, "drain_timeout": args.drain_timeout,
                "parent_pid": os.getpid(),
            }, name="Board", waves=args.waves)
    except CocotbFailure as error:
        print(f"sim.board: {error}", file=sys.stderr, flush=True)
        return 1
    except _Stopped as stopped:
        # The simulator was a child of subprocess.run, which killed it on the way out.
        print(f"sim.board: stopped by {signal.Signals(stopped.signum).name}", file=sys.stderr,
              flush=True)
        return 128 + stopped.signum
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


#: Signals that stop a board (and its simulator) cleanly.
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


class _Stopped(BaseException):
    """Raised by the handler of :data:`_STOP_SIGNALS`. A ``BaseException`` that is not
    ``SystemExit``: :func:`sim.runner.run` turns a ``SystemExit`` from cocotb into a result, and
    this must end the run instead. On its way out, ``subprocess.run`` kills the simulator."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def _stop(signum, frame):
    raise _Stopped(signum)


if __name__ == "__main__":
    sys.exit(main())
