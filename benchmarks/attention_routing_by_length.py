"""Exact match and per-token accuracy by source length (1 to 32) for every arm of an attention-routing
study, from its runs' checkpoints: the curve behind the study's length buckets, down to the short
strings where the pooled bottleneck still works. Optionally copies the attention maps to docs/images.

Run from the repository root after the study (by hand, not part of the tests):

    python benchmarks/attention_routing_by_length.py attention-routing [--maps] [--tracking_uri URI]

Reads the newest parent run of the study and its FINISHED runs' `checkpoints/best.ckpt`; scores each
on `--per_length` fresh strings of every length (seed `--seed`, apart from the training and test
splits' seeds) of the run's own task, under teacher forcing (exact match = greedy decoding's,
`modules.seq2seq.model.exact_match`). Mean over seeds, bars min-max.
"""

from __future__ import annotations

import argparse
import os
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from mlflow import MlflowClient

from datamodules.seq2seq import TaskSet, collate
from modules.seq2seq.model import exact_match
from modules.seq2seq.module import Seq2SeqModule
from pipelines import tracking as trk
from pipelines.compare import StudyNotFound, children, find_parent

ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def by_length(module: Seq2SeqModule, task: str, lengths: list[int], per_length: int, seed: int
              ) -> tuple[list[float], list[float]]:
    """(exact match, token accuracy incl. EOS) at each length."""
    em, tok = [], []
    model = module.model.eval()
    for n in lengths:
        g = torch.Generator().manual_seed(seed + n)
        data = TaskSet(task, torch.full((per_length,), n), model.vocab.n_symbols, g)
        b = collate([data[i] for i in range(len(data))], model.vocab.pad)
        logits, targets = model(b["src"], b["src_len"], b["tgt"], b["tgt_len"])
        scored = targets >= 0
        em.append(exact_match(logits, targets).float().mean().item())
        tok.append(((logits.argmax(-1) == targets) & scored).sum().item() / scored.sum().item())
    return em, tok


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study")
    p.add_argument("--tracking_uri", default=None)
    p.add_argument("--max_length", type=int, default=32)
    p.add_argument("--per_length", type=int, default=64)
    p.add_argument("--seed", type=int, default=12345)
    p.add_argument("--maps", action="store_true", help="copy the first seed's attention maps to docs/images")
    p.add_argument("--out", type=Path, default=None, help="default docs/images/<study>_by_length.png")
    args = p.parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    client = MlflowClient(trk.resolve_tracking_uri(args.tracking_uri))
    try:
        runs = children(client, find_parent(client, args.study))
    except StudyNotFound as e:
        raise SystemExit(str(e)) from None
    lengths = list(range(1, args.max_length + 1))
    curves: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    images = ROOT / "docs" / "images"
    for r in sorted(runs, key=lambda r: r.data.tags.get(trk.TAG_VARIANT, "")):
        variant = r.data.tags.get(trk.TAG_VARIANT)
        if r.info.status != "FINISHED":
            continue
        module = Seq2SeqModule.load_from_checkpoint(client.download_artifacts(r.info.run_id, "checkpoints/best.ckpt"),
                                                    map_location="cpu")
        em, tok = by_length(module, r.data.params["data.init_args.task"], lengths, args.per_length, args.seed)
        curves[variant]["em"].append(em)
        curves[variant]["tok"].append(tok)
        print(f"{variant} seed={r.data.tags.get('practicum.seed')}: exact match "
              + " ".join(f"{n}:{e:.2f}" for n, e in zip(lengths, em) if n in (4, 8, 12, 16, 20, 24, 32)))
        if args.maps and len(curves[variant]["em"]) == 1 and not variant.startswith("pooled"):
            for art in client.list_artifacts(r.info.run_id, "attention"):
                name = f"{args.study.replace('-', '_')}_{variant.replace('-', '_')}_{Path(art.path).stem}.png"
                shutil.copy(client.download_artifacts(r.info.run_id, art.path), images / name)
                print(images / name)
    if not curves:
        raise SystemExit(f"study {args.study!r}: no finished run")
    for variant, c in sorted(curves.items()):  # the means the figure plots, every length
        for key in ("em", "tok"):
            print(f"{variant} {key} by length: " + " ".join(f"{v:.2f}" for v in np.mean(c[key], axis=0)))
    from matplotlib.figure import Figure

    tasks = sorted({v.split("-")[-1] for v in curves})
    fig = Figure(figsize=(10, 3.4 * len(tasks)))
    axes = np.atleast_2d(fig.subplots(len(tasks), 2))
    for row, task in zip(axes, tasks):
        for ax, key, label in ((row[0], "em", "exact match"), (row[1], "tok", "token accuracy")):
            for variant in sorted(v for v in curves if v.endswith(task)):
                vals = np.array(curves[variant][key])  # (seeds, lengths)
                mean = vals.mean(0)
                err = np.stack([mean - vals.min(0), vals.max(0) - mean]).clip(min=0)
                ax.errorbar(lengths, mean, yerr=err, marker="o", ms=3, capsize=2,
                            label=f"{variant.removesuffix('-' + task)} (n={len(vals)})")
            ax.axvspan(0.5, 16.5, color="0.9", zorder=0)
            ax.set(xlabel="source length (shaded: training lengths)", ylabel=label, ylim=(-0.02, 1.02),
                   title=f"{task}: {label} by length")
            ax.legend(fontsize=7)
    fig.suptitle(f"{args.study}: mean over seeds, bars min-max ({args.per_length} strings per length)")
    fig.tight_layout()
    out = args.out or images / f"{args.study.replace('-', '_')}_by_length.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    print(out)


if __name__ == "__main__":
    main()
