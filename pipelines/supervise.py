"""A child server and every process it starts, as one unit: started in a session of its own, stopped whole.

``mlflow server`` starts uvicorn, which starts its workers. A signal to the parent alone ends only
the parent: the rest is reparented to PID 1 and keeps the port. So the whole tree is signalled, and
waited for, whether the stop comes from Ctrl-C, ``kill PID``, ``timeout`` or a process manager.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Callable, Mapping

import psutil

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def start_group(argv: list[str], env: Mapping[str, str], cwd: Path | None = None,
                log: Path | None = None) -> subprocess.Popen:
    """``argv`` in a new session (its own process group), its output appended to ``log`` if given."""
    out = open(log, "ab") if log is not None else None
    try:
        return subprocess.Popen(argv, env=dict(env), cwd=cwd, stdout=out, stderr=subprocess.STDOUT if out else None,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    finally:
        if out is not None:
            out.close()


def stop_tree(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM to ``proc``'s group and wait; SIGKILL to what is left after ``timeout`` s, in the group or not."""
    try:  # psutil.Process objects: a pid reused by then is told apart by its start time
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    if proc.poll() is None:
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    _, alive = psutil.wait_procs(children, timeout=5)  # workers still finishing after their parent left
    _signal_group(proc.pid, signal.SIGKILL)
    for child in alive:  # also one that moved to a group of its own
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


def serve(argv: list[str], env: Mapping[str, str], when_up: Callable[[], None] | None = None) -> int:
    """Run ``argv`` until it exits, or until this process gets SIGTERM, SIGINT or SIGHUP: then stop its tree.

    Returns its exit code, or 0 when a signal stopped it. ``when_up`` runs once it has started.
    """

    def stop(signum, _frame):
        raise _Stopped(signum)

    previous = {s: signal.signal(s, stop) for s in STOP_SIGNALS}
    proc = None
    try:
        proc = start_group(argv, env)
        if when_up is not None:
            when_up()
        return proc.wait()
    except (_Stopped, KeyboardInterrupt):
        return 0
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        if proc is not None:
            stop_tree(proc)
        for s, handler in previous.items():
            signal.signal(s, handler)


class _Stopped(Exception):
    pass


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
