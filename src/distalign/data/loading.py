"""Load rows from JSONL, JSON, CSV, TSV, Parquet, ``datasets`` directories or hub ids, validated.

``load_rows`` is the only entry point the rest of the library needs: it reads the raw rows (see
``readers``), takes the prompt of implicit-prompt preference rows from their shared start (see
``implicit_prompt``), detects (or checks) the format, validates and normalises every row (see
``formats.validate_row``), and returns them with a content fingerprint used in cache keys.
Validation errors are collected (up to ``MAX_COLLECTED_ERRORS``) and raised as one ``DataError``, so
a user fixes a file in one pass.

Path forms: ``builtin:<name>`` for the datasets shipped in ``distalign/resources``; an existing file
(``.jsonl``, ``.json``, ``.csv``, ``.tsv``, ``.parquet``); an existing directory written by
``datasets.save_to_disk`` (or any directory of data files ``datasets.load_dataset`` understands);
anything else is treated as a Hugging Face hub id (``subset`` is its configuration name) and needs
network access or a warm ``datasets`` cache.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distalign.data.formats import (
    DATA_FORMATS,
    REQUIRED_COLUMNS,
    DataError,
    DataFormat,
    detect_format,
    is_conversational,
    known_columns,
    validate_row,
)
from distalign.data.implicit_prompt import ImplicitPromptError, has_implicit_prompt, split_implicit_prompt
from distalign.data.readers import BUILTIN_PREFIX, FILE_SUFFIXES, RawRow, read_raw, resource_path

__all__ = [
    "BUILTIN_PREFIX",
    "FILE_SUFFIXES",
    "MAX_COLLECTED_ERRORS",
    "LoadedData",
    "load_rows",
    "resource_path",
    "rows_fingerprint",
]

MAX_COLLECTED_ERRORS = 20
_COMPLETION_COLUMNS = ("chosen", "rejected", "completion", "label", "responses", "scores")


@dataclass
class LoadedData:
    """Validated, normalised rows of one dataset.

    ``rows[i]`` is the normalised dict of the i-th data row (0-based; tokenised outputs refer to it by
    ``row_index``). ``fingerprint`` is the sha256 hex digest of the rows as canonical JSON lines, so two
    files with the same content in different containers share it. ``ignored_columns`` lists input
    columns the format does not read. ``implicit_prompt_rows`` counts the rows whose prompt was split
    off the shared start of ``chosen`` and ``rejected``; ``warnings`` holds one line per problem that
    does not stop loading (shown by ``distalign data check`` and at the start of training).
    """

    format: DataFormat
    rows: list[dict[str, Any]]
    path: str
    conversational: bool
    fingerprint: str
    ignored_columns: list[str] = field(default_factory=list)
    implicit_prompt_rows: int = 0
    warnings: list[str] = field(default_factory=list)
    num_rows: int = field(init=False)

    def __post_init__(self) -> None:
        self.num_rows = len(self.rows)


def rows_fingerprint(rows: list[dict[str, Any]]) -> str:
    """sha256 hex digest of ``rows`` serialised as canonical (sorted-key, compact) JSON lines."""
    digest = hashlib.sha256()
    for row in rows:
        line = json.dumps(row, sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        digest.update(line.encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def _columns_of(record: Any) -> set[str]:
    return {key for key, value in record.items() if value is not None} if isinstance(record, dict) else set()


def _row_format(record: Any) -> str | None:
    present = _columns_of(record)
    for fmt in ("paired", "unpaired", "listwise"):
        if set(REQUIRED_COLUMNS[fmt]) <= present:
            return fmt
    return None


def _format_problem(reason: str, columns: set[str], file: str, raw: list[RawRow]) -> DataError:
    """``detect_format``'s error made specific: the first row of another format in a mixed file, or the
    missing column of a nearly complete format."""
    first: tuple[int, str] | None = None
    for row_number, record in raw:
        fmt = _row_format(record)
        if fmt is None:
            continue
        if first is None:
            first = (row_number, fmt)
        elif fmt != first[1]:
            return DataError(
                f"this row is {fmt} ({', '.join(REQUIRED_COLUMNS[fmt])}) but row {first[0]} is {first[1]} "
                f"({', '.join(REQUIRED_COLUMNS[first[1]])}); a dataset holds one format: put each format "
                "in its own file (or set data.format / --format to read rows of one format)",
                file=file,
                row=row_number,
            )
    lowered = {column.strip().lower(): column for column in columns}
    renames = [
        f"{lowered[name]!r} -> {name!r}"
        for name in ("prompt", *_COMPLETION_COLUMNS)
        if name not in columns and name in lowered
    ]
    if renames:
        return DataError(f"{reason}; column names are case-sensitive: rename {', '.join(renames)}", file=file)
    best: tuple[int, str] | None = None
    for fmt in ("paired", "unpaired", "listwise"):
        overlap = len(columns & set(REQUIRED_COLUMNS[fmt][1:]))
        if overlap and (best is None or overlap > best[0]):
            best = (overlap, fmt)
    if best is not None:
        fmt = best[1]
        missing = [c for c in REQUIRED_COLUMNS[fmt] if c not in columns]
        return DataError(
            f"{reason}; the columns look like the {fmt} format, which also needs {', '.join(missing)}",
            file=file,
            field=missing[0],
        )
    return DataError(reason, file=file)


def _resolve_format(format: str, columns: set[str], file: str, raw: list[RawRow]) -> DataFormat:
    if format == "auto":
        try:
            return detect_format(columns)
        except DataError as exc:
            raise _format_problem(exc.reason, columns, file, raw) from None
    if format not in DATA_FORMATS:
        raise DataError(f"unknown data format {format!r}; valid: auto, {', '.join(DATA_FORMATS)}", file=file)
    missing = [c for c in REQUIRED_COLUMNS[format] if c not in columns]
    if missing:
        raise DataError(
            f"format {format!r} needs columns {', '.join(missing)}; found: {', '.join(sorted(columns))}",
            file=file,
            field=missing[0],
        )
    return format  # type: ignore[return-value]


def _extract_implicit_prompts(raw: list[RawRow], format: str, file: str) -> tuple[list[RawRow], int]:
    """Rows of TRL's implicit-prompt format get the prompt split off ``chosen`` / ``rejected``."""
    if format not in ("auto", "paired"):
        return raw, 0
    out: list[RawRow] = []
    count = 0
    for row_number, record in raw:
        if isinstance(record, dict) and has_implicit_prompt(record):
            count += 1
            try:
                record = split_implicit_prompt(record)
            except ImplicitPromptError as exc:
                record = DataError(str(exc), file=file, row=row_number, field="prompt")
        out.append((row_number, record))
    return out, count


def _trailing_whitespace_warning(rows: list[dict[str, Any]], row_numbers: list[int], fmt: str) -> str | None:
    if fmt == "prompt":
        return None
    hits = [
        n
        for n, row in zip(row_numbers, rows)
        if isinstance(row["prompt"], str) and row["prompt"][-1:].isspace()
    ]
    if not hits:
        return None
    return (
        f"{len(hits)} of {len(rows)} prompts end in whitespace (first: row {hits[0]}); prompt and completion "
        "are tokenised separately, so without a chat template that whitespace becomes a token of its own "
        "before a completion that starts without it, a split the model rarely saw: move the whitespace to "
        "the start of the completions (prompt 'Answer:', completion ' Paris')"
    )


def load_rows(
    path: str | Path,
    *,
    format: str = "auto",
    split: str = "train",
    subset: str | None = None,
    limit: int | None = None,
) -> LoadedData:
    """Read, validate and normalise a dataset.

    ``format`` is ``"auto"`` (detected from the columns) or one of ``paired``, ``unpaired``,
    ``listwise``, ``prompt``. ``split`` is used for ``datasets`` directories and hub ids, ``subset``
    (a dataset configuration name) for hub ids and dataset repositories. ``limit`` keeps the first N
    data rows (before validation). Raises ``DataError`` for a missing or unreadable file, an unknown
    format, or invalid rows (the error lists up to ``MAX_COLLECTED_ERRORS`` of them). All rows must
    agree on being plain text or conversational.
    """
    path_text = str(path)
    raw = list(read_raw(path_text, split, subset, limit))
    if not raw:
        raise DataError(
            "no data rows (the file is empty, or holds only blank lines or a header)", file=path_text
        )
    raw, implicit = _extract_implicit_prompts(raw, format, path_text)
    columns: set[str] = set()
    for _, record in raw:
        if isinstance(record, dict):
            columns.update(record)
    row_errors = [record for _, record in raw if isinstance(record, DataError)]
    if not columns and row_errors:  # no readable row to take the format from: the rows' errors say why
        raise DataError.collected(
            row_errors[:MAX_COLLECTED_ERRORS],
            file=path_text,
            truncated=len(row_errors) > MAX_COLLECTED_ERRORS,
        )
    fmt = _resolve_format(format, columns, path_text, raw)
    rows, row_numbers, errors, conversational = _validate_all(raw, fmt, path_text)
    if errors:
        raise DataError.collected(errors, file=path_text, truncated=len(errors) >= MAX_COLLECTED_ERRORS)
    ignored = sorted(columns - known_columns(fmt, columns))
    warning = _trailing_whitespace_warning(rows, row_numbers, fmt)
    return LoadedData(
        format=fmt,
        rows=rows,
        path=path_text,
        conversational=bool(conversational),
        fingerprint=rows_fingerprint(rows),
        ignored_columns=ignored,
        implicit_prompt_rows=implicit,
        warnings=[warning] if warning else [],
    )


def _validate_all(
    raw: list[RawRow], fmt: DataFormat, file: str
) -> tuple[list[dict[str, Any]], list[int], list[DataError], bool | None]:
    rows: list[dict[str, Any]] = []
    row_numbers: list[int] = []
    errors: list[DataError] = []
    conversational: bool | None = None
    first_row_number = 0
    for row_number, record in raw:
        if len(errors) >= MAX_COLLECTED_ERRORS:
            break
        if isinstance(record, DataError):
            errors.append(record)
            continue
        try:
            row = validate_row(record, fmt, file=file, row_number=row_number)
        except DataError as exc:
            errors.append(exc)
            continue
        if conversational is None:
            conversational, first_row_number = is_conversational(row), row_number
        elif is_conversational(row) != conversational:
            kinds = ("plain text", "conversational") if conversational else ("conversational", "plain text")
            reason = f"{kinds[0]} prompt, but row {first_row_number} is {kinds[1]}; a dataset cannot mix them"
            errors.append(DataError(reason, file=file, row=row_number, field="prompt"))
            continue
        rows.append(row)
        row_numbers.append(row_number)
    return rows, row_numbers, errors, conversational
