"""The reward model, PPO and RLOO modules under a plain Trainer on a tiny supervised mini-GPT: TRL's
reward-model names and a written reward model, the KL estimator exactly zero at initialisation,
the gold, proxy and KL logs over training, the adaptive KL, and clear errors."""

from __future__ import annotations

import pytest
import torch

from datamodules.preference import PromptDataModule
from modules.align.pairs import PairSampler
from modules.align.ppo import per_token_kl
from modules.align.reward import RewardModule, load_reward_model
from modules.align.rl import PPOModule, RLOOModule
from tests.helpers import quiet_trainer
from tests.helpers import preference_data


def metrics_of(trainer) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def prompts(**kw) -> PromptDataModule:
    args = dict(n_prompts=16, n_eval_prompts=4, prompt_chars=8, max_new_tokens=12, batch_size=8,
                reward="tests.helpers.count_e")
    return PromptDataModule(**{**args, **kw})


@pytest.fixture(scope="module")
def reward_fit(sft_ckpt, sft_pairs, tmp_path_factory):
    folder = tmp_path_factory.mktemp("reward")
    torch.manual_seed(0)
    module = RewardModule(backbone=sft_ckpt, lr=3e-3, export_dir=str(folder))
    trainer = quiet_trainer(max_steps=20, val_check_interval=20, check_val_every_n_epoch=None, num_sanity_val_steps=0)
    before = trainer.validate(module, datamodule=preference_data(sft_pairs), verbose=False)[0]
    trainer.fit(module, datamodule=preference_data(sft_pairs))
    return module, before, metrics_of(trainer), folder / "model.ckpt"


def test_reward_model_learns_the_labeller_and_logs_trl_names(reward_fit):
    module, before, after, _ = reward_fit
    for key in ("val/loss", "val/accuracy", "val/margin", "val/mean_reward", "val/calibration_ece", "train/accuracy"):
        assert key in after, key
    assert after["val/loss"] < before["val/loss"] and after["val/margin"] > before["val/margin"]
    assert after["val/accuracy"] > 0.5 and after["train/accuracy"] > 0.5
    assert after["val/pairs"] == len(module.trainer.datamodule.records["val"])  # what the accuracy is over


def test_written_reward_model_scores_as_the_trained_one(reward_fit, sft_pairs):
    module, _, _, path = reward_fit
    loaded, tok = load_reward_model(path)
    dm = preference_data(sft_pairs)
    dm.set_tokenizer(tok)
    batch = next(iter(dm.val_dataloader()))
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch["input_ids"], batch["attention_mask"]),
                                   module.reward_model(batch["input_ids"], batch["attention_mask"]))
    assert not any(p.requires_grad for p in loaded.parameters())


@pytest.mark.parametrize("pooling", ["last", "sum"])
def test_a_reward_ignores_padding_and_the_written_file_keeps_its_pooling(sft_ckpt, tmp_path, pooling):
    import shutil

    from modules.align.model import RewardModel
    from modules.align.reward import attach_head
    from modules.finetune.backbone import load_minigpt
    from modules.finetune.model import MiniGPTForCausalLM

    torch.manual_seed(0)
    model = RewardModel(MiniGPTForCausalLM(load_minigpt(sft_ckpt)), pooling=pooling).eval()
    ids = torch.randint(1, 60, (2, 10))
    mask = torch.ones_like(ids)
    padded_ids, padded_mask = torch.cat([ids, torch.zeros(2, 5, dtype=ids.dtype)], 1), torch.cat([mask, 0 * mask[:, :5]], 1)
    with torch.no_grad():
        alone = model(ids, mask)
        torch.testing.assert_close(model(padded_ids, padded_mask), alone)  # right padding adds nothing
        path = attach_head(shutil.copy(sft_ckpt, tmp_path / "rm.ckpt"), model.head, pooling)
        loaded, _ = load_reward_model(path)
        assert loaded.pooling == pooling
        torch.testing.assert_close(loaded(ids, mask), alone)
    with pytest.raises(ValueError, match="pooling must be one of"):
        RewardModel(model.backbone, pooling="mean")


def test_the_pairs_stage_writes_every_training_comparison_and_one_pair_per_held_out_prompt(sft_ckpt, tmp_path):
    import json

    from tests.helpers import sample_pairs

    rows = [json.loads(x) for x in open(sample_pairs(sft_ckpt, tmp_path / "all.jsonl", train_pairs="all", n_prompts=16,
                                                     n_eval_prompts=4))]
    per_prompt = {}
    for r in rows:
        per_prompt.setdefault((r["split"], r["prompt"]), []).append(r)
    train = [v for (split, _), v in per_prompt.items() if split == "train"]
    assert len(train) == 16 and max(map(len, train)) > 1 and all(len(v) <= 6 for v in train)  # 4 samples: <= 6 pairs
    assert all(len(v) == 1 for (split, _), v in per_prompt.items() if split != "train")
    with pytest.raises(ValueError, match="train_pairs must be"):
        PairSampler(train_pairs="every")


def test_ppo_kl_is_zero_at_initialisation_then_trains_logging_gold_proxy_and_kl(sft_ckpt, reward_fit):
    torch.manual_seed(0)
    module = PPOModule(backbone=sft_ckpt, reward_model=str(reward_fit[3]), lr=3e-3, target_kl=0.5, kl_horizon=50,
                       eval_samples=2, rollout_tokens=12)
    module.configure_model()
    roll = module.rollout(["To be or ", "My lord "], 2)
    old, _ = module.logps_and_values(roll)
    for estimator in ("k1", "k2", "k3"):
        assert torch.equal(per_token_kl(old, roll["ref_logps"], estimator) * roll["mask"], torch.zeros_like(old))
    assert roll["mask"].sum(1).tolist() == [12.0] * 4 and roll["proxy"].shape == (4,)
    trainer = quiet_trainer(max_steps=16, val_check_interval=1, check_val_every_n_epoch=None,
                            num_sanity_val_steps=0, log_every_n_steps=1)
    trainer.fit(module, datamodule=prompts())
    m = metrics_of(trainer)
    for key in ("train/true_reward", "train/proxy_reward", "train/kl", "train/kl_coef", "train/clipfrac",
                "train/value_loss", "val/kl", "val/true_reward", "val/proxy_reward"):
        assert key in m, key
    assert trainer.global_step == 16 and len(module.history) == 4  # 2 epochs x 2 minibatches per batch of prompts
    assert m["train/kl_coef"] != 0.05  # the adaptive controller moved it
    assert m["val/kl"] != 0


def test_rloo_trains_against_the_true_reward(sft_ckpt, tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    torch.manual_seed(0)
    module = RLOOModule(backbone=sft_ckpt, reward_signal="gold", k=4, lr=3e-3, eval_samples=1)
    # a logger merges the module's and the data module's hyper-parameters: no name may clash
    trainer = quiet_trainer(max_steps=2, val_check_interval=2, check_val_every_n_epoch=None, num_sanity_val_steps=0,
                            log_every_n_steps=1, logger=CSVLogger(tmp_path))
    trainer.fit(module, datamodule=prompts())
    m = metrics_of(trainer)
    assert {"train/loss", "train/true_reward", "train/kl", "val/kl", "val/true_reward"} <= set(m)
    assert "train/proxy_reward" not in m and m["val/kl"] != 0
    assert module.tokens_per_batch(["a ", "b "]) == 2 * 4 * 12  # prompts x k answers x answer tokens


@pytest.mark.parametrize("cls, kwargs, match", [
    (PPOModule, {}, "reward_signal='proxy' optimises the learned reward model"),
    (PPOModule, {"reward_signal": "true"}, "reward_signal must be one of"),
    (PPOModule, {"reward_signal": "gold", "target_kl": 0}, "target_kl must be > 0"),
    (PPOModule, {"reward_signal": "gold", "kl_estimator": "k9"}, "kl_estimator must be one of"),
    (RLOOModule, {"reward_signal": "gold", "k": 1}, "k must be >= 2"),
    (RLOOModule, {"reward_signal": "gold", "best_of_by": "proxy"}, "set reward_model"),
    (RewardModule, {"calibration_bins": 1}, "calibration_bins must be >= 2"),
    (RewardModule, {"pooling": "mean"}, "pooling must be one of"),
])
def test_bad_arguments_get_clear_errors(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_a_checkpoint_without_a_head_is_not_a_reward_model(sft_ckpt):
    with pytest.raises(ValueError, match="holds no reward head"):
        load_reward_model(sft_ckpt)
