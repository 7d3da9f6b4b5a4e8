"""DPO's mathematics against TRL (the sigmoid loss of `trl.DPOTrainer`) and against first principles."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from modules.align.objective import best_of_n_kl, dpo_loss, preference_metrics, sampled_kl, sequence_logps


def trl_sigmoid_dpo(chosen, rejected, ref_chosen, ref_rejected, beta):
    """TRL 1.16's `DPOTrainer._compute_loss` (loss_type="sigmoid") on given sequence log-probabilities.

    TRL computes the loss inside the trainer, from a model's per-token log-probs; a stand-in model
    returns per-token log-probs whose sums are ours (one token per answer), and the trainer's few
    attributes the loss path reads are set as its defaults are. The loss and TRL's logged metrics
    come back from TRL's own code.
    """
    from trl import DPOTrainer

    b = chosen.numel()
    logps = torch.cat([chosen, rejected])[:, None]  # (2B, 1): one completion token per sequence
    out = SimpleNamespace(log_probs=logps, entropy=torch.zeros(2 * b, 1), mean_logits=torch.zeros(2 * b, 1),
                          is_top1=torch.zeros(2 * b, 1, dtype=torch.bool))
    gather = SimpleNamespace(gather=lambda t: t, gather_for_metrics=lambda t: t, device="cpu")
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=gather, aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=["sigmoid"], loss_weights=[1.0],
        beta=beta, use_weighting=False, label_smoothing=0.0, _metrics={"train": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1,
    )
    inputs = {"input_ids": torch.zeros(2 * b, 2, dtype=torch.long), "attention_mask": torch.ones(2 * b, 2),
              "completion_mask": torch.tensor([[0, 1]] * (2 * b)), "ref_chosen_logps": ref_chosen,
              "ref_rejected_logps": ref_rejected}
    loss = DPOTrainer._compute_loss(trainer, lambda **kw: out, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize("beta", [0.05, 0.1, 0.5])
def test_loss_and_metrics_equal_trl_sigmoid_dpo(beta):
    g = torch.Generator().manual_seed(0)
    chosen, rejected, ref_c, ref_r = (-30 + 10 * torch.randn(8, generator=g, dtype=torch.float64) for _ in range(4))
    loss, r_c, r_r = dpo_loss(chosen, rejected, ref_c, ref_r, beta)
    want, trl_metrics = trl_sigmoid_dpo(chosen, rejected, ref_c, ref_r, beta)
    torch.testing.assert_close(loss, want)
    ours = preference_metrics(r_c, r_r)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
        assert float(ours[key]) == pytest.approx(trl_metrics[key], rel=1e-12, abs=1e-12), key
    assert 0 < trl_metrics["rewards/accuracies"] < 1  # the draw has pairs either way: the check can fail


def test_step_zero_is_log_two_with_zero_rewards():
    logps = torch.tensor([-12.0, -40.0, -3.5])
    other = torch.tensor([-20.0, -1.0, -7.0])
    loss, r_c, r_r = dpo_loss(logps, other, logps.clone(), other.clone(), beta=0.1)  # pi = pi_ref
    assert float(loss) == pytest.approx(math.log(2), abs=1e-7)
    assert torch.equal(r_c, torch.zeros(3)) and torch.equal(r_r, torch.zeros(3))
    m = preference_metrics(r_c, r_r)
    assert float(m["rewards/margins"]) == 0 and float(m["rewards/accuracies"]) == 0


def test_loss_gradient_raises_chosen_and_lowers_rejected():
    chosen, rejected = torch.tensor([-5.0], requires_grad=True), torch.tensor([-5.0], requires_grad=True)
    loss, _, _ = dpo_loss(chosen, rejected, torch.tensor([-5.0]), torch.tensor([-5.0]), beta=0.5)
    loss.backward()
    # d/d logp_w of -log sigmoid(beta (logp_w - logp_l)) at equality is -beta / 2 (eq. 7's gradient)
    assert float(chosen.grad) == pytest.approx(-0.25) and float(rejected.grad) == pytest.approx(0.25)


def test_sequence_logps_sums_the_labelled_tokens_only():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 1, -100], [-100, 2, 2, 6, 0]])
    lp = F.log_softmax(logits, -1)
    want = torch.stack([lp[0, 1, 3] + lp[0, 2, 1], lp[1, 0, 2] + lp[1, 1, 2] + lp[1, 2, 6] + lp[1, 3, 0]])
    torch.testing.assert_close(sequence_logps(logits, labels), want)


def test_sampled_kl_estimates_the_kl_of_two_categoricals():
    p = torch.tensor([0.6, 0.3, 0.1])
    q = torch.tensor([0.2, 0.5, 0.3])
    y = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    exact = float((p * (p / q).log()).sum())
    assert float(sampled_kl(p.log()[y], q.log()[y])) == pytest.approx(exact, abs=0.01)


def test_best_of_n_kl():
    assert best_of_n_kl(1) == 0
    assert best_of_n_kl(4) == pytest.approx(math.log(4) - 0.75)
    with pytest.raises(ValueError, match="n >= 1"):
        best_of_n_kl(0)
