"""Reading a checkpoint never runs code: a pickled object is refused naming the file; a damaged file too.
Every path that loads a checkpoint is held to it, not only `read_checkpoint`: the DDPM/VAE judge,
`practicum generate`, the MLflow Model (pyfunc and transformers), the fine-tune's backbone and module."""

from types import SimpleNamespace

import pytest
import torch

from pipelines.checkpoint import read_checkpoint
from pipelines.tracking import ConfigError
from tests.helpers import crafted_checkpoint

# what torch (weights_only=True) and read_checkpoint say when they refuse a pickled object
REFUSED = r"could run code|Weights only load failed|Unsupported global"


def test_plain_checkpoint_reads(tmp_path):
    path = tmp_path / "ok.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "practicum": {"class_path": "a.B"}}, path)
    assert read_checkpoint(path)["practicum"] == {"class_path": "a.B"}


def test_the_crafted_checkpoint_runs_code_when_loaded_unsafely(tmp_path):
    """The payload is real: a plain torch.load would have run it (so the refusals below mean something)."""
    marker = tmp_path / "ran"
    torch.load(crafted_checkpoint(tmp_path / "crafted.ckpt", marker), weights_only=False)
    assert marker.exists()


def test_pickled_payload_is_refused_naming_the_file(tmp_path):
    marker = tmp_path / "ran"
    with pytest.raises(ConfigError, match=r"crafted\.ckpt.*could run code"):
        read_checkpoint(crafted_checkpoint(tmp_path / "crafted.ckpt", marker))
    assert not marker.exists()


def _judge(path):
    from modules.classifier.module import load_judge

    return load_judge(str(path))


def _generate(path):
    from pipelines.generate import load_generator

    return load_generator(str(path))


def _pyfunc(path):
    from pipelines.models import CheckpointModel

    return CheckpointModel().load_context(SimpleNamespace(artifacts={"checkpoint": str(path)}))


def _transformers_flavour(path):
    from modules.finetune.module import FinetuneModule
    from pipelines.models import _log_transformers

    return _log_transformers(None, "0" * 32, "sqlite:///unused.db", FinetuneModule, str(path), None)


def _backbone_weights(path):
    from modules.finetune.backbone import load_minigpt

    return load_minigpt(str(path))


def _backbone_tokenizer(path):
    from modules.finetune.backbone import load_tokenizer

    return load_tokenizer("minigpt", str(path))


def _finetune_on_backbone(path):
    from modules.finetune.module import FinetuneModule

    return FinetuneModule(backbone=str(path), export=False).configure_model()


def _finetune_module(path):
    from modules.finetune.load import load_for_generation

    return load_for_generation(path)


@pytest.mark.parametrize("load", [_judge, _generate, _pyfunc, _transformers_flavour, _backbone_weights,
                                  _backbone_tokenizer, _finetune_on_backbone, _finetune_module],
                         ids=lambda f: f.__name__.lstrip("_"))
def test_every_loader_refuses_a_crafted_checkpoint(load, tmp_path):
    marker = tmp_path / "ran"
    path = crafted_checkpoint(tmp_path / "crafted.ckpt", marker)
    with pytest.raises(Exception, match=REFUSED):
        load(path)
    assert not marker.exists(), "the checkpoint's payload ran"


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "cut.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1000)}}, path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ConfigError, match=r"cut\.ckpt is corrupt or truncated"):
        read_checkpoint(path)
