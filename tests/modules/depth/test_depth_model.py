"""The depth project's core: hand-written BatchNorm, LayerNorm and RMSNorm against torch's layers,
the MLP against the textbook composition, and the vanishing gradient it is built to show."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modules.depth.model import BatchNorm, DepthConfig, DepthMLP, LayerNorm, RMSNorm, geometric_mean, num_parameters

TOL = dict(atol=1e-6, rtol=0)


def _batches(n=5, b=8, c=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    # non-zero means and unequal scales per feature, so the statistics matter
    return [torch.randn(b, c, generator=g) * torch.linspace(0.5, 3.0, c) + torch.linspace(-2, 2, c) for _ in range(n)]


def _affine(ours, ref, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = torch.randn(ref.weight.shape, generator=g)
        ref.weight.copy_(w)
        ours.weight.copy_(w)
        if getattr(ref, "bias", None) is not None:
            b = torch.randn(ref.bias.shape, generator=g)
            ref.bias.copy_(b)
            ours.bias.copy_(b)


def _check_grads(ours, ref, x):
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn_like(x)
    (ours(xa) * g).sum().backward()
    (ref(xb) * g).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, **TOL)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, **TOL)


def test_batchnorm_matches_torch_in_training_and_evaluation():
    ours, ref = BatchNorm(6), nn.BatchNorm1d(6)
    _affine(ours, ref)
    for x in _batches():  # training: batch statistics, running estimates move
        torch.testing.assert_close(ours(x), ref(x), **TOL)
    torch.testing.assert_close(ours.running_mean, ref.running_mean, **TOL)
    torch.testing.assert_close(ours.running_var, ref.running_var, **TOL)
    _check_grads(ours, ref, _batches(1, seed=5)[0])
    ours.eval(), ref.eval()
    x = _batches(1, b=3, seed=7)[0]
    torch.testing.assert_close(ours(x), ref(x), **TOL)  # evaluation: the running estimates
    # and evaluation really differs from training: a sample no longer depends on its batch
    torch.testing.assert_close(ours(x[:1]), ours(x)[:1], **TOL)
    assert not torch.allclose(ours.train()(x), ours.eval()(x), atol=1e-3)


def test_layernorm_and_rmsnorm_match_torch():
    x = _batches(1, b=4, c=6, seed=3)[0]
    ln, ln_ref = LayerNorm(6), nn.LayerNorm(6)
    _affine(ln, ln_ref)
    torch.testing.assert_close(ln(x), ln_ref(x), **TOL)
    _check_grads(ln, ln_ref, x)
    rms, rms_ref = RMSNorm(6, eps=1e-6), nn.RMSNorm(6, eps=1e-6)
    _affine(rms, rms_ref)
    torch.testing.assert_close(rms(x), rms_ref(x), **TOL)
    _check_grads(rms, rms_ref, x)
    # per-sample: batch size and train/eval change nothing
    torch.testing.assert_close(ln.eval()(x[:1]), ln.train()(x)[:1], **TOL)


def test_batchnorm_rejects_a_batch_of_one_in_training():
    with pytest.raises(ValueError, match="at least 2 samples.*norm='layer'"):
        BatchNorm(4)(torch.randn(1, 4))
    BatchNorm(4).eval()(torch.randn(1, 4))  # evaluation needs no batch statistics


def test_plain_mlp_is_the_textbook_composition_and_residual_adds_the_identity():
    torch.manual_seed(0)
    net = DepthMLP(DepthConfig(depth=3, width=5, in_features=7, num_classes=3))
    x = torch.randn(4, 7)
    h = torch.sigmoid(net.stem(x))
    for b in net.blocks:
        h = torch.sigmoid(b.linear(h))
    torch.testing.assert_close(net(x), net.head(h))
    res = DepthMLP(DepthConfig(depth=3, width=5, in_features=7, num_classes=3, residual=True))
    res.load_state_dict(net.state_dict())
    h = net.stem(x)
    for b in net.blocks:
        h = h + b.linear(torch.sigmoid(h))
    torch.testing.assert_close(res(x), net.head(torch.sigmoid(h)))
    logits, hidden = res(x, return_hidden=True)
    assert logits.shape == (4, 3) and len(hidden) == 4 and all(a.shape == (4, 5) for a in hidden)


@pytest.mark.parametrize("norm, per_norm", [("none", 0), ("batch", 2), ("layer", 2), ("rms", 1)])
def test_parameter_counts(norm, per_norm):
    depth, w = 10, 64
    linear = (784 * w + w) + depth * (w * w + w) + (w * 10 + 10)
    for residual in (False, True):  # shortcuts add no parameters
        net = DepthMLP(DepthConfig(depth=depth, width=w, norm=norm, residual=residual))
        assert num_parameters(net) == linear + (depth + 1) * per_norm * w


def _block_grad_norms(cfg, seed=0):
    torch.manual_seed(seed)
    net = DepthMLP(cfg)
    x, y = torch.rand(64, 784) * 2 - 1, torch.randint(0, 10, (64,))
    F.cross_entropy(net(x), y).backward()
    return [b.linear.weight.grad.norm().item() for b in net.blocks]


def test_sigmoid_gradient_vanishes_with_depth_and_the_shortcut_carries_it():
    # Nielsen ch. 5: each sigmoid layer multiplies the backward error by W^T diag(σ') with σ' <= 1/4.
    plain = _block_grad_norms(DepthConfig(depth=10))
    assert plain[0] / plain[-1] < 1e-2
    assert all(a < b for a, b in zip(plain, plain[1:]))  # smaller at every step towards the input
    res = _block_grad_norms(DepthConfig(depth=10, residual=True))
    assert 0.1 < res[0] / res[-1] < 10
    bn = _block_grad_norms(DepthConfig(depth=10, norm="batch"))  # normalisation also keeps it alive
    assert 0.1 < bn[0] / bn[-1] < 10


def test_init_schemes_set_the_weight_scale():
    torch.manual_seed(0)
    for init, std in (("normal", 1.0), ("xavier", (2 / (256 + 256)) ** 0.5), ("kaiming", (2 / 256) ** 0.5)):
        net = DepthMLP(DepthConfig(depth=2, width=256, init=init))
        assert net.blocks[0].linear.weight.std().item() == pytest.approx(std, rel=0.05), init


@pytest.mark.parametrize("kw, match", [
    (dict(depth=0), "depth"), (dict(activation="gelu"), "activation"), (dict(norm="group"), "norm"),
    (dict(init="orthogonal"), "init"), (dict(width=0), "width"),
])
def test_bad_config_is_a_clear_error(kw, match):
    with pytest.raises(ValueError, match=match):
        DepthConfig(**kw)


def test_geometric_mean_skips_non_positive_values():
    assert geometric_mean([1e-4, 1e-2, 0.0, float("nan")]) == pytest.approx(1e-3)
