"""What the attention studies promise beyond instantiating (tests/test_configs.py does that): equal
parameters where the variant allows, the window at block_size / 4, and defaults that are MHA."""

from pathlib import Path

from pipelines.study import load_study
from tests.helpers import built_gpt as built

ROOT = Path(__file__).resolve().parents[3]


def _models(study_file: str) -> dict:
    study = load_study(ROOT / "configs" / "studies" / study_file)
    return {name: built(*study.variant_config(name)).model for name in study.variants}


def test_attention_variants_have_equal_parameters_where_possible():
    models = _models("attention-variants.yaml")
    mha = models["mha"]
    assert mha.config.kv_heads == mha.config.n_head and mha.config.pos_emb == "learned"
    assert (models["gqa-2"].config.kv_heads, models["mqa"].config.kv_heads) == (2, 1)
    total = {n: m.num_params(non_embedding=False) for n, m in models.items()}
    for name in ("gqa-2", "mqa", "window-16"):
        assert total[name] == total["mha"], name  # the MLP takes back what the k/v projections save
    c = mha.config
    for name in ("rope", "alibi"):  # no position table: only those rows are missing
        assert total[name] == total["mha"] - c.block_size * c.n_embd
        assert models[name].num_params() == mha.num_params()
    assert models["window-16"].config.sliding_window == c.block_size // 4
    # the cache: MQA a quarter of MHA's at 4 heads
    assert models["mqa"].kv_bytes_per_token_formula() * 4 == mha.kv_bytes_per_token_formula()


def test_long_context_trains_at_64_and_scores_longer():
    models = _models("long-context.yaml")
    assert {m.config.pos_emb for m in models.values()} == {"learned", "sinusoidal", "rope", "alibi"}
    assert all(m.config.block_size == 64 for m in models.values())
    assert models["learned"].max_positions == 64 and models["alibi"].max_positions is None
