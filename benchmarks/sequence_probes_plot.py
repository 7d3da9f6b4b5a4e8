"""One figure of a study with SequenceProbes (rnn-vs-transformer, rnn-quick): test loss by context
octave and the gradient norm through time, per variant, mean over seeds (min-max as error bars).

Run from the repository root after the study (by hand, not part of the tests):

    python benchmarks/sequence_probes_plot.py rnn-vs-transformer [--out docs/images/rnn_vs_transformer_probes.png]

Reads the newest parent run of the study and its FINISHED variant runs' metrics test/loss_ctx{a}to{b}
and grad_time/d{d} (modules/rnn/probes.py).
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
from mlflow import MlflowClient

from pipelines import tracking as trk
from pipelines.compare import StudyNotFound, children, find_parent

ROOT = Path(__file__).resolve().parents[1]
CTX = re.compile(r"^test/loss_ctx(\d+)to(\d+)$")
GRAD = re.compile(r"^grad_time/d(\d+)$")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study")
    p.add_argument("--tracking_uri", default=None)
    p.add_argument("--variants", nargs="*", default=None, help="only these variants (default: all)")
    p.add_argument("--out", type=Path, default=None, help="default docs/images/<study>_probes.png")
    args = p.parse_args(argv)
    client = MlflowClient(trk.resolve_tracking_uri(args.tracking_uri))
    try:
        runs = children(client, find_parent(client, args.study))
    except StudyNotFound as e:
        raise SystemExit(str(e)) from None
    ctx: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    grad: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        name = r.data.tags.get(trk.TAG_VARIANT)
        if r.info.status != "FINISHED" or (args.variants and name not in args.variants):
            continue
        for k, v in r.data.metrics.items():
            if m := CTX.match(k):
                ctx[name][int(m.group(2))].append(v)  # x: the octave's longest context
            elif m := GRAD.match(k):
                grad[name][int(m.group(1))].append(v)
    if not ctx:
        raise SystemExit(f"study {args.study!r}: no finished run with test/loss_ctx* metrics")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    ax1, ax2 = fig.subplots(1, 2)
    for ax, data, ylabel in ((ax1, ctx, "test cross-entropy"), (ax2, grad, "||dL_T/de_(T-d)|| / ||dL_T/de_T||")):
        for name in sorted(data):
            xs = sorted(data[name])
            vals = [np.array(data[name][x]) for x in xs]
            mean = np.array([v.mean() for v in vals])
            err = np.array([[m - v.min() for m, v in zip(mean, vals)], [v.max() - m for m, v in zip(mean, vals)]])
            ax.errorbar(xs, mean, yerr=err, marker="o", capsize=2, label=f"{name} (n={len(vals[0])})")
        ax.set_xscale("log", base=2)
        ax.set(ylabel=ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    ax1.set(xlabel="tokens of context (octave's upper end)", title="test loss by position in the window")
    ax2.set_yscale("log")
    ax2.set(xlabel="steps back d", title="gradient norm through time (after training)")
    fig.suptitle(f"{args.study}: mean over seeds, bars min-max")
    fig.tight_layout()
    out = args.out or ROOT / "docs" / "images" / f"{args.study.replace('-', '_')}_probes.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    print(out)


if __name__ == "__main__":
    main()
