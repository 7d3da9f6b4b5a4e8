"""Mixture-of-Experts feed-forward for the mini-GPT (Switch Transformer / ST-MoE style).

Pieces, each small and tested on its own:
- `Router`: softmax over experts in float32 (bf16 logits make top-k and the z-loss unstable,
  ST-MoE sec. 3), top-k, optional noisy top-k (Shazeer et al. 2017, eq. 3-5).
- `load_balancing_loss` (Switch, eq. 4) and `router_z_loss` (ST-MoE, eq. 5).
- `dispatch`: which (token, expert) assignments fit the expert capacity, and in which slot.
- `MoE`: groups tokens by expert into an (E, capacity, C) buffer and applies all experts with
  two batched matmuls; no Python loop over tokens (the per-token reference is in the tests).

Shape legend: N tokens (B * T), C n_embd, E n_experts, k top_k, H expert hidden, S capacity.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# Order of the per-layer statistics vector `MoE.last_stats`: these four, then E load fractions.
STAT_NAMES = ("aux_loss", "z_loss", "dropped_frac", "load_cv")


class Router(nn.Module):
    def __init__(self, n_embd: int, n_experts: int, top_k: int, noisy: bool = False):
        super().__init__()
        self.top_k = top_k
        self.w_gate = nn.Linear(n_embd, n_experts, bias=False)
        # noisy top-k: a learned, input-dependent noise scale, only active in training
        self.w_noise = nn.Linear(n_embd, n_experts, bias=False) if noisy else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (N, C). Returns logits (N, E) and probs (N, E) in float32, gates (N, k) and experts (N, k).

        With k > 1 the k gate values are renormalised to sum to 1 (Mixtral / ST-MoE top-2).
        """
        with torch.autocast(device_type=x.device.type, enabled=False):
            xf = x.float()
            logits = F.linear(xf, self.w_gate.weight.float())
            if self.w_noise is not None and self.training:
                logits = logits + torch.randn_like(logits) * F.softplus(F.linear(xf, self.w_noise.weight.float()))
            probs = logits.softmax(dim=-1)
            gates, experts = probs.topk(self.top_k, dim=-1)
            if self.top_k > 1:
                gates = gates / gates.sum(dim=-1, keepdim=True)
        return logits, probs, gates, experts


def load_balancing_loss(probs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Switch Transformer auxiliary loss, eq. 4: E * sum_i f_i * P_i.

    f_i is the fraction of the N * k assignments routed to expert i (not differentiable), P_i
    the mean router probability of expert i (differentiable). It is 1 at perfect balance.
    probs: (N, E); counts: (E,) assignments per expert, as `dispatch` returns them.
    """
    f = counts.to(probs.dtype) / counts.sum()
    return probs.shape[-1] * (f * probs.mean(dim=0)).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss, eq. 5: mean over tokens of logsumexp(logits)^2; keeps logits small."""
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


def expert_capacity(n_tokens: int, n_experts: int, top_k: int, factor: float) -> int:
    """Slots per expert: ceil(factor * N * k / E) (Switch sec. 2.2), at least 1."""
    return max(1, math.ceil(factor * n_tokens * top_k / n_experts))


def dispatch(experts: torch.Tensor, n_experts: int, capacity: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Assign each (token, choice) to a slot of its expert.

    Priority follows GShard / ST-MoE: every token's first choice is placed before any second
    choice, and within a choice rank, earlier tokens first. Assignments past the capacity are
    dropped. capacity None means dropless (capacity = the busiest expert's load).

    experts: (N, k). Returns, for the flattened (k, N) assignments (index a = r * N + n):
    position within the expert (kN,), keep mask (kN,), per-expert counts before dropping (E,),
    and the capacity used.
    """
    flat = experts.t().reshape(-1)  # (kN,), choice-rank major
    counts = torch.bincount(flat, minlength=n_experts)
    # a stable sort groups assignments by expert and keeps priority order inside each group
    order = torch.argsort(flat, stable=True)
    starts = counts.cumsum(0) - counts  # first sorted index of each expert's group
    pos = torch.empty_like(flat)
    pos[order] = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
    if capacity is None:
        capacity = max(1, int(counts.max()))
    return pos, pos < capacity, counts, capacity


class MoE(nn.Module):
    def __init__(self, router: Router, n_embd: int, hidden: int, capacity_factor: float = 1.25,
                 eval_capacity_factor: float = 2.0, dropless: bool = False, bias: bool = True, dropout: float = 0.0,
                 shared_expert: nn.Module | None = None):
        """Routed experts (plus an optional shared one) replacing a block's MLP.

        The router and the shared expert are built by the caller and handed in, as torchtune's
        `MoE(experts, router, shared_expert)` takes them: this file needs nothing from the model
        that uses it (`modules.gpt.model.build_ffn` reads the GPTConfig).

        Args:
            router: Picks top_k of its n_experts per token (its w_gate sets E).
            n_embd: Token width C.
            hidden: Each expert's hidden width H.
            capacity_factor: Slots per expert in training, as a multiple of the fair share N k / E.
            eval_capacity_factor: The same in evaluation.
            dropless: No capacity: every assignment is kept.
            bias: Biases in the experts' two projections.
            dropout: Dropout on the output.
            shared_expert: A dense feed-forward every token also passes through (DeepSeek-MoE), or None.
        """
        super().__init__()
        C, H, E = n_embd, hidden, router.w_gate.out_features
        self.n_experts, self.top_k = E, router.top_k
        self.capacity_factor, self.eval_capacity_factor, self.dropless = capacity_factor, eval_capacity_factor, dropless
        self.router = router
        # all experts' weights stacked, so one bmm applies every expert to its token group
        self.w_fc = nn.Parameter(torch.empty(E, C, H))
        self.w_proj = nn.Parameter(torch.empty(E, H, C))
        self.b_fc = nn.Parameter(torch.zeros(E, H)) if bias else None
        self.b_proj = nn.Parameter(torch.zeros(E, C)) if bias else None
        nn.init.normal_(self.w_fc, std=0.02)
        nn.init.normal_(self.w_proj, std=0.02)  # GPT rescales "w_proj" like c_proj
        self.shared_expert = shared_expert
        self.dropout = nn.Dropout(dropout)
        self.last_losses: tuple[torch.Tensor, torch.Tensor] | None = None  # (aux, z), with grad
        self.last_stats: torch.Tensor | None = None  # (4 + E,), detached; see STAT_NAMES

    def expert_params(self) -> int:
        """Parameters of one routed expert."""
        n = self.w_fc[0].numel() + self.w_proj[0].numel()
        if self.b_fc is not None:
            n += self.b_fc[0].numel() + self.b_proj[0].numel()
        return n

    def inactive_params(self) -> int:
        """Parameters a token does not pass through: the experts it is not routed to."""
        return (self.n_experts - self.top_k) * self.expert_params()

    def experts_forward(self, h: torch.Tensor) -> torch.Tensor:
        """h: (E, S, C) tokens grouped by expert -> (E, S, C); expert e applied to h[e]."""
        a = torch.bmm(h, self.w_fc)  # (E, S, H)
        if self.b_fc is not None:
            a = a + self.b_fc[:, None, :]
        out = torch.bmm(F.gelu(a), self.w_proj)  # (E, S, C)
        if self.b_proj is not None:
            out = out + self.b_proj[:, None, :]
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, C)
        N, C = x.shape
        E, k = self.n_experts, self.top_k
        logits, probs, gates, experts = self.router(x)
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        capacity = None if self.dropless else expert_capacity(N, E, k, factor)
        pos, keep, counts, capacity = dispatch(experts, E, capacity)

        # 1. gather kept assignments into slots of an (E * S, C) buffer
        tok = torch.arange(N, device=x.device).repeat(k)[keep]  # token of each kept assignment
        slot = (experts.t().reshape(-1) * capacity + pos)[keep]
        gate = gates.t().reshape(-1)[keep]
        buf = x.new_zeros(E * capacity, C).index_copy(0, slot, x[tok])
        # 2. every expert on its own slots at once
        out = self.experts_forward(buf.view(E, capacity, C)).reshape(E * capacity, C)
        # 3. weight by the gate and sum each token's k expert outputs; dropped ones add nothing
        y = (out[slot].float() * gate[:, None]).to(x.dtype)
        y = x.new_zeros(N, C).index_add(0, tok, y)
        if self.shared_expert is not None:
            y = y + self.shared_expert(x)

        aux = load_balancing_loss(probs, counts)
        z = router_z_loss(logits)
        self.last_losses = (aux, z)
        with torch.no_grad():
            load = counts.float()
            self.last_stats = torch.cat([
                torch.stack([aux.detach(), z.detach(), 1.0 - keep.float().mean(), load.std(unbiased=False) / load.mean()]),
                load / (N * k),
            ])
        return self.dropout(y).reshape(shape)
