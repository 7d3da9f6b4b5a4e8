"""Val loss of the CPU preset against nanoGPT's own training loop, over seeds, on the exact metric.

Run from the repository root (by hand, not part of the tests; about 2 minutes per run on 2 cores):

    .venv/bin/python benchmarks/gpt_nanogpt_parity.py --path ../shared/data/tinyshakespeare.txt \
        [--nanogpt-seeds 1337 1 2] [--pipeline-seeds 1337:1337 1:1337 2:1337 1:1 2:2] [--replay]

Three kinds of run, each trained for 2000 iterations on configs/gpt/shakespeare_char_cpu.yaml's
model and hyper-parameters, each scored on the whole validation split in consecutive windows
(the preset's `val_windows: null`):

* nanogpt SEED: nanoGPT's train.py loop, written out here: `torch.manual_seed(SEED)`, the model
  built from that global RNG, batches drawn by `torch.randint` from the same RNG, `get_lr`,
  AdamW with decay on >= 2-D weights, clipping at 1.0, and `estimate_loss` (20 batches of
  each split every 250 iterations, which also draws from the RNG). Its val estimate at
  iteration 2000 is printed beside the exact figure: that estimate is the number nanoGPT reports.
* pipeline INIT:DATA: `run_experiment` on the preset with `--seed_everything=INIT` and
  `--data.init_args.seed=DATA` (the step-seeded batch stream); the figure is the run's val/loss.
* replay: nanoGPT's loop again, but on the pipeline's batch stream and initial weights (seed
  1337 for both): it must end where the pipeline's 1337:1337 run ends.

Results are printed as JSON lines and appended to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "gpt" / "shakespeare_char_cpu.yaml"
B, T, ITERS, EVAL_INTERVAL, EVAL_ITERS = 12, 64, 2000, 250, 20
MODEL = dict(n_layer=4, n_head=4, n_embd=128, dropout=0.0, bias=False)


def get_lr(it: int, learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, lr_decay_iters=2000) -> float:
    """nanoGPT's train.py schedule."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


class Data:
    """The preset's datamodule (same split and char vocabulary), for the loops outside Lightning."""

    def __init__(self, path: str):
        from datamodules.shakespeare import ShakespeareDataModule

        self.dm = ShakespeareDataModule(corpus="tinyshakespeare", path=path, block_size=T, batch_size=B,
                                        val_windows=None)
        self.dm.setup()
        self.train, self.val = self.dm.train_data, self.dm.val_data

    def model(self):
        from modules.gpt.model import GPT, GPTConfig

        return GPT(GPTConfig(vocab_size=self.dm.tokenizer.vocab_size, block_size=T, **MODEL))

    @torch.no_grad()
    def whole_split(self, model) -> float:
        x, y = self.dm.val_windows_tensor()
        model.eval()
        total = sum(model(x[i : i + 256], y[i : i + 256])[1].item() * len(x[i : i + 256]) for i in range(0, len(x), 256))
        model.train()
        return total / len(x)


def train_loop(data: Data, model, next_batch, estimate=None) -> float | None:
    """nanoGPT's loop body; `estimate()` runs where nanoGPT evaluates. Returns the last estimate."""
    params = list(model.parameters())
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.99))
    last = None
    X, Y = next_batch()
    for it in range(ITERS + 1):
        for g in opt.param_groups:
            g["lr"] = get_lr(it)
        if estimate is not None and it % EVAL_INTERVAL == 0:
            last = estimate()
        if it == ITERS:
            break  # nanoGPT evaluates at max_iters after max_iters updates
        _, loss = model(X, Y)
        X, Y = next_batch()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return last


def nanogpt(data: Data, seed: int) -> dict:
    torch.manual_seed(seed)
    model = data.model()

    def get_batch(split):
        d = data.train if split == "train" else data.val
        ix = torch.randint(len(d) - T, (B,))
        return torch.stack([d[i : i + T] for i in ix]), torch.stack([d[i + 1 : i + 1 + T] for i in ix])

    @torch.no_grad()
    def estimate_loss():
        model.eval()
        out = {s: float(np.mean([model(*get_batch(s))[1].item() for _ in range(EVAL_ITERS)])) for s in ("train", "val")}
        model.train()
        return out["val"]

    est = train_loop(data, model, lambda: get_batch("train"), estimate_loss)
    return {"kind": "nanogpt", "seed": seed, "val_loss_whole_split": data.whole_split(model), "nanogpt_estimate": est}


def replay(data: Data) -> dict:
    """nanoGPT's loop on the pipeline's stream and initial weights (both seed 1337)."""
    import lightning as L

    from datamodules.shakespeare import RandomWindowBatches

    L.seed_everything(1337)  # what the preset's run does before building the model
    model = data.model()
    stream = iter(RandomWindowBatches(data.train, T, B, seed=1337))
    train_loop(data, model, lambda: next(stream))
    return {"kind": "replay", "seed": "1337:1337", "val_loss_whole_split": data.whole_split(model)}


def pipeline(path: str, init: int, data_seed: int, uri: str) -> dict:
    from pipelines.run import run_experiment

    r = run_experiment(CONFIG, [f"--data.init_args.path={path}", f"--seed_everything={init}",
                                f"--data.init_args.seed={data_seed}"],
                       tracking_uri=uri, experiment="gpt-nanogpt-parity", system_metrics=False)
    if r.status != "FINISHED":
        raise SystemExit(f"pipeline run {init}:{data_seed} ended {r.status}: {r.error}")
    return {"kind": "pipeline", "seed": f"{init}:{data_seed}", "val_loss_whole_split": r.metrics["val/loss"],
            "run_id": r.run_id}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--path", required=True, help="tiny Shakespeare (e.g. ../shared/data/tinyshakespeare.txt)")
    ap.add_argument("--nanogpt-seeds", type=int, nargs="*", default=[1337, 1, 2])
    ap.add_argument("--pipeline-seeds", nargs="*", default=["1337:1337", "1:1337", "2:1337", "1:1", "2:2"],
                    help="INIT:DATA pairs")
    ap.add_argument("--replay", action="store_true", help="also replay nanoGPT's loop on the pipeline's stream")
    ap.add_argument("--tracking_uri", default=None, help="default: a temporary SQLite store")
    ap.add_argument("--out", default="gpt_nanogpt_parity.jsonl")
    args = ap.parse_args()

    data = Data(args.path)
    uri = args.tracking_uri or f"sqlite:///{tempfile.mkdtemp(prefix='parity-')}/mlflow.db"
    jobs = [lambda s=s: nanogpt(data, s) for s in args.nanogpt_seeds]
    jobs += [lambda p=p: pipeline(args.path, *map(int, p.split(":")), uri) for p in args.pipeline_seeds]
    if args.replay:
        jobs.append(lambda: replay(data))
    rows = []
    for job in jobs:
        t = time.perf_counter()
        row = {**job(), "wall_s": round(time.perf_counter() - t, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
    for kind in ("nanogpt", "pipeline"):
        v = [r["val_loss_whole_split"] for r in rows if r["kind"] == kind]
        if v:
            print(f"{kind}: n={len(v)} mean {np.mean(v):.4f} min {min(v):.4f} max {max(v):.4f}")


if __name__ == "__main__":
    main()
