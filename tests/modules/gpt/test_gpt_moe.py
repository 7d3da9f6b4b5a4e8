"""MoE feed-forward: batched dispatch against a naive per-token loop, router losses, capacity."""

import pytest
import torch
import torch.nn.functional as F

from modules.gpt.model import GPT, GPTConfig, build_ffn
from modules.gpt.moe import MoE, dispatch, expert_capacity, load_balancing_loss, router_z_loss

C = 16


def moe(**kw) -> MoE:
    torch.manual_seed(0)
    cfg = dict(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=C, ffn="moe", n_experts=4, top_k=2,
               expert_hidden=24)
    m = build_ffn(GPTConfig(**{**cfg, **kw}), layer=0)  # the path the model takes: config -> MoE
    with torch.no_grad():  # non-zero biases so the reference must get them right too
        for p in (m.b_fc, m.b_proj):
            if p is not None:
                p.normal_(std=0.1)
    return m


def naive_moe(m: MoE, x: torch.Tensor) -> torch.Tensor:
    """The definition, one token and one choice at a time: first choices of all tokens take
    capacity slots before any second choice, earlier tokens first."""
    _, _, gates, experts = m.router(x)
    N = x.size(0)
    factor = m.capacity_factor if m.training else m.eval_capacity_factor
    cap = None if m.dropless else expert_capacity(N, m.n_experts, m.top_k, factor)
    load = [0] * m.n_experts
    rows = [x.new_zeros(C) for _ in range(N)]
    for r in range(m.top_k):
        for n in range(N):
            e = int(experts[n, r])
            if cap is not None and load[e] >= cap:
                continue  # dropped: this choice contributes nothing
            load[e] += 1
            h = x[n] @ m.w_fc[e] + (m.b_fc[e] if m.b_fc is not None else 0)
            y = F.gelu(h) @ m.w_proj[e] + (m.b_proj[e] if m.b_proj is not None else 0)
            rows[n] = rows[n] + gates[n, r] * y
    out = torch.stack(rows)
    if m.shared_expert is not None:
        out = out + m.shared_expert(x)
    return out


@pytest.mark.parametrize(
    "kw",
    [
        dict(),  # capacity 1.25: a few drops
        dict(capacity_factor=0.5),  # many drops
        dict(dropless=True),
        dict(top_k=1, bias=True),
        dict(shared_expert=True, bias=True, capacity_factor=0.75),
    ],
)
def test_batched_equals_naive_forward_and_backward(kw):
    m = moe(**kw).train()
    x = torch.randn(2, 20, C)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_fast = m(x1)
    grads_fast = torch.autograd.grad(y_fast.pow(2).sum(), [x1, *m.parameters()])
    y_ref = naive_moe(m, x2.view(-1, C)).view_as(x2)
    grads_ref = torch.autograd.grad(y_ref.pow(2).sum(), [x2, *m.parameters()], allow_unused=True)
    assert (y_fast - y_ref).abs().max() < 1e-5
    for gf, gr in zip(grads_fast, grads_ref):
        assert (gf - (torch.zeros_like(gf) if gr is None else gr)).abs().max() < 1e-5
    dropped = m.last_stats[2].item()
    if kw.get("capacity_factor") == 0.5:
        assert dropped > 0.2  # the case really exercises dropping
    if kw.get("dropless"):
        assert dropped == 0


def test_dispatch_priority_first_choices_first():
    experts = torch.tensor([[0, 1], [0, 1], [1, 0]])  # (N=3, k=2)
    pos, keep, counts, cap = dispatch(experts, 2, capacity=2)
    # flattened (k, N): first choices of tokens 0,1,2, then second choices
    assert pos.tolist() == [0, 1, 0, 1, 2, 2]
    assert keep.tolist() == [True, True, True, True, False, False]
    assert counts.tolist() == [3, 3] and cap == 2
    _, keep, _, cap = dispatch(experts, 2, capacity=None)
    assert cap == 3 and keep.all()


def test_load_balancing_loss_values():
    E, N = 4, 8
    uniform = torch.full((N, E), 1 / E)
    balanced = torch.arange(N)[:, None] % E
    assert load_balancing_loss(uniform, torch.bincount(balanced.reshape(-1), minlength=E)).item() == pytest.approx(1.0)
    collapsed = F.one_hot(torch.zeros(N, dtype=torch.long), E).float()
    assert load_balancing_loss(collapsed, torch.bincount(torch.zeros(N, dtype=torch.long), minlength=E)).item() == pytest.approx(E)


def test_router_z_loss_value():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    lse = [torch.log(torch.tensor(2.0)), torch.log(torch.exp(torch.tensor(1.0)) + torch.exp(torch.tensor(2.0)))]
    assert router_z_loss(logits).item() == pytest.approx(((lse[0] ** 2 + lse[1] ** 2) / 2).item(), rel=1e-6)


def test_router_runs_in_float32_under_bf16_autocast():
    m = moe()
    x = torch.randn(10, C)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, probs, gates, _ = m.router(x)
        y = m(x)
    assert logits.dtype == probs.dtype == gates.dtype == torch.float32
    assert torch.allclose(gates.sum(-1), torch.ones(10))
    assert y.shape == x.shape


def test_eval_capacity_factor_and_noise():
    m = moe(capacity_factor=0.5, eval_capacity_factor=4.0, noisy_topk=True)
    x = torch.randn(32, C)
    m.train()
    a, b = m(x), m(x)
    assert m.last_stats[2] > 0  # train capacity drops
    assert not torch.allclose(a, b)  # noisy gating differs call to call in training
    m.eval()
    a, b = m(x), m(x)
    assert m.last_stats[2] == 0  # eval capacity 4x: nothing dropped
    assert torch.equal(a, b)


def test_active_params_and_layer_placement():
    base = dict(vocab_size=11, block_size=8, n_layer=4, n_head=2, n_embd=C)
    dense = GPT(GPTConfig(**base))
    # 8 experts of hidden 2C, top-2: the same active feed-forward parameters as the 4C dense MLP
    sparse = GPT(GPTConfig(**base, ffn="moe", n_experts=8, top_k=2, expert_hidden=2 * C))
    router = 4 * 8 * C
    assert sparse.num_active_params() == dense.num_params() + router
    assert sparse.num_params() == dense.num_params() + router + 4 * 6 * (2 * C * 2 * C)
    every2 = GPT(GPTConfig(**base, ffn="moe", moe_every=2))
    assert [i for i, _ in every2.moe_layers()] == [1, 3]
    assert type(every2.transformer.h[0].mlp).__name__ == "MLP"


def test_model_aux_loss_collects_layers():
    cfg = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=C, ffn="moe", aux_loss_coef=0.1,
                    z_loss_coef=0.01)
    m = GPT(cfg)
    idx = torch.randint(0, 11, (3, 8))
    _, loss = m(idx, idx)
    expected = sum(0.1 * moe.last_losses[0] + 0.01 * moe.last_losses[1] for _, moe in m.moe_layers())
    assert torch.allclose(m.aux_loss(), expected)
    (loss + m.aux_loss()).backward()
    assert m.transformer.h[0].mlp.router.w_gate.weight.grad.abs().sum() > 0
