"""Wall time of one study run three ways: serially, on two local workers, and on a local 2-CPU Ray
instance; and whether the three tables agree.

Run from the repository root (by hand, not part of the tests), on a quiet machine:

    .venv/bin/python benchmarks/study_workers.py [--study configs/studies/depth-quick.yaml --seeds 0 1 2 3 --max-steps N]

The study (default: depth-quick, 2 variants, here with 4 seeds: 8 CPU runs) is copied with the
given seeds and run by ``practicum study`` in a fresh process per mode, each into its own SQLite
store, every run with one thread (OMP_NUM_THREADS=1): ``--workers 2`` and ``--ray`` then use the two
cores at once. Reported: wall time per mode, its ratio to serial, and the largest difference of any
metric of any run from the serial run at the same (variant, seed), leaving out what measures the
machine rather than the model (time/, perf/, host and device memory, and rates: *_per_s such as
gen/tokens_per_s).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
MODES = {"serial": [], "workers": ["--workers", "2"], "ray": ["--ray"]}


def runs_table(uri: str, name: str):
    from mlflow import MlflowClient

    from pipelines.compare import find_parent, study_table

    client = MlflowClient(uri)
    t = study_table(client, find_parent(client, name)).runs
    return t.sort_values(["variant", "seed"]).reset_index(drop=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--study", default="configs/studies/depth-quick.yaml")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--max-steps", type=int, default=None,
                   help="trainer.max_steps for every run (longer runs: the workers' fixed start-up cost weighs less)")
    ns = p.parse_args()
    src = (ROOT / ns.study).resolve()
    study = yaml.safe_load(src.read_text())
    study.update(seeds=ns.seeds, base=str((src.parent / study["base"]).resolve()))
    if ns.max_steps is not None:
        study["overrides"] = {**study.get("overrides", {}), "trainer.max_steps": ns.max_steps}
    out = Path(tempfile.mkdtemp(prefix="study_workers_"))
    path = out / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    n_runs = len(study["variants"]) * len(ns.seeds)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PRACTICUM_LOG_MODEL": "0",
           "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    walls, tables = {}, {}
    for mode in ns.modes:
        uri = f"sqlite:///{out}/{mode}/mlflow.db"
        cmd = [sys.executable, "-m", "pipelines", "study", str(path), "--tracking_uri", uri, "--no_system_metrics",
               "--log_checkpoint=false", *MODES[mode]]
        started = time.perf_counter()
        res = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True)
        walls[mode] = time.perf_counter() - started
        if res.returncode != 0:
            sys.exit(f"{mode} failed ({res.returncode}):\n{res.stderr[-3000:]}")
        tables[mode] = runs_table(uri, study["name"])
        print(f"{mode:8s} {walls[mode]:7.1f} s", flush=True)

    load = os.getloadavg()
    print(f"\n{study['name']}: {n_runs} runs, {os.cpu_count()} cores, load average at the end "
          f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min)")
    print(f"{'mode':8s} {'wall s':>8s} {'x serial':>9s} {'max |diff| vs serial':>22s}")
    base = tables.get("serial")
    for mode in ns.modes:
        t = tables[mode]
        diff = "-"
        if base is not None:
            cols = [c for c in base.columns if c in t.columns and c != "seed" and base[c].dtype.kind == "f"
                    and not c.startswith(("time/", "perf/", "mem/host", "mem/device")) and not c.endswith("_per_s")]
            diff = f"{max(float(np.nanmax(np.abs(t[c].to_numpy() - base[c].to_numpy()))) for c in cols):.2e}"
        ratio = walls[mode] / walls["serial"] if "serial" in walls else float("nan")
        print(f"{mode:8s} {walls[mode]:8.1f} {ratio:9.2f} {diff:>22s}")
    print(f"\nstores and study file: {out}")


if __name__ == "__main__":
    main()
