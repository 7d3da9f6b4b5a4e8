"""Val loss of the CPU preset against nanoGPT's own training loop, over seeds, on the exact metric.

Run from the repository root (by hand, not part of the tests). nanoGPT is not part of this
project: pass a checkout of github.com/karpathy/nanoGPT with --nanogpt (its model.py builds the
nanoGPT side, its train.py is run for --check-train-py):

    .venv/bin/python benchmarks/gpt_nanogpt_parity.py --path ../shared/data/tinyshakespeare.txt \
        --nanogpt ../nanoGPT --threads 1 [--check-train-py] \
        [--nanogpt-seeds 1337 1 2 3 4] [--stream-seeds 1337:1337 1:1 2:2 3:3 4:4] \
        [--pipeline-seeds 1337:1337 ...] [--check-stream 1337 1]

Each run trains configs/gpt/shakespeare_char_cpu.yaml's model and hyper-parameters (nanoGPT's
"I only have a macbook" command) for 2000 iterations and is scored on the whole validation split
in consecutive windows (the preset's `val_windows: null`). Kinds of run:

* nanogpt SEED: nanoGPT's train.py loop, written out here: `torch.manual_seed(SEED)`, nanoGPT's
  model.py `GPT` (ours without --nanogpt) built from that global RNG, its `configure_optimizers`,
  batches drawn by `torch.randint` from the same RNG, `get_lr`, clipping at 1.0, and
  `estimate_loss` (20 batches of each split every 250 iterations, which also draws from the
  RNG). Its val estimate at iteration 2000 is printed beside the exact figure: that estimate is
  the number nanoGPT reports. train.py itself fixes the seed at 1337; --check-train-py runs it
  for a few iterations and checks that this loop ends on its weights.
* stream INIT:DATA: the same loop body on the pipeline's batch stream
  (`RandomWindowBatches(seed=DATA)`) from the pipeline's initial weights (`seed_everything(INIT)`),
  without the pipeline's periodic validation. This is what the pipeline computes: the
  pipeline's training step equals this loop's (tests/modules/gpt/test_gpt_module.py), and
  1337:1337 ends at the pipeline run's val loss to 1e-8. It is ~1.5x cheaper than a pipeline run,
  which scores the whole split at every one of its 8 validations.
* pipeline INIT:DATA: `run_experiment` on the preset with `--seed_everything=INIT` and
  `--data.init_args.seed=DATA`; the figure is the run's val/loss.

With the same seed, nanogpt S and stream S:S start from the same weights (both seed torch's
global RNG and build the model first), so their difference is the batch order alone; the
summary gives the paired difference with its 95% t-interval. Results are printed as JSON lines
and appended to --out.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "gpt" / "shakespeare_char_cpu.yaml"
B, T, ITERS, EVAL_INTERVAL, EVAL_ITERS = 12, 64, 2000, 250, 20
MODEL = dict(n_layer=4, n_head=4, n_embd=128, dropout=0.0, bias=False)
# nanoGPT README, "I only have a macbook": the run this preset reproduces
MACBOOK = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
           "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
           "--n_embd=128", "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0"]


def get_lr(it: int, learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, lr_decay_iters=2000) -> float:
    """nanoGPT's train.py schedule."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


def load_nanogpt_model(checkout: str):
    """nanoGPT's model.py module, imported from a checkout (never copied into this project)."""
    path = Path(checkout).expanduser() / "model.py"
    if not path.is_file():
        raise SystemExit(f"--nanogpt {checkout}: no model.py there; pass a checkout of github.com/karpathy/nanoGPT")
    spec = importlib.util.spec_from_file_location("nanogpt_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Data:
    """The preset's datamodule (same split and char vocabulary), for the loops outside Lightning."""

    def __init__(self, path: str, nanogpt: str | None = None):
        from datamodules.shakespeare import ShakespeareDataModule

        self.dm = ShakespeareDataModule(corpus="tinyshakespeare", path=path, block_size=T, batch_size=B,
                                        val_windows=None)
        self.dm.setup()
        self.train, self.val = self.dm.train_data, self.dm.val_data
        self.nanogpt = load_nanogpt_model(nanogpt) if nanogpt else None

    def model(self):
        from modules.gpt.model import GPT, GPTConfig

        return GPT(GPTConfig(vocab_size=self.dm.tokenizer.vocab_size, block_size=T, **MODEL))

    def nanogpt_model(self):
        """nanoGPT's GPT and its own optimizer when a checkout was given, else ours, set up alike."""
        if self.nanogpt is None:
            model = self.model()
            ps = list(model.parameters())
            return model, torch.optim.AdamW([{"params": [p for p in ps if p.dim() >= 2], "weight_decay": 0.1},
                                             {"params": [p for p in ps if p.dim() < 2], "weight_decay": 0.0}],
                                            lr=1e-3, betas=(0.9, 0.99))
        cfg = self.nanogpt.GPTConfig(vocab_size=self.dm.tokenizer.vocab_size, block_size=T, **MODEL)
        model = self.nanogpt.GPT(cfg)
        return model, model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")

    @torch.no_grad()
    def whole_split(self, model) -> float:
        x, y = self.dm.val_windows_tensor()
        model.eval()
        total = sum(model(x[i : i + 256], y[i : i + 256])[1].item() * len(x[i : i + 256]) for i in range(0, len(x), 256))
        model.train()
        return total / len(x)


def train_loop(model, opt, next_batch, estimate=None, iters=ITERS, eval_interval=EVAL_INTERVAL) -> float | None:
    """nanoGPT's loop body; `estimate()` runs where nanoGPT evaluates. Returns the last estimate."""
    last = None
    X, Y = next_batch()
    for it in range(iters + 1):
        for g in opt.param_groups:
            g["lr"] = get_lr(it)
        if estimate is not None and it % eval_interval == 0:
            last = estimate()
        if it == iters:
            break  # nanoGPT evaluates (and checkpoints) at max_iters after max_iters updates
        _, loss = model(X, Y)
        X, Y = next_batch()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return last


def nanogpt_run(data: Data, seed: int, iters=ITERS, eval_interval=EVAL_INTERVAL):
    """(model, last val estimate) of nanoGPT's loop at `seed`."""
    torch.manual_seed(seed)
    model, opt = data.nanogpt_model()

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

    est = train_loop(model, opt, lambda: get_batch("train"), estimate_loss, iters, eval_interval)
    return model, est


def nanogpt(data: Data, seed: int) -> dict:
    model, est = nanogpt_run(data, seed)
    return {"kind": "nanogpt", "seed": seed, "model_py": "nanoGPT" if data.nanogpt else "ours",
            "val_loss_whole_split": data.whole_split(model), "nanogpt_estimate": est}


def stream(data: Data, init: int, data_seed: int) -> dict:
    """nanoGPT's loop on the pipeline's batch stream from the pipeline's initial weights."""
    import lightning as L

    from datamodules.shakespeare import RandomWindowBatches

    L.seed_everything(init, verbose=False)  # what the preset's run does before building the model
    model = data.model()
    ps = list(model.parameters())
    opt = torch.optim.AdamW([{"params": [p for p in ps if p.dim() >= 2], "weight_decay": 0.1},
                             {"params": [p for p in ps if p.dim() < 2], "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.99))
    batches = iter(RandomWindowBatches(data.train, T, B, seed=data_seed))
    train_loop(model, opt, lambda: next(batches))
    return {"kind": "stream", "seed": f"{init}:{data_seed}", "val_loss_whole_split": data.whole_split(model)}


def pipeline(path: str, init: int, data_seed: int, uri: str) -> dict:
    from pipelines.run import run_experiment

    r = run_experiment(CONFIG, [f"--data.init_args.path={path}", f"--seed_everything={init}",
                                f"--data.init_args.seed={data_seed}"],
                       tracking_uri=uri, experiment="gpt-nanogpt-parity", system_metrics=False)
    if r.status != "FINISHED":
        raise SystemExit(f"pipeline run {init}:{data_seed} ended {r.status}: {r.error}")
    return {"kind": "pipeline", "seed": f"{init}:{data_seed}", "val_loss_whole_split": r.metrics["val/loss"],
            "run_id": r.run_id}


def check_train_py(data: Data, checkout: str, text: str, iters: int = 20, eval_interval: int = 10) -> dict:
    """Run nanoGPT's own prepare.py and train.py (the macbook command, `iters` iterations, seed
    1337) in a scratch copy of the checkout and compare its checkpoint with the loop above."""
    src = Path(checkout).expanduser()
    with tempfile.TemporaryDirectory(prefix="nanogpt-") as tmp:
        work = Path(tmp)
        for rel in ("train.py", "model.py", "configurator.py", "config/train_shakespeare_char.py",
                    "data/shakespeare_char/prepare.py"):
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src / rel, work / rel)
        shutil.copy(text, work / "data/shakespeare_char/input.txt")  # prepare.py downloads only without it
        subprocess.run([sys.executable, "data/shakespeare_char/prepare.py"], cwd=work, check=True, capture_output=True)
        args = [a for a in MACBOOK if not a.startswith("--max_iters")]
        args += [f"--max_iters={iters}", f"--eval_interval={eval_interval}", "--always_save_checkpoint=True",
                 "--out_dir=out"]
        subprocess.run([sys.executable, "train.py", *args], cwd=work, check=True, capture_output=True)
        ckpt = torch.load(work / "out" / "ckpt.pt", map_location="cpu", weights_only=False)
    if ckpt["iter_num"] != iters:
        raise SystemExit(f"train.py's checkpoint is from iteration {ckpt['iter_num']}, expected {iters}")
    model, _ = nanogpt_run(data, 1337, iters, eval_interval)
    ours = model.state_dict()
    diff = max((ckpt["model"][k] - v).abs().max().item() for k, v in ours.items())
    moved = max((ckpt["model"][k] - v).abs().max().item() for k, v in _initial(data).items())
    return {"kind": "check_train_py", "iters": iters, "max_abs_weight_diff": diff,
            "max_abs_weight_moved_by_training": moved}


def check_stream(data: Data, seed: int) -> dict:
    """Window starts of 2000 steps of the pipeline's stream (seed `seed`) against 2000 steps of
    nanoGPT's global-RNG draws (`torch.manual_seed(seed)`): uniformity, agreement, lag-1 correlation."""
    from scipy import stats as sps

    from datamodules.shakespeare import RandomWindowBatches

    n = len(data.train)
    s = RandomWindowBatches(torch.arange(n), T, B, seed)
    ix = {"stream": np.concatenate([s.batch(k)[0][:, 0].numpy() for k in range(ITERS)])}
    torch.manual_seed(seed)
    ix["global"] = torch.randint(n - T, (ITERS * B,)).numpy()
    row = {"kind": "check_stream", "seed": seed, "ks_p": round(float(sps.ks_2samp(ix["stream"], ix["global"]).pvalue), 3)}
    for name, v in ix.items():
        hist = np.histogram(v, bins=100, range=(0, n - T))[0]
        means = v.reshape(ITERS, B).mean(1)
        row[f"{name}_chi2_p"] = round(float(sps.chisquare(hist).pvalue), 3)
        row[f"{name}_lag1_r"] = round(float(np.corrcoef(means[:-1], means[1:])[0, 1]), 4)
    return row


def _initial(data: Data) -> dict:
    torch.manual_seed(1337)
    return data.nanogpt_model()[0].state_dict()


def summary(rows: list[dict]) -> None:
    from pipelines.stats import mean_ci, paired_difference

    by_kind: dict[str, dict] = {}
    for r in rows:
        if "val_loss_whole_split" in r:
            seed = str(r["seed"]).split(":")[0]  # the init seed: nanogpt S pairs with stream S:S
            by_kind.setdefault(r["kind"], {})[seed] = r["val_loss_whole_split"]
    for kind, vals in by_kind.items():
        mean, half, n = mean_ci(vals.values())
        v = list(vals.values())
        print(f"{kind}: n={n} mean {mean:.4f} ± {half:.4f} (95% t), sd {np.std(v, ddof=1) if n > 1 else float('nan'):.4f},"
              f" min {min(v):.4f} max {max(v):.4f}")
    for kind in ("stream", "pipeline"):
        if kind in by_kind and "nanogpt" in by_kind:
            d, half, n = paired_difference(by_kind[kind], by_kind["nanogpt"])
            print(f"{kind} - nanogpt, paired by init seed: {d:+.4f} ± {half:.4f} (95% t, n={n})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--path", required=True, help="tiny Shakespeare (e.g. ../shared/data/tinyshakespeare.txt)")
    ap.add_argument("--nanogpt", default=None, help="a checkout of github.com/karpathy/nanoGPT (its model.py, train.py)")
    ap.add_argument("--check-train-py", action="store_true", help="run nanoGPT's train.py briefly against the loop here")
    ap.add_argument("--check-stream", type=int, nargs="*", default=[], metavar="SEED",
                    help="compare the window starts of the pipeline's stream and nanoGPT's draws")
    ap.add_argument("--nanogpt-seeds", type=int, nargs="*", default=[])
    ap.add_argument("--stream-seeds", nargs="*", default=[], help="INIT:DATA pairs")
    ap.add_argument("--pipeline-seeds", nargs="*", default=[], help="INIT:DATA pairs")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 on a shared machine)")
    ap.add_argument("--tracking_uri", default=None, help="default: a temporary SQLite store")
    ap.add_argument("--out", default="gpt_nanogpt_parity.jsonl")
    ap.add_argument("--summarize", action="store_true", help="only print the summary of the rows in --out")
    args = ap.parse_args()

    if args.summarize:
        summary([json.loads(line) for line in Path(args.out).read_text().splitlines() if line.strip()])
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.check_train_py and not args.nanogpt:
        raise SystemExit("--check-train-py needs --nanogpt (a checkout of github.com/karpathy/nanoGPT)")
    data = Data(args.path, args.nanogpt)
    uri = args.tracking_uri or f"sqlite:///{tempfile.mkdtemp(prefix='parity-')}/mlflow.db"
    jobs = [lambda: check_train_py(data, args.nanogpt, args.path)] if args.check_train_py else []
    jobs += [lambda s=s: check_stream(data, s) for s in args.check_stream]
    jobs += [lambda s=s: nanogpt(data, s) for s in args.nanogpt_seeds]
    jobs += [lambda p=p: stream(data, *map(int, p.split(":"))) for p in args.stream_seeds]
    jobs += [lambda p=p: pipeline(args.path, *map(int, p.split(":")), uri) for p in args.pipeline_seeds]
    rows = []
    for job in jobs:
        t = time.perf_counter()
        row = {**job(), "wall_s": round(time.perf_counter() - t, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
    summary(rows)


if __name__ == "__main__":
    main()
