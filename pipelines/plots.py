"""A study's figures, drawn from what its runs logged to MLflow: the primary metric over steps, the
memory ledger beside the measured peaks and throughput, and the scatter pairs the study file asks for."""

from __future__ import annotations

from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pipelines import tracking as trk  # noqa: E402
from pipelines.compare import children, human  # noqa: E402
from pipelines.stats import mean_ci  # noqa: E402

MEMORY_KEYS = ("mem/params_bytes", "mem/grads_bytes", "mem/optimizer_bytes", "mem/activations_bytes")
PEAK_KEYS = ("mem/device_peak_allocated_bytes", "mem/host_peak_rss_bytes")
THROUGHPUT_KEYS = ("perf/tokens_per_s", "perf/samples_per_s")


def study_plots(client: trk.MlflowClient, parent_id: str, primary: str,
                scatter: Sequence[Sequence[str]] = ()) -> dict[str, Any]:
    """Every figure of a study, by file name (they go to the parent run's plots/)."""
    groups: dict[str, list] = {}
    for r in children(client, client.get_run(parent_id)):
        groups.setdefault(r.data.tags.get(trk.TAG_VARIANT, r.info.run_name), []).append(r)
    return {f"{primary.replace('/', '_')}.png": curves_plot(client, groups, primary),
            "memory_throughput.png": memory_throughput_plot(groups),
            **{f"{y.replace('/', '_')}_vs_{x.replace('/', '_')}.png": scatter_plot(groups, x, y) for x, y in scatter}}


def curves_plot(client: trk.MlflowClient, groups: dict[str, list], primary: str):
    """The primary metric over steps per variant: the mean over seeds, a band from min to max."""
    fig, ax = plt.subplots(figsize=(7, 4))
    markers = "osD^vP*X"
    for i, (name, rs) in enumerate(groups.items()):
        curves = [{m.step: m.value for m in client.get_metric_history(r.info.run_id, primary)} for r in rs]
        curves = [c for c in curves if c]
        if not curves:
            continue
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        vals = np.array([[c[t] for t in steps] for c in curves])
        # distinct hollow markers: variants with equal values (two k-NNs) stay visible on top of each other
        (line,) = ax.plot(steps, vals.mean(0), label=f"{name} (n={len(curves)})", marker=markers[i % len(markers)],
                          markevery=max(1, len(steps) // 15), markerfacecolor="none", markersize=5 + 2 * (i % 3))
        if len(curves) > 1 and len(steps) > 1:
            ax.fill_between(steps, vals.min(0), vals.max(0), color=line.get_color(), alpha=0.2, linewidth=0)
        elif len(curves) > 1:  # one evaluation (a fit-once model): its spread as an error bar
            ax.errorbar(steps, vals.mean(0), yerr=[vals.mean(0) - vals.min(0), vals.max(0) - vals.mean(0)],
                        color=line.get_color(), capsize=4, linewidth=1)
    ax.set(xlabel="step", ylabel=primary, title=f"{primary} per variant: mean over seeds, band min-max")
    if ax.lines:
        ax.legend()
    return fig


def memory_throughput_plot(groups: dict[str, list]):
    """The memory ledger, the measured peaks and the throughput per variant (mean; error bars: the
    spread over seeds)."""
    names = list(groups)
    runs = [r for rs in groups.values() for r in rs]

    def stat(key: str, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        vals = [[r.data.metrics[key] / scale for r in groups[n] if key in r.data.metrics] for n in names]
        return (np.array([np.mean(v) if v else 0.0 for v in vals]),
                np.array([np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in vals]))

    # The ledger, the peaks and the throughput each get their own axis: a few-MiB ledger difference
    # (LoRA's optimizer state against full's) must not be a sliver under a GiB-sized RSS.
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.6))
    # The ledger's components side by side on a log axis, each bar labelled: a LoRA run's optimizer
    # state is a few percent of full fine-tuning's, and a logistic regression's KiB sit beside a k-NN's MiB.
    width, logged = 0.8 / len(MEMORY_KEYS), False
    for i, key in enumerate(MEMORY_KEYS):
        mean, _ = stat(key)
        logged |= bool((mean > 0).any())
        x = np.arange(len(names)) + (i - (len(MEMORY_KEYS) - 1) / 2) * width
        bars = ax1.bar(x, np.where(mean > 0, mean, np.nan), width, label=key.split("/")[1].replace("_bytes", ""))
        ax1.bar_label(bars, labels=[human(v, key) if v > 0 else "" for v in mean], fontsize=6, rotation=90,
                      padding=2)
    ax1.set_xticks(np.arange(len(names)), names)
    if logged:  # a log axis needs a positive bar (runs killed before their ledger have none)
        ax1.set_yscale("log")
    ax1.margins(y=0.25)
    ax1.set(ylabel="bytes (log)", title="memory ledger per component (exact bytes)")
    ax1.legend(fontsize=7)
    width = 0.8 / len(PEAK_KEYS)
    for i, key in enumerate(PEAK_KEYS):
        mean, sd = stat(key, 2**20)
        if mean.any():
            x = np.arange(len(names)) + (i - (len(PEAK_KEYS) - 1) / 2) * width
            bars = ax2.bar(x, mean, width, yerr=sd, capsize=3, label=key.split("/")[1].replace("_bytes", ""))
            ax2.bar_label(bars, fmt="%.4g", fontsize=7)
    ax2.set_xticks(np.arange(len(names)), names)
    ax2.set(ylabel="MiB", title="measured peaks")
    if ax2.containers:
        ax2.legend(fontsize=7)
    key = next((k for k in THROUGHPUT_KEYS if any(k in r.data.metrics for r in runs)), THROUGHPUT_KEYS[1])
    mean, sd = stat(key)
    bars = ax3.bar(names, mean, yerr=sd, capsize=3, color="tab:green")
    ax3.bar_label(bars, fmt="%.4g", fontsize=7)
    if (mean > 0).all() and mean.max() / mean.min() > 20:  # a fit-once model beside gradient steps
        ax3.set_yscale("log")
    ax3.set(ylabel=key, title="throughput (error bar: sd over seeds)")
    for a in (ax1, ax2, ax3):
        a.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    return fig


def scatter_plot(groups: dict[str, list], x: str, y: str):
    """Final metrics y against x: a point per run, the variant's mean with 95% intervals on both axes
    (a reward-KL frontier, say)."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name in groups:
        pts = [(r.data.metrics[x], r.data.metrics[y]) for r in groups[name] if x in r.data.metrics
               and y in r.data.metrics]
        if not pts:
            continue
        xs, ys = zip(*pts)
        (mx, hx, _), (my, hy, _) = mean_ci(xs), mean_ci(ys)
        bar = ax.errorbar([mx], [my], xerr=[np.nan_to_num(hx)], yerr=[np.nan_to_num(hy)], fmt="o", capsize=3,
                          label=f"{name} (n={len(pts)})")
        ax.scatter(xs, ys, s=12, alpha=0.4, color=bar[0].get_color())
    ax.set(xlabel=x, ylabel=y, title=f"{y} against {x}")
    if ax.collections:
        ax.legend(title="dots: runs; bars: mean, 95% interval", fontsize=7, title_fontsize=7)
    fig.tight_layout()
    return fig
