"""Does a run's host peak (``mem/host_peak_rss_increase_bytes``) depend on what ran before it in the process?

    python benchmarks/host_peak_order.py [--hidden 50000 400000] [--repeats 4] [--timing 3]

A study's runs share one process. For each pair of toy-MLP widths (SMALL, BIG) this runs, each sequence
in a fresh process (a tiny warm-up run first, as every process pays one-time costs):
SMALL then BIG, BIG then SMALL, and BIG then BIG with 48 MiB held between them (an earlier run's
leftovers). It prints each run's own peak (MiB) in each position and the spread: for one width, the
largest relative difference between its figures across positions and repeats.

``--timing N``: why the peak is measured over the first steps only. A small GPT (2 layers, 128 wide,
block 128, batch 16, 25 steps) in N fresh processes each way, alternating: its median step time as
the pipeline runs it, and with every block of 128 KiB or more freshly mapped for the whole fit.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys, torch
from lightning import Trainer
from pipelines.resources import ResourceMonitor
from tests.pipelines.toy import ToyDataModule, ToyModule

def peak(hidden):
    mon = ResourceMonitor(warmup_steps=1)
    Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            accelerator="cpu", devices=1, max_steps=4, limit_val_batches=0, callbacks=[mon]).fit(
        ToyModule(hidden=hidden), ToyDataModule(n=64, batch_size=8))
    return mon.summary["mem/host_peak_rss_increase_bytes"] / 2**20

peak(1000)
out, held = [], None
for i, hidden in enumerate(json.loads(sys.argv[1])):
    if i and sys.argv[2] == "hold":
        held = torch.ones(12 * 2**20)  # 48 MiB kept between the runs
    out.append(peak(hidden))
print(json.dumps(out))
"""


TIMED = """
import sys
from lightning import Trainer
from pipelines import resources
from pipelines.run import load_experiment
from tests.data import shakespeare_text
from tests.helpers import GPT_CONFIG

if sys.argv[1] == "mapped":  # exact mapping for the whole fit, not only its first steps
    mapped = resources.map_large_blocks
    resources.map_large_blocks = lambda exact: mapped(True)
cli = load_experiment(GPT_CONFIG, [f"--data.init_args.path={shakespeare_text()}", "--data.init_args.max_chars=200000",
                                   "--data.init_args.block_size=128", "--data.init_args.batch_size=16",
                                   "--model.init_args.n_layer=2", "--model.init_args.n_head=4", "--model.init_args.n_embd=128"])
mon = resources.ResourceMonitor(warmup_steps=3)
Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        accelerator="cpu", devices=1, max_steps=25, limit_val_batches=0, callbacks=[mon]).fit(cli.model, cli.datamodule)
print(mon.summary["perf/step_time_s"])
"""


def _child(code: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    if p.returncode:
        raise SystemExit(p.stderr[-3000:])
    return p.stdout.strip().splitlines()[-1]


def sequence(widths: list[int], hold: bool) -> list[float]:
    return json.loads(_child(CHILD, json.dumps(widths), "hold" if hold else "-"))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, nargs=2, default=[50_000, 400_000], metavar=("SMALL", "BIG"))
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--timing", type=int, default=0, metavar="N")
    ns = ap.parse_args()
    small, big = ns.hidden
    figures: dict[int, list[float]] = {small: [], big: []}
    print(f"{'sequence':<28} {'first':>8} {'second':>8}  (MiB, each run's own peak)")
    for r in range(ns.repeats):
        for widths, hold in (([small, big], False), ([big, small], False), ([big, big], True)):
            a, b = sequence(widths, hold)
            figures[widths[0]].append(a)
            figures[widths[1]].append(b)
            name = f"{widths[0]} then {widths[1]}" + (" (48 MiB held)" if hold else "")
            print(f"{name:<28} {a:8.2f} {b:8.2f}")
    for hidden, xs in figures.items():
        if not xs:
            continue
        lo, hi = min(xs), max(xs)
        print(f"hidden {hidden}: {len(xs)} figures, {lo:.2f} .. {hi:.2f} MiB, spread {hi - lo:.2f} MiB "
              f"= {(hi - lo) / hi:.0%} of the largest")
    if ns.timing:
        times: dict[str, list[float]] = {"pipeline": [], "mapped": []}
        for _ in range(ns.timing):
            for how in times:
                times[how].append(float(_child(TIMED, how)) * 1000)
        base = statistics.median(times["pipeline"])
        for how, ms in times.items():
            print(f"small GPT step, {how:<8}: median {statistics.median(ms):6.1f} ms over {len(ms)} processes "
                  f"({statistics.median(ms) / base:.2f}x); {', '.join(f'{t:.1f}' for t in ms)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
