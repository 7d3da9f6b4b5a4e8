"""The Llama-3-8B and Mistral-7B presets, offline: each instantiates with a local folder holding the
shipped config.json of its architecture (and a tokenizer) as the backbone and a small JSONL in the
medical-flashcards format (input, output) as the data, and its data module builds masked batches."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from pipelines.run import load_experiment
from pipelines.tracking import ConfigError
from tests.helpers import make_tokenizer

ROOT = Path(__file__).resolve().parents[3]
PRESETS = sorted(p for p in (ROOT / "configs" / "finetune").glob("*.yaml") if p.name.startswith(("llama3_8b", "mistral_7b")))
ARCH = {"llama3_8b": "llama3-8b", "mistral_7b": "mistral-7b"}
CARDS = [{"instruction": "Answer this question truthfully", "input": f"What does drug {i} treat?",
          "output": f"Drug {i} treats condition {i}."} for i in range(12)]


def test_there_are_six_presets():
    assert len(PRESETS) == 6


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_instantiates_offline_from_a_local_architecture_and_jsonl(path, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(ROOT / "configs" / "finetune" / "arch" / ARCH[path.stem.rsplit("_", 1)[0]] / "config.json", folder)
    make_tokenizer().save_pretrained(folder)
    data = tmp_path / "flashcards.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in CARDS))
    args = [f"--model.init_args.backbone={folder}", f"--data.init_args.source={data}",
            f"--data.init_args.tokenizer={folder}", "--data.init_args.max_length=48", "--data.init_args.batch_size=2"]
    cli = load_experiment(path, args)  # QLoRA too: construction is CUDA-free, so `practicum estimate` reads it
    if "qlora" in path.stem and not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
            cli.model.prepare_data()  # the first hook of a run, before data and weights
        return
    assert (cli.model.kind, cli.model.source) == ("hf", str(folder)) and cli.model.backbone is None  # no weights
    dm = cli.datamodule
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 2
    # the "### Question: ... ### Answer:" prompt is masked from the loss, the answer is not
    assert (batch["labels"][:, :5] == -100).all() and (batch["labels"] != -100).any()
