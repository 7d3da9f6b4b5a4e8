"""The bytes attention saves for backward, measured by the pipeline's ledger, against their closed forms:
explicit softmax(QK^T)V keeps the (T, T) probabilities (quadratic), the fused SDPA kernel only q, k, v,
the output and a log-sum-exp per row (linear). benchmarks/attention_memory.py sweeps the same to T = 4096."""

import pytest
import torch

from modules.gpt.attention import attention_reference, attention_sdpa, flash_saved_bytes, reference_saved_bytes
from pipelines.resources import ActivationMeter

B, NH, HS = 2, 3, 8


def saved_bytes(fn, t: int) -> tuple[int, str]:
    q, k, v = (torch.randn(B, NH, t, HS, requires_grad=True) for _ in range(3))
    with ActivationMeter() as meter:
        y = fn(q, k, v)
    y.sum().backward()  # the saved graph is a real one: backward runs
    return meter.bytes, y.grad_fn.name()


@pytest.mark.parametrize("t", [24, 96])
def test_explicit_attention_ledger_matches_its_quadratic_formula(t):
    measured, _ = saved_bytes(attention_reference, t)
    assert measured == reference_saved_bytes(B, NH, t, HS)
    # the formula by its terms: probabilities 4 B nh T^2, the bool mask T^2, and q, k, v
    assert measured == 4 * B * NH * t * t + t * t + 3 * 4 * B * NH * t * HS


def test_fused_sdpa_ledger_is_linear_in_length():
    (small, kernel), (large, _) = saved_bytes(attention_sdpa, 24), saved_bytes(attention_sdpa, 96)
    assert "FlashAttentionForCpu" in kernel  # the fused CPU kernel, not the math fallback
    assert (small, large) == (flash_saved_bytes(B, NH, 24, HS), flash_saved_bytes(B, NH, 96, HS))
    assert large == 4 * small  # 4x the length, 4x the bytes; explicit attention grows about 16x
    ref_small, ref_large = saved_bytes(attention_reference, 24)[0], saved_bytes(attention_reference, 96)[0]
    assert ref_large / ref_small > 10
