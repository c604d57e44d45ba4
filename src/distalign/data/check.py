"""``distalign data check``: what a dataset holds and what tokenisation would do to it."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from distalign.data.loading import LoadedData, load_rows
from distalign.data.tokenize import apply_length_policy, encode_rows
from distalign.data.tokenized import TokenizationReport, TokenizationSettings

_LENGTH_FIELDS = {
    "paired": ("chosen", "rejected"),
    "unpaired": ("completion",),
    "listwise": ("responses",),
    "prompt": (),
}


@dataclass(frozen=True)
class LengthStats:
    """Token-length distribution (linear-interpolated percentiles, as numpy computes them)."""

    count: int
    p50: float
    p90: float
    p99: float
    max: int

    @classmethod
    def of(cls, lengths: list[int]) -> LengthStats:
        if not lengths:
            return cls(0, 0.0, 0.0, 0.0, 0)
        p50, p90, p99 = (float(v) for v in np.percentile(np.asarray(lengths), [50, 90, 99]))
        return cls(len(lengths), p50, p90, p99, int(max(lengths)))


@dataclass
class DatasetSummary:
    """Counts and distributions of one dataset; ``to_text`` renders them for the CLI.

    ``labels`` (unpaired only) maps ``"positive"`` / ``"negative"`` to row counts. ``token_lengths``
    (only with a tokenizer) maps ``"prompt"`` and each completion field to untruncated token lengths
    (completions include the EOS that would be appended); ``tokenization`` holds the counts the
    truncation policy in ``settings`` would produce. ``implicit_prompt_rows`` counts rows whose prompt
    was split off ``chosen`` / ``rejected``; ``warnings`` are problems that do not stop training.
    """

    path: str
    format: str
    num_rows: int
    conversational: bool
    fingerprint: str
    ignored_columns: list[str]
    sources: dict[str, int]
    groups: dict[str, int]
    labels: dict[str, int] | None = None
    weights: tuple[float, float, float] | None = None
    reward_names: list[str] = field(default_factory=list)
    token_lengths: dict[str, LengthStats] = field(default_factory=dict)
    tokenization: TokenizationReport | None = None
    settings: dict[str, Any] | None = None
    implicit_prompt_rows: int = 0
    warnings: list[str] = field(default_factory=list)

    def to_text(self) -> str:
        """Human-readable multi-line summary."""
        kind = "conversational" if self.conversational else "plain text"
        lines = [
            f"{self.path}: {self.num_rows} rows, format {self.format}, {kind}",
            f"fingerprint: {self.fingerprint[:16]}",
            f"sources: {_counts_text(self.sources)}",
            f"groups: {_counts_text(self.groups)}",
        ]
        if self.implicit_prompt_rows:
            lines.append(
                f"prompt: split off the shared start of chosen and rejected in {self.implicit_prompt_rows} "
                "rows (implicit-prompt format)"
            )
        if self.ignored_columns:
            lines.append(f"ignored columns: {', '.join(self.ignored_columns)}")
        if self.labels is not None:
            total = sum(self.labels.values()) or 1
            positive, negative = self.labels["positive"], self.labels["negative"]
            lines.append(f"labels: {positive} positive ({positive / total:.1%}), {negative} negative")
        if self.weights is not None:
            low, mean, high = self.weights
            lines.append(f"weights: min {low:g}, mean {mean:g}, max {high:g}")
        if self.reward_names:
            lines.append(f"designer rewards: {', '.join(self.reward_names)}")
        for name, stats in self.token_lengths.items():
            lines.append(
                f"tokens {name}: p50 {stats.p50:g}, p90 {stats.p90:g}, p99 {stats.p99:g}, max {stats.max}"
            )
        if self.tokenization is not None and self.settings is not None:
            lines.append(
                f"with max_length={self.settings['max_length']}, "
                f"max_prompt_length={self.settings['max_prompt_length']}, "
                f"truncation={self.settings['truncation']}: {self.tokenization.summary()}"
            )
        lines += [f"warning: {warning}" for warning in self.warnings]
        return "\n".join(lines)


def _counts_text(counts: dict[str, int]) -> str:
    if not counts:
        return "(none)"
    return ", ".join(
        f"{name} {count}" for name, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    )


def _tag_counts(rows: list[dict[str, Any]], key: str) -> dict[str, int]:
    return dict(Counter(row[key] for row in rows if row.get(key) is not None))


def _reward_names(rows: list[dict[str, Any]]) -> list[str]:
    names: set[str] = set()
    for row in rows:
        for key in ("rewards", "chosen_rewards", "rejected_rewards"):
            names.update(row.get(key) or {})
    return sorted(names)


def _token_lengths(
    data: LoadedData, tokenizer: Any, settings: TokenizationSettings
) -> tuple[dict[str, LengthStats], TokenizationReport]:
    encoded = encode_rows(data.rows, tokenizer, settings, data.format)
    lengths: dict[str, list[int]] = {"prompt": [len(row.prompt_ids) for row in encoded]}
    fields = _LENGTH_FIELDS[data.format]
    for name in fields:
        lengths[name] = []
    for row in encoded:
        for position, ids in enumerate(row.completions_ids):
            lengths[fields[min(position, len(fields) - 1)]].append(len(ids))
    _, report = apply_length_policy(
        encoded, settings, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
    )
    return {name: LengthStats.of(values) for name, values in lengths.items()}, report


def summarize_dataset(
    path: str | Path | LoadedData,
    tokenizer: Any = None,
    settings: TokenizationSettings | None = None,
    format: str = "auto",
    *,
    split: str = "train",
    subset: str | None = None,
    limit: int | None = None,
) -> DatasetSummary:
    """Load (and validate) a dataset and summarise it; with a tokenizer, add token-length percentiles
    and the counts the truncation policy would produce. Raises ``DataError`` for invalid data."""
    data = (
        path
        if isinstance(path, LoadedData)
        else load_rows(path, format=format, split=split, subset=subset, limit=limit)
    )
    rows = data.rows
    summary = DatasetSummary(
        path=data.path,
        format=data.format,
        num_rows=data.num_rows,
        conversational=data.conversational,
        fingerprint=data.fingerprint,
        ignored_columns=list(data.ignored_columns),
        sources=_tag_counts(rows, "source"),
        groups=_tag_counts(rows, "group"),
        reward_names=_reward_names(rows),
        implicit_prompt_rows=data.implicit_prompt_rows,
        warnings=list(data.warnings),
    )
    if data.format == "unpaired":
        positive = sum(1 for row in rows if row["label"])
        summary.labels = {"positive": positive, "negative": len(rows) - positive}
    weights = [row["weight"] for row in rows]
    if any(w != 1.0 for w in weights):
        summary.weights = (min(weights), sum(weights) / len(weights), max(weights))
    if tokenizer is not None:
        settings = settings or TokenizationSettings()
        summary.token_lengths, summary.tokenization = _token_lengths(data, tokenizer, settings)
        summary.settings = settings.as_dict()
        if summary.tokenization.rows_kept == 0:
            reason = nothing_kept_reason(
                data.rows, data.format, tokenizer, settings, summary.tokenization, _FLAGS
            )
            summary.warnings.append(reason)
    return summary


_FLAGS = ("--max-length", "--max-prompt-length", "--truncation truncate")
_CONFIG_KEYS = ("data.max_length", "data.max_prompt_length", "data.truncation=truncate")


def nothing_kept_reason(
    rows: list[dict[str, Any]],
    fmt: str,
    tokenizer: Any,
    settings: TokenizationSettings,
    report: TokenizationReport,
    names: tuple[str, str, str] = _CONFIG_KEYS,
) -> str:
    """Why tokenisation kept no row, with the limits that would keep them; ``names`` are how the user
    sets max_length, max_prompt_length and truncate (config keys, or the ``data check`` flags)."""
    if not report.dropped_too_long:
        return (
            f"all {report.rows_in} rows are dropped at tokenisation: the completions of "
            f"{report.empty_completion_dropped} tokenise to nothing"
        )
    encoded = [row for row in encode_rows(rows, tokenizer, settings, fmt) if all(row.completions_ids)]
    prompts = [len(row.prompt_ids) for row in encoded]
    totals = [len(row.prompt_ids) + max(len(ids) for ids in row.completions_ids) for row in encoded]
    length_name, prompt_name, truncate = names
    over_prompt = sum(n > settings.max_prompt_length for n in prompts)
    over_total = sum(n > settings.max_length for n in totals)
    need_prompt = max(prompts)
    need_total = max(max(totals), need_prompt + 1)
    found, advice = [], []
    if over_prompt:
        found.append(
            f"{over_prompt} prompts are longer than {prompt_name}={settings.max_prompt_length} tokens"
        )
    if over_total:
        found.append(f"{over_total} rows are longer than {length_name}={settings.max_length} tokens")
    if need_prompt > settings.max_prompt_length:
        advice.append(f"{prompt_name} to {need_prompt}")
    if need_total > settings.max_length:
        advice.append(f"{length_name} to {need_total}")
    return (
        f"all {report.rows_in} rows are dropped for length (truncation=drop): {' and '.join(found)}; raise "
        f"{' and '.join(advice)} to keep every row, or cut long rows instead with {truncate}"
    )
