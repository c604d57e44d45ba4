"""Row schemas of the four data formats and validation at the boundary.

Formats (the TRL conventions):

- ``paired``:   ``prompt``, ``chosen``, ``rejected``
- ``unpaired``: ``prompt``, ``completion``, ``label``
- ``listwise``: ``prompt``, ``responses`` (list, at least 2), ``scores`` (list of numbers, same length)
- ``prompt``:   ``prompt`` (prompt-only, for methods that sample their own completions)

A row is *plain text* when its prompt is a string and *conversational* when its prompt is a list of
``{"role", "content"}`` messages. In a conversational row a completion is a list of messages ending
with an assistant message, or a plain string, which becomes one assistant message. A plain-text row
cannot carry message-list completions.

Emptiness: an empty prompt string is allowed (unconditional generation); an empty or whitespace-only
completion is an error, because it carries no signal and tokenises to nothing but EOS.

Optional columns: ``source`` and ``group`` (strings; integers are converted, since parquet files often
store group ids as integers), ``weight`` (finite float >= 0, default 1.0) and per-completion designer
rewards. For ``unpaired`` rows the rewards come from a ``rewards`` dict (name -> number) and/or numeric
columns ``reward_<name>``; ``paired`` rows hold one set per completion, in ``chosen_rewards`` /
``rejected_rewards`` or ``chosen_reward_<name>`` / ``rejected_reward_<name>``; ``listwise`` rows give a
``rewards`` dict of name -> list with one number per response. Numbers may be numeric strings (CSV
has no types). Other columns are ignored (the loader reports which).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, get_args

DataFormat = Literal["paired", "unpaired", "listwise", "prompt"]
DATA_FORMATS: tuple[str, ...] = get_args(DataFormat)

REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "paired": ("prompt", "chosen", "rejected"),
    "unpaired": ("prompt", "completion", "label"),
    "listwise": ("prompt", "responses", "scores"),
    "prompt": ("prompt",),
}
MESSAGE_ROLES = frozenset({"system", "user", "assistant", "tool"})
_TRUE_STRINGS = frozenset({"true", "1", "yes"})
_FALSE_STRINGS = frozenset({"false", "0", "no"})
_REWARD_PREFIXES: dict[str, tuple[str, ...]] = {
    "paired": ("chosen_reward_", "rejected_reward_"),
    "unpaired": ("reward_",),
    "listwise": (),
    "prompt": (),
}


class DataError(ValueError):
    """A problem in the input data, located by file, 1-based row number and field.

    Row numbers: the line number for JSONL (blank lines count, so an editor jumps to it); the data row
    number for CSV (the header is not counted, the first data row is 1); the 1-based row index for
    Parquet files and ``datasets`` datasets. ``errors`` holds every collected error when several rows
    failed; the attributes of the instance are those of the first.
    """

    def __init__(
        self,
        reason: str,
        *,
        file: str | None = None,
        row: int | None = None,
        field: str | None = None,
        errors: Sequence[DataError] | None = None,
    ) -> None:
        self.reason = reason
        self.file = file
        self.row = row
        self.field = field
        self.errors: list[DataError] = list(errors) if errors else [self]
        super().__init__(str(self))

    def location(self) -> str:
        """``"file: row N: field 'x'"`` with the parts that are known."""
        parts = []
        if self.file is not None:
            parts.append(str(self.file))
        if self.row is not None:
            parts.append(f"row {self.row}")
        if self.field is not None:
            parts.append(f"field {self.field!r}")
        return ": ".join(parts)

    def __str__(self) -> str:
        if len(self.errors) > 1:
            lines = [self.reason] + [f"  {error.location()}: {error.reason}" for error in self.errors]
            return "\n".join(lines)
        location = self.location()
        return f"{location}: {self.reason}" if location else self.reason

    @classmethod
    def collected(cls, errors: Sequence[DataError], *, file: str, truncated: bool) -> DataError:
        """One error summarising several row errors; its attributes are those of the first."""
        first = errors[0]
        more = " (stopped collecting; there may be more)" if truncated else ""
        reason = f"{len(errors)} invalid row(s) in {file}{more}:"
        if len(errors) == 1:
            return first
        return cls(reason, file=first.file, row=first.row, field=first.field, errors=errors)


def _describe(columns: Iterable[str]) -> str:
    return ", ".join(sorted(columns)) or "(none)"


def detect_format(columns: Iterable[str]) -> DataFormat:
    """The data format whose required columns are present.

    The most specific format wins (every format has a prompt, so ``prompt`` only when nothing else
    matches). Columns that belong to another format without completing it (``chosen`` but no
    ``rejected``, ``completion`` but no ``label``) are an error rather than silently read as prompts.
    """
    present = set(columns)
    matches = [fmt for fmt in ("paired", "unpaired", "listwise") if set(REQUIRED_COLUMNS[fmt]) <= present]
    recognised = "; ".join(f"{fmt}: {', '.join(cols)}" for fmt, cols in REQUIRED_COLUMNS.items())
    if len(matches) > 1:
        raise DataError(
            f"ambiguous data format: columns {_describe(present)} match {' and '.join(matches)}; "
            f"set the format explicitly (recognised column sets: {recognised})"
        )
    if matches:
        return matches[0]  # type: ignore[return-value]
    partial = present & {"chosen", "rejected", "completion", "label", "responses", "scores"}
    if "prompt" in present and not partial:
        return "prompt"
    raise DataError(
        f"unrecognised data format: columns {_describe(present)}; recognised column sets: {recognised}"
    )


def _messages(value: Any, where: dict[str, Any], field: str) -> list[dict[str, Any]]:
    if not value:
        raise DataError("expected a non-empty list of messages", field=field, **where)
    normalised = []
    for index, message in enumerate(value):
        if not isinstance(message, Mapping):
            got = type(message).__name__
            raise DataError(
                f"message {index}: expected a dict with role and content, got {got}", field=field, **where
            )
        role, content = message.get("role"), message.get("content")
        if role not in MESSAGE_ROLES:
            roles = ", ".join(sorted(MESSAGE_ROLES))
            raise DataError(f"message {index}: role {role!r} is not one of {roles}", field=field, **where)
        if not isinstance(content, str):
            got = type(content).__name__
            raise DataError(f"message {index}: content must be a string, got {got}", field=field, **where)
        # parquet/arrow structs fill absent optional keys (name, tool_calls) with None; drop them
        normalised.append({key: val for key, val in message.items() if val is not None})
    return normalised


def _prompt(value: Any, where: dict[str, Any]) -> str | list[dict[str, Any]]:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return _messages(value, where, "prompt")
    got = type(value).__name__
    raise DataError(f"expected a string or a list of messages, got {got}", field="prompt", **where)


def _completion(value: Any, conversational: bool, where: dict[str, Any], field: str) -> Any:
    if isinstance(value, str):
        if not value.strip():
            raise DataError("empty completion", field=field, **where)
        return [{"role": "assistant", "content": value}] if conversational else value
    if isinstance(value, list):
        if not conversational:
            raise DataError(
                "a list of messages needs a conversational prompt (list of messages)", field=field, **where
            )
        messages = _messages(value, where, field)
        if messages[-1]["role"] != "assistant":
            raise DataError(
                "the last message of a completion must have role 'assistant'", field=field, **where
            )
        if not any(m["content"].strip() for m in messages):
            raise DataError("empty completion", field=field, **where)
        return messages
    got = type(value).__name__
    raise DataError(f"expected a string or a list of messages, got {got}", field=field, **where)


def _number(value: Any, where: dict[str, Any], field: str) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise DataError(f"expected a number, got {value!r}", field=field, **where) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"expected a number, got {type(value).__name__}", field=field, **where)
    if not math.isfinite(value):
        raise DataError(f"expected a finite number, got {value}", field=field, **where)
    return float(value)


def _label(value: Any, where: dict[str, Any]) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE_STRINGS | _FALSE_STRINGS:
        return value.strip().lower() in _TRUE_STRINGS
    raise DataError(f"expected a boolean label (true/false or 1/0), got {value!r}", field="label", **where)


def _tag(value: Any, where: dict[str, Any], field: str) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise DataError(f"expected a string, got {type(value).__name__}", field=field, **where)
    return value


def _reward_dict(
    row: Mapping[str, Any], dict_field: str, prefix: str, where: dict[str, Any]
) -> dict[str, float]:
    rewards: dict[str, float] = {}
    given = row.get(dict_field)
    if given is not None and given != "":
        if not isinstance(given, Mapping):
            raise DataError(
                f"expected a dict of name -> number, got {type(given).__name__}", field=dict_field, **where
            )
        for name, value in given.items():
            rewards[str(name)] = _number(value, where, f"{dict_field}.{name}")
    for column, value in row.items():
        if column.startswith(prefix) and len(column) > len(prefix):
            name = column[len(prefix) :]
            if name in rewards:
                raise DataError(
                    f"reward {name!r} given twice (also in {dict_field!r})", field=column, **where
                )
            rewards[name] = _number(value, where, column)
    return rewards


def _listwise(row: Mapping[str, Any], conversational: bool, where: dict[str, Any]) -> dict[str, Any]:
    responses, scores = row["responses"], row["scores"]
    if not isinstance(responses, list) or len(responses) < 2:
        raise DataError("expected a list of at least 2 responses", field="responses", **where)
    if not isinstance(scores, list):
        raise DataError(f"expected a list of numbers, got {type(scores).__name__}", field="scores", **where)
    if len(scores) != len(responses):
        reason = f"{len(scores)} scores for {len(responses)} responses; expected one score per response"
        raise DataError(reason, field="scores", **where)
    out: dict[str, Any] = {
        "responses": [
            _completion(r, conversational, where, f"responses[{i}]") for i, r in enumerate(responses)
        ],
        "scores": [_number(s, where, f"scores[{i}]") for i, s in enumerate(scores)],
    }
    rewards = row.get("rewards")
    if rewards is not None and rewards != "":
        if not isinstance(rewards, Mapping):
            raise DataError("expected a dict of name -> list of numbers", field="rewards", **where)
        out["rewards"] = {}
        for name, values in rewards.items():
            if not isinstance(values, list) or len(values) != len(responses):
                raise DataError(
                    f"reward {name!r}: expected one number per response", field="rewards", **where
                )
            out["rewards"][str(name)] = [_number(v, where, f"rewards.{name}") for v in values]
    return out


def validate_row(row: Mapping[str, Any], fmt: DataFormat, *, file: str, row_number: int) -> dict[str, Any]:
    """Check one raw row against ``fmt`` and return it normalised.

    The normalised row has the format's required fields (completions as strings for plain-text rows,
    as message lists for conversational rows; ``label`` as bool; ``scores`` as floats), ``weight``
    (float, default 1.0), ``source`` and ``group`` (str or None), and the rewards described in the
    module docstring (always present for paired/unpaired rows, possibly empty). Raises ``DataError``
    naming ``file``, ``row_number`` and the field on the first problem found.
    """
    if fmt not in REQUIRED_COLUMNS:
        raise ValueError(f"unknown data format {fmt!r}; valid: {', '.join(DATA_FORMATS)}")
    where: dict[str, Any] = {"file": file, "row": row_number}
    if not isinstance(row, Mapping):
        raise DataError(f"expected an object with named fields, got {type(row).__name__}", **where)
    for column in REQUIRED_COLUMNS[fmt]:
        if row.get(column) is None:
            raise DataError("missing required field", field=column, **where)
    prompt = _prompt(row["prompt"], where)
    conversational = isinstance(prompt, list)
    out: dict[str, Any] = {"prompt": prompt}
    if fmt == "paired":
        out["chosen"] = _completion(row["chosen"], conversational, where, "chosen")
        out["rejected"] = _completion(row["rejected"], conversational, where, "rejected")
        out["chosen_rewards"] = _reward_dict(row, "chosen_rewards", "chosen_reward_", where)
        out["rejected_rewards"] = _reward_dict(row, "rejected_rewards", "rejected_reward_", where)
        if row.get("rewards") not in (None, ""):
            reason = "paired rows carry rewards per completion: use chosen_rewards and rejected_rewards"
            raise DataError(reason, field="rewards", **where)
    elif fmt == "unpaired":
        out["completion"] = _completion(row["completion"], conversational, where, "completion")
        out["label"] = _label(row["label"], where)
        out["rewards"] = _reward_dict(row, "rewards", "reward_", where)
    elif fmt == "listwise":
        out.update(_listwise(row, conversational, where))
    weight = row.get("weight")
    out["weight"] = 1.0 if weight is None or weight == "" else _number(weight, where, "weight")
    if out["weight"] < 0:
        raise DataError(f"weight must be >= 0, got {out['weight']}", field="weight", **where)
    out["source"] = _tag(row.get("source"), where, "source")
    out["group"] = _tag(row.get("group"), where, "group")
    ratio = row.get("density_ratio")
    if ratio is not None and ratio != "":
        out["density_ratio"] = _number(ratio, where, "density_ratio")
        if out["density_ratio"] < 0:
            raise DataError(f"density_ratio must be >= 0, got {ratio}", field="density_ratio", **where)
    return out


def known_columns(fmt: DataFormat, columns: Iterable[str]) -> set[str]:
    """The subset of ``columns`` that rows of ``fmt`` read (the rest are ignored by validation)."""
    known = set(REQUIRED_COLUMNS[fmt]) | {"weight", "source", "group", "density_ratio"}
    known |= {"chosen_rewards", "rejected_rewards"} if fmt == "paired" else set()
    known |= {"rewards"} if fmt in ("unpaired", "listwise") else set()
    prefixes = _REWARD_PREFIXES[fmt]
    return {c for c in columns if c in known or (prefixes and c.startswith(prefixes))}


def is_conversational(row: Mapping[str, Any]) -> bool:
    """Whether a (normalised) row's prompt is a list of messages."""
    return isinstance(row.get("prompt"), list)


def unpair_rows(paired_rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Split normalised paired rows into unpaired rows: chosen -> label True, rejected -> label False.

    Each output row keeps ``prompt``, ``weight``, ``source`` and ``group``, takes the per-completion
    rewards as ``rewards`` and records the index of its pair in ``pair_index``. Rows come out in pair
    order, the chosen row of pair i at 2i and its rejected row at 2i + 1.
    """
    unpaired: list[dict[str, Any]] = []
    for pair_index, row in enumerate(paired_rows):
        shared = {key: row.get(key) for key in ("weight", "source", "group", "density_ratio")}
        if shared["weight"] is None:
            shared["weight"] = 1.0
        for side, label in (("chosen", True), ("rejected", False)):
            unpaired.append(
                {
                    "prompt": row["prompt"],
                    "completion": row[side],
                    "label": label,
                    "rewards": dict(row.get(f"{side}_rewards") or {}),
                    **shared,
                    "pair_index": pair_index,
                }
            )
    return unpaired
