"""The schedule and loss logging the language-model modules share (modules/training.py): the
schedule against torch's own warm-up and cosine schedulers, and through both modules'
`configure_optimizers`, so neither can drift from it again."""

from types import SimpleNamespace

import pytest
import torch
from torchmetrics import MeanMetric

from datamodules.tokenizers import ByteTokenizer
from modules.finetune.export import save_minigpt
from modules.finetune.module import FinetuneModule
from modules.gpt.model import GPT, GPTConfig
from modules.gpt.module import GPTModule
from modules.training import cosine_lr, log_mean_loss

LR, MIN_RATIO, WARM, DECAY, STEPS = 1e-3, 0.1, 5, 25, 35


def lrs(optimizer, scheduler, steps: int = STEPS) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def reference(steps: int = STEPS) -> list[float]:
    """torch's LinearLR from 1/(w+1) to 1 over w steps, then CosineAnnealingLR down to the floor."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1 / (WARM + 1), end_factor=1.0, total_iters=WARM)
    cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=DECAY - WARM, eta_min=LR * MIN_RATIO)
    return lrs(opt, torch.optim.lr_scheduler.SequentialLR(opt, [warm, cos], milestones=[WARM]), steps)


def test_cosine_lr_matches_torch_schedulers_then_stays_at_the_floor():
    ours = [cosine_lr(s, LR, LR * MIN_RATIO, WARM, DECAY) for s in range(STEPS)]
    # torch's cosine is periodic past T_max; ours (nanoGPT's) stays at min_lr
    assert ours[: DECAY + 1] == pytest.approx(reference(DECAY + 1), rel=1e-6)
    assert ours[DECAY:] == pytest.approx([LR * MIN_RATIO] * (STEPS - DECAY))
    assert ours[0] == pytest.approx(LR / (WARM + 1)) and ours[WARM] == pytest.approx(LR)


def test_both_modules_follow_the_shared_schedule(tmp_path):
    expected = [cosine_lr(s, LR, LR * MIN_RATIO, WARM, DECAY) for s in range(STEPS)]
    gpt = GPTModule(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=8, lr=LR, min_lr=LR * MIN_RATIO,
                    warmup_steps=WARM, lr_decay_steps=DECAY)
    cfg = gpt.configure_optimizers()
    assert lrs(cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]) == pytest.approx(expected)

    save_minigpt(GPT(GPTConfig(vocab_size=256, block_size=8, n_layer=1, n_head=2, n_embd=8)), ByteTokenizer(),
                 tmp_path / "base.ckpt")
    ft = FinetuneModule(str(tmp_path / "base.ckpt"), "lora", r=2, lr=LR, warmup_steps=WARM, min_lr_ratio=MIN_RATIO,
                        export=False)
    ft.configure_model()
    ft._trainer = SimpleNamespace(estimated_stepping_batches=DECAY)  # what fit would plan
    cfg = ft.configure_optimizers()
    assert lrs(cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]) == pytest.approx(expected)


def test_log_mean_loss_logs_the_token_mean_once_reduced():
    logged = {}
    module = SimpleNamespace(log=lambda key, value, **kw: logged.update({key: (float(value), kw)}))
    metric = MeanMetric()
    metric.update(torch.tensor(2.0), 3)  # 3 tokens at loss 2, 1 token at loss 6: mean 3
    metric.update(torch.tensor(6.0), 1)
    assert float(log_mean_loss(module, "val", metric)) == pytest.approx(3.0)
    assert logged["val/loss"] == (pytest.approx(3.0), {"sync_dist": False})  # MeanMetric already synced
    assert logged["val/ppl"][0] == pytest.approx(torch.exp(torch.tensor(3.0)).item())
    assert metric.update_count == 0  # reset for the next epoch
