"""Every gpt preset and study parses and instantiates; the dense-vs-moe variants are sized as designed."""

from pathlib import Path

import pytest
from lightning import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

from datamodules.shakespeare import ShakespeareDataModule
from modules.gpt.module import GPTModule
from pipelines.study import load_study

ROOT = Path(__file__).resolve().parents[3]
PRESETS = sorted((ROOT / "configs" / "gpt").glob("*.yaml"))
STUDIES = [ROOT / "configs" / "studies" / n for n in ("dense-vs-moe.yaml", "gpt-quick.yaml")]
CPU = ["--trainer.accelerator=cpu", "--trainer.precision=32-true", "--trainer.logger=false",
       "--trainer.enable_checkpointing=false"]


def instantiate(config: Path, args: list[str]) -> LightningCLI:
    return LightningCLI(
        LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True, run=False,
        save_config_callback=None, auto_configure_optimizers=False, args=["--config", str(config), *args, *CPU],
    )


def built(cli: LightningCLI, vocab_size: int = 80) -> GPTModule:
    """The module's model as `setup` would build it for a tokenizer of vocab_size."""
    m = cli.model
    m.hparams.vocab_size, m.hparams.block_size = vocab_size, cli.datamodule.block_size
    m._build()
    return m


@pytest.mark.parametrize("config", PRESETS, ids=lambda p: p.name)
def test_presets_instantiate(config):
    cli = instantiate(config, [])
    assert isinstance(cli.model, GPTModule) and isinstance(cli.datamodule, ShakespeareDataModule)
    assert cli.trainer.max_steps > 0
    assert not cli.trainer.loggers  # the pipeline adds the logger, never the config


def test_cpu_preset_is_nanogpts():
    cli = instantiate(ROOT / "configs" / "gpt" / "shakespeare_char_cpu.yaml", [])
    hp, dm = cli.model.hparams, cli.datamodule
    assert (hp.n_layer, hp.n_head, hp.n_embd, dm.block_size, dm.batch_size) == (4, 4, 128, 64, 12)
    assert (hp.lr, hp.min_lr, hp.warmup_steps, hp.lr_decay_steps, tuple(hp.betas)) == (1e-3, 1e-4, 100, 2000, (0.9, 0.99))
    assert (hp.dropout, hp.bias, hp.weight_decay, cli.trainer.gradient_clip_val) == (0.0, False, 0.1, 1.0)
    assert dm.corpus == "tinyshakespeare"


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.name)
def test_study_variants_instantiate(path):
    study = load_study(path)
    for name in study.variants:
        config, args = study.variant_config(name)
        cli = instantiate(config, args)
        assert cli.trainer.max_steps == study.overrides["trainer.max_steps"], name


def test_dense_vs_moe_variants_are_matched():
    study = load_study(ROOT / "configs" / "studies" / "dense-vs-moe.yaml")
    models = {n: built(instantiate(*study.variant_config(n))).model for n in study.variants}
    dense = models["dense"].num_params(non_embedding=False)
    active = models["moe-equal-active"]
    assert abs(active.num_active_params(non_embedding=False) / dense - 1) < 0.01  # router only
    C, L = 128, 4  # 8 experts of 2C x C twice replace one 4C MLP; plus a C x 8 router per layer
    assert active.num_params(non_embedding=False) == dense + L * (8 * 2 * C * 2 * C - 8 * C * C + 8 * C)
    assert abs(models["moe-equal-total"].num_params(non_embedding=False) / dense - 1) < 0.01
    assert models["moe-equal-active-no-aux"].config.aux_loss_coef == 0.0
    assert models["moe-equal-active"].config.aux_loss_coef > 0
