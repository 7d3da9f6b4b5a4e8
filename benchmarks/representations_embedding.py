"""One figure of the representations study: the t-SNE of each encoder's test features, coloured by class.

Run from the repository root after the study (by hand, not part of the tests):

    python benchmarks/representations_embedding.py representations [--seed 0] [--out docs/images/representations_tsne.png]

Reads, from the newest parent run of that study in the MLflow store, each variant's run at `--seed`
and its `embedding/tsne.json` (the 2-D t-SNE points the run computed of its own test features; see
modules/contrastive/module.py), and draws one panel per variant with its test probe accuracies.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mlflow import MlflowClient

from pipelines import tracking as trk
from pipelines.compare import StudyNotFound, children, find_parent

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tracking_uri", default=None)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "representations_tsne.png")
    args = p.parse_args(argv)
    client = MlflowClient(trk.resolve_tracking_uri(args.tracking_uri))
    try:
        runs = children(client, find_parent(client, args.study))
    except StudyNotFound as e:
        raise SystemExit(str(e)) from None
    panels = []
    for r in sorted(runs, key=lambda r: r.data.tags.get(trk.TAG_VARIANT, "")):
        if r.data.tags.get("practicum.seed") != str(args.seed) or r.info.status != "FINISHED":
            continue
        points = json.loads(Path(client.download_artifacts(r.info.run_id, "embedding/tsne.json")).read_text())
        panels.append((r.data.tags.get(trk.TAG_VARIANT, r.info.run_name), points, r.data.metrics))
    if not panels:
        raise SystemExit(f"study {args.study!r}: no run at seed {args.seed} with embedding/tsne.json")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.2 * len(panels), 3.6))
    for ax, (name, pts, m) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        xy = list(zip(*pts["xy"]))
        ax.scatter(xy[0], xy[1], c=pts["label"], cmap="tab10", s=4)
        acc = " / ".join(f"{m.get(f'test/probe_acc_{k}pct', float('nan')):.2f}" for k in ("1", "10", "100"))
        ax.set(title=f"{name}\nprobe 1/10/100%: {acc}", xticks=[], yticks=[])
    fig.suptitle(f"{args.study}: t-SNE of the test features (seed {args.seed}), coloured by digit")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    print(args.out)


if __name__ == "__main__":
    main()
