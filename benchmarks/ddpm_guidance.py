"""Judge one trained DDPM checkpoint at several guidance scales (w = 0 is unconditional sampling).

Run by hand, never by the test suite:
    python benchmarks/ddpm_guidance.py CKPT [--judge checkpoints/classifier/lenet_mnist5k.ckpt] [--w 0 1 2] [--n 1000]

Class coverage is only informative for w = 0: conditional samples ask for every class by construction.
"""

from __future__ import annotations

import argparse
import time

import torch

from datamodules.mnist import MNISTDataModule
from modules.diffusion.module import DiffusionModule


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("ckpt")
    p.add_argument("--judge", default="checkpoints/classifier/lenet_mnist5k.ckpt")
    p.add_argument("--w", type=float, nargs="+", default=[0.0, 1.0, 2.0])
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the checkpoint's)")
    a = p.parse_args()
    module = DiffusionModule.load_from_checkpoint(a.ckpt, map_location="cpu", classifier_checkpoint=a.judge)
    if a.steps:
        module.hparams.num_sample_steps = a.steps
    module.setup("validate")
    module.eval()
    dm = MNISTDataModule(pad_to_32=module.config.image_size == 32)
    dm.setup("fit")
    real = dm._tensors("val").tensors[0]
    reference = dm._tensors("train").tensors[0][: a.n]
    print(f"{'w':>5} {'fid':>8} {'floor':>8} {'coverage':>9} {'confidence':>11} {'seconds':>8}")
    for w in a.w:
        module.hparams.guidance_scale = w
        t0 = time.time()
        labels = None if w == 0 else torch.arange(a.n) % module.config.num_classes
        fake, _ = module.sample(a.n, labels=labels, seed=module.hparams.eval_seed)
        m = module.judge_metrics(fake, real, reference)
        print(f"{w:5.1f} {m['val/fid']:8.3f} {m['val/fid_floor']:8.3f} {m['val/class_coverage']:9.2f} "
              f"{m['val/classifier_confidence']:11.3f} {time.time() - t0:8.1f}")


if __name__ == "__main__":
    main()
