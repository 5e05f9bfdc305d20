"""``python -m sim.board`` as a server process: stopping it stops its simulator, and two boards
of one configuration run side by side (:func:`sim.runner.run` shares their build).

The boards are :class:`sim.board.BoardProcess` subprocesses of the small configuration of
:mod:`tests.test_end_to_end` (its build is shared with those tests). Each one's simulator is
the Verilator executable it runs as a child process; the checks look it up in ``/proc``.
"""

import errno
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from sim import runner
from sim.board import BoardProcess
from sw import protocol
from tests import boards
from tests.test_end_to_end import BOARD_LIMITS, CONFIG, REPLY_TIMEOUT


def children(pid):
    """The ids of the child processes of ``pid`` (empty if it has ended)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return []
    return [int(word) for word in text.split()]


def alive(pid):
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return status.rsplit(")", 1)[1].split()[0] != "Z"


def simulator_of(board):
    """The id of the Verilator simulator that ``board`` (started) runs."""
    found = [pid for pid in children(board.process.pid)
             if Path(f"/proc/{pid}/exe").resolve().name == "top"]
    assert len(found) == 1, (f"expected one simulator (sim_build/.../top) under the board "
                             f"{board.process.pid}, found children {children(board.process.pid)}")
    return found[0]


def port_is_free(port):
    """Whether nothing listens on ``127.0.0.1:port`` and it can be bound again."""
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", port)) != errno.ECONNREFUSED:
            return False
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", port))
    return True


def wait_until(condition, seconds, what):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"{what} after {seconds} s"
        time.sleep(0.1)


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="looks up processes in /proc; the parent-death signal is Linux's")
def test_two_boards_serve_side_by_side_and_stop_with_their_simulators():
    with BoardProcess(CONFIG, **BOARD_LIMITS) as first, BoardProcess(CONFIG, **BOARD_LIMITS) \
            as second:
        assert first.port != second.port
        for board in (first, second):
            with boards.open_device(board, REPLY_TIMEOUT) as device:
                device.ping(b"side by side")     # raises unless echoed
                assert device.info() == protocol.INFO.unpack(CONFIG.info())
        simulators = {first: simulator_of(first), second: simulator_of(second)}

        # SIGTERM: the board ends its simulator and says why it stopped.
        os.kill(first.process.pid, signal.SIGTERM)
        assert first.wait(30) == 128 + signal.SIGTERM
        assert "sim.board: stopped by SIGTERM" in first.output()
        wait_until(lambda: not alive(simulators[first]), 10,
                   f"the simulator {simulators[first]} still runs after SIGTERM to its board")
        wait_until(lambda: port_is_free(first.port), 10,
                   f"port {first.port} still busy after SIGTERM")

        # SIGKILL: the board cannot act; its simulator ends itself (parent-death signal).
        with boards.open_device(second, REPLY_TIMEOUT) as device:
            device.ping(b"still here")
        os.kill(second.process.pid, signal.SIGKILL)
        assert second.wait(30) == -signal.SIGKILL
        wait_until(lambda: not alive(simulators[second]), 10,
                   f"the simulator {simulators[second]} still runs after its board was killed")
        wait_until(lambda: port_is_free(second.port), 10,
                   f"port {second.port} still busy after its board was killed")


def test_build_lock_is_shared_by_simulations_and_a_rebuild_says_what_it_waits_for(
        tmp_path, capsys):
    """:func:`sim.runner._build_locked` (in-process: each ``open`` is its own lock)."""
    state = {"current": True, "builds": 0}

    def build():
        state["builds"] += 1
        state["current"] = True

    def is_current():
        return state["current"]

    entered = threading.Event()
    with runner._build_locked(tmp_path, is_current, build) as built:
        assert not built
        # A second simulation of the same, current build does not wait.
        worker = threading.Thread(target=lambda: _enter(tmp_path, is_current, build, entered))
        worker.start()
        assert entered.wait(5), "a second simulation of a current build waited"
        worker.join(5)
        assert "waiting" not in capsys.readouterr().err

        # A rebuild waits for the running simulation and says so at once.
        state["current"] = False
        entered.clear()
        worker = threading.Thread(target=lambda: _enter(tmp_path, is_current, build, entered))
        worker.start()
        wait_until(lambda: "sim.runner: waiting for" in capsys.readouterr().err, 5,
                   "no message from the process that waits for the build lock")
        assert not entered.is_set() and state["builds"] == 0
    worker.join(5)
    assert entered.is_set() and state["builds"] == 1


def _enter(directory, is_current, build, entered):
    with runner._build_locked(directory, is_current, build):
        entered.set()


def test_a_traced_run_holds_the_build_alone(tmp_path, capsys):
    """``exclusive_run`` (traced runs, which write one dump.vcd): a second run waits, saying
    so, until the first ends."""
    entered = threading.Event()

    def current():
        return True

    def build():
        raise AssertionError("a current build was rebuilt")

    with runner._build_locked(tmp_path, current, build, exclusive_run=True) as built:
        assert not built
        worker = threading.Thread(target=lambda: _enter(tmp_path, current, build, entered))
        worker.start()
        wait_until(lambda: "sim.runner: waiting for" in capsys.readouterr().err, 5,
                   "no message from the run that waits for the traced one")
        assert not entered.is_set()
    worker.join(5)
    assert entered.is_set()
