"""A run's best checkpoint as an MLflow Model, so `mlflow.pyfunc.load_model("runs:/ID/model")` serves it.

What the module can do picks the flavour, asked through `contract`: a `TransformersExport` that
writes a transformers folder (a fine-tuned Hugging Face backbone, adapters merged) goes in MLflow's
``transformers`` flavour, a text-generation pipeline. Everything else in one pyfunc wrapper: a
`TextGenerator` (the mini-GPT, a LoRA-tuned mini-GPT) takes prompts and returns text; an
`ImageSampler` (the DDPM) takes digit labels and returns images; any other ``nn.Module`` takes the
input tensor of its ``forward``. The checkpoint travels as the model's artifact and is read with
``weights_only=True`` (`pipelines.checkpoint.read_checkpoint`); Practicum's packages travel as code.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd

from contract import ImageSampler, TextGenerator, TransformersExport
from pipelines.tracking import TAG_STUDY, TAG_VARIANT

ROOT = Path(__file__).resolve().parent.parent
CODE = [str(ROOT / p) for p in ("contract", "modules", "datamodules", "pipelines")]
TEXT_PARAMS = {"max_new_tokens": 100, "temperature": 0.8, "top_k": 0, "seed": 0}
IMAGE_PARAMS = {"seed": 0}


def kind_of(module) -> str | None:
    """"text", "images" or "tensor": what the pyfunc serves for this module (None: nothing to serve)."""
    import torch

    if isinstance(module, TextGenerator):
        return "text"
    if isinstance(module, ImageSampler):
        return "images"
    from lightning import LightningModule

    if type(module).forward not in (torch.nn.Module.forward, LightningModule.forward):  # a forward of its own
        return "tensor"
    return None


class CheckpointModel(mlflow.pyfunc.PythonModel):
    """pyfunc around a Practicum checkpoint (see the module docstring for the three interfaces)."""

    def load_context(self, context) -> None:
        from pipelines.checkpoint import locate, read_checkpoint

        path = context.artifacts["checkpoint"]
        info = read_checkpoint(path).get("practicum") or {}
        cls = locate(info["class_path"])
        self.module = cls.load_from_checkpoint(path, map_location="cpu", weights_only=True).eval()
        self.kind = kind_of(self.module)

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None):
        import torch

        params = params or {}
        with torch.no_grad():
            if self.kind == "text":
                p = {**TEXT_PARAMS, **params}
                return [self.module.generate_text(str(prompt), max_new_tokens=int(p["max_new_tokens"]),
                                                  temperature=float(p["temperature"]), top_k=int(p["top_k"]) or None,
                                                  seed=int(p["seed"]))
                        for prompt in _column(model_input, "prompt")]
            if self.kind == "images":
                labels = torch.as_tensor(np.asarray(_column(model_input, "label"), dtype=np.int64))
                images, _ = self.module.sample(len(labels), labels=labels, seed=int(params.get("seed", 0)))
                return ((images[:, 0] + 1) / 2).numpy()  # (n, H, W) in [0, 1]
            x = torch.as_tensor(np.asarray(model_input), dtype=torch.float32)
            return self.module(x).numpy()


def _column(df, name: str) -> list:
    if isinstance(df, pd.DataFrame):
        if name not in df.columns:
            raise ValueError(f"the model takes a column '{name}'; got columns {list(df.columns)}")
        return df[name].tolist()
    return list(df)


def signature_and_example(module, example_batch=None):
    """The signature and input example of each interface; None for a module without one."""
    from mlflow.models import infer_signature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    kind = kind_of(module)
    if kind == "text":
        params = ParamSchema([ParamSpec(k, "long" if isinstance(v, int) else "double", v) for k, v in TEXT_PARAMS.items()])
        sig = mlflow.models.ModelSignature(Schema([ColSpec("string", "prompt")]), Schema([ColSpec("string")]), params)
        # MLflow checks the example by serving it once: a few tokens keep that check cheap
        return sig, (pd.DataFrame({"prompt": ["ROMEO:"]}), {"max_new_tokens": 8})
    if kind == "images":
        size = module.image_size
        params = ParamSchema([ParamSpec("seed", "long", 0)])
        sig = mlflow.models.ModelSignature(Schema([ColSpec("long", "label")]),
                                           Schema([TensorSpec(np.dtype(np.float32), (-1, size, size))]), params)
        return sig, (pd.DataFrame({"label": [7]}), {"seed": 0})
    if kind == "tensor" and example_batch is not None:
        import torch

        x = example_batch[0] if isinstance(example_batch, (list, tuple)) else example_batch
        x = x[:2].float()
        with torch.no_grad():
            y = module.eval()(x)
        return infer_signature(x.numpy(), y.numpy()), x.numpy()
    return None, None


def model_name(tags: dict[str, str]) -> str:
    """The name a run logs its model under: ``STUDY-VARIANT-seedN`` for a study's run, so MLflow's list of
    logged models tells them apart; ``model`` for a run of its own (``runs:/ID/model``)."""
    study, variant, seed = tags.get(TAG_STUDY), tags.get(TAG_VARIANT), tags.get("practicum.seed")
    if not (study and variant):
        return "model"
    raw = f"{study}-{variant}" + (f"-seed{seed}" if seed not in (None, "", "None") else "")
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", raw)


def log_model(client, run_id: str, uri: str, module, checkpoint: str, register: str | None = None,
              example_batch=None, name: str = "model") -> str | None:
    """Log `checkpoint` as the run's MLflow Model `name`; with `register`, also a Registry version.

    Returns the model URI, or None where the module has no interface to serve.
    """
    if isinstance(module, TransformersExport):
        logged = _log_transformers(client, run_id, uri, type(module), checkpoint, register, name)
        if logged:
            return logged
    sig, example = signature_and_example(module, example_batch)
    if sig is None:
        return None
    # Leaving the run's block marks it FINISHED; the pipeline sets its true status right after.
    with fluent_store(uri), mlflow.start_run(run_id=run_id, log_system_metrics=False):
        info = mlflow.pyfunc.log_model(
            name=name, python_model=CheckpointModel(), artifacts={"checkpoint": checkpoint},
            signature=sig, input_example=example, code_paths=CODE, pip_requirements=_requirements(),
            registered_model_name=register,
        )
    client.set_tag(run_id, "practicum.model_uri", f"runs:/{run_id}/{name}")
    return info.model_uri


@contextmanager
def fluent_store(uri: str):
    """MLflow's model logging is fluent only: point its global tracking URI at this run's store for the
    call, then put back both the global and $MLFLOW_TRACKING_URI (which `set_tracking_uri` overwrites:
    left changed, every later resolution in this process would go to MLflow's default store)."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    env = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        with _use_tracking_uri(uri):
            yield
    finally:
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env


def _requirements() -> list[str]:
    """Pinned from this environment, instead of MLflow's slow inference (it imports the model in a subprocess)."""
    from importlib import metadata

    out = []
    for dist in ("torch", "lightning", "mlflow", "numpy", "pandas", "jsonargparse", "torchmetrics"):
        try:
            out.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pass
    return out


def _log_transformers(client, run_id: str, uri: str, cls, checkpoint: str, register: str | None,
                      name: str = "model") -> str | None:
    """The best checkpoint, exported by the module as a transformers folder (`contract.TransformersExport`),
    in MLflow's ``transformers`` flavour as a text-generation pipeline: servable and loadable without
    Practicum. None where the module declines (its model is no transformers model)."""
    import tempfile

    best = cls.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = best.export_transformers(Path(tmp) / "merged")
        if folder is None:
            return None
        return _log_pipeline(client, run_id, uri, folder, register, name)


def _log_pipeline(client, run_id: str, uri: str, folder: Path, register: str | None, name: str = "model") -> str:
    with fluent_store(uri), mlflow.start_run(run_id=run_id, log_system_metrics=False):
        from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

        # a pipeline object: MLflow 3.17's local-folder path breaks on transformers 5's task registry
        pipe = pipeline("text-generation", model=AutoModelForCausalLM.from_pretrained(folder),
                        tokenizer=AutoTokenizer.from_pretrained(folder))
        info = mlflow.transformers.log_model(
            pipe, task="text-generation", name=name, registered_model_name=register,
            input_example=("ROMEO:", {"max_new_tokens": 8}), pip_requirements=_requirements() + _hf_requirements(),
        )
    client.set_tag(run_id, "practicum.model_uri", f"runs:/{run_id}/{name}")
    return info.model_uri


def _hf_requirements() -> list[str]:
    from importlib import metadata

    return [f"{d}=={metadata.version(d)}" for d in ("transformers", "tokenizers", "safetensors", "accelerate")
            if _installed(d)]


def _installed(dist: str) -> bool:
    from importlib import metadata

    try:
        metadata.version(dist)
        return True
    except metadata.PackageNotFoundError:
        return False
