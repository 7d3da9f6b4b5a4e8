"""DPOModule under a plain Trainer: log 2 at step 0, the reference held fixed (a frozen copy, or the
base with LoRA adapters disabled), the sampled KL and true reward, checkpoints, a Hugging Face model."""

from __future__ import annotations

import math

import pytest
import torch

from modules.align.module import DPOModule
from tests.helpers import quiet_trainer
from tests.helpers import preference_data, sample_pairs


def metrics_of(trainer) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def test_untrained_policy_scores_log_two_zero_rewards_and_zero_kl(sft_ckpt, sft_pairs):
    module, dm = DPOModule(backbone=sft_ckpt, eval_samples=2), preference_data(sft_pairs)
    trainer = quiet_trainer()
    trainer.validate(module, datamodule=dm, verbose=False)
    m = metrics_of(trainer)
    assert m["val/loss"] == pytest.approx(math.log(2), abs=1e-6)
    for key in ("val/rewards/chosen", "val/rewards/rejected", "val/rewards/margins", "val/kl"):
        assert m[key] == 0.0, key
    assert -1 <= m["val/true_reward"] <= 1
    assert len(dm.records["train"]) > 8 and len(dm.eval_prompts("val")) == 6  # pairs were sampled and labelled


def test_best_of_n_kl_is_the_analytic_bound(sft_ckpt, sft_pairs):
    module, dm = DPOModule(backbone=sft_ckpt, best_of=4, eval_samples=1), preference_data(sft_pairs)
    trainer = quiet_trainer()
    trainer.validate(module, datamodule=dm, verbose=False)
    assert metrics_of(trainer)["val/kl"] == pytest.approx(math.log(4) - 0.75)


@pytest.fixture(scope="module")
def fitted(sft_ckpt, sft_pairs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dpo-fit")
    torch.manual_seed(0)
    module = DPOModule(backbone=sft_ckpt, beta=0.1, lr=3e-3, eval_samples=2)
    trainer = quiet_trainer(max_steps=12, val_check_interval=12, check_val_every_n_epoch=None,
                            num_sanity_val_steps=0, log_every_n_steps=1, default_root_dir=tmp)
    trainer.fit(module, datamodule=preference_data(sft_pairs))
    return module, trainer, tmp


def test_fit_logs_trl_names_and_moves_away_from_a_fixed_reference(fitted, sft_ckpt):
    module, trainer, _ = fitted
    m = metrics_of(trainer)
    assert m["val/loss_before"] == pytest.approx(math.log(2), abs=1e-6)
    for key in ("train/loss", "train/rewards/chosen", "train/rewards/rejected", "train/rewards/accuracies",
                "train/rewards/margins", "train/logps/chosen", "val/loss", "val/rewards/accuracies", "val/kl",
                "val/true_reward"):
        assert key in m, key
    assert m["val/kl"] > 0 and m["val/loss"] != pytest.approx(math.log(2))
    base = DPOModule(backbone=sft_ckpt)
    base.configure_model()
    for (name, p), (_, q) in zip(module.reference.named_parameters(), base.backbone.named_parameters()):
        assert torch.equal(p, q), f"the reference changed: {name}"
    assert not all(torch.equal(p, q) for p, q in zip(module.backbone.parameters(), base.backbone.parameters()))
    assert not any(p.requires_grad for p in module.reference.parameters())


def test_checkpoint_leaves_the_reference_out_and_rebuilds_it(fitted):
    module, trainer, tmp = fitted
    path = tmp / "dpo.ckpt"
    trainer.save_checkpoint(path)
    sd = torch.load(path, weights_only=True)["state_dict"]
    assert sd and not any(k.startswith("reference.") for k in sd)
    loaded = DPOModule.load_from_checkpoint(path, weights_only=True)
    for p, q in zip(loaded.backbone.parameters(), module.backbone.parameters()):
        assert torch.equal(p, q.cpu())
    for p, q in zip(loaded.reference.parameters(), module.reference.parameters()):
        assert torch.equal(p, q.cpu())


def test_lora_reference_is_the_base_with_adapters_disabled(sft_ckpt, sft_pairs):
    torch.manual_seed(0)
    module = DPOModule(backbone=sft_ckpt, method="lora", r=4, lora_dropout=0.0, lr=1e-2, eval_samples=1)
    dm = preference_data(sft_pairs)
    trainer = quiet_trainer(max_steps=4, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    assert module.reference is None
    batch = next(iter(dm.val_dataloader()))
    base = DPOModule(backbone=sft_ckpt)
    base.configure_model()
    with torch.no_grad(), module.as_reference() as ref:
        ref_logps = module._logps(ref, batch)
    torch.testing.assert_close(ref_logps, base._logps(base.backbone, batch))
    assert not torch.allclose(module._logps(module.backbone, batch), ref_logps)  # the adapters are back on


def test_hugging_face_model_with_lora(tiny_llama_dir, tmp_path):
    torch.manual_seed(0)
    module = DPOModule(backbone=str(tiny_llama_dir), method="lora", r=4, lr=1e-2, eval_samples=1)
    pairs = sample_pairs(str(tiny_llama_dir), tmp_path / "pairs.jsonl", n_prompts=16, n_eval_prompts=2, max_new_tokens=6)
    dm = preference_data(pairs, n_eval_prompts=2, max_new_tokens=6, batch_size=4)
    trainer = quiet_trainer(max_steps=2, val_check_interval=2, check_val_every_n_epoch=None, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    m = metrics_of(trainer)
    assert m["val/loss_before"] == pytest.approx(math.log(2), abs=1e-6)
    assert math.isfinite(m["val/loss"]) and m["val/kl"] != 0 and "val/true_reward" in m


@pytest.mark.parametrize("kwargs, match", [({"beta": 0}, "beta must be > 0"), ({"best_of": 0}, "best_of must be >= 1")])
def test_bad_arguments_get_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DPOModule(**kwargs)
