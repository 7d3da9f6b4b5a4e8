"""The figure of the streaming study: loss against stream position, one line per arm (mean over seeds of
the loss in log-spaced position bins, band min-max over seeds), and the cache bytes each arm holds.

Run from the repository root after the study (by hand, not part of the tests):

    python benchmarks/streaming_plot.py streaming [--tracking_uri URI] [--out docs/images/streaming_loss_by_position.png]

Reads the newest parent run of the study and the `stream/by_position.json` artifact of each FINISHED
variant run (per-token losses and cache bytes, written by `StreamingGPTModule`).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
from mlflow import MlflowClient

from pipelines import tracking as trk
from pipelines.compare import StudyNotFound, children, find_parent

ROOT = Path(__file__).resolve().parents[1]


def binned(losses: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Mean loss in each [edges[i], edges[i + 1]) position bin."""
    return np.array([losses[a:b].mean() for a, b in zip(edges[:-1], edges[1:])])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study")
    p.add_argument("--tracking_uri", default=None)
    p.add_argument("--bins", type=int, default=16, help="log-spaced position bins (default 16)")
    p.add_argument("--out", type=Path, default=None, help="default docs/images/<study>_loss_by_position.png")
    args = p.parse_args(argv)
    client = MlflowClient(trk.resolve_tracking_uri(args.tracking_uri))
    try:
        runs = children(client, find_parent(client, args.study))
    except StudyNotFound as e:
        raise SystemExit(str(e)) from None
    losses: dict[str, list[np.ndarray]] = defaultdict(list)
    cache: dict[str, list[np.ndarray]] = defaultdict(list)
    for r in runs:
        if r.info.status != "FINISHED":
            continue
        record = json.loads(Path(client.download_artifacts(r.info.run_id, "stream/by_position.json")).read_text())
        name = r.data.tags.get(trk.TAG_VARIANT)
        losses[name].append(np.array(record["losses"]))
        cache[name].append(np.array(record["cache_bytes"]))
    if not losses:
        raise SystemExit(f"study {args.study!r}: no finished run with a stream/by_position.json artifact")
    n = min(len(v) for runs_ in losses.values() for v in runs_)
    edges = np.unique(np.concatenate([[0], np.geomspace(1, n, args.bins).astype(int)]))
    centres = np.sqrt(np.maximum(edges[:-1], 1) * edges[1:])
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    ax1, ax2 = fig.subplots(1, 2)
    for name in losses:  # the study's variant order
        curves = np.stack([binned(v[:n], edges) for v in losses[name]])  # (seeds, bins)
        line, = ax1.plot(centres, curves.mean(0), marker="o", ms=3, label=f"{name} (n={len(curves)})")
        ax1.fill_between(centres, curves.min(0), curves.max(0), color=line.get_color(), alpha=0.2)
        ax2.plot(np.arange(1, n + 1), np.mean([c[:n] for c in cache[name]], axis=0) / 1024, label=name)
    ax1.set_xscale("log", base=2)
    ax1.set(xlabel="position in the stream (tokens)", ylabel="test cross-entropy (nats/char)",
            title="loss by stream position (log bins)")
    ax2.set_xscale("log", base=2)
    ax2.set_yscale("log", base=2)
    ax2.set(xlabel="tokens streamed", ylabel="KV cache (KiB, all layers)", title="cache held")
    for ax in (ax1, ax2):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{args.study}: mean over seeds, band min-max")
    fig.tight_layout()
    out = args.out or ROOT / "docs" / "images" / f"{args.study.replace('-', '_')}_loss_by_position.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    print(out)


if __name__ == "__main__":
    main()
