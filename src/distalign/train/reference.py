"""Reference log-probs per training row for a run: looked up from the precomputed cache, or scored per
batch (``ReferenceLogps``), with the scorer that runs the reference (packed like the policy when
``data.packing`` is on)."""

from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from distalign.config import RunConfig
from distalign.data.collate import PackingLayout, to_device
from distalign.losses.base import LossSpec
from distalign.models.fingerprint import model_fingerprint
from distalign.models.loading import (
    load_model_and_tokenizer,
)
from distalign.models.logprobs import SequenceLogprobModel, batch_logprobs
from distalign.models.reference import ReferenceLogprobCache, adapters_disabled
from distalign.train.engine import Engine
from distalign.train.setup import (
    OfflineData,
    default_cache_dir,
    packing_layout,
    packs_on_span_attention,
    tokenization_settings,
)


class ReferenceLogps:
    """Reference log-probs per training row: looked up from a precomputed cache, or computed per batch.

    The reference is ``reference.model`` when set; otherwise the policy's initial weights — for LoRA
    the base with adapters disabled; for a full fine-tune, precomputed before the first step (when the
    policy still *is* the reference) or, on the fly, a frozen copy.

    Under FSDP2 or ZeRO-3 no process holds the whole policy, so when the policy is its own reference
    and the cache misses, the table is scored through the sharded policy once it is prepared and before
    any step or resume (:meth:`score_with_prepared_policy`), all processes in step.
    """

    def __init__(
        self,
        data: OfflineData,
        engine: Engine,
        table: dict[str, torch.Tensor] | None,
        model=None,
        pending: _PendingScore | None = None,
    ):
        self.data = data
        self.engine = engine
        self.table = table
        self.model = model
        self._pending = pending

    @classmethod
    def build(
        cls,
        config: RunConfig,
        spec: LossSpec,
        policy,
        data: OfflineData,
        engine: Engine,
        packing: PackingLayout | None = None,
    ) -> ReferenceLogps:
        """``packing``: the policy's packing layout (:func:`~distalign.train.setup.packing_layout`),
        which the reference shares unless it is a separate model (``reference.model``, laid out for
        itself)."""
        with engine.loading_whole_models():
            ref_model, adapters_off = _reference_model(config, policy)
        ref_packing = packing_layout(ref_model, config) if ref_model is not policy else packing
        if not config.reference.precompute:
            if ref_model is policy and not adapters_off:
                ref_model = copy.deepcopy(policy).requires_grad_(False)
            return cls(
                data, engine, None, _ReferenceScorer.unprepared(ref_model, adapters_off, config, ref_packing)
            )
        key = {
            "reference_model": model_fingerprint(ref_model, exclude_adapters=True),
            "data": data.fingerprint,
            "tokenization": tokenization_settings(config).as_dict(),
            "kind": data.kind,
            "logprobs": "sum_over_completion_tokens_float32",
        }
        through_sharded_policy = engine.sharding.shards_parameters and ref_model is policy
        if through_sharded_policy and engine.accelerator.mixed_precision != "no":
            key["compute_precision"] = engine.accelerator.mixed_precision  # the sharded forward's, not fp32
        cache_dir = (
            Path(config.reference.cache_dir)
            if config.reference.cache_dir
            else default_cache_dir() / "reference_logps"
        )
        cache = ReferenceLogprobCache(cache_dir)
        # The main process reads the cache and sends the table: other machines need not share its disk.
        table = engine.from_main(cache.load(key) if engine.is_main else None)
        if table is not None:
            engine.print("reference log-probs: reusing cache")
            return cls(data, engine, table)
        if through_sharded_policy:
            pending = _PendingScore(cache, key, adapters_off, packing)
            return cls(data, engine, None, pending=pending)
        scorer = _ReferenceScorer.unprepared(ref_model, adapters_off, config, ref_packing)
        table = _score_every_row(scorer, data, engine, config.train.no_grad_rows)
        if engine.is_main:
            cache.store(key, table)
        engine.barrier()
        return cls(data, engine, table)

    def score_with_prepared_policy(self) -> None:
        """Score the table left pending by :meth:`build` (FSDP2 / ZeRO-3) with the prepared policy and
        cache it; a no-op otherwise. Call it after ``engine.prepare`` and before ``engine.resume_latest``:
        the weights must still be the initial ones."""
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        scorer = _ReferenceScorer.prepared(self.engine, pending.adapters_off, pending.packing)
        self.table = _score_every_row(scorer, self.data, self.engine, self.engine.config.train.no_grad_rows)
        if self.engine.is_main:
            pending.cache.store(pending.key, self.table)
        self.engine.barrier()

    def for_rows(self, rows: list[int]) -> dict[str, torch.Tensor]:
        if self.table is not None:
            index = torch.tensor(rows)
            return {name: values[index].to(self.engine.device) for name, values in self.table.items()}
        if self.model is None:
            raise RuntimeError("reference log-probs are pending: call score_with_prepared_policy() first")
        return _split(self.data, rows, self.model(self.data, rows, self.engine.device))


@dataclass
class _PendingScore:
    """A reference table to score once the sharded policy is prepared, and where to cache it."""

    cache: ReferenceLogprobCache
    key: dict
    adapters_off: bool
    packing: PackingLayout | None


def _reference_model(config: RunConfig, policy):
    """(model to score with, whether to disable its adapters while scoring)."""
    if config.reference.model is not None:
        model, _ = load_model_and_tokenizer(
            config.reference.model,
            dtype=config.model.dtype,
            trust_remote_code=config.model.trust_remote_code,
            span_attention=packs_on_span_attention(config),
        )
        return model.requires_grad_(False), False
    return policy, config.model.lora.enabled


class _ReferenceScorer:
    """Summed completion log-probs of rows under the reference, without gradients (packed like the
    policy's when ``data.packing`` is on, in the reference model's own layout).

    ``model``: the LM (whose adapters are switched off when ``adapters_off``); ``wrapper``: the
    log-prob module the batches run through — the engine's prepared model when scoring the sharded
    policy, then under the engine's autocast like a training forward."""

    def __init__(
        self, model, wrapper, adapters_off: bool, packing: PackingLayout | None, autocast=None
    ) -> None:
        self.model = model
        self.wrapper = wrapper
        self.adapters_off = adapters_off
        self.packing = packing
        self.autocast = autocast

    @classmethod
    def unprepared(
        cls, model, adapters_off: bool, config: RunConfig, packing: PackingLayout | None
    ) -> _ReferenceScorer:
        wrapper = SequenceLogprobModel(model, chunk_size=config.model.logprob_chunk_size, packing=packing)
        return cls(model, wrapper, adapters_off, packing)

    @classmethod
    def prepared(cls, engine: Engine, adapters_off: bool, packing: PackingLayout | None) -> _ReferenceScorer:
        return cls(engine.unwrapped().model, engine.model, adapters_off, packing, engine.accelerator.autocast)

    @torch.no_grad()
    def __call__(self, data: OfflineData, rows: list[int], device) -> torch.Tensor:
        if self.autocast is None:  # a prepared model is already where accelerate placed it
            self.model.to(device)
        was_training = self.wrapper.training
        self.wrapper.eval()
        context = adapters_disabled(self.model) if self.adapters_off else nullcontext()
        with context, self.autocast() if self.autocast is not None else nullcontext():
            batch = to_device(data.collate(rows, packing=self.packing), device)
            logps, _ = batch_logprobs(self.wrapper, batch)
        self.wrapper.train(was_training)
        return logps.to(torch.promote_types(logps.dtype, torch.float32))


def _split(data: OfflineData, rows: list[int], logps: torch.Tensor) -> dict[str, torch.Tensor]:
    """Name the slices of one forward's log-probs (layout of ``OfflineData.sequences``)."""
    n = len(rows)
    if data.kind == "listwise":
        return {"responses": data.to_grid(rows, logps)}
    if data.kind == "paired":
        return {"chosen": logps[:n], "rejected": logps[n:]}
    named = {"completion": logps[:n]}
    if data.needs_kl:
        named["kl"] = logps[n:]
    return named


def _score_every_row(scorer, data, engine, rows_per_forward) -> dict[str, torch.Tensor]:
    """The reference table of every row: each process scores an interleaved shard, the shards are
    gathered onto every process. Every process runs as many forward passes as the busiest one (the
    extra ones are discarded): under FSDP2 or ZeRO-3 each forward is a collective. ``rows_per_forward``:
    rows per no-grad forward (``train.no_grad_rows``)."""
    engine.print(f"reference log-probs: computing for {len(data)} rows")
    shard = list(range(engine.rank, len(data), engine.world_size))
    batches = [shard[start : start + rows_per_forward] for start in range(0, len(shard), rows_per_forward)]
    for _ in range(engine.max_across(len(batches)) - len(batches)):
        scorer(data, [0], engine.device)
    parts: dict[str, list[torch.Tensor]] = {}
    for rows in batches:
        for name, values in _split(data, rows, scorer(data, rows, engine.device)).items():
            parts.setdefault(name, []).append(values)
    table = {}
    for name, chunks in parts.items():
        local = torch.cat(chunks) if chunks else torch.zeros(0, device=engine.device)
        gathered = engine.gather_varlen(local).cpu()
        # Process r scored rows r, r + W, r + 2W, ...: undo the interleaving.
        ordered = torch.empty((len(data), *gathered.shape[1:]), dtype=gathered.dtype)
        cursor = 0
        for rank in range(engine.world_size):
            rank_rows = list(range(rank, len(data), engine.world_size))
            ordered[rank_rows] = gathered[cursor : cursor + len(rank_rows)]
            cursor += len(rank_rows)
        table[name] = ordered
    return table
