"""The tabular study on every data set: one study per data set, generated from configs/studies/tabular.yaml.

The study file describes one data set (its base configs name breast_cancer). This script writes
one copy per data set, changing only the study's name (tabular-<dataset>) and adding the override
data.init_args.dataset=<dataset> for every variant, runs each with `practicum study`'s own
`run_study`, and prints each table and verdict with its wall time. Run from the repository root,
by hand (about an hour on 2 busy cores for all six):

    nice -n 10 python benchmarks/tabular_study.py [--datasets wine iris] [--tracking_uri sqlite:///mlruns/mlflow.db]
    python benchmarks/tabular_study.py --study configs/studies/tabular-quick.yaml --datasets iris   # any base
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import yaml

from pipelines.tables import render
from pipelines.study import run_study

DATASETS = ["wine", "breast_cancer", "iris", "diabetes", "digits", "synthetic"]


def study_for(base: Path, dataset: str, folder: Path) -> Path:
    """`base` as the study of one data set, written into `folder` (config paths made absolute)."""
    raw = yaml.safe_load(base.read_text())
    raw["name"] = f"{raw['name']}-{dataset}"
    raw["base"] = str((base.parent / raw["base"]).resolve())
    for v in raw["variants"].values():
        if v and "base" in v:
            v["base"] = str((base.parent / v["base"]).resolve())
    raw["overrides"] = {**(raw.get("overrides") or {}), "data.init_args.dataset": dataset}
    path = folder / f"{raw['name']}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", default="configs/studies/tabular.yaml")
    ap.add_argument("--datasets", nargs="+", default=DATASETS)
    ap.add_argument("--tracking_uri")
    ap.add_argument("--variants", nargs="+", help="run only these variants (as practicum study --variants)")
    args = ap.parse_args()
    total = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for dataset in args.datasets:
            t0 = time.perf_counter()
            parent, table = run_study(study_for(Path(args.study), dataset, Path(tmp)), (), args.tracking_uri,
                                      only=args.variants, system_metrics=False)
            print(f"\n## {dataset} (parent run {parent}, {time.perf_counter() - t0:.0f} s)\n\n{render(table, 'table')}"
                  f"\n\nverdict: {table.verdict_line()}", flush=True)
    print(f"\nall data sets: {time.perf_counter() - total:.0f} s")


if __name__ == "__main__":
    main()
