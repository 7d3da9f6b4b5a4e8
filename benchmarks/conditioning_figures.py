"""The conditioning study's two figures: each arm's sample grid, and the cross-attention maps.

Run from the repository root after the study (by hand, not part of the tests):

    python benchmarks/conditioning_figures.py conditioning [--seed 0] [--tracking_uri URI]

Reads, from the newest parent run of that study, each arm's run at `--seed` and its artifacts
`samples/final.png` (canvases for 20 fixed prompts, "0 3", "1 4", ..., then "2 0", "9 1", ...;
modules/ldm/module.py) and `attention/maps.png` (cross-attention arms), and writes
docs/images/<study>_samples.png (one panel per arm, with its test accuracy of both halves) and
docs/images/<study>_attention_<arm>.png (each cross-attention arm's maps, as logged).
"""

from __future__ import annotations

import argparse
import shutil
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
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    args = p.parse_args(argv)
    client = MlflowClient(trk.resolve_tracking_uri(args.tracking_uri))
    try:
        runs = children(client, find_parent(client, args.study))
    except StudyNotFound as e:
        raise SystemExit(str(e)) from None
    panels = []
    args.out.mkdir(parents=True, exist_ok=True)
    for r in sorted(runs, key=lambda r: r.data.tags.get(trk.TAG_VARIANT, "")):
        if r.data.tags.get("practicum.seed") != str(args.seed) or r.info.status != "FINISHED":
            continue
        name = r.data.tags.get(trk.TAG_VARIANT, r.info.run_name)
        logged = {f.path for folder in ("samples", "attention") for f in client.list_artifacts(r.info.run_id, folder)}
        if "samples/final.png" not in logged:
            continue
        panels.append((name, client.download_artifacts(r.info.run_id, "samples/final.png"), r.data.metrics))
        if "attention/maps.png" in logged:
            dst = args.out / f"{args.study}_attention_{name}.png"
            shutil.copyfile(client.download_artifacts(r.info.run_id, "attention/maps.png"), dst)
            print(dst)
    if not panels:
        raise SystemExit(f"study {args.study!r}: no finished run at seed {args.seed} with samples/final.png")
    import matplotlib.image as mpimg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.4 * len(panels), 3.8))
    for ax, (name, png, m) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        ax.imshow(mpimg.imread(png), cmap="gray")
        ax.set(title=f"{name}\ntest acc both halves {m.get('test/acc_both', float('nan')):.2f}", xticks=[], yticks=[])
    fig.suptitle(f'{args.study} (seed {args.seed}): prompts "0 3", "1 4", ... row by row')
    fig.tight_layout()
    out = args.out / f"{args.study}_samples.png"
    fig.savefig(out, dpi=100)
    print(out)


if __name__ == "__main__":
    main()
