"""Muon's Newton-Schulz step, the composite MuonAdamW (against torch's own optimizers run apart), its
checkpoint round trip, what the memory ledger sees of it, the warm-up/stable/decay schedule, and
TimeToTarget."""

from __future__ import annotations

import io

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers.logger import Logger

from modules.classifier.module import ClassifierModule
from modules.gpt.module import GPTModule
from modules.optimizers import MuonAdamW, build_optimizer
from modules.targets import TimeToTarget
from modules.training import cosine_lr, lr_schedule, wsd_lr
from pipelines.resources import optimizer_bytes
from tests.helpers import quiet_trainer


@pytest.mark.parametrize("shape", [(32, 96), (96, 32), (64, 200)])
def test_five_newton_schulz_steps_put_singular_values_in_muon_band(shape):
    """Muon's quintic (a, b, c) = (3.4445, -4.775, 2.0315) trades exactness for slope at zero: after 5 steps
    the singular values of a random matrix lie in about [0.68, 1.14], not at 1 (Jordan et al. 2024).
    Read through torch.optim.Muon itself: from zero weights, with no momentum or decay, one step at lr 1
    writes -NS(G), scaled by sqrt(max(1, rows/cols))."""
    g = torch.Generator().manual_seed(shape[0])
    for _ in range(3):
        G = torch.randn(*shape, generator=g) * 3.0
        w = torch.zeros(*shape, requires_grad=True)
        w.grad = G
        torch.optim.Muon([w], lr=1.0, momentum=0.0, nesterov=False, weight_decay=0.0).step()
        s = torch.linalg.svdvals(-w.detach() / max(1.0, shape[0] / shape[1]) ** 0.5)
        assert 0.66 <= s.min() and s.max() <= 1.15, (s.min(), s.max())
        assert s.max() - s.min() > 0.2  # not an exact orthogonalisation: the band is the point
        # the plain normalised gradient is far from that band: NS did the work
        s0 = torch.linalg.svdvals(G / G.norm())
        assert s0.max() < 0.5


def tiny_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 8),
                               torch.nn.ReLU(), torch.nn.Linear(8, 3))


def batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(5, 2, 6, 6, generator=g), torch.randint(0, 3, (5,), generator=g)


def loss_of(net, seed):
    x, y = batch(seed)
    return torch.nn.functional.cross_entropy(net(x), y)


def test_muon_adamw_equals_torch_muon_and_adamw_run_apart():
    """Filters flattened to matrices for Muon, the head and biases for AdamW: the composite's step equals
    torch's two optimizers stepping their own parameters (the filter's Muon on a 2-D copy of it)."""
    a, b = tiny_net(), tiny_net()
    hidden = lambda n, p: p.dim() >= 2 and not n.startswith("4.")  # noqa: E731  (conv and first linear)
    opt = build_optimizer(a.named_parameters(), "muon", lr=1e-2, weight_decay=0.1, muon_lr=0.05, is_hidden=hidden)
    assert isinstance(opt, MuonAdamW)
    conv2d = b[0].weight.detach().reshape(4, -1).clone().requires_grad_()
    muon = torch.optim.Muon([conv2d, b[2].weight], lr=0.05, weight_decay=0.1, momentum=0.95)
    rest = [b[0].bias, b[2].bias, b[4].weight, b[4].bias]
    adamw = torch.optim.AdamW([{"params": [b[4].weight], "weight_decay": 0.1},
                               {"params": [b[0].bias, b[2].bias, b[4].bias], "weight_decay": 0.0}],
                              lr=1e-2, betas=(0.9, 0.99))
    for step in range(3):
        opt.zero_grad()
        loss_of(a, step).backward()
        opt.step()
        with torch.no_grad():
            b[0].weight.copy_(conv2d.view_as(b[0].weight))
        for p in [b[0].weight, *rest, b[2].weight]:
            p.grad = None
        loss_of(b, step).backward()
        conv2d.grad = b[0].weight.grad.reshape(4, -1)
        muon.step()
        adamw.step()
        with torch.no_grad():
            b[0].weight.copy_(conv2d.view_as(b[0].weight))
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    assert len(rest) == 4


def gpt_module(optimizer):
    torch.manual_seed(0)
    return GPTModule(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=16, tie_weights=False,
                     optimizer=optimizer, lr_schedule="wsd", warmup_steps=2, lr_decay_steps=8)


def train(module, conf, steps, seed):
    g = torch.Generator().manual_seed(seed)
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    for _ in range(steps):
        x = torch.randint(0, 16, (3, 8), generator=g)
        opt.zero_grad()
        module.model(x, x.roll(1, 1))[1].backward()
        torch.nn.utils.clip_grad_norm_(module.model.parameters(), 1.0)  # reads param_groups, as Lightning's does
        opt.step()
        sched.step()


def test_checkpoint_round_trip_resumes_identically():
    """Save weights, optimizer and scheduler after 3 steps, load them into a fresh module, and both go on
    to the same weights: Muon's momentum, AdamW's moments and the schedule's position all came back."""
    a = gpt_module("muon")
    conf_a = a.configure_optimizers()
    train(a, conf_a, 3, seed=0)
    buf = io.BytesIO()
    torch.save({"model": a.state_dict(), "opt": conf_a["optimizer"].state_dict(),
                "sched": conf_a["lr_scheduler"]["scheduler"].state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    b = gpt_module("muon")
    conf_b = b.configure_optimizers()
    b.load_state_dict(saved["model"])
    conf_b["optimizer"].load_state_dict(saved["opt"])
    conf_b["lr_scheduler"]["scheduler"].load_state_dict(saved["sched"])
    assert optimizer_bytes([conf_b["optimizer"]]) == optimizer_bytes([conf_a["optimizer"]])  # the ledger sees it too
    train(a, conf_a, 4, seed=1)  # across the start of the cool-down: the loaded schedule must reach both halves
    train(b, conf_b, 4, seed=1)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0, msg=n)
    fresh = gpt_module("muon")  # the same 4 steps without the saved state end elsewhere
    conf_f = fresh.configure_optimizers()
    fresh.load_state_dict(saved["model"])
    train(fresh, conf_f, 4, seed=1)
    assert max((pa - pf).abs().max() for pa, pf in zip(a.parameters(), fresh.parameters())) > 1e-4


def test_an_adamw_state_dict_is_refused_with_the_reason():
    a, m = gpt_module("adamw"), gpt_module("muon")
    with pytest.raises(ValueError, match="another optimizer"):
        m.configure_optimizers()["optimizer"].load_state_dict(a.configure_optimizers()["optimizer"].state_dict())


def test_the_schedule_drives_both_halves_and_the_ledger_sees_one_buffer_for_muon():
    m = gpt_module("muon")
    conf = m.configure_optimizers()
    opt = conf["optimizer"]
    train(m, conf, 7, seed=0)
    factor = wsd_lr(6, 1.0, 1e-4 / 1e-3, 2, 8, 0.4)  # the factor the 7th step (step 6) ran at
    assert factor < 1.0  # inside the cool-down: the schedule has moved off the peak
    assert opt.muon.param_groups[0]["lr"] == pytest.approx(0.02 * factor)
    assert all(g["lr"] == pytest.approx(1e-3 * factor) for g in opt.adamw.param_groups)
    hidden = [p for g in opt.muon.param_groups for p in g["params"]]
    rest = [p for g in opt.adamw.param_groups for p in g["params"]]
    n_hidden, n_rest = sum(p.numel() for p in hidden), sum(p.numel() for p in rest)
    steps = sum(s["step"].nbytes for s in opt.adamw.state.values())  # AdamW's step counters
    assert optimizer_bytes([opt]) == 4 * n_hidden + 2 * 4 * n_rest + steps  # momentum; exp_avg + exp_avg_sq
    a = gpt_module("adamw")
    conf_a = a.configure_optimizers()
    train(a, conf_a, 1, seed=0)
    assert optimizer_bytes([conf_a["optimizer"]]) > optimizer_bytes([opt]) + 4 * n_hidden - 1


def test_wsd_holds_the_peak_then_decays_linearly_to_the_floor():
    lr, lo = 1.0, 0.1
    assert [wsd_lr(s, lr, lo, 4, 20, 0.5) for s in range(4)] == [cosine_lr(s, lr, lo, 4, 20) for s in range(4)]
    assert all(wsd_lr(s, lr, lo, 4, 20, 0.5) == lr for s in range(4, 10))  # stable until 20 - 0.5 * 20
    assert wsd_lr(15, lr, lo, 4, 20, 0.5) == pytest.approx(lr - (lr - lo) * 0.5)
    assert wsd_lr(20, lr, lo, 4, 20, 0.5) == lo and wsd_lr(99, lr, lo, 4, 20, 0.5) == lo
    with pytest.raises(ValueError, match="cooldown_frac"):
        lr_schedule(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), 1, 10, 0.1, "wsd", 1.5)


def test_lenet_muon_flattens_the_filters_and_keeps_the_head_on_adamw():
    m = ClassifierModule(optimizer="muon")
    opt = m.configure_optimizers()
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    before = m.net.conv1.weight.detach().clone()
    torch.nn.functional.cross_entropy(m(x), y).backward()
    opt.step()
    assert not torch.equal(before, m.net.conv1.weight)
    shapes = {tuple(s["momentum_buffer"].shape) for s in opt.muon.state.values()}
    assert shapes == {(6, 25), (16, 150), (120, 400), (84, 120)}  # conv filters as out x (in * k * k)
    assert any(p is m.net.fc3.weight for g in opt.adamw.param_groups for p in g["params"])


class Captured(Logger):
    def __init__(self):
        super().__init__()
        self.metrics: list[tuple[int, dict]] = []

    name, version = "captured", 0

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


class Scripted(L.LightningModule):
    """Validation loss 3, 2, 1, ... at its successive validations."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.evals = 0

    def training_step(self, batch, i):
        return (self.w - 1).pow(2).sum()

    def validation_step(self, batch, i):
        pass

    def on_validation_epoch_end(self):
        if not self.trainer.sanity_checking:
            self.evals += 1
        self.log("val/loss", 4.0 - self.evals)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(64, 1), batch_size=4)

    val_dataloader = train_dataloader

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("target, steps", [(2.5, 4), (0.5, 8)])  # losses 3, 2, 1, 0 at steps 2, 4, 6, 8
def test_time_to_target_logs_the_first_validation_at_the_target(target, steps):
    logger, cb = Captured(), TimeToTarget(target)
    trainer = quiet_trainer(max_steps=12, val_check_interval=2, check_val_every_n_epoch=None, limit_val_batches=1,
                            logger=logger, callbacks=[cb], num_sanity_val_steps=1)
    trainer.fit(Scripted())
    logged = {k: v for _, m in logger.metrics for k, v in m.items() if k.startswith("target/")}
    assert logged["target/steps"] == steps and logged["target/reached"] == 1.0
    assert logged["target/time_s"] > 0
    assert cb.reached_at[0] == steps


def test_time_to_target_says_when_the_run_never_gets_there():
    logger = Captured()
    trainer = quiet_trainer(max_steps=4, val_check_interval=2, check_val_every_n_epoch=None, limit_val_batches=1,
                            logger=logger, callbacks=[TimeToTarget(-10.0)])
    trainer.fit(Scripted())
    logged = {k: v for _, m in logger.metrics for k, v in m.items() if k.startswith("target/")}
    assert set(logged) == {"target/reached", "target/steps_at_least", "target/time_s_at_least"}
    assert logged["target/reached"] == 0.0 and logged["target/steps_at_least"] == 4  # censored: at least the run
    assert logged["target/time_s_at_least"] > 0
