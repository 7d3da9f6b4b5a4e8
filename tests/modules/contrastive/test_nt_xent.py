"""NT-Xent (Chen et al. 2020, eq. 1) against a case computed by hand and against the usual
cross-entropy formulation of SimCLR implementations."""

import math

import pytest
import torch
import torch.nn.functional as F

from modules.contrastive.loss import nt_xent


def test_hand_computed_case():
    # N = 2 images in 2-D: z1 = [e1, e2], z2 = [e1, -e2] (up to length). Cosines: e1.e1 = 1, e1.e2 = 0, e1.-e2 = 0, e2.-e2 = -1.
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z2 = torch.tensor([[2.0, 0.0], [0.0, -3.0]])  # lengths do not matter: sim is a cosine
    tau = 0.5
    e = math.exp
    # i = view 1 of image 1 (e1): positive e1 (sim 1); others e2 (0), -e2 (0)
    l1 = -math.log(e(1 / tau) / (e(1 / tau) + e(0) + e(0)))
    # i = view 1 of image 2 (e2): positive -e2 (sim -1); others e1 (0), e1 (0)
    l2 = -math.log(e(-1 / tau) / (e(0) + e(0) + e(-1 / tau)))
    # the second views mirror them: e1 (view 2 of image 1) has the same neighbours as view 1; -e2 likewise
    expected = (l1 + l2 + l1 + l2) / 4
    assert float(nt_xent(z1, z2, tau)) == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.5 * (math.log(1 + 2 * e(-2)) + math.log(1 + 2 * e(2))), rel=1e-12)


def test_matches_the_cross_entropy_formulation():
    torch.manual_seed(0)
    z1, z2 = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    for tau in (0.1, 0.5, 2.0):
        # the form of SimCLR's reference code: logits over the 2N - 1 others, target the other view
        z = F.normalize(torch.cat([z1, z2]), dim=1)
        sim = (z @ z.t() / tau).fill_diagonal_(float("-inf"))
        target = torch.cat([torch.arange(6, 12), torch.arange(6)])
        torch.testing.assert_close(nt_xent(z1, z2, tau), F.cross_entropy(sim, target))


def test_gradient_pulls_views_together():
    z1 = torch.randn(4, 3, requires_grad=True)
    z2 = (z1.detach() + 0.5 * torch.randn(4, 3)).requires_grad_()
    nt_xent(z1, z2, 0.5).backward()
    with torch.no_grad():
        after = nt_xent(z1 - 0.1 * z1.grad, z2 - 0.1 * z2.grad, 0.5)
    assert after < nt_xent(z1, z2, 0.5)


@pytest.mark.parametrize("z1, z2, tau, match", [
    (torch.randn(4, 3), torch.randn(5, 3), 0.5, "same shape"),
    (torch.randn(1, 3), torch.randn(1, 3), 0.5, "N >= 2"),
    (torch.randn(4, 3), torch.randn(4, 3), 0.0, "temperature must be > 0"),
])
def test_bad_input_is_a_clear_error(z1, z2, tau, match):
    with pytest.raises(ValueError, match=match):
        nt_xent(z1, z2, tau)
