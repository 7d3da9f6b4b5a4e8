"""Property-based: bad overrides always end in a clear error that names the field, never a crash inside torch."""

from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipelines.run import run_experiment
from pipelines.tracking import ConfigError
from tests.helpers import GPT_RUN as GPT

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--trainer.max_steps=1", "--trainer.limit_val_batches=1", "--system_metrics=false", "--log_checkpoint=false"]
SETTINGS = settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture
def gpt_cfg(tmp_path):
    p = tmp_path / "gpt.yaml"
    small = {**GPT, "data": {**GPT["data"], "init_args": {**GPT["data"]["init_args"], "max_chars": 20_000}}}
    p.write_text(yaml.safe_dump(small))
    return p


def _error_of(config, override, uri) -> str:
    """The message the user sees: a ConfigError before the run, or the FAILED run's error."""
    try:
        res = run_experiment(config, [override, *FAST], uri)
    except ConfigError as e:
        return str(e)
    assert res.status == "FAILED", f"{override} was accepted"
    return res.error


def _assert_clear(msg: str, field: str):
    assert field in msg, msg
    assert "Traceback" not in msg and len(msg) < 4000


@SETTINGS
@given(value=st.one_of(st.text(alphabet="abcxyz", min_size=1, max_size=5), st.just("[1, 2]"), st.just("1.5")))
def test_wrong_types_name_the_field(gpt_cfg, tracking_uri, value):
    _assert_clear(_error_of(gpt_cfg, f"--model.init_args.n_layer={value}", tracking_uri), "n_layer")


@SETTINGS
@given(lr=st.floats(max_value=0.0, allow_nan=False, allow_infinity=False))
def test_non_positive_learning_rate(gpt_cfg, tracking_uri, lr):
    _assert_clear(_error_of(gpt_cfg, f"--model.init_args.lr={lr!r}", tracking_uri), "lr")


@SETTINGS
@given(n_head=st.integers(min_value=1, max_value=64).filter(lambda h: 32 % h != 0))
def test_n_head_must_divide_n_embd(gpt_cfg, tracking_uri, n_head):
    _assert_clear(_error_of(gpt_cfg, f"--model.init_args.n_head={n_head}", tracking_uri), "n_head")


@SETTINGS
@given(block=st.integers(min_value=2_500, max_value=10**6))
def test_block_size_longer_than_the_data(gpt_cfg, tracking_uri, block):
    # 20,000 characters: the 10% validation split holds 2,000 tokens
    _assert_clear(_error_of(gpt_cfg, f"--data.init_args.block_size={block}", tracking_uri), "block_size")


@SETTINGS
@given(chars=st.integers(min_value=-5, max_value=0))
def test_empty_data(gpt_cfg, tracking_uri, chars):
    _assert_clear(_error_of(gpt_cfg, f"--data.init_args.max_chars={chars}", tracking_uri), "max_chars")


@SETTINGS
@given(k=st.integers(min_value=1_300, max_value=10**5))
def test_k_larger_than_the_training_set(tracking_uri, k):
    _assert_clear(_error_of(ROOT / "configs/classics/knn_digits.yaml", f"--model.init_args.k={k}", tracking_uri), "k=")
