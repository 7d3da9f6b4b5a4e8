"""The LeNet judge's verdict on generated digits, shared by every generative project (DDPM, VAE).

FID in LeNet-feature space (torchmetrics' Frechet distance with the 84-d penultimate layer in place
of Inception v3), the share of classes the judge finds among the samples, and its mean confidence.
The same function, with the same real digits and sample count, is what makes two generators'
numbers comparable; the real-vs-real floor (training digits against the same reference) says how
low the FID of a perfect generator would be at that sample size.
"""

from __future__ import annotations

import torch
from torchmetrics.image.fid import FrechetInceptionDistance

from modules.classifier.model import LeNet, LeNetFeatures


@torch.no_grad()
def judge_samples(
    judge: LeNet, fake: torch.Tensor, real: torch.Tensor, reference: torch.Tensor | None = None,
    labels: torch.Tensor | None = None, split: str = "val", device: torch.device | str | None = None,
    chunk: int = 500,
) -> dict[str, float]:
    """FID, class coverage and mean confidence of `fake` (N, 1, H, W) in [-1, 1].

    Args:
        judge: the frozen LeNet (`modules.classifier.module.load_judge`).
        fake: generated digits.
        real: held-out digits, the FID reference.
        reference: other real digits (training digits, as many as `fake`) for the real-vs-real
            floor `{split}/fid_floor`; None skips it.
        labels: the classes `fake` was sampled for (conditional generators), giving
            `{split}/label_accuracy`, how often the judge reads the digit that was asked for.
        split: key prefix, "val" or "test".
        device: where the judge runs (default: where its weights are).
        chunk: images per judge call.
    """
    device = device or next(judge.parameters()).device
    judge = judge.to(device)
    logits = torch.cat([judge(f.to(device)) for f in fake.split(chunk)])
    probs = logits.softmax(-1)
    pred = probs.argmax(-1)
    out = {
        f"{split}/class_coverage": pred.unique().numel() / judge.config.num_classes,
        f"{split}/classifier_confidence": probs.max(-1).values.mean().item(),
    }
    if labels is not None:
        out[f"{split}/label_accuracy"] = (pred.cpu() == labels.cpu()).float().mean().item()

    # one metric: the real features are extracted once, and kept by reset() for the floor
    metric = FrechetInceptionDistance(feature=LeNetFeatures(judge), reset_real_features=False).to(device)
    for c in real.split(chunk):
        metric.update(c.to(device), real=True)

    def fid_against_real(b: torch.Tensor) -> float:
        metric.reset()  # drops the previous fake features only
        for c in b.split(chunk):
            metric.update(c.to(device), real=False)
        return float(metric.compute())

    out[f"{split}/fid"] = fid_against_real(fake)
    if reference is not None:
        out[f"{split}/fid_floor"] = fid_against_real(reference)
    return out
