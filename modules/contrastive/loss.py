"""NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR (Chen et al. 2020, eq. 1).

A batch of N images gives 2N views; views 2k-1 and 2k come from the same image (here: z1[k] and
z2[k]). With sim(u, v) = u.v / (|u| |v|), the loss of the positive pair (i, j) is

    l(i, j) = -log  exp(sim(z_i, z_j) / tau) / sum_{k != i} exp(sim(z_i, z_k) / tau)       (eq. 1)

and the batch loss averages it over all 2N ordered positive pairs, L = 1/(2N) sum_k [l(2k-1, 2k) +
l(2k, 2k-1)]. Every other view in the batch is a negative; tau sets how hard the loss pushes on the
closest negatives (small tau: the nearest ones dominate the sum).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """Mean NT-Xent over the 2N ordered positive pairs; z1, z2 (N, D), row k of each a view of image k."""
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"z1 and z2 must be two (N, D) batches of the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if z1.size(0) < 2:
        raise ValueError("NT-Xent needs N >= 2 images per batch: with one there is no negative")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n = z1.size(0)
    z = F.normalize(torch.cat([z1, z2]), dim=1)  # (2N, D), unit rows: dot product = cosine similarity
    logits = z @ z.t() / temperature  # (2N, 2N): sim(z_i, z_k) / tau
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))  # k != i
    positive = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)  # j(i): the other view
    # l(i, j) = -sim(i, j)/tau + log sum_{k != i} exp(sim(i, k)/tau)
    losses = torch.logsumexp(logits, dim=1) - logits[torch.arange(2 * n, device=z.device), positive]
    return losses.mean()
