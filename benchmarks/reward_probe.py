"""How much of VADER's preference a reward model could learn from a pairs file, with the right features.

Run by hand, never by the test suite:
    python benchmarks/reward_probe.py PAIRS.jsonl [--sft SFT.ckpt]

PAIRS.jsonl is the pairs stage's artifact (``mlflow artifacts download -r RUN_ID -a pairs/pairs.jsonl``
or the study store's ``inputs/RUN_ID/pairs.jsonl``). Every probe is a Bradley-Terry model in its
linear form, r(x, y) = w . phi(y), fitted by logistic regression on phi(chosen) - phi(rejected)
(half the pairs flipped, no intercept), trained on the file's train split and scored on its val and
test splits (pairs with a score gap only):

    bag of words       phi = word counts: the form of VADER's own score, a sum of word valences
    char 3-5-grams     phi = character n-gram counts inside words
    lexicon sum        no fitting: the sum of VADER's lexicon valences of the words (VADER without
                       its rules for negation, emphasis and "but"): the ceiling with the right features
    frozen sum / last  phi = the SFT mini-GPT's final hidden states, summed over the tokens or at the
                       last one (`--sft`): the reward model's two poolings with its backbone frozen

A fine-tuned reward model that scores below the frozen probes memorises its pairs rather than
learning the lexicon; one below the bag of words lacks data or the inductive bias, not labels.
"""

from __future__ import annotations

import argparse
import json
import re

import numpy as np


def _split(rows: list[dict]) -> dict[str, list[dict]]:
    kept = [r for r in rows if r["score_chosen"] > r["score_rejected"]]
    return {s: [r for r in kept if r["split"] == s] for s in ("train", "val", "test")}


def _flip(d) -> tuple:
    """Every other difference negated (label 0), so the classes balance; `d` dense or scipy-sparse."""
    import scipy.sparse as sp

    y = np.ones(d.shape[0])
    y[1::2] = 0
    sign = sp.diags(2 * y - 1) if sp.issparse(d) else (2 * y - 1)[:, None]
    return (sign @ d if sp.issparse(d) else sign * d), y


def linear_probe(feature, splits: dict[str, list[dict]], C: float = 1.0) -> dict[str, float]:
    """Held-out accuracy of a linear Bradley-Terry model on `feature(rows, key) -> (n, d)` differences."""
    from sklearn.linear_model import LogisticRegression

    data = {s: _flip(feature(rs, "chosen") - feature(rs, "rejected")) for s, rs in splits.items()}
    model = LogisticRegression(C=C, max_iter=5000, fit_intercept=False).fit(*data["train"])
    return {s: float(model.score(*data[s])) for s in data}


def counts(analyzer: str, ngrams: tuple[int, int], train: list[dict]):
    from sklearn.feature_extraction.text import CountVectorizer

    kw = {"token_pattern": r"(?u)\b\w+\b"} if analyzer == "word" else {}
    vec = CountVectorizer(analyzer=analyzer, ngram_range=ngrams, **kw)
    vec.fit([r[k] for r in train for k in ("chosen", "rejected")])
    return lambda rows, key: vec.transform([r[key] for r in rows]).astype(float)  # sparse


def lexicon_rule(splits: dict[str, list[dict]]) -> dict[str, float]:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    lex = SentimentIntensityAnalyzer().lexicon

    def total(text: str) -> float:
        return sum(lex.get(w.lower(), 0.0) for w in re.findall(r"[\w']+", text))

    return {s: float(np.mean([total(r["chosen"]) > total(r["rejected"]) for r in rs])) for s, rs in splits.items()}


def hidden_features(ckpt: str, pooling: str):
    import torch

    from datamodules.tokenizers import encode, special_ids
    from modules.align.model import hidden_and_logits, last_token
    from modules.finetune.backbone import load_minigpt, load_tokenizer
    from modules.finetune.model import MiniGPTForCausalLM

    model, tok = MiniGPTForCausalLM(load_minigpt(ckpt)).eval(), load_tokenizer("minigpt", ckpt)
    bos = special_ids(tok)[0]

    @torch.no_grad()
    def feature(rows: list[dict], key: str) -> np.ndarray:
        out = []
        for i in range(0, len(rows), 256):
            ids = [([bos] if bos is not None else []) + encode(tok, r["prompt"]) + encode(tok, r[key])
                   for r in rows[i : i + 256]]
            x = torch.zeros(len(ids), max(map(len, ids)), dtype=torch.long)
            mask = torch.zeros_like(x)
            for j, s in enumerate(ids):
                x[j, : len(s)], mask[j, : len(s)] = torch.tensor(s), 1
            h, _ = hidden_and_logits(model, x, mask)
            out.append(((h * mask[..., None]).sum(1) if pooling == "sum" else last_token(h, mask)).numpy())
        return np.concatenate(out)

    return feature


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pairs")
    p.add_argument("--sft", help="the SFT mini-GPT checkpoint, for the frozen-feature probes")
    a = p.parse_args()
    splits = _split([json.loads(line) for line in open(a.pairs)])
    print(f"pairs with a score gap: {', '.join(f'{s} {len(rs)}' for s, rs in splits.items())}")
    results = {"bag of words": linear_probe(counts("word", (1, 1), splits["train"]), splits),
               "char 3-5-grams": linear_probe(counts("char_wb", (3, 5), splits["train"]), splits),
               "lexicon sum (no fit)": lexicon_rule(splits)}
    if a.sft:
        for pooling in ("sum", "last"):
            results[f"frozen {pooling}"] = linear_probe(hidden_features(a.sft, pooling), splits)
    print(f"{'probe':<22}{'train':>8}{'val':>8}{'test':>8}")
    for name, acc in results.items():
        print(f"{name:<22}" + "".join(f"{acc[s]:>8.3f}" for s in ("train", "val", "test")))


if __name__ == "__main__":
    main()
