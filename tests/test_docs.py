"""Every code block of README.md and docs/walkthrough.md runs as written.

The blocks are extracted from the pages (fenced blocks, and README's indented ones) and each
is checked here; :func:`test_every_code_block_is_checked` fails when a page gains, loses or
changes a block that :data:`CHECKS` does not know, so that a new example comes with its check.

What runs, in a scratch directory with this checkout on ``PYTHONPATH``:

* fully, as written: ``python -m sim.board --port 5555`` (the simulated board the pages
  name), README's GEMM example and ``Accelerator`` example against it, ``python -m
  sw.models.summary``, both pages' ``python -m sw.compile`` commands, the walk-through's
  ``python -c`` that writes the PNG files, and its two ``python -m sw.infer`` commands (the
  golden model and the simulated board; the board must print the golden model's classes and
  probabilities);
* with a reduced setting: the walk-through's ``python -m sw.train`` runs for one epoch
  (``--epochs 1``) of a smaller MeliusNet (:data:`SMALL_MELIUSNET`, about a twentieth of the
  weights), so that the simulated board loads the compiled model in seconds rather than
  minutes; every later command of both pages uses that checkpoint. README's training
  command (the same model and data set for eight epochs) is parsed by ``sw.train``'s own
  command line, which must accept it and give it the walk-through's output directory, but is
  not run;
* more cheaply: ``make bitstream`` and ``make test`` as dry runs (``make -n``, and
  ``python -m hw.build --help``), and ``make setup TORCH_INDEX=...`` as a dry run that must
  pass PyTorch's CPU index to pip; the Debian package of the set-up block is checked against
  what ``.ci/run`` and :mod:`sw.data` use (nothing is installed or downloaded).

Two liberties for the test's sake: the board's port 5555 is replaced by a free port, and the
board gets ``--idle-timeout``/``--time-limit`` so that it ends itself if this process dies.
The board is stopped by SIGTERM at the end; it must exit with status 143 and leave no
simulator process and no listening port.
"""

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hw.board import get_board
from sim.board import LISTENING
from tests.test_board_processes import alive, children, wait_until

ROOT = Path(__file__).resolve().parent.parent
PAGES = ("README.md", "docs/walkthrough.md")
#: The port the pages use for the simulated board.
DOC_PORT = "5555"
#: ``--model-option``s of the reduced training runs: a MeliusNet with a tenth of the weights.
SMALL_MELIUSNET = ("--model-option", "blocks=(1, 1)", "--model-option",
                   "transition_channels=(16,)", "--model-option", "init_features=16",
                   "--model-option", "growth_rate=8", "--threads", "1", "--no-progress")
#: Seconds any one command may take.
COMMAND_TIMEOUT = 600

#: The first line of every code block of the pages, and how the block is checked.
CHECKS = {
    "make bitstream": "make -n bitstream; python -m hw.build --help",
    "make test": "make -n test",
    "sudo apt-get install dataset-fashion-mnist": "the package .ci/run and sw.data use",
    "make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu":
        "make -n -B: the CPU index reaches pip; the installed torch is that version",
    "python -m sim.board --port 5555": "run (free port), serves the other blocks",
    "import numpy as np": "run against the board",
    "python -m sw.models.summary": "run; its sw.train line parsed by sw.train",
    "from sw.compile import load": "run against the board",
    "python -m sw.compile runs/meliusnet-small-digits/best.pt --board ulx3s -o model.bnn": "run",
    "$ python -m sw.train --model meliusnet-small --dataset digits --epochs 10 --threads 1 \\":
        "run for one epoch of a smaller MeliusNet",
    "$ python -m sw.compile runs/meliusnet-small-digits/best.pt --board ulx3s -o "
    "meliusnet-digits.bnn": "run",
    "$ python -m sim.board --port 5555 &": "run (free port), serves the other blocks",
    '$ python -c "': "run",
    "$ python -m sw.infer digit0.png digit1.png digit2.png --model meliusnet-digits.bnn":
        "run, on the golden model and on the board",
}


def code_blocks(page):
    """The code blocks of a Markdown page: fenced ones, and indented ones after a blank
    line (outside fences); each as its text without the indentation."""
    blocks, fenced, indented = [], None, None
    previous_blank = True
    for line in (ROOT / page).read_text().splitlines():
        if fenced is not None:
            if line.startswith("```"):
                blocks.append("\n".join(fenced))
                fenced = None
            else:
                fenced.append(line)
            continue
        if line.startswith("```"):
            fenced = []
        elif line.startswith("    ") and (indented is not None or previous_blank):
            indented = (indented or []) + [line[4:]]
        elif indented is not None and not line.strip():
            blocks.append("\n".join(indented))
            indented = None
        previous_blank = not line.strip()
    if indented:
        blocks.append("\n".join(indented))
    return blocks


def first_line(text):
    """A block's first line, without a trailing comment: the key of :data:`CHECKS`."""
    return text.splitlines()[0].split("  #")[0].rstrip()


def block(first):
    """The one block of the pages whose first line is ``first``."""
    found = [text for page in PAGES for text in code_blocks(page) if first_line(text) == first]
    assert len(found) == 1, f"{len(found)} blocks start with {first!r}"
    return found[0]


def commands(text):
    """The commands of a block: its ``$`` lines with their continuations, or (a block
    without ``$``) its lines, comments dropped."""
    lines = text.splitlines()
    if not any(line.startswith("$ ") for line in lines):
        return [line.split("  #")[0].strip() for line in lines if line.strip()]
    found, current = [], None
    for line in lines:
        if current is not None:
            current.append(line)
        elif line.startswith("$ "):
            current = [line[2:]]
        else:
            continue
        joined = "\n".join(current)
        if joined.endswith("\\") or joined.count('"') % 2:
            continue
        found.append(joined)
        current = None
    return found


def environment():
    """The commands' environment: this checkout first on ``PYTHONPATH``, this Python's
    ``python`` first on ``PATH``."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get(
        "PYTHONPATH", "")]).rstrip(os.pathsep),
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}


def shell(command, cwd):
    """Run ``command`` with bash in ``cwd``; return its standard output (fail with its
    output unless it exits with status 0)."""
    result = subprocess.run(["bash", "-c", command], cwd=cwd, env=environment(), check=False,
                            capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    assert result.returncode == 0, (f"{command!r} exited with {result.returncode}:\n"
                                    f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout


def on_port(text, port):
    return text.replace(f":{DOC_PORT}", f":{port}").replace(f"--port {DOC_PORT}",
                                                           f"--port {port}")


def reduced_training(command):
    """A page's ``sw.train`` command for one epoch of :data:`SMALL_MELIUSNET`."""
    argv = shlex.split(command.replace("\\\n", " "))
    if "--threads" in argv:
        del argv[argv.index("--threads"):argv.index("--threads") + 2]
    argv = [arg for arg in argv if arg != "--no-progress"]
    argv[argv.index("--epochs") + 1] = "1"
    return shlex.join(argv + list(SMALL_MELIUSNET))


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def board():
    """The walk-through's ``python -m sim.board --port 5555 &`` on a free port; stopped by
    SIGTERM at the end (which must also end its simulator)."""
    readme = commands(block("python -m sim.board --port 5555"))
    walkthrough = commands(block("$ python -m sim.board --port 5555 &"))
    assert readme == [walkthrough[0].removesuffix(" &")]
    port = free_port()
    argv = shlex.split(on_port(readme[0], port)) + ["--idle-timeout", "300",
                                                     "--time-limit", "1200"]
    assert argv[:3] == ["python", "-m", "sim.board"]
    process = subprocess.Popen([sys.executable, *argv[1:]], cwd=ROOT, env=environment(),
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    try:
        for line in process.stdout:
            lines.append(line)
            if LISTENING.match(line.rstrip("\n")):
                break
        else:
            pytest.fail(f"sim.board exited with {process.wait()} before listening:\n"
                        f"{''.join(lines[-30:])}")
        assert f"socket://127.0.0.1:{port}" in lines[-1]
        yield port
    finally:
        simulators = children(process.pid)
        process.send_signal(signal.SIGTERM)
        try:
            status = process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            raise
        finally:
            process.stdout.close()
    assert status == 128 + signal.SIGTERM
    assert simulators, "the board ran no simulator process"
    wait_until(lambda: not any(alive(pid) for pid in simulators), 10,
               f"the board's simulator {simulators} still runs after SIGTERM")
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0, "the board's port still listens"


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A directory where the pages' commands run, one after the other."""
    return tmp_path_factory.mktemp("docs")


def test_every_code_block_is_checked():
    firsts = [first_line(text) for page in PAGES for text in code_blocks(page)]
    unknown = [first for first in firsts if first not in CHECKS]
    assert not unknown, f"code blocks without a check in tests/test_docs.py: {unknown}"
    missing = [first for first in CHECKS if first not in firsts]
    assert not missing, f"checks of code blocks the pages no longer have: {missing}"
    assert len(firsts) == len(set(firsts)) == len(CHECKS)


def test_make_targets_and_the_build_command(scratch):
    for target in ("bitstream", "test"):
        (command,) = commands(block(f"make {target}"))
        dry = shell(f"make -n -C {shlex.quote(str(ROOT))} {command.split()[1]}", scratch)
        expected = "-m hw.build" if target == "bitstream" else "-m pytest"
        assert expected in dry, dry
    assert "--board" in shell("python -m hw.build --help", scratch)


def test_setup_blocks_name_what_ci_and_the_makefile_use():
    (install,) = commands(block("sudo apt-get install dataset-fashion-mnist"))
    package = install.split()[-1]
    assert f"install -y --no-install-recommends {package}" in (ROOT / ".ci/run").read_text()
    from sw import data
    assert data.FASHION_MNIST_DIR == Path("/usr/share/datasets/fashion-mnist")
    (setup,) = commands(block("make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu"))
    # -B: the commands of every rule, the virtual environment's included, even where it exists.
    dry = shell(f"make -n -B -C {shlex.quote(str(ROOT))} {setup.removeprefix('make ')}",
                ROOT)
    wheel = re.search(r"pip install (torch==\S+) --index-url "
                      r"https://download\.pytorch\.org/whl/cpu\n", dry)
    assert wheel, dry
    assert "-m venv .venv" in dry and 'pip install -e ".[test]"' in dry, dry
    assert "--index-url" not in shell(f"make -n -B -C {shlex.quote(str(ROOT))} setup", ROOT)
    import torch
    assert torch.__version__.split("+")[0] == wheel[1].split("==")[1]


def test_readme_gemm_example(board, scratch):
    code = on_port(block("import numpy as np"), board)
    output = shell(f"python -c {shlex.quote(code)}", scratch)
    assert re.fullmatch(r"16 x 16 counts in [\d,]+ cycles\n", output), output


def test_readme_models_summary(scratch):
    summary = commands(block("python -m sw.models.summary"))[0]
    assert summary == "python -m sw.models.summary"
    output = shell(summary, scratch)
    # The README's figures for MeliusNet22 at 224x224.
    assert re.search(r"^meliusnet22 +3x224x224 .*6,944,584", output, re.MULTILINE), output


@pytest.fixture(scope="module")
def trained(scratch):
    """The walk-through's training command, reduced (see the module docstring); its output
    directory."""
    (train,) = commands(block(next(first for first in CHECKS if "sw.train" in first)))
    output = shell(reduced_training(train), scratch)
    assert re.match(r"training meliusnet-small \(\d+ parameters\) on digits \(1438 train, 359 "
                    r"test images\), 1 process, epochs 1\.\.1 of 1\n", output), output
    argv = shlex.split(train.replace("\\\n", " "))
    directory = argv[argv.index("--output") + 1]
    assert (scratch / directory / "best.pt").exists()
    return directory


def test_walkthrough(board, scratch, trained):
    """The walk-through's steps in order (training reduced, see the module docstring)."""

    compile_block = block(next(first for first in CHECKS if "meliusnet-digits.bnn" in first
                               and "sw.compile" in first))
    (compile_command,) = commands(compile_block)
    output = shell(compile_command, scratch)
    page = compile_block.splitlines()
    assert output.splitlines()[:3] == page[1:4], output
    config = get_board('ulx3s').default_config
    clock_mhz = f"{config.clock_hz / 1e6:g}"
    shape = f"{config.rows}x{config.cols}x{config.lane}"
    assert re.search(rf"^array {shape}, {config.int_banks} fixed-point lanes, at "
                     rf"{re.escape(clock_mhz)} MHz: ", output, re.MULTILINE)
    assert f"array {shape}, " in compile_block, "the page shows another array"
    assert f"at {clock_mhz} MHz: " in compile_block, "the page shows another clock"

    (pictures,) = commands(block('$ python -c "'))
    shell(pictures, scratch)
    assert all((scratch / f"digit{i}.png").exists() for i in range(3))

    golden_command, board_command = commands(block(next(
        first for first in CHECKS if "sw.infer" in first)))
    golden = shell(golden_command, scratch).splitlines()
    on_board = shell(on_port(board_command, board), scratch).splitlines()
    assert len(golden) == len(on_board) == 3
    for expected, got in zip(golden, on_board):
        # The same class and probabilities; the board adds its cycles.
        assert re.fullmatch(r"digit\d\.png: \d \(class \d\) \| top 3: .*; [\d.]+ ms on the host",
                            expected), expected
        assert got.split("; ")[0] == expected.split("; ")[0]
        assert re.search(r"; [\d,]+ cycles \([\d.]+ ms at the device clock\), [\d.]+ s on the "
                         r"host$", got), got


def test_readme_training_compiling_and_accelerator(board, scratch, trained):
    """README's training (parsed), compiling and ``Accelerator`` blocks, in order."""
    from sw import train as sw_train
    _, train = commands(block("python -m sw.models.summary"))
    assert train.startswith("python -m sw.train "), train
    config = sw_train.config_from_args(shlex.split(train)[3:])
    assert (config.model, config.dataset, config.epochs) == ("meliusnet-small", "digits", 8)
    assert Path(config.output) == Path(trained)     # the checkpoint the compile block reads
    (compile_command,) = commands(block(next(first for first in CHECKS
                                             if first.endswith("-o model.bnn"))))
    shell(compile_command, scratch)
    assert (scratch / "model.bnn").exists()
    code = on_port(block("from sw.compile import load"), board)
    output = shell(f"python -c {shlex.quote(code)}", scratch).splitlines()
    assert len(output) == 2, output
    assert re.fullmatch(r"\[[-\d, ]+\] \d+ \[[\d, ]+\]", output[0]), output
    assert re.fullmatch(r"\[\d, \d\]", output[1]), output
