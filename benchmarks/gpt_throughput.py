"""Tokens/s of the full pipeline against a bare PyTorch loop over the same model and batches.

Run from the repository root (by hand, not part of the tests):

    .venv/bin/python benchmarks/gpt_throughput.py --steps 400 [--path ../shared/data/tinyshakespeare.txt]

Both sides train the CPU preset's model (configs/gpt/shakespeare_char_cpu.yaml) on the same
step-seeded batches with the same AdamW, schedule and gradient clipping, in this one process.
The pipeline side is `run_experiment` (LightningCLI, Trainer, MLflow logging, the resource
callback, checkpointing, system metrics). On a shared machine the load drifts by more than the
5% being measured, so the two sides are interleaved: after every `block` pipeline steps a
callback runs `block` bare steps. Pipeline time is wall clock between those pauses, so data
loading, logging and every hook of every callback are inside it; the bare blocks are outside.
Validation is switched off for both, as the bare loop has none. (The run's own
perf/tokens_per_s is not reported: the bare blocks run inside a batch-end hook, so the resource
callback's step timer counts them.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from lightning import Callback

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "gpt" / "shakespeare_char_cpu.yaml"


class BareLoop:
    """nanoGPT's CPU training step in plain PyTorch, on the datamodule's batch stream."""

    def __init__(self, dm, model_kwargs: dict, total_steps: int):
        from modules.gpt.model import GPT, GPTConfig
        from modules.training import cosine_lr

        torch.manual_seed(1337)
        self.model = GPT(GPTConfig(vocab_size=dm.tokenizer.vocab_size, block_size=dm.block_size, **model_kwargs))
        self.params = list(self.model.parameters())
        groups = [{"params": [p for p in self.params if p.dim() >= 2], "weight_decay": 0.1},
                  {"params": [p for p in self.params if p.dim() < 2], "weight_decay": 0.0}]
        self.opt = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.99))
        warmup = min(100, total_steps)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: cosine_lr(s, 1e-3, 1e-4, warmup, total_steps) / 1e-3)
        self.stream = iter(dm.train_dataloader())

    def run(self, steps: int) -> float:
        """Seconds for `steps` training steps."""
        t0 = time.perf_counter()
        for _ in range(steps):
            x, y = next(self.stream)
            _, loss = self.model(x, y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.opt.step()
            self.sched.step()
        return time.perf_counter() - t0


class Interleave(Callback):
    """Times pipeline blocks of `block` steps and runs a bare block after each."""

    bare: BareLoop
    warmup, block = 20, 25
    pipe_s: list[float] = []
    bare_s: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step, now = trainer.global_step, time.perf_counter()
        if step < self.warmup:
            return
        if step > self.warmup and (step - self.warmup) % self.block == 0:
            Interleave.pipe_s.append(now - self.mark)
            Interleave.bare_s.append(self.bare.run(self.block))
        if step == self.warmup:
            self.bare.run(self.warmup)  # the bare side gets the same warm-up
        if step == self.warmup or (step - self.warmup) % self.block == 0:
            self.mark = time.perf_counter()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=400, help="timed steps per side")
    p.add_argument("--block", type=int, default=25, help="steps per interleaved block")
    p.add_argument("--path", default=str(ROOT / ".." / "shared" / "data" / "tinyshakespeare.txt"),
                   help="tiny Shakespeare text (the shared test copy by default)")
    ns = p.parse_args()

    import yaml

    from datamodules.shakespeare import ShakespeareDataModule
    from pipelines.run import run_experiment

    cfg = yaml.safe_load(CONFIG.read_text())
    model_kwargs = {k: cfg["model"]["init_args"][k] for k in ("n_layer", "n_head", "n_embd", "dropout", "bias")}
    dm = ShakespeareDataModule(**{**cfg["data"]["init_args"], "path": ns.path})
    dm.setup()
    total = Interleave.warmup + ns.steps
    Interleave.bare, Interleave.block = BareLoop(dm, model_kwargs, total), ns.block
    args = [f"--data.init_args.path={ns.path}", f"--trainer.max_steps={total}",
            f"--model.init_args.lr_decay_steps={total}", f"--model.init_args.warmup_steps={min(100, total)}",
            "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0", "--model.init_args.sample_tokens=0",
            "--trainer.callbacks+=__main__.Interleave"]
    with tempfile.TemporaryDirectory() as tmp:
        res = run_experiment(CONFIG, args, tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    if res.status != "FINISHED":
        raise SystemExit(f"pipeline run {res.status}: {res.error}")
    tokens = ns.block * dm.batch_size * dm.block_size
    pipe, bare = Interleave.pipe_s, Interleave.bare_s
    out = {
        "torch_threads": torch.get_num_threads(),
        "blocks": len(pipe),
        "block_steps": ns.block,
        "bare_tokens_per_s": round(len(bare) * tokens / sum(bare)),
        "pipeline_tokens_per_s": round(len(pipe) * tokens / sum(pipe)),
        "ratio_pipeline_over_bare": round(sum(bare) / sum(pipe), 4),
        "ratio_median_of_blocks": round(statistics.median(b / p for b, p in zip(bare, pipe)), 4),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
