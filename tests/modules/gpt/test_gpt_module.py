"""GPTModule through the real pipeline into a temporary MLflow store, plus its schedule and optimizer."""

import math
from pathlib import Path

import mlflow
import pytest
import torch

from datamodules.shakespeare import ShakespeareDataModule
from modules.gpt.module import GPTModule
from modules.training import cosine_lr
from pipelines.cli import main as practicum
from pipelines.run import run_experiment
from tests.data import shakespeare_text
from tests.helpers import GPT_CONFIG, gpt_small, quiet_trainer

TINY = shakespeare_text()  # Shakespeare text in place of the tinyshakespeare file (tests/data.py)
CONFIG, SMALL = GPT_CONFIG, gpt_small()


def test_cosine_lr_matches_nanogpt_schedule():
    kw = dict(lr=1e-3, min_lr=1e-4, warmup_steps=10, decay_steps=110)
    assert cosine_lr(0, **kw) == pytest.approx(1e-3 / 11)
    assert cosine_lr(9, **kw) == pytest.approx(1e-3 * 10 / 11)
    assert cosine_lr(10, **kw) == pytest.approx(1e-3)
    assert cosine_lr(60, **kw) == pytest.approx((1e-3 + 1e-4) / 2)  # half-way down the cosine
    assert cosine_lr(110, **kw) == pytest.approx(1e-4)
    assert cosine_lr(500, **kw) == 1e-4


def test_optimizer_decays_only_matrices_and_follows_schedule():
    m = GPTModule(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=8, warmup_steps=2, lr_decay_steps=10)
    cfg = m.configure_optimizers()
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(m.parameters()))
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([cosine_lr(s, 1e-3, 1e-4, 2, 10) for s in range(12)])


def test_module_rejects_mismatched_data():
    dm = ShakespeareDataModule(corpus="tinyshakespeare", path=str(TINY), max_chars=5000, block_size=16)
    dm.setup()
    m = GPTModule(vocab_size=99, n_layer=1, n_head=2, n_embd=8)
    m._trainer = type("T", (), {"datamodule": dm})()
    with pytest.raises(ValueError, match="vocab_size=99"):
        m.setup("fit")
    m = GPTModule(block_size=8, n_layer=1, n_head=2, n_embd=8)
    m._trainer = type("T", (), {"datamodule": dm})()
    with pytest.raises(ValueError, match="block_size=16 exceeds"):
        m.setup("fit")
    with pytest.raises(ValueError, match="min_lr"):
        GPTModule(lr=1e-4, min_lr=1e-3)
    with pytest.raises(ValueError, match="divisible by n_head"):
        GPTModule(n_embd=10, n_head=4)


def test_pipeline_run_logs_and_generate_round_trip(tracking_uri, capsys):
    res = run_experiment(CONFIG, SMALL, tracking_uri=tracking_uri)
    assert res.status == "FINISHED", res.error
    client = mlflow.MlflowClient(tracking_uri)
    run = client.get_run(res.run_id)
    m = run.data.metrics
    assert run.data.tags["practicum.project"] == "gpt"
    assert math.isclose(m["val/ppl"], math.exp(m["val/loss"]), rel_tol=1e-4)
    assert m["val/loss"] < math.log(65)  # it learned something in 6 steps
    # tokens_per_batch reached the ledger: every sample is a window of block_size=16 tokens, 6 steps of 4
    assert m["perf/tokens_per_s"] == pytest.approx(16 * m["perf/samples_per_s"]) and m["budget/tokens"] == 6 * 4 * 16
    assert m["params/active"] == m["params/total"]
    assert m["gpt/flops_per_token"] > 6 * m["params/active"] / 2
    assert not any(k.startswith("test/") for k in m)  # the test split is opt-in (data.test_fraction)
    history = client.get_metric_history(res.run_id, "train/loss")
    assert [h.step for h in history] == [1, 3, 5]  # every log_every_n_steps=2 steps
    dm = ShakespeareDataModule(corpus="tinyshakespeare", path=str(TINY), max_chars=20000, block_size=16)
    dm.setup()
    assert run.data.params["data.fingerprint"] == dm.fingerprint()
    files = {a.path for a in client.list_artifacts(res.run_id, "samples")}
    assert {"samples/step_000003.txt", "samples/step_000006.txt", "samples/final.txt"} <= files

    # the checkpoint alone rebuilds model and tokenizer: practicum generate from the run id
    capsys.readouterr()
    assert practicum(["generate", res.run_id, "--prompt", "ROMEO:", "--max_new_tokens", "20", "--seed", "3",
                      "--tracking_uri", tracking_uri]) == 0
    text = capsys.readouterr().out.rstrip("\n")
    assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 20
    loaded = GPTModule.load_from_checkpoint(res.checkpoint, map_location="cpu")
    assert loaded.tokenizer.state_dict() == dm.tokenizer.state_dict()
    assert loaded.generate_text("ROMEO:", 20, temperature=0.8, seed=3) == text
    assert loaded.generate_text("ROMEO:", 20, temperature=0.8, seed=4) != text


def test_pipeline_scores_the_test_split_with_the_best_checkpoint(tracking_uri):
    res = run_experiment(CONFIG, SMALL + ["--data.init_args.test_fraction=0.05"], tracking_uri=tracking_uri)
    assert res.status == "FINISHED", res.error
    m = mlflow.MlflowClient(tracking_uri).get_run(res.run_id).data.metrics
    # the token mean over the whole test split, recomputed from the checkpoint the pipeline tested
    dm = ShakespeareDataModule(corpus="tinyshakespeare", path=str(TINY), max_chars=20000, block_size=16,
                               test_fraction=0.05)
    dm.setup()
    model = GPTModule.load_from_checkpoint(res.checkpoint, map_location="cpu").eval()
    with torch.no_grad():
        losses = [model(x, y)[1] * x.size(0) for x, y in dm.test_dataloader()]
    n = sum(x.size(0) for x, _ in dm.test_dataloader())
    assert m["test/loss"] == pytest.approx(float(sum(losses) / n), rel=1e-5)
    assert m["test/ppl"] == pytest.approx(math.exp(m["test/loss"]), rel=1e-4)


def test_pipeline_moe_run_logs_routing(tracking_uri):
    args = SMALL + ["--model.init_args.ffn=moe", "--model.init_args.n_experts=4", "--model.init_args.expert_hidden=32"]
    res = run_experiment(CONFIG, args, tracking_uri=tracking_uri)
    assert res.status == "FINISHED", res.error
    client = mlflow.MlflowClient(tracking_uri)
    m = client.get_run(res.run_id).data.metrics
    for key in ("moe/aux_loss", "moe/z_loss", "moe/load_cv", "moe/dropped_frac", "moe/layer0/expert3_frac"):
        assert key in m
    # E * sum_i f_i P_i lies in (0, E] (it can fall below 1: see test_switch_balancing_loss_is_its_definition)
    assert 0.0 < m["moe/aux_loss"] <= 4.0
    fracs = sum(m[f"moe/layer0/expert{e}_frac"] for e in range(4))
    assert fracs == pytest.approx(1.0, abs=1e-5)
    assert m["params/active"] < m["params/total"]  # 2 of 4 experts per token
    assert "moe/expert_utilization.png" in {a.path for a in client.list_artifacts(res.run_id, "moe")}


def switch_loss_by_definition(probs: torch.Tensor, experts: torch.Tensor) -> float:
    """Fedus et al. (2021) eq. 4 by loops: E * sum_i f_i * P_i, f_i the share of the N * k assignments
    sent to expert i, P_i the mean over the N tokens of the router probability of expert i."""
    n_tokens, n_experts = probs.shape
    sent = [e for row in experts.tolist() for e in row]
    return n_experts * sum(sent.count(i) / len(sent) * sum(probs[t, i].item() for t in range(n_tokens)) / n_tokens
                           for i in range(n_experts))


def test_switch_balancing_loss_is_its_definition():
    from modules.gpt.moe import load_balancing_loss

    # below 1 although routing is unbalanced: 60% of tokens go to expert 0 with P = (.51, .49), 40% to
    # expert 1 with P = (0, 1): f = (.6, .4), mean P = (.306, .694), 2 * (.6 * .306 + .4 * .694) = 0.9224
    probs = torch.tensor([[0.51, 0.49]] * 6 + [[0.0, 1.0]] * 4)
    experts = probs.argmax(-1, keepdim=True)
    loss = load_balancing_loss(probs, torch.bincount(experts.reshape(-1), minlength=2)).item()
    assert loss == pytest.approx(switch_loss_by_definition(probs, experts), rel=1e-6)
    assert loss == pytest.approx(0.9224, abs=1e-6)

    # and what a MoE layer of the model computes in its forward, top-2 of 4 experts on real routing
    torch.manual_seed(0)
    model = GPTModule(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=16, ffn="moe", n_experts=4, top_k=2)
    (_, layer), = model.model.moe_layers()
    seen = {}
    layer.router.register_forward_hook(lambda mod, inp, out: seen.update(probs=out[1], experts=out[3]))
    model(torch.randint(0, 20, (3, 8)))
    assert seen["experts"].shape == (24, 2)
    assert layer.last_losses[0].item() == pytest.approx(switch_loss_by_definition(seen["probs"], seen["experts"]),
                                                        rel=1e-5)


def test_resume_from_checkpoint_continues_the_batch_stream(tmp_path):
    import lightning as L

    class Seen(L.Callback):
        def __init__(self):
            self.rows = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.rows.append((trainer.global_step, batch[0][0].tolist()))

    def fit(steps, ckpt=None):
        seen = Seen()
        dm = ShakespeareDataModule(corpus="tinyshakespeare", path=str(TINY), max_chars=20000, block_size=16,
                                   batch_size=4, val_windows=8)
        trainer = quiet_trainer(max_steps=steps, callbacks=[seen], limit_val_batches=0, default_root_dir=tmp_path)
        model = GPTModule(n_layer=1, n_head=2, n_embd=16, warmup_steps=1, lr_decay_steps=6, sample_tokens=0)
        trainer.fit(model, dm, ckpt_path=ckpt)
        return trainer, seen.rows

    _, straight = fit(5)
    first, head = fit(2)
    first.save_checkpoint(tmp_path / "step2.ckpt")
    _, tail = fit(5, tmp_path / "step2.ckpt")
    assert [s for s, _ in tail] == [2, 3, 4]
    assert head + tail == straight


def test_lightning_training_equals_nanogpt_bare_step():
    """The module under Lightning (with the pipeline's step-touching callbacks) trains exactly as
    nanoGPT's plain loop would: same weights after 12 steps from the same start on the same
    batches (AdamW with decay on matrices only, warm-up + cosine, clipping at 1.0)."""
    import copy

    import lightning as L

    from pipelines.resources import ResourceMonitor
    from pipelines.callbacks import NaNGuard

    dm = ShakespeareDataModule(corpus="tinyshakespeare", path=str(TINY), max_chars=20000, block_size=16,
                               batch_size=4, val_windows=8)
    m = GPTModule(n_layer=2, n_head=2, n_embd=16, warmup_steps=3, lr_decay_steps=12)
    start = {}

    class Snap(L.Callback):
        def on_train_start(self, trainer, pl_module):
            start.update(copy.deepcopy(pl_module.model.state_dict()))

    trainer = quiet_trainer(max_steps=12, gradient_clip_val=1.0, limit_val_batches=0, callbacks=[Snap(), ResourceMonitor(), NaNGuard()])
    trainer.fit(m, datamodule=dm)

    bare = copy.deepcopy(m.model)
    bare.load_state_dict(start)
    ps = list(bare.parameters())
    opt = torch.optim.AdamW([{"params": [p for p in ps if p.dim() >= 2], "weight_decay": 0.1},
                             {"params": [p for p in ps if p.dim() < 2], "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.99))


    def get_lr(it, learning_rate=1e-3, min_lr=1e-4, warmup_iters=3, lr_decay_iters=12):
        """nanoGPT's train.py, written out here rather than taken from the module."""
        if it < warmup_iters:
            return learning_rate * (it + 1) / (warmup_iters + 1)
        if it > lr_decay_iters:
            return min_lr
        decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * decay_ratio)) * (learning_rate - min_lr)

    stream = iter(dm.train_dataset(0))
    for it in range(12):
        for group in opt.param_groups:
            group["lr"] = get_lr(it)
        x, y = next(stream)
        _, loss = bare(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ps, 1.0)
        opt.step()
    moved = max((a - start[k]).abs().max().item() for k, a in bare.state_dict().items())
    assert moved > 1e-3  # training really happened
    for k, a in m.model.state_dict().items():
        torch.testing.assert_close(a, bare.state_dict()[k], rtol=0, atol=1e-6, msg=k)
