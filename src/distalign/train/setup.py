"""What a run needs before its first step: the policy, the tokenised data, the reference log-probs.

Kept apart from the loop so ``offline.py`` reads as the step itself.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from distalign.config import RunConfig
from distalign.data.check import nothing_kept_reason
from distalign.data.collate import PackingLayout, collate_sequences, pack_sequences
from distalign.data.designer import FittedDesigner, attach_designer, build_designer, fit_designer
from distalign.data.formats import unpair_rows
from distalign.data.loading import load_rows
from distalign.data.signals import missing_signals, signal_table
from distalign.data.tokenize import tokenize_listwise, tokenize_paired, tokenize_unpaired
from distalign.data.tokenized import TokenizationSettings
from distalign.errors import SetupError
from distalign.losses.base import format_mismatch
from distalign.models.compile import compile_decoder_layers
from distalign.models.fingerprint import data_fingerprint
from distalign.models.heads import build_heads
from distalign.models.loading import LoraSettings, load_model_and_tokenizer, public_model_id
from distalign.models.logprobs import SequenceLogprobModel
from distalign.models.packed_logprobs import packing_layout_of
from distalign.models.packing import packing_problem
from distalign.models.saved import save_final_model, unsharded_copy
from distalign.train.card import write_model_card
from distalign.train.checkpoints import remove_stale_evaluation
from distalign.train.engine import Engine
from distalign.train.objective import BatchObjective
from distalign.train.record import TrainingRecord


def default_cache_dir() -> Path:
    return Path(os.environ.get("DISTALIGN_CACHE", Path.home() / ".cache" / "distalign"))


def lora_settings(config: RunConfig) -> LoraSettings | None:
    lora = config.model.lora
    if not lora.enabled:
        return None
    return LoraSettings(r=lora.r, alpha=lora.alpha, dropout=lora.dropout, target_modules=lora.target_modules)


def load_policy(config: RunConfig):
    """The policy model (LoRA-wrapped when configured) and its tokenizer; on span attention when the run
    packs (:func:`packs_on_span_attention`)."""
    m = config.model
    return load_model_and_tokenizer(
        m.name,
        dtype=m.dtype,
        lora=lora_settings(config),
        gradient_checkpointing=m.gradient_checkpointing,
        trust_remote_code=m.trust_remote_code,
        revision=m.revision,
        span_attention=packs_on_span_attention(config),
    )


def packs_on_span_attention(config: RunConfig) -> bool:
    """Whether the run's models load on span attention: with ``data.packing``, so that a model that would
    run on SDPA computes only the attention blocks each packed sequence sees. The attention is chosen
    here, at load time; nothing switches it on a loaded model."""
    return config.data.packing


def tokenization_settings(config: RunConfig) -> TokenizationSettings:
    d = config.data
    return TokenizationSettings(
        max_length=d.max_length,
        max_prompt_length=d.max_prompt_length,
        truncation=d.truncation,
        chat_template=d.chat_template,
    )


@dataclass
class OfflineData:
    """Tokenised training rows and how to batch them.

    ``kind`` is "paired" (TokenizedPair items), "unpaired" (TokenizedCompletion items) or "listwise"
    (TokenizedList items). For losses that anchor on mismatched pairs (KTO), ``kl_items[i]`` is row i's
    prompt with another row's completion, fixed once so its reference log-prob can be cached like any
    other. ``designer``: the fitted designer rewards (``designer:`` section) whose normalised values
    and composite the rows carry as signals. ``signal_table`` holds every per-row signal of the data as a tensor over rows (see
    :mod:`distalign.data.signals`); ``signal_vocab`` the strings behind categorical codes.
    """

    kind: str
    items: list
    pad_token_id: int
    kl_items: list | None = None
    designer: FittedDesigner | None = None
    signal_table: dict[str, torch.Tensor] = field(init=False)
    signal_vocab: dict[str, list[str]] = field(init=False)

    def __post_init__(self) -> None:
        self.signal_table, self.signal_vocab = signal_table([item.signals for item in self.items])
        self._weight_list = [float(item.weight) for item in self.items]  # host numbers: no tensor read
        self._weights = torch.tensor(self._weight_list, dtype=torch.float64)

    def __len__(self) -> int:
        return len(self.items)

    @functools.cached_property
    def fingerprint(self) -> str:
        """:func:`~distalign.models.fingerprint.data_fingerprint` of every row's sequences (prompt and
        completion ids of each, in the order of :meth:`sequences`)."""
        return data_fingerprint([s for pair in zip(*self.sequences(range(len(self)))) for s in pair])

    def record(self, config: RunConfig, steps: int, processes: int) -> TrainingRecord:
        """What the model card says about this data (source, kind, rows, fingerprint) and the run."""
        return TrainingRecord(config.data.path, self.kind, len(self), self.fingerprint, steps, processes)

    @property
    def needs_kl(self) -> bool:
        return self.kl_items is not None

    @property
    def max_responses(self) -> int:
        """K, the most responses of any listwise row (1 for other kinds)."""
        return (
            max((len(item.responses_ids) for item in self.items), default=1) if self.kind == "listwise" else 1
        )

    def sequences(self, rows: list[int], with_kl: bool = True) -> tuple[list[list[int]], list[list[int]]]:
        """(prompt ids, completion ids) of the sequences one forward pass scores, in stats order
        (chosen then rejected; completions then, if ``with_kl``, their mismatched pairs; or every
        response of each listwise row, row by row)."""
        picked = [self.items[i] for i in rows]
        if self.kind == "paired":
            prompts = [p.prompt_ids for p in picked] * 2
            return prompts, [p.chosen_ids for p in picked] + [p.rejected_ids for p in picked]
        if self.kind == "listwise":
            prompts = [item.prompt_ids for item in picked for _ in item.responses_ids]
            return prompts, [ids for item in picked for ids in item.responses_ids]
        prompts = [c.prompt_ids for c in picked]
        completions = [c.completion_ids for c in picked]
        if self.kl_items is not None and with_kl:
            mismatched = [self.kl_items[i] for i in rows]
            prompts += [c.prompt_ids for c in mismatched]
            completions += [c.completion_ids for c in mismatched]
        return prompts, completions

    def collate(
        self, rows: list[int], with_kl: bool = True, packing: PackingLayout | None = None
    ) -> dict[str, torch.Tensor]:
        """The batch of :meth:`sequences`: padded, or packed as ``packing`` lays it out."""
        prompts, completions = self.sequences(rows, with_kl)
        if packing is None:
            return collate_sequences(prompts, completions, self.pad_token_id)
        return pack_sequences(prompts, completions, self.pad_token_id, rows=packing.rows)

    def row_lengths(self, rows: list[int]) -> list[int]:
        """Per row, the longest of the sequences it puts in a forward pass (to group rows by length)."""
        prompts, completions = self.sequences(rows)
        lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
        if self.kind == "listwise":
            starts = self.first_sequence(rows).tolist() + [len(lengths)]
            return [max(lengths[a:b]) for a, b in zip(starts, starts[1:])]
        # chosen then rejected, or completions then their mismatched pairs: row i is i-th of each half
        return [max(lengths[i :: len(rows)]) for i in range(len(rows))]

    def to_grid(self, rows: list[int], flat: torch.Tensor) -> torch.Tensor:
        """Listwise: per-sequence values [M] (layout of :meth:`sequences`) -> [len(rows), K], 0-padded."""
        counts = [len(self.items[i].responses_ids) for i in rows]
        row_of = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor(counts)).to(flat.device)
        slot = torch.cat([torch.arange(c) for c in counts]).to(flat.device)
        grid = flat.new_zeros(len(rows), self.max_responses)
        return grid.index_put((row_of, slot), flat)

    def first_sequence(self, rows: list[int]) -> torch.Tensor:
        """Index, in the layout of :meth:`sequences`, of each row's first sequence (its prompt's)."""
        if self.kind != "listwise":
            return torch.arange(len(rows))
        counts = torch.tensor([len(self.items[i].responses_ids) for i in rows])
        return torch.cumsum(counts, 0) - counts

    def listwise_targets(self, rows: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
        """Listwise: (scores [n, K], present [n, K]) with 0 on padding."""
        flat_scores = torch.tensor([s for i in rows for s in self.items[i].scores], dtype=torch.float64)
        present = self.to_grid(rows, torch.ones_like(flat_scores))
        return self.to_grid(rows, flat_scores).to(device), present.to(device)

    def weights(self, rows: list[int], device) -> torch.Tensor:
        """Per-row weights [n] (ones where the data has no ``weight`` column): always a tensor, so every
        micro-batch and process carries the same fields."""
        return self._weights[rows].to(device)

    def weight_total(self, rows: list[int]) -> float:
        return float(sum(self._weight_list[i] for i in rows))

    def signals(self, rows: list[int], device) -> dict[str, torch.Tensor]:
        return {name: values[rows].to(device) for name, values in self.signal_table.items()}

    def labels(self, rows: list[int], device) -> torch.Tensor:
        return torch.tensor([float(self.items[i].label) for i in rows], device=device)

    def plan_labels(self) -> list[float] | None:
        """Labels for stratified batching (unpaired data only)."""
        return [float(c.label) for c in self.items] if self.kind == "unpaired" else None


_TOKENIZERS = {"paired": tokenize_paired, "unpaired": tokenize_unpaired, "listwise": tokenize_listwise}


def load_offline_data(config: RunConfig, tokenizer, objective: BatchObjective, engine: Engine) -> OfflineData:
    """Load, validate and tokenise the training data for ``objective``; report what was dropped or cut,
    and refuse data without the per-row signals the loss or aggregator declares."""
    spec = objective.loss
    d = config.data
    loaded = load_rows(d.path, format=d.format, split=d.split, subset=d.subset, limit=d.limit)
    rows, fmt = loaded.rows, loaded.format
    if d.unpair:
        if fmt != "paired":
            raise SetupError(f"data.unpair=true needs paired rows, but {d.path} is {fmt}")
        rows, fmt = unpair_rows(rows), "unpaired"
    if fmt != spec.data_kind:
        raise SetupError(format_mismatch(spec.name, spec.data_kind, d.path, fmt))
    designer = None
    if config.designer.enabled:
        rows, designer = _with_designer_rewards(config, rows, fmt, engine)
        if not any("reward/" in signal for signal in spec.signals):
            # Legitimate (a sweep's plain baseline, scored by eval on the same scale), but say so.
            engine.print(
                f"designer: loss {spec.name!r} reads no designer reward, so r_aux does not enter training "
                "(distalign eval still reports it); upo, upo_kto, modpo and dpo_relabel use it"
            )
    settings = tokenization_settings(config)
    items, report = _TOKENIZERS[fmt](rows, tokenizer, settings)
    engine.print(f"data: {d.path}: {report.summary('data.max_prompt_length', 'data.max_length')}")
    for warning in loaded.warnings:
        engine.print(f"data: warning: {warning}")
    if not items:
        raise SetupError(f"{d.path}: {nothing_kept_reason(rows, fmt, tokenizer, settings, report)}")
    kl_items = None
    if spec.needs_kl_pairs:
        kl_items = _mismatched_completions(items, config.train.seed)
    data = OfflineData(fmt, items, tokenizer.pad_token_id, kl_items=kl_items, designer=designer)
    for owner, declared in (
        ("loss " + spec.name, spec.signals),
        ("aggregator " + objective.aggregator.name, objective.aggregator.signals),
    ):
        missing = missing_signals(declared, data.signal_table)
        if missing:
            have = ", ".join(sorted(data.signal_table)) or "none"
            raise SetupError(
                f"{owner} needs the per-row signal(s) {', '.join(missing)} on every row, but {d.path} "
                f"does not provide them (signals present: {have}); see docs/architecture.md, 'Per-row signals'"
            )
    return data


def _with_designer_rewards(
    config: RunConfig, rows: list, fmt: str, engine: Engine
) -> tuple[list, FittedDesigner]:
    """``rows`` carrying the designer rewards of the config (normalised, and their composite)."""
    try:
        rewards = build_designer(config.designer, config.reference.cache_dir)
        designer, normalised = fit_designer(rewards, rows, fmt, config.data.path)
    except ValueError as err:
        raise SetupError(f"designer: {err}") from None
    composite = designer.composite(normalised)
    terms = " + ".join(f"{r.weight:g} x {r.normalization.kind}({r.alias})" for r in designer.rewards)
    engine.print(
        f"designer: r_aux = {terms} over {composite.size} responses: mean {composite.mean():.3f}, "
        f"std {composite.std():.3f}"
    )
    return attach_designer(rows, fmt, designer, normalised), designer


def _mismatched_completions(items: list, seed: int) -> list:
    """Row i's prompt with the completion of a different row (a fixed seeded derangement)."""
    if len(items) < 2:
        raise SetupError("KTO needs at least two rows to pair prompts with other rows' completions")
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    partner = {order[i]: order[(i + 1) % len(order)] for i in range(len(order))}
    return [
        dataclasses.replace(items[i], completion_ids=items[partner[i]].completion_ids)
        for i in range(len(items))
    ]


def packing_layout(model, config: RunConfig) -> PackingLayout | None:
    """The run's packing layout for ``model``'s forward passes when ``data.packing`` is on (None:
    padded), decided here once and handed to the collates and the log-prob module. A model packing
    cannot be exact for is refused here, before any step, naming its model type. The layout follows
    the attention the model was loaded with (:func:`load_policy`), which this leaves as it is."""
    if not config.data.packing:
        return None
    problem = packing_problem(model, config.data.max_length)
    if problem is not None:
        raise SetupError(
            f"data.packing=true cannot be exact for {problem}; set data.packing=false (padded batches; "
            "data.group_by_length=true also cuts padding)"
        )
    return packing_layout_of(model, config.data.share_prompts)


def wrap_for_training(
    policy, config: RunConfig, heads: tuple[str, ...] = (), packing: PackingLayout | None = None
) -> SequenceLogprobModel:
    """The policy's log-prob module, with the model heads a loss declares attached and the run's
    packing layout (:func:`packing_layout`); its decoder layers compiled with ``train.compile``."""
    if config.train.compile:
        try:
            compile_decoder_layers(policy)
        except ValueError as err:
            raise SetupError(str(err)) from None
    modules = None
    if heads:
        parameter = next(policy.parameters())
        modules = build_heads(heads, policy.config.hidden_size, parameter.dtype).to(parameter.device)
    return SequenceLogprobModel(
        policy,
        chunk_size=config.model.logprob_chunk_size,
        heads=modules,
        detach_head_input=not config.train.head_gradient_to_policy,
        packing=packing,
    )


def save_final(engine: Engine, tokenizer, config: RunConfig, record: TrainingRecord | None = None) -> Path:
    """Save the trained policy to ``RUN_DIR/final`` (with LoRA: the adapter in final/adapter, and merged
    weights in final/ unless ``model.lora.save_merged`` is false) with its model card
    (``final/README.md``) and ``record`` (``final/distalign_training.json``), in one atomic step. An
    evaluation in ``RUN_DIR/eval`` measured an earlier model: it is deleted first.

    Every process calls it. Under FSDP2 or ZeRO-3 the weights are gathered onto the main process and
    saved from an unsharded CPU copy of the model, so ``final/`` is the same folder a single process
    writes."""
    target = engine.run_dir / "final"
    engine.barrier()
    whole = engine.full_state_dict() if engine.sharding.shards_parameters else None
    if engine.is_main:
        if remove_stale_evaluation(engine.run_dir):
            engine.warn(
                f"deleted {engine.run_dir / 'eval'}: it evaluated an earlier model of this run directory"
            )
        unwrapped = engine.unwrapped()
        if whole is None:
            model, heads = unwrapped.model, unwrapped.heads.state_dict()
        else:
            model = unsharded_copy(unwrapped.model, _with_prefix(whole, "model."))
            heads = _with_prefix(whole, "heads.")

        def add_files(staging: Path) -> None:
            if heads:  # model heads (e.g. a value head) beside the LM weights
                save_file(heads, str(staging / "heads.safetensors"))
            if record is not None:
                record.save(staging)
            write_model_card(staging, config, record)

        save_final_model(
            model,
            tokenizer,
            target,
            merge_lora=config.model.lora.save_merged,
            base_model_id=public_model_id(config.model.name),
            add_files=add_files,
        )
    engine.barrier()
    return target


def _with_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``state`` under ``prefix``, with the prefix taken off their names."""
    return {name[len(prefix) :]: tensor for name, tensor in state.items() if name.startswith(prefix)}
