"""Processes and memory of `practicum ui`, and what is left of it after one SIGTERM.

    python benchmarks/ui_footprint.py [--repo /path/to/a/checkout] [--store sqlite:///...]

Starts ``python -m pipelines ui`` from ``--repo`` (default: this checkout) on a fresh SQLite store,
waits for /health, counts the process tree and sums its RSS (psutil), sends SIGTERM to
`practicum ui` alone (as ``kill PID`` does), waits up to 60 s for it to exit, and reports how many
of those processes are alive 15 s after the signal and whether the port still answers. Leftovers are killed before it exits.
Run it once on the old checkout and once on the new one to compare.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

from server.process import free_port


def measure(repo: Path, store: str) -> dict:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(repo)}
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "pipelines", "ui", "--port", str(port), "--tracking_uri", store],
                            cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() - t0 > 300:
                raise SystemExit("practicum ui did not come up")
            time.sleep(0.5)
    up_s = time.monotonic() - t0
    time.sleep(5)  # workers and the job runner start after /health first answers
    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    rss = sum(p.memory_info().rss for p in tree if p.is_running())
    names = sorted(" ".join(p.cmdline()[1:4]) for p in tree)
    proc.send_signal(signal.SIGTERM)
    t1 = time.monotonic()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    stop_s = time.monotonic() - t1
    time.sleep(max(0.0, 15 - stop_s))  # then give what was left behind a chance to go away by itself
    alive = [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    with socket.socket() as s:
        port_answers = s.connect_ex(("127.0.0.1", port)) == 0
    for p in alive:
        p.kill()
    proc.wait()
    return {"up_s": up_s, "stop_s": stop_s, "processes": len(tree), "rss_mib": rss / 2**20, "kinds": names,
            "left_after_sigterm": len(alive), "port_answers_after_sigterm": port_answers}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1])
    p.add_argument("--store", help="tracking URI (default: a new SQLite store in a temporary folder)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        r = measure(a.repo.resolve(), a.store or f"sqlite:///{tmp}/mlflow.db")
    print(f"repo {a.repo}: up in {r['up_s']:.1f} s; {r['processes']} processes, RSS {r['rss_mib']:.0f} MiB; "
          f"SIGTERM: practicum ui gone after {r['stop_s']:.1f} s, {r['left_after_sigterm']} processes left, port answers: {r['port_answers_after_sigterm']}")
    for k in r["kinds"]:
        print("   ", k)


if __name__ == "__main__":
    main()
