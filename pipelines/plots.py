"""A study's figures, drawn from what its runs logged to MLflow: the primary metric over steps (with the
report metric, test/X under ``report: test``, at the end), the memory ledger beside the measured peaks
and throughput, and the scatter pairs the study file asks for.

One measure of uncertainty everywhere, as in the tables: the mean over seeds and its 95% t-interval
(`pipelines.stats.mean_ci`), said in each figure's title."""

from __future__ import annotations

from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pipelines import tracking as trk  # noqa: E402
from pipelines.compare import children, human, reported  # noqa: E402
from pipelines.stats import mean_ci  # noqa: E402

MEMORY_KEYS = ("mem/params_bytes", "mem/grads_bytes", "mem/optimizer_bytes", "mem/activations_bytes")
PEAK_KEYS = ("mem/device_peak_allocated_bytes", "mem/host_peak_rss_increase_bytes")  # host: the run's own
THROUGHPUT_KEYS = ("perf/tokens_per_s", "perf/samples_per_s")
CI = "mean over seeds, 95% t-interval"


def study_plots(client: trk.MlflowClient, parent_id: str, primary: str,
                scatter: Sequence[Sequence[str]] = ()) -> dict[str, Any]:
    """Every figure of a study, by file name (they go to the parent run's plots/)."""
    groups: dict[str, list] = {}
    parent = client.get_run(parent_id)
    for r in children(client, parent):
        groups.setdefault(r.data.tags.get(trk.TAG_VARIANT, r.info.run_name), []).append(r)
    report = reported(primary, parent.data.tags.get("practicum.report", "val"))
    return {f"{primary.replace('/', '_')}.png": curves_plot(client, groups, primary, report),
            "memory_throughput.png": memory_throughput_plot(groups),
            **{f"{y.replace('/', '_')}_vs_{x.replace('/', '_')}.png": scatter_plot(groups, x, y) for x, y in scatter}}


def curves_plot(client: trk.MlflowClient, groups: dict[str, list], primary: str, report: str | None = None):
    """The primary metric over steps per variant (mean over seeds, a 95% t-interval band) and, where the
    study reports another metric (test/loss beside val/loss), that one at the last step with its interval:
    the number the verdict is on."""
    fig, ax = plt.subplots(figsize=(7, 4))
    markers = "osD^vP*X"
    last = 0
    for i, (name, rs) in enumerate(groups.items()):
        curves = [{m.step: m.value for m in client.get_metric_history(r.info.run_id, primary)} for r in rs]
        curves = [c for c in curves if c]
        if not curves:
            continue
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        mean, half = ci_per_column(np.array([[c[t] for t in steps] for c in curves]))
        last = max(last, steps[-1])
        # distinct hollow markers: variants with equal values (two k-NNs) stay visible on top of each other
        (line,) = ax.plot(steps, mean, label=f"{name} (n={len(curves)})", marker=markers[i % len(markers)],
                          markevery=max(1, len(steps) // 15), markerfacecolor="none", markersize=5 + 2 * (i % 3))
        if len(curves) > 1 and len(steps) > 1:
            ax.fill_between(steps, mean - half, mean + half, color=line.get_color(), alpha=0.2, linewidth=0)
        elif len(curves) > 1:  # one evaluation (a fit-once model): its interval as an error bar
            ax.errorbar(steps, mean, yerr=half, color=line.get_color(), capsize=4, linewidth=1)
    ends = {}
    if report and report != primary:
        for name, rs in groups.items():
            vals = [r.data.metrics[report] for r in rs if report in r.data.metrics]
            if vals:
                ends[name] = mean_ci(vals)
    for i, (name, (m, h, n)) in enumerate(ends.items()):
        color = next((ln.get_color() for ln in ax.lines if ln.get_label().startswith(f"{name} (")), None)
        ax.errorbar([last * (1.01 + 0.01 * i)], [m], yerr=[np.nan_to_num(h)], fmt="*", markersize=10, capsize=4,
                    color=color, label=f"{name}: {report} at the end (n={n})")
    what = f"{primary} per variant" + (f"; stars: {report} at the end, the verdict's metric" if ends else "")
    ax.set(xlabel="step", ylabel=primary if not ends else f"{primary}, {report}", title=f"{what}\n{CI}")
    if ax.lines:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def ci_per_column(vals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, 95% t-interval half-width) of each column of (runs, steps); a half-width of 0 for one run."""
    stats = [mean_ci(col) for col in vals.T]
    return np.array([m for m, _, _ in stats]), np.nan_to_num(np.array([h for _, h, _ in stats]))


def memory_throughput_plot(groups: dict[str, list]):
    """The memory ledger, the measured peaks and the throughput per variant (mean over seeds; error bars:
    the 95% t-interval)."""
    names = list(groups)
    runs = [r for rs in groups.values() for r in rs]

    def stat(key: str, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        vals = [[r.data.metrics[key] / scale for r in groups[n] if key in r.data.metrics] for n in names]
        stats = [mean_ci(v) if v else (0.0, 0.0, 0) for v in vals]
        return np.array([m for m, _, _ in stats]), np.nan_to_num(np.array([h for _, h, _ in stats]))

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
            label = {"mem/host_peak_rss_increase_bytes": "host RSS above the run's start"}.get(key, key.split("/")[1])
            bars = ax2.bar(x, mean, width, yerr=sd, capsize=3, label=label.replace("_bytes", ""))
            ax2.bar_label(bars, fmt="%.4g", fontsize=7)
    ax2.set_xticks(np.arange(len(names)), names)
    ax2.set(ylabel="MiB", title=f"measured peaks\n{CI}")
    if ax2.containers:
        ax2.legend(fontsize=7)
    key = next((k for k in THROUGHPUT_KEYS if any(k in r.data.metrics for r in runs)), THROUGHPUT_KEYS[1])
    mean, sd = stat(key)
    bars = ax3.bar(names, mean, yerr=sd, capsize=3, color="tab:green")
    ax3.bar_label(bars, fmt="%.4g", fontsize=7)
    if (mean > 0).all() and mean.max() / mean.min() > 20:  # a fit-once model beside gradient steps
        ax3.set_yscale("log")
    ax3.set(ylabel=key, title=f"throughput\n{CI}")
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
    ax.set(xlabel=x, ylabel=y, title=f"{y} against {x}\nbars: {CI}")
    if ax.collections:
        ax.legend(title="dots: runs", fontsize=7, title_fontsize=7)
    fig.tight_layout()
    return fig
