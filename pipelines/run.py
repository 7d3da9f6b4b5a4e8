"""One experiment: parse a config, open an MLflow run, fit, test, close the run with the right status.

Every project takes this path, `run_experiment`, read top to bottom. The typed signatures of a
project's LightningModule and LightningDataModule are the schema (`pipelines.config`); the MLflow
run is `pipelines.session`; the callbacks every run gets are `pipelines.callbacks`; checkpoints,
resume and inputs from earlier runs are `pipelines.checkpoint`.
"""

from __future__ import annotations

import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import yaml
from lightning.pytorch.utilities.model_helpers import is_overridden

from contract import Fingerprinted, OptionalTestSplit, ServesEstimator
from pipelines import console
from pipelines import tracking as trk
from pipelines.callbacks import pipeline_callbacks
from pipelines.checkpoint import find_resume_point, inputs_tag, resolve_run_inputs
from pipelines.config import PracticumCLI, check_strategy, project_of
from pipelines.lineage import DataLineage, log_datasets
from pipelines.tracking import ConfigError
from pipelines.resources import ResourceMonitor
from pipelines.session import Session, is_rank_zero, one_line

# OnExceptionCheckpoint makes a fresh fit look for a "last" checkpoint; in a new run there is none by design.
warnings.filterwarnings("ignore", message=r".*(called without a model|there is no last checkpoint).*")
HEADLINE = re.compile(r"^(train|val|test)/|^perf/(tokens|samples)_per_s$|^time/fit_s$|^params/total$")


@dataclass
class RunResult:
    run_id: str | None
    status: str
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    checkpoint: str | None = None

    def headline(self) -> dict[str, float]:
        return {k: v for k, v in sorted(self.metrics.items()) if HEADLINE.search(k)}


def load_experiment(config: str | Path | None, args: Sequence[str] = ()) -> PracticumCLI:
    """Parse and build a config's model and datamodule without opening a run (``.model``, ``.datamodule``)."""
    cli = PracticumCLI((["--config", str(config)] if config else []) + list(args))
    cli.build()
    return cli


def run_experiment(
    config: str | Path | None,
    args: Sequence[str] = (),
    tracking_uri: str | None = None,
    *,
    experiment: str | None = None,
    run_name: str | None = None,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    system_metrics: bool = True,
    callbacks: Sequence = (),
    progress_bar: bool = True,
) -> RunResult:
    """Fit (then test, where the datamodule has a test split) one config into one MLflow run.

    `callbacks` are added to the config's and the pipeline's (a tuner's pruning callback, say).
    `progress_bar=False` leaves the progress to the caller (a study draws one line for all its runs).

    Raises ``ConfigError`` for a config the schema rejects (before any run is opened) and
    ``TrackingError`` when the store cannot be used. Any error after the run is opened ends the run
    FAILED (Ctrl-C or SIGTERM: KILLED) with what it logged kept, and is returned, not raised.
    """
    console.apply()  # Lightning and MLflow are imported by now: their INFO chatter off unless --verbose
    # 1. Parse against the typed signatures; resolve where the run goes, once.
    cli = PracticumCLI((["--config", str(config)] if config else []) + list(args))
    cfg = cli.config
    uri = trk.resolve_tracking_uri(tracking_uri or cfg.tracking_uri)
    check_strategy(cfg.trainer)
    config_path = str(Path(config).resolve()) if config else None
    resume_id = resume_ckpt = None
    if cfg.resume and is_rank_zero():
        resume_id, resume_ckpt = find_resume_point(cfg.resume, uri, config_path)

    # 2. Earlier runs named as inputs (runs:/ID) become local files; then build model and data.
    inputs = resolve_run_inputs(cfg, uri)
    model, dm = cli.build()

    # 3. Open the MLflow run (or reopen the one being resumed) and record the config.
    project = project_of(cfg.model.class_path)
    run_tags = {
        trk.TAG_PROJECT: project,
        "practicum.model": cfg.model.class_path,
        "practicum.data": cfg.data.class_path if cfg.get("data") else "",
        "practicum.seed": str(cfg.seed_everything),
        **({"practicum.config": config_path} if config_path else {}),
        # MLflow's Source column: the config the run came from (its commit is mlflow.source.git.commit)
        **({"mlflow.source.name": config_path, "mlflow.source.type": "LOCAL"} if config_path else {}),
        **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {}),
        **inputs_tag(inputs),
        **(tags or {}),
    }
    s = Session(uri, cfg.experiment or experiment or project, cfg.run_name or run_name, run_tags,
                cfg.system_metrics and system_metrics, cfg.log_checkpoint, resume_run_id=resume_id)
    if cfg.resume and not is_rank_zero():  # rank 0 found it; the same folder holds it for every rank
        resume_ckpt = str(s.ckpt_dir / "last.ckpt")
    status, error = "FINISHED", None
    trainer, metrics = None, {}
    try:
        dump = trk.redact(cli.dump())  # the logged config and its params carry no URL password
        params = {k: v for k, v in trk.flatten(yaml.safe_load(dump)).items() if k != "resume"}
        s.log_config(dump, {**params, "seed": cfg.seed_everything})
        if s.resumed:
            s.set_tags({"practicum.resumed_from": resume_ckpt})

        # 4. The trainer: the config's arguments, the pipeline's logger and callbacks.
        info = {"class_path": cfg.model.class_path, "run_id": s.run_id, "tracking_uri": uri,
                **({"datamodule_class_path": cfg.data.class_path} if cfg.get("data") else {})}
        trainer_cfg = cli.config_init.get("trainer") or {}
        lineage = DataLineage()
        callbacks = [*(trainer_cfg.get("callbacks") or []), *callbacks, lineage, *pipeline_callbacks(
            s.ckpt_dir, info, cfg.checkpoint_monitor, cfg.checkpoint_mode, cfg.checkpoint_every_n_steps,
            checkpointing=trainer_cfg.get("enable_checkpointing") is not False,
            every_minutes=cfg.checkpoint_every_n_minutes)]
        trainer = cli.instantiate_trainer(logger=s.logger or False, callbacks=callbacks,
                                          default_root_dir=trainer_cfg.get("default_root_dir") or str(trk.local_dir(uri)),
                                          **console.trainer_overrides(trainer_cfg, progress_bar))

        # 5. Fit, then test the best checkpoint where the project has a test split.
        trainer.fit(model, datamodule=dm, ckpt_path=resume_ckpt)
        metrics = _scalars(trainer.callback_metrics)  # testing replaces the fit's callback metrics
        fingerprint = None  # a hash of every example served: computed once, for the param and the datasets
        if isinstance(dm, Fingerprinted) and trainer.is_global_zero:
            fingerprint = dm.fingerprint()
            s.client.log_param(s.run_id, "data.fingerprint", fingerprint)
        # a datamodule may hold a test split only on request (contract.OptionalTestSplit)
        if (dm is not None and is_overridden("test_dataloader", dm)
                and (not isinstance(dm, OptionalTestSplit) or dm.has_test_split) and is_overridden("test_step", model)):
            best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
            trainer.test(model, datamodule=dm, ckpt_path=best or None, verbose=False)
        if trainer.interrupted:
            status = "KILLED"
        elif trainer.is_global_zero:
            _log_model(s, cfg, model, trainer, run_tags)
            _log_datasets(s, dm, lineage, fingerprint)
    except (KeyboardInterrupt, SystemExit) as e:  # Ctrl-C, or Lightning's SIGTERMException
        status, error = "KILLED", e
    except Exception as e:
        status, error = "FAILED", e
    finally:
        # 6. Close the run with its status; checkpoints and the error are uploaded.
        status, error = s.end(status, error)
    return _result(s.run_id, status, error, trainer, metrics)


def _log_model(s: Session, cfg, model, trainer, tags: dict[str, str]) -> None:
    """The best checkpoint as the run's MLflow Model (and a Registry version with --register). A model
    that cannot be logged is a warning on the run, not a failed run: the checkpoint is there."""
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if not (cfg.log_model or cfg.register) or not best:
        if cfg.register:
            raise ConfigError(f"--register {cfg.register}: the run saved no checkpoint to register "
                              "(enable checkpointing)")
        return
    from pipelines import models
    from pipelines.models_sklearn import log_estimator

    name = models.model_name(tags)
    try:
        example = None
        # After trainer.test() the trainer holds no validation loader: ask the datamodule for one then.
        loader = trainer.val_dataloaders or (trainer.datamodule.val_dataloader() if trainer.datamodule else None)
        if isinstance(model, ServesEstimator) and model.fitted_estimator() is not None:
            # a scikit-learn-API estimator: its library's own MLflow flavour, a few validation rows as example
            rows = next(iter(loader))[0][:5].numpy() if loader is not None else None
            log_estimator(s.client, s.run_id, s.uri, model.fitted_estimator(), cfg.register, rows, name)
            return
        if models.kind_of(model) == "tensor" and loader is not None:
            example = next(iter(loader))
        models.log_model(s.client, s.run_id, s.uri, model, best, cfg.register, example, name)
    except Exception as e:  # noqa: BLE001  (the run's results stand without their MLflow Model)
        if cfg.register:
            raise
        s.set_tags({"practicum.model_error": one_line(e)})
        print(f"warning: run {s.run_id} has no MLflow Model ({one_line(e)})", file=sys.stderr)


def _log_datasets(s: Session, dm, lineage: DataLineage, fingerprint: str | None) -> None:
    try:
        log_datasets(s.client, s.run_id, dm, lineage.used, fingerprint)
    except Exception as e:  # noqa: BLE001  (lineage is a convenience of the UI, never a failed run)
        s.set_tags({"practicum.dataset_error": one_line(e)})


def _scalars(d: dict) -> dict[str, float]:
    return {k: float(v) for k, v in d.items() if getattr(v, "numel", lambda: 1)() == 1}


def _result(run_id: str, status: str, error: BaseException | None, trainer, metrics: dict) -> RunResult:
    if trainer is None:
        return RunResult(run_id, status, error=one_line(error) if error else None)
    metrics = {**metrics, **_scalars(trainer.callback_metrics)}
    for cb in trainer.callbacks:
        if isinstance(cb, ResourceMonitor):
            metrics.update(cb.summary)
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else None
    return RunResult(run_id, status, metrics, one_line(error) if error else None, best or None)
