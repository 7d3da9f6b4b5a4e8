"""The memory estimate (modules/finetune/memory.py) against the exact ledger of a real step of the
model `FinetuneModule` itself loads and builds (pipelines/resources.py measures it), and its
closed forms against hand computations. CPU only, no network."""

import gc
import weakref

import pytest
import torch
import transformers

from datamodules.tokenizers import ByteTokenizer
from modules.finetune import memory as M
from modules.finetune.export import save_minigpt
from modules.finetune.model import causal_lm_loss, logits_of
from modules.finetune.module import FinetuneModule
from modules.gpt.model import GPT, GPTConfig
from pipelines.resources import _storage_key, grad_bytes, optimizer_bytes, parameter_ledger

# tiny Llama/Mistral shapes: (hidden, intermediate, layers, heads, kv heads, vocab)
SIZES = {"s": (32, 64, 1, 4, 4, 96), "m": (64, 160, 2, 4, 2, 256), "l": (96, 256, 3, 6, 2, 320)}
HUB_ID = "practicum-test/tiny"  # a name only: construction loads nothing, the estimate builds on meta


def hf_config(kind: str, size: str):
    h, i, n, nh, nkv, v = SIZES[size]
    cls = transformers.LlamaConfig if kind == "llama" else transformers.MistralConfig
    return cls(hidden_size=h, intermediate_size=i, num_hidden_layers=n, num_attention_heads=nh,
               num_key_value_heads=nkv, vocab_size=v, max_position_embeddings=256)


def saved_backbone(arch, folder) -> str:
    """Random weights of `arch` on disk, where `FinetuneModule` loads a backbone from."""
    torch.manual_seed(0)
    if isinstance(arch, GPTConfig):
        save_minigpt(GPT(arch), ByteTokenizer(), folder / "base.ckpt")
        return str(folder / "base.ckpt")
    transformers.AutoModelForCausalLM.from_config(arch).save_pretrained(folder)
    return str(folder)


class LiveActivationMeter:
    """Bytes of the storages autograd still holds for backward when the forward ends, each once,
    parameters excluded. `pipelines.resources.ActivationMeter` counts every storage packed during
    the forward; that is the same number unless a graph is dropped before backward: DoRA builds
    B A through a graph whose output it detaches, so autograd frees those saved tensors at once
    and the allocator reuses their memory (a key of a freed storage then hides a live one)."""

    class Held:  # what autograd keeps for one saved tensor: dies with the graph node that saved it
        __slots__ = ("t", "__weakref__")

        def __init__(self, t):
            self.t = t

    def __init__(self, exclude):
        self._exclude = {_storage_key(p) for p in exclude}
        self._held: list = []
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda held: held.t)

    def _pack(self, t):
        held = self.Held(t)
        self._held.append(weakref.ref(held))
        return held

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)

    @property
    def bytes(self) -> int:
        gc.collect()
        live = {}
        for ref in self._held:
            if (held := ref()) is not None and (key := _storage_key(held.t)) not in self._exclude:
                live.setdefault(key, held.t.untyped_storage().nbytes())
        return sum(live.values())


def measure(module: FinetuneModule, vocab: int, batch: int, seq: int, precision: str = "32-true") -> dict:
    """One forward/backward/AdamW step of the module's own model, ledgered as ResourceMonitor does."""
    module.configure_model()  # loads the saved weights and builds, as under a Trainer
    m = module.backbone
    if precision == "bf16-true":  # what Lightning's bf16-true plugin does to the module
        m = m.to(torch.bfloat16)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    x = torch.randint(0, vocab, (batch, seq))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    with LiveActivationMeter(exclude=list(m.parameters())) as meter, autocast:
        loss, _ = causal_lm_loss(logits_of(m, x, torch.ones_like(x)), x)
    activations = meter.bytes  # what backward will read
    loss.backward()
    grads = grad_bytes(m)
    opt.step()
    return {"params": parameter_ledger(m)["mem/params_bytes"], "grads": grads,
            "optimizer": optimizer_bytes([opt]), "activations": activations}


def assert_close(est: M.Estimate, measured: dict, tol: float = 0.05):
    for k, v in measured.items():
        assert getattr(est, k) == pytest.approx(v, rel=tol), (k, getattr(est, k), v)


CASES = [  # (kind, size, method, precision, attention, checkpointing, batch, seq)
    ("llama", "s", "full", "32-true", "sdpa", False, 2, 16),
    ("llama", "m", "lora", "32-true", "sdpa", False, 2, 24),
    ("llama", "l", "full", "bf16-true", "sdpa", False, 1, 32),
    ("llama", "l", "lora", "bf16-mixed", "sdpa", False, 2, 16),
    ("llama", "m", "full", "bf16-mixed", "eager", False, 2, 16),
    ("mistral", "s", "lora", "32-true", "eager", False, 3, 16),
    ("mistral", "m", "full", "32-true", "sdpa", True, 2, 32),
    ("mistral", "l", "lora", "bf16-true", "sdpa", True, 2, 16),
    # the other methods: their own parts of each layer (modules/finetune/activations.py, `lin`)
    ("llama", "m", "dora", "32-true", "sdpa", False, 2, 16),
    ("mistral", "l", "dora", "bf16-mixed", "eager", False, 2, 16),
    ("llama", "m", "ia3", "bf16-mixed", "sdpa", False, 2, 16),
    ("mistral", "s", "ia3", "32-true", "sdpa", True, 2, 24),
    ("llama", "m", "prefix", "32-true", "sdpa", False, 2, 16),
    ("mistral", "l", "prefix", "bf16-mixed", "eager", False, 3, 16),
    ("llama", "l", "adapter", "bf16-mixed", "sdpa", False, 2, 16),
    ("mistral", "m", "adapter", "32-true", "sdpa", True, 2, 16),
]


@pytest.mark.parametrize("kind,size,method,precision,attn,ckpt,batch,seq", CASES)
def test_llama_and_mistral_match_the_ledger(kind, size, method, precision, attn, ckpt, batch, seq, tmp_path):
    cfg = hf_config(kind, size)
    module = FinetuneModule(saved_backbone(cfg, tmp_path), method, r=4, lora_dropout=0.05, num_virtual_tokens=3,
                            attn_implementation=attn,
                            dtype="bfloat16" if precision == "bf16-true" else "float32", gradient_checkpointing=ckpt,
                            export=False)
    est = M.estimate(module, cfg, precision, batch_size=batch, seq_len=seq, cuda=False)
    assert_close(est, measure(module, cfg.vocab_size, batch, seq, precision))


@pytest.mark.parametrize("method,dropout", [("full", 0.0), ("lora", 0.0), ("lora", 0.1), ("dora", 0.0), ("ia3", 0.0),
                                            ("adapter", 0.0)])
def test_minigpt_matches_the_ledger(method, dropout, tmp_path):
    cfg = GPTConfig(vocab_size=80, block_size=32, n_layer=2, n_head=4, n_embd=64)
    module = FinetuneModule(saved_backbone(cfg, tmp_path), method, r=4, lora_dropout=dropout, export=False)
    est = M.estimate(module, cfg, batch_size=4, seq_len=32, cuda=False)
    assert_close(est, measure(module, 80, 4, 32))


def test_checkpointing_keeps_layer_inputs_and_rebuilds_one_layer():
    cfg = hf_config("llama", "l")
    full = M.estimate(FinetuneModule(HUB_ID, "full"), cfg, batch_size=2, seq_len=16, cuda=False)
    ck = M.estimate(FinetuneModule(HUB_ID, "full", gradient_checkpointing=True), cfg, batch_size=2, seq_len=16,
                    cuda=False)
    per_layer_input = 2 * 16 * 96 * 4
    # without checkpointing the three layers' saves and the head; with it, inputs + the head only
    head = ck.activations - 3 * per_layer_input
    assert full.activations == pytest.approx(head + 3 * ck.recompute, rel=0.02)


def test_the_estimate_reads_the_module_it_is_given():
    """Options set on the module reach the estimate: rank, targets, method (not restated defaults)."""
    cfg = hf_config("llama", "m")
    h, i, n, nh, nkv, v = SIZES["m"]
    r4 = M.estimate(FinetuneModule(HUB_ID, "lora", r=4), cfg, seq_len=8)
    r8 = M.estimate(FinetuneModule(HUB_ID, "lora", r=8), cfg, seq_len=8)
    q_only = M.estimate(FinetuneModule(HUB_ID, "lora", r=4, target_modules=["q_proj"]), cfg, seq_len=8)
    assert r8.grads == 2 * r4.grads
    assert q_only.grads == n * 4 * 4 * (h + nh * (h // nh))  # fp32 A (r x h) and B (h x r) per layer
    with pytest.raises(ValueError, match="mini-GPT but the architecture"):
        M.estimate(FinetuneModule(None, "lora"), cfg)


def test_nf4_bytes_by_hand():
    # a 4096 x 4096 projection: 8 Mi packed bytes, 262144 blocks of 64 → 262144 uint8 absmax,
    # 1024 fp32 second-level absmax, an fp32 offset and the 16-entry fp32 NF4 code
    n = 4096 * 4096
    assert M.nf4_bytes(n) == n // 2 + n // 64 + 4 * (n // 64 // 256) + 4 + 64
    assert M.nf4_bytes(n) / n == pytest.approx(0.5 + 1 / 64 + 4 / (64 * 256), rel=1e-5)
    assert M.nf4_bytes(65) == 33 + 2 + 4 + 4 + 64  # odd count and a partial block round up


def test_qlora_quantises_decoder_linears_and_upcasts_the_rest():
    cfg = hf_config("llama", "m")
    est = M.estimate(FinetuneModule(HUB_ID, "qlora", r=4), cfg, "bf16-mixed")
    h, i, n, nh, nkv, v = SIZES["m"]
    hd = h // nh
    linears = [h * nh * hd, h * nkv * hd, h * nkv * hd, nh * hd * h, h * i, h * i, i * h]
    lora = sum(4 * (a + b) for a, b in [(h, nh * hd), (h, nkv * hd), (h, nkv * hd), (nh * hd, h), (h, i), (h, i), (i, h)])
    frozen_fp32 = 4 * (2 * v * h + (2 * n + 1) * h)  # embeddings, lm_head and norms in fp32
    expected = n * sum(M.nf4_bytes(k) for k in linears) + frozen_fp32 + n * lora * 4 + M.QLORA_SHARED_BYTES
    assert est.params == expected
    assert est.grads == n * lora * 4


def test_optimizer_state_by_hand():
    assert M.optimizer_state_bytes(10_000, 4, "adamw") == 2 * 4 * 10_000 + 4
    assert M.optimizer_state_bytes(10_000, 4, "adamw8bit") == 2 * (10_000 + 4 * 40)
    assert M.optimizer_state_bytes(100, 4, "adamw8bit") == 800  # under min_8bit_size: fp32 state
    assert M.optimizer_state_bytes(10_000, 2, "sgd_momentum") == 20_000
    assert M.optimizer_state_bytes(10_000, 4, "sgd") == 0


def test_sharding_and_headroom():
    b = {"params": 800, "grads": 800, "optimizer": 1600, "activations": 100, "recompute": 0}
    assert M.shard(b, "ddp", 8) == b
    assert M.shard(b, "deepspeed_stage_2", 8) == {**b, "grads": 100, "optimizer": 200}
    assert M.shard(b, "fsdp", 8) == {**b, "params": 100, "grads": 100, "optimizer": 200}
    assert M.gpu_bytes("h100") == ("H100-80GB", 80 * 2**30)
    assert M.gpu_bytes("123") == ("GPU", 123.0)


def test_bad_input_is_a_clear_error():
    with pytest.raises(LookupError, match="unknown GPU"):
        M.gpu_bytes("TPU-v9")
    with pytest.raises(ValueError, match="precision must be one of"):
        M.estimate(FinetuneModule(HUB_ID, "lora"), hf_config("llama", "s"), precision="fp8")
    with pytest.raises(ValueError, match="models the activations of"):
        M.estimate(FinetuneModule(HUB_ID, "vera"), hf_config("llama", "s"))
