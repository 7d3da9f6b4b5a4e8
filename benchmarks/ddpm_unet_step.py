"""Time per training step of the DDPM's UNet at several widths and depths, side by side in one process.

Run by hand, never by the test suite:
    OMP_NUM_THREADS=1 python benchmarks/ddpm_unet_step.py [--batch 64] [--rounds 5] [--steps 5]

Each round runs `steps` training steps (forward, L_simple, backward, AdamW) of every UNet in turn, so
a shared machine's load falls on all of them alike; the table gives the median seconds per step and
the ratio to the CPU preset's UNet, which is what sets equal-time step counts in
configs/studies/ddpm-recipe.yaml (width against depth at one budget).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from modules.diffusion.model import Denoiser, DiffusionConfig

UNETS = {  # name: (block_out_channels, layers_per_block)
    "preset (16,32,64) x1": ((16, 32, 64), 1),
    "wider (32,64,64) x1": ((32, 64, 64), 1),
    "deeper (16,32,64) x2": ((16, 32, 64), 2),
    "narrower (16,32,32) x2": ((16, 32, 32), 2),
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=5)
    a = p.parse_args()
    torch.manual_seed(0)
    nets = {k: Denoiser(DiffusionConfig(block_out_channels=c, attention=(False,) * len(c), layers_per_block=n))
            for k, (c, n) in UNETS.items()}
    opts = {k: torch.optim.AdamW(n.parameters(), lr=1e-3) for k, n in nets.items()}
    x, y = torch.randn(a.batch, 1, 28, 28), torch.randint(0, 10, (a.batch,))
    times: dict[str, list[float]] = {k: [] for k in nets}
    for r in range(a.rounds + 1):  # round 0 warms up and is dropped
        for k, net in nets.items():
            t0 = time.perf_counter()
            for _ in range(a.steps):
                t = torch.randint(0, 1000, (a.batch,))
                loss = (net(x, t, y) - x).pow(2).mean()
                opts[k].zero_grad(set_to_none=True)
                loss.backward()
                opts[k].step()
            if r:
                times[k].append((time.perf_counter() - t0) / a.steps)
    base = statistics.median(times[next(iter(nets))])
    print(f"batch {a.batch}, torch threads {torch.get_num_threads()}, {a.rounds} rounds x {a.steps} steps")
    print(f"{'unet':>24} {'params':>8} {'s/step':>8} {'ratio':>6}")
    for k, net in nets.items():
        med = statistics.median(times[k])
        print(f"{k:>24} {sum(p.numel() for p in net.parameters()):8d} {med:8.3f} {med / base:6.2f}")


if __name__ == "__main__":
    main()
