"""Predicted memory of fine-tuning Llama-3-8B and Mistral-7B on one GPU: full / LoRA r=16 / QLoRA
r=16, bf16, batch 1 and 4, sequence 512 and 2048, with and without gradient checkpointing.

    python benchmarks/estimate_7b.py [--out estimate_7b.md]

Offline: the architectures are the shipped configs/finetune/arch/*/config.json. Full is bf16-true
(bf16 weights, gradients and AdamW state, as configs/finetune/*_full.yaml); LoRA is a bf16 base
with fp32 adapters under bf16-mixed; QLoRA an NF4 base (bitsandbytes layout) under bf16-mixed.
"""

import argparse
from pathlib import Path

from pipelines.estimate import ARCH_DIR, GiB, estimate

SETUPS = {"full": dict(method="full", precision="bf16-true"), "LoRA r=16": dict(method="lora", precision="bf16-mixed"),
          "QLoRA r=16": dict(method="qlora", precision="bf16-mixed")}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="estimate_7b.md")
    out = Path(p.parse_args().out)
    rows = ["| model | method | batch | seq | ckpt | params | grads | optimizer | activations | recompute | total GiB |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for model in ("llama3-8b", "mistral-7b"):
        arch = str(ARCH_DIR / model / "config.json")
        for name, kw in SETUPS.items():
            for batch in (1, 4):
                for seq in (512, 2048):
                    for ckpt in (False, True):
                        e = estimate(arch, r=16, dtype="bfloat16", batch_size=batch, seq_len=seq,
                                     gradient_checkpointing=ckpt, **kw)
                        g = [f"{getattr(e, k) / GiB:.2f}" for k in ("params", "grads", "optimizer", "activations", "recompute")]
                        rows.append(f"| {model} | {name} | {batch} | {seq} | {'yes' if ckpt else 'no'} | "
                                    + " | ".join(g) + f" | **{e.total / GiB:.1f}** |")
    text = "\n".join(rows) + "\n"
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
