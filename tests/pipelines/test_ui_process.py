"""`practicum ui` serves the store and stops whole: a SIGTERM to it (what `kill PID`, `timeout` and process managers send) ends
mlflow and every worker it started, and frees the port; and it starts no GenAI job runner."""

import signal
import socket
import subprocess
import sys
import time
import urllib.request

import psutil

from pipelines.cli import ui_workers
from tests.helpers import free_port


def _wait_up(port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert proc.poll() is None, "practicum ui exited before serving"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError("the UI did not come up")


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_sigterm_to_practicum_ui_leaves_nothing_behind(tracking_uri):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pipelines", "ui", "--port", str(port), "--tracking_uri", tracking_uri],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    tree = []
    try:
        assert f"http://127.0.0.1:{port}" in proc.stdout.readline()
        _wait_up(port, proc)
        tree = psutil.Process(proc.pid).children(recursive=True)
        lines = [" ".join(p.cmdline()) for p in tree]
        assert any("mlflow" in line and " ui " in line for line in lines), lines  # the tree is the server's
        assert not any("huey" in line for line in lines), "the GenAI job runner started"
        # mlflow, uvicorn and its workers (uvicorn runs one worker in its own process)
        assert len(tree) <= 2 + (ui_workers() if ui_workers() > 1 else 0), lines
        proc.send_signal(signal.SIGTERM)  # to practicum ui alone, not to its group
        assert proc.wait(timeout=60) == 0
        _, alive = psutil.wait_procs(tree, timeout=10)
        assert alive == [], [" ".join(p.cmdline()) for p in alive]
        assert not _port_open(port)
    finally:
        for p in [*tree, psutil.Process(proc.pid) if proc.poll() is None else None]:
            try:
                p and p.kill()
            except psutil.NoSuchProcess:
                pass
