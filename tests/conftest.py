import os
import shutil

import pytest

os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
# Logging each run's MLflow Model costs seconds a run; the tests of that feature turn it on (--log_model=true).
os.environ.setdefault("PRACTICUM_LOG_MODEL", "0")
# Under pytest-xdist (make test) each worker takes one core: torch's threads default to every core,
# and two workers with two threads each would share two cores four ways.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")


def pytest_configure(config):
    if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
        import torch

        torch.set_num_threads(1)  # in case torch was imported before this file set OMP_NUM_THREADS


def pytest_collection_modifyitems(config, items):
    """A test that needs CUDA says so with one marker, @pytest.mark.gpu: `-m gpu` selects every such
    test, and without CUDA they are skipped here (tests/test_markers.py keeps it the only way)."""
    # The long end-to-end tests (marked slow) first, the longest of them first (`slow(seconds=N)`, as
    # `make test`'s durations report them). Under `--dist loadfile` pytest-xdist reorders the files by
    # their count of tests unless given --no-loadscope-reorder, which `make test` passes: without it the
    # one-test S3 file started last and ran alone for the suite's last two minutes.
    def order(item):
        slow = item.get_closest_marker("slow")
        return (1, 0) if slow is None else (0, -slow.kwargs.get("seconds", 30))

    items.sort(key=order)
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="marked gpu: needs CUDA, and none is available")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def _empty_store(tmp_path_factory):
    """Creating an MLflow SQLite schema takes seconds (migrations): do it once, copy it per test."""
    from mlflow.tracking import MlflowClient

    db = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def tracking_uri(tmp_path, monkeypatch, _empty_store):
    """A fresh SQLite MLflow store; the working directory moves there so checkpoints land in tmp too."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "mlruns").mkdir()
    shutil.copy(_empty_store, tmp_path / "mlruns" / "mlflow.db")
    return f"sqlite:///{tmp_path}/mlruns/mlflow.db"


@pytest.fixture
def practicum_cli():
    """``python -m pipelines ARGS`` in a fresh process: `tests.helpers.practicum_cli`."""
    from tests.helpers import practicum_cli

    return practicum_cli


# Tiny backbones, built once per session (builders: tests/helpers.py).
@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A Llama-architecture Hugging Face model folder (`tests.helpers.save_tiny_llama`)."""
    from tests.helpers import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_minigpt_ckpt(tmp_path_factory):
    """A byte-level mini-GPT trained 3 steps: a fine-tune's backbone (the byte vocabulary reads any text)."""
    from tests.helpers import train_tiny_gpt

    return train_tiny_gpt(tmp_path_factory.mktemp("tiny-minigpt") / "base.ckpt", "byte", steps=3, seed=1,
                          max_chars=20000, warmup_steps=1)


@pytest.fixture(scope="session")
def sft_ckpt(tmp_path_factory):
    """A character-level mini-GPT trained 20 steps on the plays: DPO's policy, old enough to write letters
    (context 32: an 8-character prompt and 16 new characters fit)."""
    from tests.helpers import train_tiny_gpt

    return train_tiny_gpt(tmp_path_factory.mktemp("tiny-sft") / "sft.ckpt", "char", steps=20, seed=0, batch_size=8,
                          lr=1e-2, warmup_steps=2)
