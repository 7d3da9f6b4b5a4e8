"""Every shipped module and datamodule keeps the promises it makes in `contract`, both ways: a protocol it
lists among its bases is implemented with the protocol's signature, and a hook it implements is listed.
The built instances (data members included) are checked in tests/test_configs.py, from every YAML."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import lightning as L
import pytest

import contract
from contract import HOOKS, claims

ROOT = Path(__file__).resolve().parents[1]


def shipped_classes() -> list[type]:
    """Every LightningModule and LightningDataModule defined under modules/ and datamodules/."""
    out = []
    for pkg in ("modules", "datamodules"):
        for info in pkgutil.walk_packages([str(ROOT / pkg)], prefix=f"{pkg}."):
            mod = importlib.import_module(info.name)
            out += [c for _, c in inspect.getmembers(mod, inspect.isclass) if c.__module__ == mod.__name__
                    and issubclass(c, (L.LightningModule, L.LightningDataModule)) and not c.__name__.startswith("_")]
    return sorted(set(out), key=lambda c: f"{c.__module__}.{c.__qualname__}")


def members(proto: type) -> dict[str, object]:
    """The methods and properties a protocol asks for (data members are checked on instances)."""
    return {k: v for k, v in vars(proto).items() if not k.startswith("_") and (inspect.isfunction(v) or isinstance(v, property))}


def _owner(cls: type, name: str) -> type | None:
    return next((c for c in cls.__mro__ if name in vars(c)), None)


def implements(cls: type, proto: type) -> bool:
    """Whether `cls` itself (not the protocol's stub) defines every method and property of `proto`."""
    return all((o := _owner(cls, name)) is not None and o not in HOOKS for name in members(proto))


def problems(cls: type) -> list[str]:
    """How `cls` breaks the contract: claims it does not keep, signatures that differ, hooks it does not claim."""
    out, claimed = [], claims(cls)
    for proto in HOOKS:
        if proto not in claimed:
            if implements(cls, proto):
                out.append(f"defines the hooks of {proto.__name__} without listing it among its bases")
            continue
        for name, stub in members(proto).items():
            owner = _owner(cls, name)
            if owner in HOOKS:
                out.append(f"claims {proto.__name__} but does not define {name}")
            elif isinstance(stub, property) != isinstance(vars(owner)[name], property):
                out.append(f"{name} must be a {'property' if isinstance(stub, property) else 'method'} ({proto.__name__})")
            elif inspect.isfunction(stub) and (why := _signature_mismatch(stub, vars(owner)[name])):
                out.append(f"{name} {why} ({proto.__name__})")
    return out


def _signature_mismatch(stub, impl) -> str | None:
    """None where `impl` can be called every way the protocol's `stub` may be: the same parameters in
    the same order with the same defaults; more only with defaults."""
    impl = inspect.unwrap(impl)  # torch.no_grad() and the like wrap the method
    want, have = list(inspect.signature(stub).parameters.values()), list(inspect.signature(impl).parameters.values())
    for i, p in enumerate(want):
        q = have[i] if i < len(have) else None
        if q is None or q.name != p.name or q.kind != p.kind:
            return f"takes {inspect.signature(impl)}, the contract says {inspect.signature(stub)}"
        if p.default is not inspect.Parameter.empty and q.default != p.default:
            return f"defaults {q.name}={q.default!r}, the contract says {p.default!r}"
    extra = [q.name for q in have[len(want):] if q.default is inspect.Parameter.empty and q.kind not in (q.VAR_POSITIONAL, q.VAR_KEYWORD)]
    return f"adds required parameters {extra}" if extra else None


SHIPPED = shipped_classes()


def test_the_walk_finds_the_projects():
    names = {c.__name__ for c in SHIPPED}
    assert {"GPTModule", "FinetuneModule", "DPOModule", "DiffusionModule", "KNNModule", "ShakespeareDataModule",
            "MNISTDataModule", "PreferenceDataModule"} <= names


@pytest.mark.parametrize("cls", SHIPPED, ids=lambda c: c.__name__)
def test_shipped_class_keeps_its_claims(cls):
    assert not problems(cls), f"{cls.__module__}.{cls.__name__}: " + "; ".join(problems(cls))


# The checker can fail: each of these classes breaks the contract in one way.
class _Lies(L.LightningModule, contract.TextGenerator):  # claims, defines nothing
    pass


class _WrongSignature(L.LightningModule, contract.TextGenerator):
    def generate_text(self, prompt: str, n: int, temperature: float = 1.0, top_k=None, seed: int = 0) -> str:
        return prompt


class _WrongDefault(L.LightningModule, contract.TextGenerator):
    def generate_text(self, prompt, max_new_tokens, temperature=0.7, top_k=None, seed=0):
        return prompt


class _Unclaimed(L.LightningModule):  # a hook the contract knows, not listed among the bases
    def tokens_per_batch(self, batch) -> int:
        return 0


class _NotAProperty(L.LightningDataModule, contract.OptionalTestSplit):
    def has_test_split(self) -> bool:
        return True


class _Keeps(L.LightningModule, contract.TextGenerator, contract.CountsTokens):
    def generate_text(self, prompt, max_new_tokens, temperature=1.0, top_k=None, seed=0, stop: str | None = None):
        return prompt

    def tokens_per_batch(self, batch) -> int:
        return 0


@pytest.mark.parametrize("cls,why", [(_Lies, "does not define generate_text"), (_WrongSignature, "takes"),
                                     (_WrongDefault, "defaults temperature"), (_Unclaimed, "without listing it"),
                                     (_NotAProperty, "must be a property")])
def test_the_checker_catches_a_broken_class(cls, why):
    assert any(why in p for p in problems(cls)), problems(cls)


def test_the_checker_passes_a_class_that_keeps_its_claims():
    assert problems(_Keeps) == []


HOOK_NAMES = {name for proto in HOOKS for name in members(proto)} | {"schedule", "kind"}


def test_the_pipeline_asks_through_the_protocols_only():
    """No `hasattr(x, "hook")` / `getattr(x, "hook", ...)` probe for a hook the contract names, nor a `kind`
    attribute read off a project, anywhere in pipelines/."""
    bad = []
    for path in (ROOT / "pipelines").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("hasattr", "getattr")
                    and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and node.args[1].value in HOOK_NAMES):
                bad.append(f"{path.name}:{node.lineno} {ast.unparse(node)}")
    assert not bad, bad
