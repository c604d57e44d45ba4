"""What tokenisation produces and how it is set: the settings (lengths, truncation policy, chat
template, EOS), the report of what the length policy did to the rows, and the tokenised row types the
collates and the training loops consume. The encoding itself is :mod:`distalign.data.tokenize`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class TokenizationSettings:
    """How rows become token ids; part of every cache key (see ``as_dict``).

    max_length: tokens of prompt + completion at most.
    max_prompt_length: tokens of the prompt at most; must be below ``max_length`` so that every kept
        completion keeps at least one token.
    truncation: ``"truncate"`` (cut and count) or ``"drop"`` (drop and count); see the module docstring.
    chat_template: ``"auto"`` uses the tokenizer's chat template iff the row is conversational; ``"on"``
        always (a plain prompt becomes one user message); ``"off"`` never (conversational rows then fail).
    add_eos: append the EOS id to each completion that does not already end with it.
    """

    max_length: int = 512
    max_prompt_length: int = 256
    truncation: Literal["truncate", "drop"] = "truncate"
    chat_template: Literal["auto", "on", "off"] = "auto"
    add_eos: bool = True

    def __post_init__(self) -> None:
        if self.max_prompt_length < 1 or self.max_length <= self.max_prompt_length:
            raise ValueError(
                f"need 1 <= max_prompt_length < max_length, got max_prompt_length={self.max_prompt_length}, "
                f"max_length={self.max_length}"
            )
        if self.truncation not in ("truncate", "drop"):
            raise ValueError(f"truncation must be 'truncate' or 'drop', got {self.truncation!r}")
        if self.chat_template not in ("auto", "on", "off"):
            raise ValueError(f"chat_template must be 'auto', 'on' or 'off', got {self.chat_template!r}")

    def as_dict(self) -> dict[str, Any]:
        """Plain dict of the settings, for cache keys and run metadata."""
        return asdict(self)


@dataclass
class TokenizationReport:
    """Counts of what tokenisation did to the rows (every count is a number of rows), with the limits
    applied and the longest untruncated lengths seen (tokens), so a cut can name the limit to raise."""

    rows_in: int = 0
    rows_kept: int = 0
    dropped_too_long: int = 0
    empty_completion_dropped: int = 0
    prompt_truncated: int = 0
    completion_truncated: int = 0
    eos_lost: int = 0
    max_prompt_length: int | None = None
    max_length: int | None = None
    longest_prompt: int = 0
    longest_sequence: int = 0

    def summary(self, prompt_limit: str = "max_prompt_length", length_limit: str = "max_length") -> str:
        """One line for logs and the CLI; ``prompt_limit`` / ``length_limit`` are how the user sets the
        two limits (e.g. the config keys ``data.max_prompt_length`` / ``data.max_length``)."""
        parts = [
            f"tokenised {_rows(self.rows_in)}: kept {self.rows_kept}, dropped {self.dropped_too_long} too long "
            f"and {self.empty_completion_dropped} with an empty completion"
        ]
        if self.dropped_too_long:
            parts.append(
                f"the dropped rows exceed {prompt_limit}={self.max_prompt_length} or "
                f"{length_limit}={self.max_length} tokens (longest prompt: {self.longest_prompt} tokens, "
                f"longest prompt + completion: {self.longest_sequence}; raise the limits to keep them)"
            )
        if self.prompt_truncated:
            parts.append(
                f"truncated the prompt of {_rows(self.prompt_truncated)} to {prompt_limit}="
                f"{self.max_prompt_length} tokens (longest prompt: {self.longest_prompt} tokens; raise "
                f"{prompt_limit} to keep them whole)"
            )
        if self.completion_truncated:
            parts.append(
                f"cut the completion of {_rows(self.completion_truncated)} to fit {length_limit}="
                f"{self.max_length} tokens, {self.eos_lost} of them losing their EOS (longest prompt + "
                f"completion: {self.longest_sequence} tokens; raise {length_limit} to keep them whole)"
            )
        if not (self.prompt_truncated or self.completion_truncated or self.dropped_too_long):
            parts.append("nothing truncated")
        return "; ".join(parts)

    def as_dict(self) -> dict[str, int]:
        """The row counts (not the limits and lengths)."""
        return {key: value for key, value in asdict(self).items() if key in _REPORT_COUNTS}


def _rows(count: int) -> str:
    return f"{count} row" if count == 1 else f"{count} rows"


_REPORT_COUNTS = (
    "rows_in",
    "rows_kept",
    "dropped_too_long",
    "empty_completion_dropped",
    "prompt_truncated",
    "completion_truncated",
    "eos_lost",
)


@dataclass(slots=True)
class EncodedRow:
    """Untruncated ids of one row: its prompt and each of its completions (format order)."""

    row_index: int
    prompt_ids: list[int]
    completions_ids: list[list[int]]
    prompt_text: str


@dataclass(slots=True)
class TokenizedPair:
    """A preference pair; ``row_index`` is the 0-based index in ``LoadedData.rows``."""

    row_index: int
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    weight: float
    signals: dict[str, float | str] = field(default_factory=dict)


@dataclass(slots=True)
class TokenizedCompletion:
    """One labelled completion (label 1.0 desirable, 0.0 undesirable)."""

    row_index: int
    prompt_ids: list[int]
    completion_ids: list[int]
    label: float
    weight: float
    signals: dict[str, float | str] = field(default_factory=dict)


@dataclass(slots=True)
class TokenizedList:
    """A prompt with several scored responses (listwise; higher score is better)."""

    row_index: int
    prompt_ids: list[int]
    responses_ids: list[list[int]]
    scores: list[float]
    weight: float
    signals: dict[str, float | str] = field(default_factory=dict)


@dataclass(slots=True)
class TokenizedPrompt:
    """A prompt to sample from; ``prompt_text`` is the rendered text of ``prompt_ids``."""

    row_index: int
    prompt_ids: list[int]
    prompt_text: str
