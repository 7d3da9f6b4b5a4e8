"""Paired verdicts between any two variants of a finished study, and the gradient-norm-against-depth figure.

A study's table compares every variant with one baseline; the depth and normalisation bars compare
other pairs too (residual-20 against residual-2, batchnorm at batch 4 against batch 64). This reads
the study's runs from MLflow (nothing is re-run) and applies the same paired t-interval per seed
(`pipelines.stats`). Run by hand, never by the test suite:

    python benchmarks/depth_contrasts.py depth-vs-residual --pairs plain-10:plain-2 residual-20:residual-2 \
        --metrics train/loss_epoch --figure depth_grad_norms.png
    python benchmarks/depth_contrasts.py norm-layers --pairs batch-b4:batch-b64 layer-b4:layer-b64 --metrics test/acc
"""

from __future__ import annotations

import argparse

import numpy as np
from mlflow.tracking import MlflowClient

from pipelines import stats as st
from pipelines import tracking as trk
from pipelines.compare import children, find_parent, run_rows


def contrasts(runs, pairs: list[tuple[str, str]], metrics: list[str]) -> list[dict]:
    out = []
    for a, b in pairs:
        for m in metrics:
            ga, gb = (runs[(runs.variant == v) & (runs.status == "FINISHED")] for v in (a, b))
            d, half, n = st.paired_difference(dict(zip(ga.seed, ga[m])), dict(zip(gb.seed, gb[m])))
            out.append({"variant": a, "against": b, "metric": m, "n_pairs": n, "difference": d, "±": half,
                        "verdict": st.verdict(d, half, st.mode_of(m))})
    return out


def grad_figure(client: MlflowClient, parent, path: str) -> None:
    """Per variant: the weight-gradient norm of each block (geometric mean over logged steps and seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_variant: dict[str, list[np.ndarray]] = {}
    for r in children(client, parent):
        keys = sorted(k for k in r.data.metrics if k.startswith("grad_norm/layer_"))
        if not keys:
            continue
        layers = [np.mean(np.log([m.value for m in client.get_metric_history(r.info.run_id, k)])) for k in keys]
        per_variant.setdefault(r.data.tags.get(trk.TAG_VARIANT), []).append(np.array(layers))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rows in per_variant.items():
        g = np.exp(np.mean(rows, axis=0))
        ax.semilogy(np.arange(1, len(g) + 1), g, marker="o", ms=3, label=f"{name} (n={len(rows)})",
                    linestyle="--" if "residual" in name else "-")
    ax.set(xlabel="block (1 = nearest the input)", ylabel="weight-gradient L2 norm",
           title=f"{parent.data.tags.get(trk.TAG_STUDY)}: gradient norm against depth")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("study")
    p.add_argument("--pairs", nargs="+", required=True, help="VARIANT:AGAINST, paired by seed")
    p.add_argument("--metrics", nargs="+", default=["train/loss_epoch"])
    p.add_argument("--figure", help="write the gradient-norm-against-depth figure here")
    p.add_argument("--tracking_uri")
    a = p.parse_args()
    client = MlflowClient(trk.resolve_tracking_uri(a.tracking_uri))
    parent = find_parent(client, a.study)
    runs = run_rows(client, parent)
    pairs = [tuple(x.split(":")) for x in a.pairs]
    bad = [v for pair in pairs for v in pair if v not in set(runs.variant)]
    if bad or any(len(pair) != 2 for pair in pairs):
        raise SystemExit(f"--pairs takes VARIANT:AGAINST from {sorted(set(runs.variant))}; unknown: {bad}")
    import pandas as pd

    print(f"study {a.study} (parent run {parent.info.run_id}): paired difference variant - against, 95% t-interval")
    print(pd.DataFrame(contrasts(runs, pairs, a.metrics)).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if a.figure:
        grad_figure(client, parent, a.figure)
        print(f"figure: {a.figure}")


if __name__ == "__main__":
    main()
