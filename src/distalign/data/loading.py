"""Load rows from JSONL, JSON, CSV, Parquet, ``datasets`` directories or hub ids, validated.

``load_rows`` is the only entry point the rest of the library needs: it reads the raw rows, detects
(or checks) the format, validates and normalises every row (see ``formats.validate_row``), and
returns them with a content fingerprint used in cache keys. Validation errors are collected (up to
``MAX_COLLECTED_ERRORS``) and raised as one ``DataError``, so a user fixes a file in one pass.

Path forms: ``builtin:<name>`` for the datasets shipped in ``distalign/resources``; an existing file
(``.jsonl``, ``.json``, ``.csv``, ``.parquet``); an existing directory written by
``datasets.save_to_disk`` (or any directory ``datasets.load_dataset`` understands); anything else is
treated as a Hugging Face hub id and needs network access or a warm ``datasets`` cache.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
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

MAX_COLLECTED_ERRORS = 20
BUILTIN_PREFIX = "builtin:"
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
# CSV cells are strings; these columns may hold JSON (message lists, lists of responses or scores, dicts).
_CSV_JSON_COLUMNS = frozenset(
    {
        "prompt",
        "chosen",
        "rejected",
        "completion",
        "responses",
        "scores",
        "rewards",
        "chosen_rewards",
        "rejected_rewards",
    }
)
_DATASET_DIR_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")

RawRow = tuple[int, "dict[str, Any] | DataError"]


@dataclass
class LoadedData:
    """Validated, normalised rows of one dataset.

    ``rows[i]`` is the normalised dict of the i-th data row (0-based; tokenised outputs refer to it by
    ``row_index``). ``fingerprint`` is the sha256 hex digest of the rows as canonical JSON lines, so two
    files with the same content in different containers share it. ``ignored_columns`` lists input
    columns the format does not read.
    """

    format: DataFormat
    rows: list[dict[str, Any]]
    path: str
    conversational: bool
    fingerprint: str
    ignored_columns: list[str] = field(default_factory=list)
    num_rows: int = field(init=False)

    def __post_init__(self) -> None:
        self.num_rows = len(self.rows)


def resource_path(name: str) -> Path:
    """Path of a data file shipped in ``distalign/resources`` (e.g. ``"quickstart_pairs.jsonl"``)."""
    root = resources.files("distalign") / "resources"
    candidate = root / name
    if not candidate.is_file():
        available = sorted(p.name for p in root.iterdir() if p.name.endswith(FILE_SUFFIXES))
        raise DataError(f"no built-in data file {name!r}; available: {', '.join(available)}", file=name)
    return Path(str(candidate))


def rows_fingerprint(rows: list[dict[str, Any]]) -> str:
    """sha256 hex digest of ``rows`` serialised as canonical (sorted-key, compact) JSON lines."""
    digest = hashlib.sha256()
    for row in rows:
        line = json.dumps(row, sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        digest.update(line.encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def _read_jsonl(path: Path, limit: int | None) -> Iterator[RawRow]:
    with path.open(encoding="utf-8") as handle:
        count = 0
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            if limit is not None and count >= limit:
                return
            count += 1
            try:
                yield line_number, json.loads(line)
            except json.JSONDecodeError as exc:
                yield (
                    line_number,
                    DataError(
                        f"invalid JSON: {exc.msg} (column {exc.colno})", file=str(path), row=line_number
                    ),
                )


def _read_json(path: Path, limit: int | None) -> Iterator[RawRow]:
    text = path.read_text(encoding="utf-8")
    if not text.lstrip().startswith("["):
        yield from _read_jsonl(path, limit)  # ".json" files are often JSON lines
        return
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"invalid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})", file=str(path)
        ) from None
    yield from enumerate(records[:limit] if limit is not None else records, start=1)


def _decode_csv_cell(column: str, value: str) -> Any:
    stripped = value.strip()
    if column not in _CSV_JSON_COLUMNS or not stripped.startswith(("[", "{")):
        return value
    try:
        decoded = json.loads(stripped)
    except json.JSONDecodeError:
        return value  # plain text that happens to start with a bracket, e.g. "[INST] ..."
    if column in ("prompt", "chosen", "rejected", "completion") and not (
        isinstance(decoded, list) and all(isinstance(item, dict) for item in decoded)
    ):
        return value
    return decoded


def _read_csv(path: Path, limit: int | None) -> Iterator[RawRow]:
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        for row_number, record in enumerate(reader, start=1):
            if limit is not None and row_number > limit:
                return
            if None in record:
                extra = DataError("more cells than header columns", file=str(path), row=row_number)
                yield row_number, extra
                continue
            yield (
                row_number,
                {col: (None if val is None else _decode_csv_cell(col, val)) for col, val in record.items()},
            )


def _read_parquet(path: Path, limit: int | None) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    row_number = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            row_number += 1
            if limit is not None and row_number > limit:
                return
            yield row_number, record


def _read_dataset(dataset: Any, limit: int | None) -> Iterator[RawRow]:
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    yield from enumerate(dataset, start=1)


def _load_saved_dataset(path: Path, split: str) -> Any:
    import datasets

    if any((path / marker).exists() for marker in _DATASET_DIR_MARKERS):
        loaded = datasets.load_from_disk(str(path))
    else:
        loaded = datasets.load_dataset(str(path), split=None)
    if isinstance(loaded, (datasets.DatasetDict, dict)):
        if split not in loaded:
            raise DataError(
                f"no split {split!r}; available splits: {', '.join(sorted(loaded))}", file=str(path)
            )
        return loaded[split]
    return loaded


def _load_hub_dataset(name: str, split: str) -> Any:
    import datasets

    try:
        return datasets.load_dataset(name, split=split)
    except Exception as exc:  # offline, unknown id, missing split: all end the same way for the user
        reason = (
            f"not an existing local path, and loading it as a Hugging Face hub dataset (split {split!r}) "
            f"failed: {type(exc).__name__}: {exc}. Hub ids need network access or a populated datasets cache."
        )
        raise DataError(reason, file=name) from exc


def _looks_like_local_path(text: str) -> bool:
    return (
        text.endswith(FILE_SUFFIXES)
        or text.startswith((".", "/", "~"))
        or "\\" in text
        or text.count("/") > 1
    )


def _raw_rows(path_text: str, split: str, limit: int | None) -> Iterator[RawRow]:
    if path_text.startswith(BUILTIN_PREFIX):
        path = resource_path(path_text[len(BUILTIN_PREFIX) :])
    else:
        path = Path(path_text).expanduser()
    if path.is_dir():
        return _read_dataset(_load_saved_dataset(path, split), limit)
    if path.is_file():
        readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
        reader = readers.get(path.suffix.lower())
        if reader is None:
            raise DataError(
                f"unsupported file type {path.suffix!r}; supported: {', '.join(FILE_SUFFIXES)}",
                file=path_text,
            )
        return reader(path, limit)
    if _looks_like_local_path(path_text):
        raise DataError("file not found", file=path_text)
    return _read_dataset(_load_hub_dataset(path_text, split), limit)


def _resolve_format(format: str, columns: set[str], file: str) -> DataFormat:
    if format == "auto":
        try:
            return detect_format(columns)
        except DataError as exc:
            raise DataError(exc.reason, file=file) from None
    if format not in DATA_FORMATS:
        raise DataError(f"unknown data format {format!r}; valid: auto, {', '.join(DATA_FORMATS)}", file=file)
    missing = [c for c in REQUIRED_COLUMNS[format] if c not in columns]
    if missing:
        raise DataError(
            f"format {format!r} needs columns {', '.join(missing)}; found: {', '.join(sorted(columns))}",
            file=file,
        )
    return format  # type: ignore[return-value]


def load_rows(
    path: str | Path, *, format: str = "auto", split: str = "train", limit: int | None = None
) -> LoadedData:
    """Read, validate and normalise a dataset.

    ``format`` is ``"auto"`` (detected from the columns) or one of ``paired``, ``unpaired``,
    ``listwise``, ``prompt``. ``split`` is used for ``datasets`` directories and hub ids. ``limit``
    keeps the first N data rows (before validation). Raises ``DataError`` for a missing file, an
    unknown format, or invalid rows (the error lists up to ``MAX_COLLECTED_ERRORS`` of them). All rows
    must agree on being plain text or conversational.
    """
    path_text = str(path)
    raw = list(_raw_rows(path_text, split, limit))
    if not raw:
        raise DataError("no data rows", file=path_text)
    columns: set[str] = set()
    for _, record in raw:
        if isinstance(record, dict):
            columns.update(record)
    fmt = _resolve_format(format, columns, path_text)
    rows, errors, conversational = _validate_all(raw, fmt, path_text)
    if errors:
        raise DataError.collected(errors, file=path_text, truncated=len(errors) >= MAX_COLLECTED_ERRORS)
    ignored = sorted(columns - known_columns(fmt, columns))
    return LoadedData(
        format=fmt,
        rows=rows,
        path=path_text,
        conversational=bool(conversational),
        fingerprint=rows_fingerprint(rows),
        ignored_columns=ignored,
    )


def _validate_all(
    raw: list[RawRow], fmt: DataFormat, file: str
) -> tuple[list[dict[str, Any]], list[DataError], bool | None]:
    rows: list[dict[str, Any]] = []
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
    return rows, errors, conversational
