"""CharRNNModule: trains the recurrent LMs of `model.py` through the common pipeline.

Same datamodule, tokenizer, metric keys (train/loss, val/loss, val/ppl, test/...), schedule and
sampling interface (`generate_text`, so `practicum generate RUN_ID` works) as the mini-GPT's
`GPTModule`, whose methods for those it borrows. What differs is the state: with `carry_state`
each training batch starts from the state the previous batch ended in, detached, which is
truncated backpropagation through time (Williams & Peng 1990; k1 = k2 = block_size) over
ShakespeareDataModule(train_stream="contiguous").
Evaluation starts every window from zeros, so the RNN and the transformer are scored on the same
context: the tokens of the window.
"""

from __future__ import annotations

import lightning as L
import torch
from torchmetrics import MeanMetric

from contract import CountsTokens, TextGenerator
from datamodules.tokenizers import Tokenizer
from modules.artifacts import log_text
from modules.gpt.module import GPTModule
from modules.rnn.model import CharRNN, CharRNNConfig, State
from modules.training import log_mean_loss


def detach_state(state: State) -> State:
    """The state's values without its history: the next window's gradient stops here."""
    return tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()


class CharRNNModule(L.LightningModule, TextGenerator, CountsTokens):
    def __init__(
        self,
        vocab_size: int | None = None,
        cell: str = "lstm",
        n_layer: int = 2,
        n_embd: int = 64,
        n_hidden: int = 128,
        dropout: float = 0.0,
        carry_state: bool = True,
        lr: float = 3e-3,
        min_lr: float = 3e-4,
        warmup_steps: int = 30,
        lr_decay_steps: int | None = None,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.99),
        fused: bool | None = None,
        sample_prompt: str = "\n",
        sample_tokens: int = 200,
        sample_temperature: float = 0.8,
        sample_top_k: int | None = 200,
        sample_seed: int = 1337,
    ):
        """Character-level LSTM / GRU / RNN language model; model fields are those of `CharRNNConfig`.

        Args:
            vocab_size: None takes the datamodule tokenizer's vocabulary in `setup`.
            cell, n_layer, n_embd, n_hidden, dropout: see `CharRNNConfig`.
            carry_state: Carry the (detached) state from one training batch to the next: truncated
                BPTT. Needs a datamodule whose consecutive batches continue each other
                (ShakespeareDataModule(train_stream="contiguous")); False starts every window from zeros.
            lr, min_lr, warmup_steps, lr_decay_steps: the mini-GPT's schedule (`cosine_lr`);
                lr_decay_steps None means trainer.max_steps.
            weight_decay: AdamW decay of the weight matrices (not of biases).
            betas: AdamW betas.
            fused: Fused AdamW kernel; None uses it on CUDA only.
            sample_prompt, sample_tokens, sample_temperature, sample_top_k, sample_seed: the text
                sample logged at each validation (sample_tokens 0: none).
        """
        super().__init__()
        self.save_hyperparameters()
        if lr <= 0 or min_lr < 0 or min_lr > lr:
            raise ValueError(f"need 0 <= min_lr <= lr and lr > 0, got lr={lr}, min_lr={min_lr}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.model: CharRNN | None = None
        self.tokenizer: Tokenizer | None = None
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        self._state: State | None = None
        self.model_config()  # validate the fields now, not after data loading
        if vocab_size is not None:
            self.model = CharRNN(self.model_config())

    def model_config(self) -> CharRNNConfig:
        hp = self.hparams
        return CharRNNConfig(vocab_size=hp.vocab_size or 1, cell=hp.cell, n_layer=hp.n_layer, n_embd=hp.n_embd,
                             n_hidden=hp.n_hidden, dropout=hp.dropout)

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self._trainer is not None else None
        tok = getattr(dm, "tokenizer", None)
        if tok is not None:
            if self.hparams.vocab_size is not None and self.hparams.vocab_size != tok.vocab_size:
                raise ValueError(f"model vocab_size={self.hparams.vocab_size} but the datamodule's tokenizer has "
                                 f"{tok.vocab_size} tokens; leave vocab_size unset to take it from the data")
            self.tokenizer = tok
            self.hparams.vocab_size = tok.vocab_size  # saved with the checkpoint hyper-parameters
        if self.hparams.vocab_size is None:
            raise ValueError("CharRNNModule needs vocab_size: pass it, or use a datamodule with a `tokenizer` "
                             "(ShakespeareDataModule)")
        if stage == "fit" and self.hparams.carry_state and getattr(dm, "train_stream", None) != "contiguous":
            raise ValueError("carry_state=True carries the state from one batch's windows to the next batch's, which "
                             "needs batches that continue each other: set data.init_args.train_stream=contiguous, or "
                             "model.init_args.carry_state=false to start every window from zeros")
        if self.model is None:
            self.model = CharRNN(self.model_config())

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """(logits (B, T, V), loss or None) from a zero state: the GPTModule's interface."""
        logits, loss, _ = self.model(idx, targets)
        return logits, loss

    # the GPT's: the tokenizer travels in the checkpoint; one AdamW (decay on matrices) on its cosine schedule
    on_save_checkpoint = GPTModule.on_save_checkpoint
    on_load_checkpoint = GPTModule.on_load_checkpoint
    configure_optimizers = GPTModule.configure_optimizers
    # and its sampling: CharRNN.generate takes GPT.generate's arguments
    generate_text = GPTModule.generate_text

    # -- training --------------------------------------------------------------------------
    def tokens_per_batch(self, batch) -> int:
        return batch[0].numel()

    def on_train_start(self) -> None:
        self._state = None  # a fresh (or resumed) fit starts from zeros

    def training_step(self, batch, batch_idx):
        x, y = batch
        _, loss, state = self.model(x, y, self._state if self.hparams.carry_state else None)
        self._state = detach_state(state)
        if (self.global_step + 1) % self.trainer.log_every_n_steps == 0:
            self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    # -- evaluation ------------------------------------------------------------------------
    def _score(self, batch, metric: MeanMetric) -> None:
        x, y = batch
        _, loss, _ = self.model(x, y)
        metric.update(loss, weight=x.size(0))

    def validation_step(self, batch, batch_idx):
        self._score(batch, self.val_loss)

    def on_validation_epoch_end(self) -> None:
        log_mean_loss(self, "val", self.val_loss)
        hp = self.hparams
        if self.trainer.sanity_checking or hp.sample_tokens <= 0 or self.tokenizer is None:
            return
        if self.trainer.is_global_zero:
            text = self.generate_text(hp.sample_prompt, hp.sample_tokens, hp.sample_temperature, hp.sample_top_k,
                                      hp.sample_seed)
            log_text(self.loggers, text, f"samples/step_{self.global_step:06d}.txt")

    def test_step(self, batch, batch_idx):
        self._score(batch, self.test_loss)

    def on_test_epoch_end(self) -> None:
        log_mean_loss(self, "test", self.test_loss)
