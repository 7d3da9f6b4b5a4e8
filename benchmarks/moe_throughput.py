"""Training tokens/s of the dense mini-GPT against its MoE variants, on this CPU.

Run from the repository root (by hand, not part of the tests):

    .venv/bin/python benchmarks/moe_throughput.py [--rounds 5 --steps 30]

Models are the dense-vs-moe study's (configs/studies/dense-vs-moe.yaml): the nanoGPT CPU model
(4 layers, 128 wide, context 64, batch 12) with a dense MLP, and with 8 experts, top-2, sized
to equal active parameters (experts 256 wide) or equal total parameters (experts 64 wide).
Each timed block is `steps` full training steps (forward, backward, AdamW) on the same
step-seeded batches; variants alternate within every round so that the load of a shared
machine hits them alike, and the median block is reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from datamodules.shakespeare import RandomWindowBatches
from modules.gpt.model import GPT, GPTConfig

BASE = dict(vocab_size=78, block_size=64, n_layer=4, n_head=4, n_embd=128, dropout=0.0, bias=False)
VARIANTS = {
    "dense": {},
    "moe-equal-active": dict(ffn="moe", n_experts=8, top_k=2, expert_hidden=256),
    "moe-equal-total": dict(ffn="moe", n_experts=8, top_k=2, expert_hidden=64),
}


class Trainer:
    def __init__(self, overrides: dict, batches: RandomWindowBatches):
        torch.manual_seed(0)
        self.model = GPT(GPTConfig(**BASE, **overrides))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3, betas=(0.9, 0.99))
        self.batches, self.step = batches, 0

    def run(self, steps: int) -> float:
        """Seconds for `steps` training steps."""
        t0 = time.perf_counter()
        for _ in range(steps):
            x, y = self.batches.batch(self.step)
            _, loss = self.model(x, y)
            loss = loss + self.model.aux_loss()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.step += 1
        return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=30, help="training steps per timed block")
    ns = p.parse_args()
    data = torch.randint(0, BASE["vocab_size"], (200_000,))
    batches = RandomWindowBatches(data, BASE["block_size"], 12, seed=1337)
    trainers = {name: Trainer(kw, batches) for name, kw in VARIANTS.items()}
    for t in trainers.values():
        t.run(5)  # warm-up: allocator, first-call overheads
    times: dict[str, list[float]] = {name: [] for name in trainers}
    for _ in range(ns.rounds):
        for name, t in trainers.items():
            times[name].append(t.run(ns.steps))
    tokens = ns.steps * 12 * BASE["block_size"]
    tps = {name: tokens / statistics.median(ts) for name, ts in times.items()}
    out = {
        "torch_threads": torch.get_num_threads(),
        "tokens_per_s": {k: round(v) for k, v in tps.items()},
        "ratio_vs_dense": {k: round(v / tps["dense"], 3) for k, v in tps.items()},
        "params_total": {k: t.model.num_params(non_embedding=False) for k, t in trainers.items()},
        "params_active": {k: t.model.num_active_params(non_embedding=False) for k, t in trainers.items()},
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
