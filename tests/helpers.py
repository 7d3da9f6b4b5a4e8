"""What many tests need: a quiet plain Trainer, the real command line in a subprocess, a free port, a
checkpoint crafted to run code, the tiny backbones' builders (their session fixtures: tests/conftest.py)
and the small mini-GPT configs the pipeline tests run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch
from server.process import free_port  # noqa: F401  (one copy: the team server's)

ROOT = Path(__file__).resolve().parents[1]

# The mini-GPT's CPU preset, made tiny by overrides (1 layer, 16 wide, 6 steps): `gpt_small()` adds the text.
GPT_CONFIG = ROOT / "configs" / "gpt" / "shakespeare_char_cpu.yaml"
_GPT_SMALL = [
    "--data.init_args.max_chars=20000", "--data.init_args.block_size=16",
    "--data.init_args.batch_size=4", "--data.init_args.val_windows=8",
    "--model.init_args.n_layer=1", "--model.init_args.n_head=2", "--model.init_args.n_embd=16",
    "--model.init_args.warmup_steps=2", "--model.init_args.lr_decay_steps=6", "--model.init_args.sample_tokens=10",
    "--trainer.max_steps=6", "--trainer.val_check_interval=3", "--trainer.log_every_n_steps=2",
    "--system_metrics=false",
]

# A mini-GPT run config small enough to train 40 steps in seconds; its batches are a function of (seed, step).
GPT_RUN = {
    "seed_everything": 3,
    "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 40, "val_check_interval": 10,
                "check_val_every_n_epoch": None, "log_every_n_steps": 1, "enable_progress_bar": False,
                "enable_model_summary": False, "gradient_clip_val": 1.0},
    "model": {"class_path": "modules.gpt.module.GPTModule",
              "init_args": {"n_layer": 2, "n_head": 2, "n_embd": 32, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 5,
                            "lr_decay_steps": 40, "sample_tokens": 8}},
    "data": {"class_path": "datamodules.shakespeare.ShakespeareDataModule",
             "init_args": {"corpus": "shakespeare-plays", "block_size": 32, "batch_size": 8, "val_windows": 32,
                           "max_chars": 200_000}},
}


def quiet_trainer(**kw) -> L.Trainer:
    """A plain Lightning Trainer on the CPU without logger, checkpoints, progress bar or model summary:
    how a project runs outside the pipeline. Keyword arguments override (max_steps, callbacks, ...)."""
    defaults = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    accelerator="cpu", devices=1)
    return L.Trainer(**{**defaults, **kw})


def practicum_cli(*args: str, timeout: int = 600, launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``python [LAUNCHER] -m pipelines ARGS`` in a fresh process (the real entry point), with the
    repository on the path so the tests' toy project imports."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *launcher, "-m", "pipelines", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


class Payload:
    """What a crafted checkpoint carries: unpickling it calls a function (here: touch `marker`)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def crafted_checkpoint(path: Path, marker: Path, class_path: str = "modules.gpt.module.GPTModule") -> Path:
    """A file that looks like a Practicum checkpoint (state_dict, hyper-parameters, class path) with a pickled
    `Payload` inside: a loader that unpickles freely touches `marker`; a safe one refuses the file."""
    torch.save({"state_dict": {}, "hyper_parameters": {"method": "lora"}, "pytorch-lightning_version": L.__version__,
                "practicum": {"class_path": class_path}, "tokenizer": Payload(marker)}, path)
    return path


def gpt_small() -> list[str]:
    """GPT_CONFIG's overrides for a run of seconds, on the Shakespeare file of `tests.data.shakespeare_text`."""
    from tests.data import shakespeare_text

    return [f"--data.init_args.path={shakespeare_text()}", *_GPT_SMALL]


def make_tokenizer():
    """A byte-level BPE (vocabulary 320) trained offline on Python's docs, as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from datamodules.instruct import python_docs

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(python_docs()[:10], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def save_tiny_llama(folder: Path) -> Path:
    """A Llama-architecture causal LM (2 layers, width 128) with `make_tokenizer`'s vocabulary, saved with
    `save_pretrained`, so tests load it back through the real `from_pretrained` path."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def train_tiny_gpt(path: Path, tokenizer: str, steps: int, seed: int, max_chars: int | None = None, **model) -> str:
    """A 1-layer mini-GPT (2 heads, width 32, block 32) trained `steps` steps on the plays under a plain
    Trainer, saved as a Lightning checkpoint at `path` (tokenizer inside): a fine-tune's or DPO's backbone."""
    from datamodules.shakespeare import ShakespeareDataModule
    from modules.gpt.module import GPTModule

    torch.manual_seed(seed)
    dm = ShakespeareDataModule(corpus="shakespeare-plays", tokenizer=tokenizer, block_size=32,
                               batch_size=model.pop("batch_size", 4), max_chars=max_chars)
    trainer = quiet_trainer(max_steps=steps, limit_val_batches=0, default_root_dir=path.parent)
    trainer.fit(GPTModule(n_layer=1, n_head=2, n_embd=32, sample_tokens=0, **model), datamodule=dm)
    trainer.save_checkpoint(path)
    return str(path)


def built_gpt(config: Path, args: list[str], vocab_size: int = 80):
    """A config's GPTModule with its model built as `setup` would build it for a tokenizer of vocab_size."""
    from pipelines.run import load_experiment

    cli = load_experiment(config, args)
    m = cli.model
    m.hparams.vocab_size, m.hparams.block_size = vocab_size, cli.datamodule.block_size
    m._build()
    return m


# --- preference pairs for the alignment tests ---------------------------------------------------
def claims_about(claims: list[dict], variants) -> list[dict]:
    """A shipped study's claims that name only `variants`: a tiny copy of the study that drops or renames
    variants keeps the claims about what it runs (the others would be refused as unknown variants)."""
    return [c for c in claims if {c["variant"], c.get("against")} <= {*variants, None}]


def count_e(texts: list[str]) -> list[float]:
    """A dense reward for models too young to write words VADER knows: the share of letters 'e'."""
    return [t.count("e") / max(len(t), 1) for t in texts]


def sample_pairs(backbone: str, path, train_pairs: str = "best_worst", **kw) -> str:
    """The pairs stage on a tiny model: PairSampler over corpus prompts, labelled by `count_e`, as JSONL
    (`kw`: the PromptDataModule's arguments)."""
    import json

    from datamodules.preference import PromptDataModule
    from modules.align.pairs import PairSampler
    from tests.helpers import quiet_trainer

    args = dict(n_prompts=48, n_eval_prompts=6, prompt_chars=8, max_new_tokens=16, reward=f"{__name__}.count_e")
    sampler = PairSampler(backbone=backbone, samples_per_prompt=4, train_pairs=train_pairs)
    quiet_trainer(max_steps=0, limit_val_batches=0, num_sanity_val_steps=0).fit(
        sampler, datamodule=PromptDataModule(**{**args, **kw}))
    path.write_text("".join(json.dumps(r) + "\n" for r in sampler.rows))
    return str(path)


def preference_data(pairs: str, **kw):
    from datamodules.preference import PreferenceDataModule

    args = dict(n_eval_prompts=6, max_new_tokens=16, batch_size=8, reward=f"{__name__}.count_e")
    return PreferenceDataModule(source=pairs, **{**args, **kw})


def logged_study(uri: str, name: str, runs: dict[str, list[dict]], histories: dict[str, list[list[float]]] | None = None,
                 **declared) -> str:
    """A study as its runs left it in MLflow, without training anything: a parent with the study's
    declarations as tags (`declared`: columns, report, baseline, claims, comparable, ...) and, per variant,
    one finished child per dict of final metrics in `runs` (seeds 0, 1, ...). `histories`: per metric,
    its values at steps 0, 1, ... in each run (one list per run, in the order of `runs`)."""
    import json

    from mlflow.tracking import MlflowClient

    from pipelines import tracking as trk

    client = MlflowClient(uri)
    exp = client.create_experiment(name)
    tags = {trk.TAG_STUDY: name, trk.TAG_ROLE: "parent", "practicum.variants": json.dumps(list(runs)),
            **{f"practicum.{k}": v if isinstance(v, str) else json.dumps(v) for k, v in declared.items()}}
    parent = client.create_run(exp, tags=tags, run_name=name).info.run_id
    i = 0
    for variant, metric_dicts in runs.items():
        for seed, metrics in enumerate(metric_dicts):
            run = client.create_run(exp, run_name=f"{variant}-seed{seed}", tags={
                "mlflow.parentRunId": parent, trk.TAG_ROLE: "variant", trk.TAG_VARIANT: variant,
                "practicum.seed": str(seed)}).info.run_id
            for k, v in metrics.items():
                client.log_metric(run, k, v)
            for k, per_run in (histories or {}).items():
                for step, v in enumerate(per_run[i]):
                    client.log_metric(run, k, v, step=step)
            client.set_terminated(run, "FINISHED")
            i += 1
    client.set_terminated(parent, "FINISHED")
    return parent


def host_peak(hidden: int) -> tuple[float, float]:
    """(this run's own host peak, the process's) in MiB, of the toy MLP `hidden` wide, 3 steps."""
    from pipelines.resources import ResourceMonitor
    from tests.pipelines.toy import ToyDataModule, ToyModule

    mon = ResourceMonitor(warmup_steps=1)
    quiet_trainer(max_steps=3, callbacks=[mon], limit_val_batches=0).fit(ToyModule(hidden=hidden),
                                                                        ToyDataModule(n=64, batch_size=8))
    return mon.summary["mem/host_peak_rss_increase_bytes"] / 2**20, mon.summary["mem/host_peak_rss_bytes"] / 2**20


def host_peak_run_order() -> dict[str, float]:
    """Five toy fits in the order a study might give them, with 48 MiB held before the last
    (tests/pipelines/test_resources.py runs this in a fresh process)."""
    host_peak(1_000)
    first, process_first = host_peak(250_000)  # ~35 MiB: params, grads, Adam's state, activations
    narrow, _ = host_peak(50_000)  # its frees leave holes in the heap
    held = torch.ones(12 * 2**20)  # 48 MiB that stay, as an earlier run's leftovers would
    again, process_again = host_peak(250_000)
    return {"first": first, "narrow": narrow, "again": again, "held": float(held.sum() > 0),
            "process_first": process_first, "process_again": process_again}
