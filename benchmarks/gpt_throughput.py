"""Tokens/s of the full pipeline against a bare PyTorch loop over the same model and batches.

Run from the repository root (by hand, not part of the tests):

    .venv/bin/python benchmarks/gpt_throughput.py --steps 300 [--path ../shared/data/tinyshakespeare.txt]

Both sides train the CPU preset's model (configs/gpt/shakespeare_char_cpu.yaml) on the same
step-seeded batches with the same AdamW, schedule and gradient clipping, in this one process.
The pipeline side is `run_experiment` (LightningCLI, Trainer, MLflow logging, the resource
callback, checkpointing); it is timed by wall clock from the end of step `warmup` to the end
of the last step, so data loading, logging and every callback hook are inside the window.
Validation is switched off for both, as the bare loop has none. The bare loop runs before and
after the pipeline and the mean is used, so drifting load on a shared machine hits both sides.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from lightning import Callback

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "gpt" / "shakespeare_char_cpu.yaml"


class WallClock(Callback):
    """Wall time between the end of step `warmup` and the end of the last training step."""

    warmup = 20
    result: dict = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step == self.warmup:
            self.t0 = time.perf_counter()
        elif step > self.warmup:
            WallClock.result = {"steps": step - self.warmup, "seconds": time.perf_counter() - self.t0,
                                "tokens_per_step": batch[0].numel()}


def pipeline_tokens_per_s(steps: int, warmup: int, data_args: list[str], uri: str) -> tuple[float, dict]:
    from pipelines.run import run_experiment

    WallClock.warmup = warmup
    args = [*data_args, f"--trainer.max_steps={steps + warmup}", f"--model.init_args.lr_decay_steps={steps + warmup}",
            f"--model.init_args.warmup_steps={min(100, steps + warmup)}",
            "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
            "--model.init_args.sample_tokens=0", "--trainer.callbacks+=__main__.WallClock"]
    res = run_experiment(CONFIG, args, tracking_uri=uri)
    if res.status != "FINISHED":
        raise SystemExit(f"pipeline run {res.status}: {res.error}")
    r = WallClock.result
    return r["steps"] * r["tokens_per_step"] / r["seconds"], res.metrics


def bare_tokens_per_s(steps: int, warmup: int, dm, model_kwargs: dict) -> float:
    """The same training step written out in plain PyTorch (what nanoGPT's train.py does on CPU)."""
    from modules.gpt.model import GPT, GPTConfig
    from modules.gpt.module import cosine_lr

    torch.manual_seed(1337)
    model = GPT(GPTConfig(vocab_size=dm.tokenizer.vocab_size, block_size=dm.block_size, **model_kwargs))
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.99))
    total = steps + warmup
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, 1e-3, 1e-4, min(100, total), total) / 1e-3)
    stream = iter(dm.train_dataloader())
    for step in range(total):
        if step == warmup:
            t0 = time.perf_counter()
        x, y = next(stream)
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
    return steps * dm.batch_size * dm.block_size / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--path", default=str(ROOT / ".." / "shared" / "data" / "tinyshakespeare.txt"),
                   help="tiny Shakespeare text (the shared test copy by default)")
    ns = p.parse_args()

    import yaml

    from datamodules.shakespeare import ShakespeareDataModule

    cfg = yaml.safe_load(CONFIG.read_text())
    model_kwargs = {k: cfg["model"]["init_args"][k] for k in ("n_layer", "n_head", "n_embd", "dropout", "bias")}
    dm = ShakespeareDataModule(**{**cfg["data"]["init_args"], "path": ns.path})
    dm.setup()
    data_args = [f"--data.init_args.path={ns.path}", f"--seed_everything={cfg['seed_everything']}"]

    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        bare1 = bare_tokens_per_s(ns.steps, ns.warmup, dm, model_kwargs)
        pipe, metrics = pipeline_tokens_per_s(ns.steps, ns.warmup, data_args, uri)
        bare2 = bare_tokens_per_s(ns.steps, ns.warmup, dm, model_kwargs)
    bare = (bare1 + bare2) / 2
    out = {
        "torch_threads": torch.get_num_threads(),
        "steps": ns.steps,
        "bare_tokens_per_s": [round(bare1), round(bare2)],
        "pipeline_tokens_per_s": round(pipe),
        "pipeline_perf/tokens_per_s (resource callback, in-step time only)": round(metrics.get("perf/tokens_per_s", 0)),
        "ratio_pipeline_over_bare": round(pipe / bare, 4),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    sys.exit(main())
