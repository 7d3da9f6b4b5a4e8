"""Training-step time of the mini-GPT against nanoGPT's model.py, same weights and batches, one process.

Run from the repository root (by hand, not part of the tests). nanoGPT is not part of this
project: pass a checkout of github.com/karpathy/nanoGPT, whose model.py is imported from there:

    .venv/bin/python benchmarks/gpt_vs_nanogpt_speed.py --nanogpt ../nanoGPT \
        [--path ../shared/data/tinyshakespeare.txt] [--steps 400] [--block 10] [--threads N]

Both models are configs/gpt/shakespeare_char_cpu.yaml's (4 layers, 4 heads, 128 wide, context
64, batch 12, no bias, no dropout); nanoGPT's starts from a copy of the mini-GPT's weights (the
parameter names are the same) and each has its own AdamW with nanoGPT's groups. One step is
forward, backward, clipping at 1.0, AdamW step, zero_grad, on a batch both sides share. On a
shared machine the load drifts by more than the difference being measured, so the sides run in
alternating blocks of `block` steps (the side that goes first alternates too), and the ratio is
the median over blocks of (mini-GPT block time / nanoGPT block time), in wall-clock time and in
the process's CPU time (with --threads 1 the latter is much less disturbed by other jobs). Same weights, same batches
and the same arithmetic also mean the same losses: the benchmark checks they stay within 1e-4,
so both really compute the same model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from gpt_nanogpt_parity import load_nanogpt_model  # benchmarks/ is on the path of a script run from it

V, T, B = 65, 64, 12
MODEL = dict(n_layer=4, n_head=4, n_embd=128, dropout=0.0, bias=False)


class Side:
    """One model with its optimizer; `run(batches)` trains on them and returns (seconds, losses)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model.train()
        ps = list(model.parameters())
        self.opt = torch.optim.AdamW([{"params": [p for p in ps if p.dim() >= 2], "weight_decay": 0.1},
                                      {"params": [p for p in ps if p.dim() < 2], "weight_decay": 0.0}],
                                     lr=1e-3, betas=(0.9, 0.99))

    def run(self, batches) -> tuple[float, float, list[float]]:
        """(wall seconds, CPU seconds of this process, losses) over `batches`."""
        losses = []
        c0, t0 = time.process_time(), time.perf_counter()
        for x, y in batches:
            _, loss = self.model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        return dt, dc, [float(v) for v in losses]


def batches(n: int, path: str | None, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """n (x, y) batches: random windows of tiny Shakespeare (char ids) or, without a path, random ids."""
    g = torch.Generator().manual_seed(seed)
    if path is None:
        data = torch.randint(0, V, (200_000,), generator=g)
    else:
        from datamodules.shakespeare import ShakespeareDataModule

        dm = ShakespeareDataModule(corpus="tinyshakespeare", path=path, block_size=T, batch_size=B)
        dm.setup()
        data = dm.train_data
    from datamodules.shakespeare import windows

    return [windows(data, torch.randint(len(data) - T, (B,), generator=g), T) for _ in range(n)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nanogpt", required=True, help="a checkout of github.com/karpathy/nanoGPT")
    p.add_argument("--path", default=None, help="tiny Shakespeare text; default: random token ids")
    p.add_argument("--steps", type=int, default=400, help="timed steps per side")
    p.add_argument("--block", type=int, default=10, help="steps per alternating block")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps per side first")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ns = p.parse_args()
    if ns.threads:
        torch.set_num_threads(ns.threads)

    from modules.gpt.model import GPT, GPTConfig

    nano = load_nanogpt_model(ns.nanogpt)
    torch.manual_seed(1337)
    ours = GPT(GPTConfig(vocab_size=V, block_size=T, **MODEL))
    theirs = nano.GPT(nano.GPTConfig(vocab_size=V, block_size=T, **MODEL))
    theirs.load_state_dict(ours.state_dict())  # same names; strict: every tensor is copied
    sides = {"mini-GPT": Side(ours), "nanoGPT": Side(theirs)}

    n_blocks = ns.steps // ns.block
    data = batches(ns.warmup + n_blocks * ns.block, ns.path)
    losses = {k: s.run(data[: ns.warmup])[2] for k, s in sides.items()}
    times = {k: [] for k in sides}
    cpu = {k: [] for k in sides}
    for i in range(n_blocks):
        chunk = data[ns.warmup + i * ns.block : ns.warmup + (i + 1) * ns.block]
        for k in (["mini-GPT", "nanoGPT"] if i % 2 == 0 else ["nanoGPT", "mini-GPT"]):
            dt, dc, ls = sides[k].run(chunk)
            times[k].append(dt)
            cpu[k].append(dc)
            losses[k] += ls
    gap = max(abs(a - b) for a, b in zip(losses["mini-GPT"], losses["nanoGPT"]))
    if gap > 1e-4:
        raise SystemExit(f"the two models' losses differ by {gap:.2e} on the same weights and batches")
    out = {"torch_threads": torch.get_num_threads(), "blocks": n_blocks, "block_steps": ns.block}
    for name, t in (("wall", times), ("cpu", cpu)):
        ratios = sorted(a / b for a, b in zip(t["mini-GPT"], t["nanoGPT"]))
        q = len(ratios) // 4
        out[f"{name}_ms_per_step_median"] = {k: round(1000 * statistics.median(v) / ns.block, 1) for k, v in t.items()}
        out[f"{name}_ratio_minigpt_over_nanogpt_median"] = round(statistics.median(ratios), 4)
        out[f"{name}_ratio_interquartile"] = [round(ratios[q], 4), round(ratios[-q - 1], 4)]
    out.update({
        "max_loss_gap": gap,
        "final_loss": round(losses["mini-GPT"][-1], 4),
    })
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
