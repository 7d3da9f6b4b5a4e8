"""Time to a target validation loss: nanoGPT's CPU recipe against the mini-GPT speedrun preset.

Run from the repository root (by hand, not part of the tests). nanoGPT is not part of this project:
pass a checkout of github.com/karpathy/nanoGPT, whose model.py and optimizer groups build its side:

    .venv/bin/python benchmarks/gpt_speedrun_vs_nanogpt.py --path ../shared/data/tinyshakespeare.txt \
        --nanogpt ../nanoGPT --threads 1 [--seeds 1337 1 2] [--targets 1.92 1.905] [--eval-interval 100] \
        [--preset configs/gpt/shakespeare_char_speedrun.yaml] [--only speedrun] [--set lr=3e-3 ...]

Sides, each trained in train.py's loop body (forward, backward, clip at 1.0, step), one seed at a time,
the two sides alternating, in one process:

* nanogpt SEED: `torch.manual_seed(SEED)`, nanoGPT's model.py `GPT` and `configure_optimizers`, its
  `get_lr` cosine, batches by `torch.randint` from the global RNG: configs/gpt/shakespeare_char_cpu.yaml's
  recipe (4 x 4 x 128, context 64, batch 12, 2000 iterations).
* speedrun SEED: the preset's `GPTModule` (its model switches, `configure_optimizers` with its
  optimizer and schedule, `max_steps`, batch size) from `seed_everything(SEED)`, on the pipeline's
  batch stream `RandomWindowBatches(seed=SEED)`. `--set KEY=VALUE` overrides a model init_arg (tuning).

Both are scored on the whole validation split in consecutive windows (1,742 of 64 tokens, the
preset's `val_windows: null`) every `--eval-interval` steps and at the end. The time to a target is
the training time (wall and this process's CPU; evaluations excluded) up to the first evaluation at
or below it, so it is resolved to `--eval-interval` steps; a side that never gets there is reported
as not reaching it. Ratios are speedrun / nanoGPT of the per-seed means. With --threads 1 the CPU
time is much less disturbed by other jobs on a shared machine than the wall time. JSON lines per run
and the summary go to stdout and are appended to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml
from gpt_nanogpt_parity import B as NANO_B, ITERS as NANO_ITERS, T, Data, get_lr  # benchmarks/ is on the path

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "configs" / "gpt" / "shakespeare_char_speedrun.yaml"


class Clock:
    """Training time only: wall and process CPU seconds summed over the `with` blocks."""

    def __init__(self):
        self.wall = self.cpu = 0.0

    def __enter__(self):
        self._w, self._c = time.perf_counter(), time.process_time()

    def __exit__(self, *exc):
        self.wall += time.perf_counter() - self._w
        self.cpu += time.process_time() - self._c


def train(model, step_fn, steps: int, evaluate, eval_interval: int, targets: list[float], eval_from: int = 0) -> dict:
    """Run `step_fn(it)` `steps` times, evaluating every eval_interval steps from `eval_from` on and at the end."""
    clock, curve, reached = Clock(), [], {}
    for it in range(1, steps + 1):
        with clock:
            step_fn(it - 1)
        if (it % eval_interval == 0 and it >= eval_from) or it == steps:
            loss = evaluate(model)
            curve.append((it, round(loss, 4)))
            print(f"  step {it}: val {loss:.4f}, train {clock.cpu:.1f} s CPU / {clock.wall:.1f} s wall", file=sys.stderr,
                  flush=True)
            for t in targets:
                if loss <= t and t not in reached:
                    reached[t] = {"steps": it, "wall_s": round(clock.wall, 2), "cpu_s": round(clock.cpu, 2)}
    if any(curve[0][1] <= t for t in targets) and eval_from > eval_interval:
        print(f"  warning: below a target at the first evaluation (step {curve[0][0]}): lower --nanogpt-eval-from",
              file=sys.stderr)
    return {"final_loss": curve[-1][1], "train_wall_s": round(clock.wall, 2), "train_cpu_s": round(clock.cpu, 2),
            "reached": {str(t): reached.get(t) for t in targets}, "curve": curve}


def nanogpt_side(data: Data, seed: int, eval_interval: int, targets: list[float], eval_from: int = 0) -> dict:
    torch.manual_seed(seed)
    model, opt = data.nanogpt_model()

    def step(it):
        for g in opt.param_groups:
            g["lr"] = get_lr(it)
        ix = torch.randint(len(data.train) - T, (NANO_B,))
        x = torch.stack([data.train[i : i + T] for i in ix])
        y = torch.stack([data.train[i + 1 : i + 1 + T] for i in ix])
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return {"side": "nanogpt", "seed": seed, "steps": NANO_ITERS,
            **train(model, step, NANO_ITERS, data.whole_split, eval_interval, targets, eval_from), "eval_from": eval_from}


def load_preset(path: Path, overrides: list[str]) -> tuple[dict, int, int, float]:
    """(model init_args, max_steps, batch size, clip) of a preset YAML, with KEY=VALUE overrides of
    model init_args (and of max_steps and batch_size)."""
    cfg = yaml.safe_load(path.read_text())
    args = dict(cfg["model"]["init_args"])
    for kv in overrides:
        k, v = kv.split("=", 1)
        if k == "max_steps":
            cfg["trainer"]["max_steps"] = int(v)
        elif k == "batch_size":
            cfg["data"]["init_args"]["batch_size"] = int(v)
        else:
            args[k] = yaml.safe_load(v)
    if cfg["data"]["init_args"].get("block_size") != T:
        raise SystemExit(f"{path}: block_size must be {T}, the context both sides are scored at")
    return args, cfg["trainer"]["max_steps"], cfg["data"]["init_args"]["batch_size"], cfg["trainer"].get(
        "gradient_clip_val") or 0.0


def speedrun_side(data: Data, seed: int, preset: Path, overrides: list[str], eval_interval: int,
                  targets: list[float]) -> dict:
    import lightning as L

    from datamodules.shakespeare import RandomWindowBatches
    from modules.gpt.module import GPTModule

    args, steps, batch, clip = load_preset(preset, overrides)
    L.seed_everything(seed, verbose=False)  # what a run of the preset does before building the model
    module = GPTModule(vocab_size=data.dm.tokenizer.vocab_size, block_size=T, **args)
    model = module.model
    conf = module.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    batches = iter(RandomWindowBatches(data.train, T, batch, seed=seed))

    def step(it):
        x, y = next(batches)
        _, loss = model(x, y)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

    return {"side": "speedrun", "seed": seed, "steps": steps, "batch": batch, "overrides": overrides,
            **train(model, step, steps, data.whole_split, eval_interval, targets)}


def summarize(runs: list[dict], targets: list[float]) -> dict:
    out = {}
    for side in ("nanogpt", "speedrun"):
        rs = [r for r in runs if r["side"] == side]
        if not rs:
            continue
        s = {"seeds": [r["seed"] for r in rs], "final_loss_mean": round(statistics.mean(r["final_loss"] for r in rs), 4),
             "final_losses": [r["final_loss"] for r in rs],
             "train_cpu_s_mean": round(statistics.mean(r["train_cpu_s"] for r in rs), 1)}
        for t in targets:
            hits = [r["reached"][str(t)] for r in rs]
            s[f"target_{t}"] = {"reached": f"{sum(h is not None for h in hits)}/{len(hits)}"}
            if all(h is not None for h in hits):
                for k in ("steps", "wall_s", "cpu_s"):
                    s[f"target_{t}"][f"{k}_mean"] = round(statistics.mean(h[k] for h in hits), 2)
        out[side] = s
    if len(out) == 2:
        for t in targets:
            a, b = out["speedrun"][f"target_{t}"], out["nanogpt"][f"target_{t}"]
            for k in ("wall_s", "cpu_s"):
                if f"{k}_mean" in a and f"{k}_mean" in b:
                    out[f"ratio_{k}_to_{t}"] = round(a[f"{k}_mean"] / b[f"{k}_mean"], 3)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--path", required=True, help="tiny Shakespeare text (the preset's corpus)")
    p.add_argument("--nanogpt", default=None, help="a checkout of github.com/karpathy/nanoGPT (needed unless --only speedrun)")
    p.add_argument("--preset", type=Path, default=PRESET)
    p.add_argument("--seeds", type=int, nargs="+", default=[1337, 1, 2])
    p.add_argument("--targets", type=float, nargs="+", default=[1.92, 1.905])
    p.add_argument("--eval-interval", type=int, default=100)
    p.add_argument("--nanogpt-eval-from", type=int, default=0,
                   help="first evaluate nanoGPT at this step (its curve shows whether it was still above the targets "
                        "there; the evaluations cost as much as the training on a 2-core machine)")
    p.add_argument("--only", choices=("nanogpt", "speedrun"), default=None)
    p.add_argument("--set", dest="overrides", nargs="*", default=[], help="KEY=VALUE model init_args of the preset")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="append JSON lines here")
    ns = p.parse_args()
    if ns.threads:
        torch.set_num_threads(ns.threads)
    if ns.only != "speedrun" and not ns.nanogpt:
        raise SystemExit("--nanogpt CHECKOUT is needed for the nanoGPT side (or pass --only speedrun)")
    data = Data(ns.path, ns.nanogpt)
    runs = []
    for i, seed in enumerate(ns.seeds):
        sides = ["nanogpt", "speedrun"] if i % 2 == 0 else ["speedrun", "nanogpt"]  # who goes first alternates
        for side in sides:
            if ns.only and side != ns.only:
                continue
            if side == "nanogpt":
                r = nanogpt_side(data, seed, ns.eval_interval, ns.targets, ns.nanogpt_eval_from)
            else:
                r = speedrun_side(data, seed, ns.preset, ns.overrides, ns.eval_interval, ns.targets)
            runs.append(r)
            emit(r, ns.out)
    emit({"summary": summarize(runs, ns.targets), "torch_threads": torch.get_num_threads(),
          "eval_interval": ns.eval_interval, "preset": str(ns.preset)}, ns.out)


def emit(record: dict, out: Path | None) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if out is not None:
        with out.open("a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
