"""A tiny regression project used to exercise the pipeline itself (not a Practicum project)."""

import os
import signal

import torch
from lightning import Callback, LightningDataModule, LightningModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

# The toy project's run config: 12 steps, validation every 4 (tests/pipelines/conftest.py writes it as toy_config).
TOY = {
    "seed_everything": 7,
    "trainer": {"max_steps": 12, "log_every_n_steps": 2, "enable_progress_bar": False, "val_check_interval": 4,
                "enable_model_summary": False},
    "model": {"class_path": "tests.pipelines.toy.ToyModule", "init_args": {"hidden": 8}},
    "data": {"class_path": "tests.pipelines.toy.ToyDataModule", "init_args": {"n": 64, "batch_size": 8}},
}


class ToyModule(LightningModule):
    """y = Wx + b regression with a two-layer MLP.

    Args:
        hidden: width of the hidden layer.
        lr: Adam learning rate.
        fail_at_step: raise at this global step (to test that crashes end FAILED).
        nan_at_step: return a NaN loss at this global step (to test the NaN guard).
        init_shift: reseed the global RNG with seed + init_shift before building: the same model
            under other random numbers (initialisation and data order), i.e. pure seed noise.
    """

    def __init__(self, hidden: int = 8, lr: float = 1e-2, fail_at_step: int = -1, nan_at_step: int = -1,
                 init_shift: int = 0):
        super().__init__()
        if lr <= 0:
            raise ValueError(f"model.lr must be > 0, got {lr}")
        self.save_hyperparameters()
        if init_shift:
            torch.manual_seed(torch.initial_seed() + init_shift)
        self.net = nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def training_step(self, batch, batch_idx):
        if self.global_step == self.hparams.fail_at_step:
            raise RuntimeError("injected failure")
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        if self.global_step == self.hparams.nan_at_step:
            loss = loss * float("nan")
        self.log("train/loss", loss, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", nn.functional.mse_loss(self.net(x), y), on_epoch=True)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test/loss", nn.functional.mse_loss(self.net(x), y), on_epoch=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class ToyDataModule(LightningDataModule):
    """Random linear data, seeded.

    Args:
        n: number of samples.
        batch_size: samples per batch.
        path: an optional data file (only checked, to exercise missing-file errors).
    """

    def __init__(self, n: int = 256, batch_size: int = 32, path: str | None = None):
        super().__init__()
        self.n, self.batch_size, self.path = n, batch_size, path

    def setup(self, stage=None):
        if self.path is not None:
            from pathlib import Path

            if not Path(self.path).is_file():
                raise FileNotFoundError(f"data.path: {self.path} does not exist; give an existing file")
        g = torch.Generator().manual_seed(0)
        x = torch.randn(self.n, 4, generator=g)
        y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1 * torch.randn(self.n, 1, generator=g)
        self.ds = TensorDataset(x, y)

    def fingerprint(self) -> str:
        return f"toy-{self.n}"

    def train_dataloader(self):
        return DataLoader(self.ds, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.ds, batch_size=self.batch_size)

    def test_dataloader(self):
        return DataLoader(self.ds, batch_size=self.batch_size)


class SignalAt(Callback):
    """Sends this process a signal after the given training step: a real kill, for fault-tolerance tests.

    Args:
        step: global step after which the signal is sent.
        sig: signal name, e.g. SIGKILL or SIGTERM.
        once: a file path: only the process that creates it is signalled (a killed worker's retry lives).
    """

    def __init__(self, step: int, sig: str = "SIGKILL", once: str | None = None):
        self.step, self.sig, self.once = step, getattr(signal, sig), once

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            if self.once:  # a file: the first process to get here makes it and dies; the retry goes on
                try:
                    open(self.once, "x").close()
                except FileExistsError:
                    return
            os.kill(os.getpid(), self.sig)


HOOKS: dict = {}


class CallAt(Callback):
    """Calls ``HOOKS[step]()`` after that training step (tests put server stop/start functions there)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if fn := HOOKS.get(trainer.global_step):
            fn()


class RecordBatches(Callback):
    """Writes a hash of every training sample each rank sees to ``<folder>/rank<R>.txt`` (DDP sharding tests).

    Args:
        folder: where the per-rank files go.
    """

    def __init__(self, folder: str):
        self.folder = folder

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        import hashlib

        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        with open(os.path.join(self.folder, f"rank{trainer.global_rank}.txt"), "a") as f:
            for row in x.detach().cpu():
                f.write(f"{trainer.global_step} {hashlib.sha1(row.numpy().tobytes()).hexdigest()}\n")


class RecordLedger(Callback):
    """Writes each rank's own resource ledger, before ranks are aggregated, to ``<folder>/ledger<R>.json``
    (tests compare what rank 0 logged with these).

    Args:
        folder: where the per-rank files go.
    """

    def __init__(self, folder: str):
        self.folder = folder

    def on_fit_start(self, trainer, pl_module):
        import json

        from pipelines.resources import ResourceMonitor

        (monitor,) = [cb for cb in trainer.callbacks if isinstance(cb, ResourceMonitor)]
        reduce = monitor._reduce

        def record_then_reduce(trainer, m):
            with open(os.path.join(self.folder, f"ledger{trainer.global_rank}.json"), "w") as f:
                json.dump({k: float(v) for k, v in m.items()}, f)
            return reduce(trainer, m)

        monitor._reduce = record_then_reduce
