"""What the gpt presets and studies promise beyond instantiating (tests/test_configs.py does that):
the CPU preset is nanoGPT's configuration, and the dense-vs-moe variants are sized as designed."""

from pathlib import Path

from pipelines.config import PracticumCLI
from pipelines.run import load_experiment
from pipelines.study import load_study
from tests.helpers import built_gpt as built

ROOT = Path(__file__).resolve().parents[3]


def test_cpu_preset_is_nanogpts():
    cli = load_experiment(ROOT / "configs" / "gpt" / "shakespeare_char_cpu.yaml")
    hp, dm, trainer = cli.model.hparams, cli.datamodule, cli.config.trainer
    assert (hp.n_layer, hp.n_head, hp.n_embd, dm.block_size, dm.batch_size) == (4, 4, 128, 64, 12)
    assert (hp.lr, hp.min_lr, hp.warmup_steps, hp.lr_decay_steps, tuple(hp.betas)) == (1e-3, 1e-4, 100, 2000, (0.9, 0.99))
    assert (hp.dropout, hp.bias, hp.weight_decay, trainer.gradient_clip_val) == (0.0, False, 0.1, 1.0)
    assert dm.corpus == "tinyshakespeare"


def test_dense_vs_moe_variants_are_matched():
    study = load_study(ROOT / "configs" / "studies" / "dense-vs-moe.yaml")
    for name in study.variants:  # equal steps for every variant
        config, args = study.variant_config(name)
        assert PracticumCLI(["--config", str(config), *args]).config.trainer.max_steps == study.overrides[
            "trainer.max_steps"], name
    models = {n: built(*study.variant_config(n)).model for n in study.variants}
    dense = models["dense"].num_params(non_embedding=False)
    active = models["moe-equal-active"]
    assert abs(active.num_active_params(non_embedding=False) / dense - 1) < 0.01  # router only
    C, L = 128, 4  # 8 experts of 2C x C twice replace one 4C MLP; plus a C x 8 router per layer
    assert active.num_params(non_embedding=False) == dense + L * (8 * 2 * C * 2 * C - 8 * C * C + 8 * C)
    assert abs(models["moe-equal-total"].num_params(non_embedding=False) / dense - 1) < 0.01
    assert models["moe-equal-active-no-aux"].config.aux_loss_coef == 0.0
    assert models["moe-equal-active"].config.aux_loss_coef > 0

