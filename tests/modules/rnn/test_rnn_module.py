"""CharRNNModule through the real pipeline (truncated BPTT, the probes, `practicum generate`), and the
probes against references written out."""

import math
from pathlib import Path

import mlflow
import pytest
import torch
import torch.nn.functional as F

from datamodules.shakespeare import ShakespeareDataModule, consecutive_windows
from modules.rnn.model import CharRNN, CharRNNConfig
from modules.rnn.module import CharRNNModule
from modules.rnn.probes import grad_norm_through_time, loss_by_position, octaves
from pipelines.cli import main as practicum
from pipelines.run import run_experiment
from tests.data import shakespeare_text
from tests.helpers import quiet_trainer

TINY = shakespeare_text()
CONFIG = Path(__file__).resolve().parents[3] / "configs" / "rnn" / "lstm_plays_char_cpu.yaml"
SMALL = [
    "--data.init_args.corpus=tinyshakespeare", f"--data.init_args.path={TINY}", "--data.init_args.max_chars=20000",
    "--data.init_args.block_size=16", "--data.init_args.batch_size=4", "--data.init_args.val_windows=8",
    "--data.init_args.test_fraction=0.05", "--model.init_args.n_hidden=16", "--model.init_args.n_embd=8",
    "--model.init_args.warmup_steps=2", "--model.init_args.lr_decay_steps=6", "--model.init_args.sample_tokens=10",
    "--trainer.max_steps=6", "--trainer.val_check_interval=3", "--trainer.log_every_n_steps=2",
    "--system_metrics=false",
]


class Wrapped(torch.nn.Module):
    """A CharRNN behind the GPTModule interface the probes use: module(idx) -> (logits, ...)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, idx):
        return self.model(idx)


def test_pipeline_run_logs_probes_and_generates(tracking_uri, capsys):
    res = run_experiment(CONFIG, SMALL, tracking_uri=tracking_uri)
    assert res.status == "FINISHED", res.error
    client = mlflow.MlflowClient(tracking_uri)
    m = client.get_run(res.run_id).data.metrics
    assert m["val/loss"] < math.log(65) and m["perf/tokens_per_s"] > 0
    assert m["test/ppl"] == pytest.approx(math.exp(m["test/loss"]), rel=1e-4)
    # the probes: one loss per octave of context (16 positions: 1, 2-3, 4-7, 8-15, 16), ratios <= about 1
    assert {f"test/loss_ctx{a + 1}to{b + 1}" for a, b in octaves(16)} <= set(m)
    assert 0 < m["grad_time/d1"] and m["grad_time/d4"] < 10
    files = {a.path for a in client.list_artifacts(res.run_id, "probes")}
    assert files == {"probes/grad_time.png", "probes/loss_by_position.png"}
    capsys.readouterr()
    assert practicum(["generate", res.run_id, "--prompt", "ROMEO:", "--max_new_tokens", "20", "--seed", "3",
                      "--tracking_uri", tracking_uri]) == 0
    text = capsys.readouterr().out.rstrip("\n")
    assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 20
    loaded = CharRNNModule.load_from_checkpoint(res.checkpoint, map_location="cpu")
    assert loaded.generate_text("ROMEO:", 20, temperature=0.8, seed=3) == text


def test_training_carries_the_detached_state_across_contiguous_batches():
    dm = ShakespeareDataModule(corpus="tinyshakespeare", path=str(TINY), max_chars=20000, block_size=16,
                               batch_size=4, val_windows=8, train_stream="contiguous")
    module = CharRNNModule(vocab_size=None, cell="gru", n_embd=8, n_hidden=8, sample_tokens=0, warmup_steps=0)
    calls = []  # (state in, state out) of every training forward of the recurrence
    trainer = quiet_trainer(max_steps=3, limit_val_batches=0)
    dm.setup()
    module.model = CharRNN(CharRNNConfig(vocab_size=dm.tokenizer.vocab_size, cell="gru", n_embd=8, n_hidden=8))
    module.model.rnn.register_forward_hook(lambda m, inp, out: calls.append((inp[1], out[1])))
    trainer.fit(module, datamodule=dm)
    assert len(calls) == 3 and not calls[0][0].any()  # the first window starts from zeros
    for (_, end), (start, _) in zip(calls, calls[1:]):  # each next window from the last one's end, cut off
        assert torch.equal(start, end.detach()) and not start.requires_grad
    # the stream: row b of batch s + 1 starts where row b of batch s ended
    stream = dm.train_dataset()
    (_, y0), (x1, _) = stream.batch(0), stream.batch(1)
    assert torch.equal(x1[:, 0], y0[:, -1])


def test_carry_state_needs_a_contiguous_stream():
    dm = ShakespeareDataModule(corpus="tinyshakespeare", path=str(TINY), max_chars=20000, block_size=16)
    with pytest.raises(ValueError, match="train_stream=contiguous"):
        quiet_trainer(max_steps=1).fit(CharRNNModule(n_embd=8, n_hidden=8), datamodule=dm)


def test_grad_norm_through_time_matches_autograd_on_the_embeddings():
    torch.manual_seed(0)
    model = CharRNN(CharRNNConfig(vocab_size=11, cell="rnn", n_layer=1, n_embd=6, n_hidden=10))
    x, y = torch.randint(0, 11, (3, 12)), torch.randint(0, 11, (3, 12))
    got = grad_norm_through_time(Wrapped(model), x, y)
    assert all(p.grad is None for p in model.parameters())  # the probe leaves no gradients behind
    e = model.wte(x).detach().requires_grad_()  # the reference: the embeddings as a leaf, written out
    out, _ = model.rnn(e, model.init_state(3))
    F.cross_entropy(model.lm_head(out)[:, -1], y[:, -1]).backward()
    torch.testing.assert_close(got, e.grad.norm(dim=-1).mean(0))


def test_loss_by_position_averages_to_the_window_loss():
    torch.manual_seed(0)
    model = CharRNN(CharRNNConfig(vocab_size=7, n_embd=4, n_hidden=5))
    data = torch.randint(0, 7, (200,))
    per_pos = loss_by_position(Wrapped(model), data, 16, batch=5)
    x, y = consecutive_windows(data, 16)
    assert per_pos.shape == (16,)
    assert float(per_pos.mean()) == pytest.approx(float(model(x, y)[1]), rel=1e-5)
    assert octaves(16) == [(0, 0), (1, 2), (3, 6), (7, 14), (15, 15)]
