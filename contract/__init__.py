"""What the pipeline may ask of a project, written once: one `typing.Protocol` per optional hook.

A project is a LightningModule and a LightningDataModule; Lightning's own hooks (`training_step`,
`test_dataloader`, ...) are its first contract. The pipeline (`pipelines/`) asks for more only through
the protocols below, with ``isinstance(obj, Protocol)``: the check is structural, so any object with
the member qualifies, and nothing in the pipeline names a project.

A shipped class *claims* what it implements by listing the protocols among its bases (PEP 544's
explicit declaration), e.g. ``class GPTModule(L.LightningModule, TextGenerator, CountsTokens)``.
`tests/test_contract.py` then holds every module and datamodule under `configs/` to its claims, both
ways: a claimed hook is defined with the protocol's signature, and a hook defined is claimed.

This package is the lowest layer: it imports nothing from Practicum, so `datamodules`, `modules` and
`pipelines` may all import it (`tests/test_layers.py`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

__all__ = ["CountsSamples", "CountsTokens", "Fingerprinted", "ImageSampler", "MemoryLedger", "OptionalTestSplit",
           "ParamCount", "ServesEstimator", "TextGenerator", "TransformersExport", "MODULE_HOOKS", "DATAMODULE_HOOKS", "HOOKS", "claims"]


# --- datamodules ------------------------------------------------------------------------------------
@runtime_checkable
class Fingerprinted(Protocol):
    """A datamodule that can name the exact examples it serves."""

    def fingerprint(self) -> str:
        """A digest of every example the splits served, stable across processes and machines.

        Called once after ``trainer.fit`` on rank 0 (`pipelines.run`). Logged as the run parameter
        ``data.fingerprint``, and the digests of the run's MLflow datasets derive from it
        (`pipelines.lineage`): two runs with the same value saw the same data.
        """
        ...


@runtime_checkable
class OptionalTestSplit(Protocol):
    """A datamodule whose test split exists only on request (a `test_fraction` > 0, say)."""

    @property
    def has_test_split(self) -> bool:
        """Whether `test_dataloader` has anything to serve now.

        Read after fitting (`pipelines.run`): False skips ``trainer.test``. A datamodule without
        this property is tested whenever it overrides `test_dataloader` and the module `test_step`.
        """
        ...


# --- modules: resources ----------------------------------------------------------------------------
@runtime_checkable
class CountsTokens(Protocol):
    """A module whose batches are sequences of tokens."""

    def tokens_per_batch(self, batch: Any) -> int:
        """The tokens in one training batch (padding excluded, where there is any).

        Called by `pipelines.resources.ResourceMonitor` after every training batch; the sums become
        ``perf/tokens_per_s`` and ``budget/tokens``. Without it, a run has neither key.
        """
        ...


@runtime_checkable
class CountsSamples(Protocol):
    """A module whose batch size Lightning cannot read off the batch (a dict of ragged fields, say)."""

    def samples_per_batch(self, batch: Any) -> int:
        """The examples in one training batch.

        Called by `ResourceMonitor` after every training batch for ``perf/samples_per_s`` and
        ``budget/samples``; without it Lightning's ``extract_batch_size`` counts them.
        """
        ...


@runtime_checkable
class MemoryLedger(Protocol):
    """A module whose state is not (only) torch parameters: a NumPy core, a stored training set."""

    def memory_ledger(self) -> dict[str, int]:
        """Bytes held outside torch parameters, by name (``{"params_bytes": 800, "train_set_bytes": 4096}``).

        Called once at the end of fit (`ResourceMonitor.on_fit_end`); each entry is added to the
        run's ``mem/<name>`` (which the torch ledger has already filled for torch tensors).
        """
        ...


@runtime_checkable
class ParamCount(Protocol):
    """A module whose parameter count is not the number of elements in its torch parameters."""

    def param_count(self) -> int:
        """The model's learned parameters.

        Called once at the end of fit (`ResourceMonitor.on_fit_end`); it replaces the torch count
        in ``params/total`` and ``params/trainable``.
        """
        ...


# --- modules: serving -------------------------------------------------------------------------------
@runtime_checkable
class TextGenerator(Protocol):
    """A module that continues a text prompt."""

    def generate_text(self, prompt: str, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                      seed: int = 0) -> str:
        """The prompt followed by up to `max_new_tokens` sampled tokens, decoded; same seed, same text.

        Called by ``practicum generate`` on a module loaded from a checkpoint, an exported folder or a
        run (`pipelines.generate`), and by the run's MLflow Model (`pipelines.models`), which serves a
        ``prompt`` column with these four parameters.
        """
        ...


@runtime_checkable
class ImageSampler(Protocol):
    """A module that draws labelled images by running a noise schedule backwards (the DDPM)."""

    schedule: Any
    """The noise schedule `sample` runs in reverse."""

    @property
    def image_size(self) -> int:
        """Height and width of the square images `sample` returns."""
        ...

    def sample(self, n: int, labels: Any = None, seed: int = 0) -> tuple[Any, Any]:
        """`n` images (n, 1, H, W) in [-1, 1] for the class `labels` (a (n,) long tensor; None: the
        module's default labels), and the sampler's snapshots; same seed, same images.

        Called by the run's MLflow Model (`pipelines.models`), which serves a ``label`` column and
        returns (n, H, W) images in [0, 1]; `image_size` goes into its signature.
        """
        ...


@runtime_checkable
class TransformersExport(Protocol):
    """A module that can write itself as a Hugging Face transformers model."""

    def export_transformers(self, folder: str | Path) -> Path | None:
        """Write the model (adapters merged) and its tokenizer to `folder` in the transformers layout
        (``from_pretrained`` loads it) and return the folder; None where this instance's model is no
        transformers model (a fine-tune of the mini-GPT).

        Called on the run's best checkpoint when the run logs its MLflow Model (`pipelines.models`):
        a folder is logged in MLflow's ``transformers`` flavour, servable without Practicum; None
        falls back to the pyfunc that the other protocols choose.
        """
        ...


@runtime_checkable
class ServesEstimator(Protocol):
    """A module whose fitted model is a scikit-learn-API estimator (scikit-learn, LightGBM, XGBoost)."""

    def fitted_estimator(self) -> Any | None:
        """The fitted estimator, or None before fit.

        Called after fit and test (`pipelines.run`); a non-None result is logged as the run's MLflow
        Model in its library's own flavour (`pipelines.models_sklearn.log_estimator`) instead of the
        checkpoint pyfunc.
        """
        ...


MODULE_HOOKS = (CountsTokens, CountsSamples, MemoryLedger, ParamCount, TextGenerator, ImageSampler, TransformersExport,
                ServesEstimator)
DATAMODULE_HOOKS = (Fingerprinted, OptionalTestSplit)
HOOKS = MODULE_HOOKS + DATAMODULE_HOOKS


def claims(cls: type) -> tuple[type, ...]:
    """The protocols `cls` lists among its bases, itself or through a parent (what it promises)."""
    return tuple(p for p in HOOKS if p in cls.__mro__)
