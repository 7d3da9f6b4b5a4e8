"""StreamingGPTModule: the mini-GPT trained as usual (or with a learned sink, or with Transformer-XL
recurrence) and, after the test split, scored on one long stream token by token with a bounded cache.

It is a `GPTModule` with six more arguments; everything else (optimizer, schedule, validation,
sampling, checkpoints) is the parent's. The streaming score runs in `on_test_epoch_end`, where the
long-context scores of `GPTModule` run, so the one pipeline needs no branch: a run that tests logs it.
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from modules.artifacts import log_text
from modules.gpt.module import GPTModule
from modules.gpt.recurrence import xl_forward
from modules.gpt.streaming import POLICIES, CachePolicy, add_sink_logits, stream_score

DEFAULT_BUCKETS = (64, 256, 1024, 4096)


class StreamingGPTModule(GPTModule):
    def __init__(
        self,
        stream_cache: str | None = None,
        stream_tokens: int = 4096,
        stream_window: int | None = None,
        stream_sinks: int = 4,
        stream_buckets: list[int] | None = None,
        sink_logit: bool = False,
        xl_memory: int = 0,
        **kwargs,
    ):
        """Mini-GPT with a streaming test; the other arguments are `GPTModule`'s.

        Args:
            stream_cache: The cache policy of the streaming test (`streaming.CachePolicy`): "dense"
                (grows with the stream), "window" (the last stream_window positions), "sinks" (the
                first stream_sinks positions and the last stream_window), "segments" (Transformer-XL:
                the previous block_size-token segment's last xl_memory positions and the current
                segment); None skips the streaming test.
            stream_tokens: Tokens of the test split scored as one stream (its first stream_tokens + 1).
            stream_window: W of "window" and "sinks"; None takes the training block_size.
            stream_sinks: k, the first positions "sinks" keeps (StreamingLLM: 4).
            stream_buckets: Ends of the position buckets the loss is reported in, e.g. [64, 256, 1024,
                4096] for stream/loss_0_64, stream/loss_64_256, ...; None: those four, cut at stream_tokens.
            sink_logit: Train a learned per-head sink logit in every softmax (`streaming.SinkAttention`).
            xl_memory: M > 0 trains with Transformer-XL recurrence (`recurrence.xl_forward`): each batch's
                rows continue the previous batch's (needs the datamodule's train_stream='contiguous'),
                and every layer attends over the previous segment's last M states, without gradient.
        """
        super().__init__(**kwargs)
        if stream_cache is not None and stream_cache not in POLICIES:
            raise ValueError(f"stream_cache must be one of {POLICIES} or null, got {stream_cache!r}")
        if stream_tokens < 2:
            raise ValueError(f"stream_tokens must be >= 2, got {stream_tokens}")
        if stream_buckets is not None and (not stream_buckets or sorted(stream_buckets) != list(stream_buckets)
                                           or stream_buckets[0] <= 0):
            raise ValueError(f"stream_buckets must be increasing positive bucket ends, e.g. [64, 256, 1024, 4096], "
                             f"got {stream_buckets}")
        if xl_memory < 0:
            raise ValueError(f"xl_memory must be >= 0 (0: no recurrence), got {xl_memory}")
        if stream_cache == "segments" and xl_memory == 0:
            raise ValueError("stream_cache='segments' streams a Transformer-XL model: set xl_memory (e.g. the block size)")
        if self.hparams.pos_emb not in ("rope", "alibi") and (stream_cache is not None or xl_memory):
            raise ValueError("streaming and recurrence assign positions inside the cache: set pos_emb='rope' or 'alibi'")
        self._mems = None

    def _build(self) -> None:
        super()._build()
        if self.hparams.sink_logit:
            add_sink_logits(self.model)

    def policy(self) -> CachePolicy:
        hp = self.hparams
        window = hp.stream_window or hp.block_size
        return CachePolicy(hp.stream_cache, window=window, sinks=hp.stream_sinks if hp.stream_cache == "sinks" else 0,
                           segment=hp.block_size, memory=hp.xl_memory or None)

    # -- Transformer-XL training: the memory travels from batch to batch -------------------------
    def on_fit_start(self) -> None:
        super().on_fit_start()
        stream = getattr(self.trainer.datamodule, "train_stream", None)
        if self.hparams.xl_memory and stream != "contiguous":
            raise ValueError(f"xl_memory={self.hparams.xl_memory} carries each row's states to the next batch, so the "
                             f"rows must continue each other: set data.init_args.train_stream=contiguous (got {stream!r})")
        self._mems = None

    def training_step(self, batch, batch_idx):
        if not self.hparams.xl_memory:
            return super().training_step(batch, batch_idx)
        x, y = batch
        if self._mems is not None and self._mems[0].size(0) != x.size(0):
            self._mems = None
        logits, self._mems = xl_forward(self.model, x, self._mems, self.hparams.xl_memory)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        if (self.global_step + 1) % self.trainer.log_every_n_steps == 0:
            self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    # -- the streaming test ----------------------------------------------------------------------
    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        if self.hparams.stream_cache is not None:
            self._log_stream()

    @torch.no_grad()
    def _log_stream(self) -> None:
        hp = self.hparams
        data = getattr(self.trainer.datamodule, "test_data", None)
        if data is None or len(data) < hp.stream_tokens + 1:
            raise ValueError(f"the streaming test reads {hp.stream_tokens} + 1 tokens of the test split, which has "
                             f"{0 if data is None else len(data)}: raise data.init_args.test_fraction or lower stream_tokens")
        was_training = self.model.training
        self.model.eval()
        try:
            res = stream_score(self.model, data[: hp.stream_tokens + 1].to(self.device), self.policy(), hp.stream_sinks)
        finally:
            self.model.train(was_training)
        ends = [e for e in (hp.stream_buckets or DEFAULT_BUCKETS) if e <= hp.stream_tokens]
        metrics = {"stream/loss": res.losses.mean().item(), "stream/tokens_per_s": hp.stream_tokens / res.seconds,
                   "stream/cache_bytes_peak": float(res.cache_bytes.max()),
                   "stream/cache_bytes_per_token": res.bytes_slope(), "stream/cache_positions_max": float(res.max_cached)}
        for a, b in zip([0] + ends, ends):
            metrics[f"stream/loss_{a}_{b}"] = res.bucket_loss(a, b)
        for i, share in enumerate(res.first_share.tolist()):
            metrics[f"stream/first{hp.stream_sinks}_share_layer{i}"] = share
        if hp.sink_logit:
            for i, share in enumerate(res.sink_share.tolist()):
                metrics[f"stream/sink_logit_share_layer{i}"] = share
        self.log_dict(metrics, sync_dist=False)
        if self.trainer.is_global_zero:
            log_text(self.loggers, json.dumps({"policy": str(self.policy()), "losses": res.losses.tolist(),
                                               "cache_bytes": res.cache_bytes.tolist()}), "stream/by_position.json")
