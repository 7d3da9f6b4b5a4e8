"""A server process and everything it starts, as one unit: started in its own session, stopped whole."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path
from typing import Mapping

import psutil

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return f"(no log at {path})"


def start_group(argv: list[str], env: Mapping[str, str], cwd: Path, log: Path) -> subprocess.Popen:
    """``argv`` in a new session (its own process group), output appended to ``log``."""
    with open(log, "ab") as out:
        return subprocess.Popen(argv, env=dict(env), cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def stop_group(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM to ``proc``'s group, SIGKILL to what is left after ``timeout`` s (workers that outlived it too)."""
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
    _signal_group(proc.pid, signal.SIGKILL)
    # A child that moved to a group of its own is still in the tree taken above.
    for child in children:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
