"""Every YAML under configs/ parses against the typed signatures and instantiates (no run, no network):
the built objects are of the classes named, took the YAML's arguments and keep their `contract` claims."""

import inspect
import typing
from pathlib import Path

import pytest
import torch
import yaml

from contract import HOOKS, claims
from pipelines.run import load_experiment
from pipelines.study import load_study, unmet_requirements
from pipelines.tracking import ConfigError

ROOT = Path(__file__).resolve().parents[1]
ALL = sorted(ROOT.glob("configs/**/*.yaml"))
STUDIES = [p for p in ALL if p.parent.name == "studies"]
TRAINER_PRESETS = [p for p in ALL if p.parent.name == "trainer"]
EXPERIMENTS = [p for p in ALL if p not in STUDIES and p not in TRAINER_PRESETS]


def _id(p: Path) -> str:
    return str(p.relative_to(ROOT / "configs"))


def test_there_are_configs():
    assert EXPERIMENTS and STUDIES


def _needs_cuda(path: Path) -> bool:
    """Configs that only make sense on CUDA (QLoRA's 4-bit kernels) say so in their model arguments."""
    init = (yaml.safe_load(path.read_text()).get("model") or {}).get("init_args") or {}
    return init.get("method") == "qlora"


@pytest.mark.parametrize("path", EXPERIMENTS, ids=_id)
def test_experiment_config_instantiates(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # configs may name files relative to the repository root
    cli = load_experiment(path)  # QLoRA too: construction is CUDA-free (`practicum estimate` reads it anywhere)
    if _needs_cuda(path) and not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs a CUDA GPU"):  # the clear error, at a run's first hook
            cli.model.prepare_data()
        return
    cli = load_experiment(path)
    assert cli.config.model.class_path.startswith("modules.")
    assert cli.config.data.class_path.startswith("datamodules.")
    check_built(cli, yaml.safe_load(path.read_text()))


def _plain(v):
    return [_plain(x) for x in v] if isinstance(v, (list, tuple)) else v


def _implements(obj, proto) -> bool:
    """isinstance(obj, proto) without running a property: on Python 3.11 a runtime protocol's isinstance
    calls each getter, and a datamodule's `has_test_split` may read its data, which a config check has not."""
    attrs = getattr(proto, "__protocol_attrs__", None) or typing._get_protocol_attrs(proto)
    return all(isinstance(inspect.getattr_static(type(obj), a, None), property) or hasattr(obj, a) for a in attrs)


def check_built(cli, raw: dict | None = None) -> None:
    """What `load_experiment` built is what the config asked for, and keeps the contract."""
    for obj, section in ((cli.model, cli.config.model), (cli.datamodule, cli.config.get("data"))):
        if section is None:
            continue
        assert f"{type(obj).__module__}.{type(obj).__name__}" == section.class_path
        # the instance, data members included, is what its class claims: a claim it breaks, or a hook
        # it has without claiming it, fails (the class-level signatures: tests/test_contract.py)
        for proto in HOOKS:
            assert _implements(obj, proto) == (proto in claims(type(obj))), (type(obj).__name__, proto.__name__)
    # every argument the YAML gives the model reached it (saved as a hyper-parameter by the module)
    given = ((raw or {}).get("model") or {}).get("init_args") or {}
    hp = dict(cli.model.hparams)
    for key, value in given.items():
        assert _plain(hp[key]) == _plain(value), f"model.init_args.{key}: YAML {value!r}, module {hp[key]!r}"


@pytest.mark.parametrize("path", STUDIES, ids=_id)
def test_study_variants_instantiate(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    study = load_study(path)
    for name in study.variants:
        config, args = study.variant_config(name)
        if unmet_requirements((study.variants[name] or {}).get("requires")):
            # the study skips it here; built anyway, it must stop with a clear error naming
            # what is missing
            with pytest.raises((ConfigError, RuntimeError, ImportError), match="CUDA|bitsandbytes"):
                load_experiment(config, args).model.prepare_data()  # before data or weights
            continue
        cli = load_experiment(config, args)
        check_built(cli)  # the variant's overrides replace the base YAML's arguments: classes and contract only


@pytest.mark.parametrize("path", TRAINER_PRESETS, ids=_id)
def test_trainer_preset_is_trainer_only(path):
    cfg = yaml.safe_load(path.read_text())
    assert set(cfg) <= {"trainer"}, f"{path}: a trainer preset holds only a trainer: section"
