"""The fine-tuning methods of the table (modules/finetune/methods.py): each builds through
`FinetuneModule`, saves its trained part alone, and that folder loads back into a model that gives
the same logits and generates the same tokens; the hand-written bottleneck adapter is an identity
at step 0 and trains exactly the weights of its formula."""

from __future__ import annotations

import pytest
import torch

from modules.finetune.adapter import Bottleneck, bottleneck_params
from modules.finetune.load import load_for_generation
from modules.finetune.methods import METHODS
from modules.finetune.module import FinetuneModule

HF_METHODS = ["lora", "dora", "ia3", "vera", "loha", "prefix", "prompt", "adapter"]
MINIGPT_METHODS = ["lora", "dora", "ia3", "vera", "loha", "adapter"]


def built(backbone, method: str, **kw) -> FinetuneModule:
    kw = {"r": 4, "lora_dropout": 0.0, "num_virtual_tokens": 4, **kw}
    module = FinetuneModule(str(backbone), method, export=False, **kw)
    module.configure_model()
    return module


def perturb_(module: FinetuneModule) -> None:
    """Stand-in for training: move every trained tensor, so the adapter is no longer an identity."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def assert_round_trip(module: FinetuneModule, tmp_path, prompt: str, ids: torch.Tensor) -> None:
    folder = module.save_adapter(tmp_path / "adapter")
    again = load_for_generation(folder)
    assert again.method == module.method
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids), module(ids), atol=1e-5, rtol=0)
    kw = dict(max_new_tokens=8, temperature=0.8, top_k=20, seed=3)
    assert again.generate_text(prompt, **kw) == module.generate_text(prompt, **kw)


@pytest.mark.parametrize("method", HF_METHODS)
def test_each_method_saves_reloads_and_generates_the_same_on_llama(method, tiny_llama_dir, tmp_path):
    torch.manual_seed(0)
    module = built(tiny_llama_dir, method)
    assert 0 < module.n_trainable < 0.1 * module.n_total
    base = built(tiny_llama_dir, "full").eval()
    ids = torch.randint(3, 300, (2, 10))
    perturb_(module)
    module.eval()
    with torch.no_grad():
        assert (module(ids) - base(ids)).abs().max() > 1e-4  # the trained part changes the model...
    assert_round_trip(module, tmp_path, "The assert statement", ids)  # ...and comes back from disk


@pytest.mark.parametrize("method", MINIGPT_METHODS)
def test_each_method_saves_reloads_and_generates_the_same_on_the_minigpt(method, tiny_minigpt_ckpt, tmp_path):
    torch.manual_seed(0)
    module = built(tiny_minigpt_ckpt, method)
    assert 0 < module.n_trainable < module.n_total
    perturb_(module)
    assert_round_trip(module, tmp_path, "To be", torch.randint(0, 256, (2, 10)))


def test_virtual_token_methods_need_a_hugging_face_backbone(tiny_minigpt_ckpt):
    for method in ("prefix", "prompt"):
        with pytest.raises(ValueError, match="needs a Hugging Face backbone"):
            FinetuneModule(tiny_minigpt_ckpt, method)
    with pytest.raises(ValueError, match="does not train under gradient_checkpointing"):
        FinetuneModule("some/model", "prefix", gradient_checkpointing=True)


def test_unmergeable_methods_export_the_adapter_only(tiny_llama_dir, tmp_path):
    assert {m for m, spec in METHODS.items() if not spec.mergeable} == {"prefix", "prompt", "adapter"}
    module = built(tiny_llama_dir, "adapter")
    with pytest.raises(ValueError, match="does not fold into the weights"):
        module.save_merged(tmp_path / "merged")


@pytest.mark.parametrize("backbone", ["tiny_llama_dir", "tiny_minigpt_ckpt"])
def test_bottleneck_adapter_is_the_identity_at_step_0_and_trains_its_formula(backbone, request):
    path = request.getfixturevalue(backbone)
    adapted, base = built(path, "adapter", r=6), built(path, "full")
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(adapted.eval()(ids), base.eval()(ids), atol=0, rtol=0)  # W_up = 0: exactly
    adapters = [m for m in adapted.modules() if isinstance(m, Bottleneck)]
    n_layers = 2 if backbone == "tiny_llama_dir" else 1
    assert len(adapters) == 2 * n_layers  # after the attention and the MLP block of every layer
    d = adapters[0].base.out_features  # the model width: both blocks write back into the residual stream
    assert adapted.n_trainable == 2 * n_layers * bottleneck_params(d, 6) == 2 * n_layers * (2 * 6 * d + 6 + d)
    assert {n.rsplit(".", 2)[-2] for n, p in adapted.named_parameters() if p.requires_grad} == {"down", "up"}
    # and it learns: one step moves the output
    loss = adapted.train()(ids).float().logsumexp(-1).mean()
    loss.backward()
    assert all(a.up.weight.grad.abs().sum() > 0 for a in adapters)
