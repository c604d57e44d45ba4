"""JSON lines (``.jsonl``) and JSON (``.json``: JSON lines, or one array of objects) read into raw rows
for :mod:`distalign.data.readers`, refusing what JSON readers would silently accept or misread: a key
given twice in one object (the last value would win), a whole document in a ``.jsonl`` file, one
object where rows were expected, bytes that are not UTF-8."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from distalign.data.file_diagnosis import (
    SNIFF_BYTES,
    UTF8_BOM,
    conversion_hint,
    decode_utf8,
    not_utf8,
    output_name,
    refuse_binary,
)
from distalign.data.formats import DataError

#: (row number as the file counts it, the decoded row or the DataError that row raised)
RawRow = tuple[int, Any]


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    record = dict(pairs)
    if len(record) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return record


def _duplicate_key_error(key: str, file: str, row: int | None) -> DataError:
    return DataError(
        f"key {key!r} appears twice in one JSON object; JSON readers silently keep the last value: "
        "remove or rename one",
        file=file,
        row=row,
        field=key,
    )


def _json_line(line: str, path: Path, line_number: int, first: bool) -> Any:
    try:
        record = json.loads(line, object_pairs_hook=_unique_keys)
    except _DuplicateKey as dup:
        return _duplicate_key_error(dup.key, str(path), line_number)
    except json.JSONDecodeError as exc:
        stripped = line.strip()
        if first and (stripped.startswith("[") or stripped == "{"):  # a document, not one object per line
            hint = (
                conversion_hint("json_array", path.name)
                if stripped.startswith("[")
                else f"write one object per line: jq -c . {path.name} > {output_name(path.name, '.jsonl')}"
            )
            raise DataError(
                f"this is JSON written over several lines, not JSON lines (one object per line): {hint}",
                file=str(path),
            ) from None
        return DataError(f"invalid JSON: {exc.msg} (column {exc.colno})", file=str(path), row=line_number)
    if isinstance(record, list):
        hint = (
            f"; if the file is one array of rows: {conversion_hint('json_array', path.name)}"
            if record and all(isinstance(item, dict) for item in record)
            else ""
        )
        return DataError(
            f"this line is a JSON array; JSON lines need one object {{...}} per line{hint}",
            file=str(path),
            row=line_number,
        )
    return record


def read_jsonl(path: Path, limit: int | None) -> Iterator[RawRow]:
    """One row per non-blank line; the row number is the line number."""
    with path.open("rb") as handle:
        offset, count = 0, 0
        for line_number, raw in enumerate(handle, start=1):
            start = offset
            offset += len(raw)
            if line_number == 1:
                refuse_binary(path, raw[:SNIFF_BYTES], "JSON lines")
                if raw.startswith(UTF8_BOM):
                    raw, start = raw[len(UTF8_BOM) :], start + len(UTF8_BOM)
            if not raw.strip():
                continue
            if limit is not None and count >= limit:
                return
            count += 1
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise not_utf8(path, raw, raw[exc.start], start + exc.start, line_number) from None
            yield line_number, _json_line(line, path, line_number, first=count == 1)


def _locate_json_duplicate(text: str) -> int | None:
    """1-based index of the first array element holding an object with a repeated key."""

    class Marked(dict):
        pass

    def mark(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        record = Marked(pairs) if len(dict(pairs)) != len(pairs) else dict(pairs)
        return record

    def has_mark(value: Any) -> bool:
        if isinstance(value, Marked):
            return True
        if isinstance(value, dict):
            return any(has_mark(v) for v in value.values())
        if isinstance(value, list):
            return any(has_mark(v) for v in value)
        return False

    for index, element in enumerate(json.loads(text, object_pairs_hook=mark), start=1):
        if has_mark(element):
            return index
    return None


def _single_object_reason(document: dict[str, Any], path: Path) -> str:
    name, stem = path.name, path.stem
    for key, value in document.items():
        if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
            return (
                f"this is one JSON object whose {key!r} holds the rows; write them as JSON lines: "
                f"jq -c '.{key}[]' {name} > {stem}.jsonl"
            )
    values = list(document.values())
    if values and all(isinstance(v, (list, dict)) for v in values) and len({len(v) for v in values}) == 1:
        return (
            "this is one JSON object of columns (pandas' DataFrame.to_json default); write one object per "
            f"row: python -c \"import pandas as pd; pd.read_json('{name}').to_json('{stem}.jsonl', "
            "orient='records', lines=True)\""
        )
    return (
        "this is a single JSON object written over several lines; JSON lines need one object per line: "
        f"jq -c . {name} > {stem}.jsonl"
    )


def read_json(path: Path, limit: int | None) -> Iterator[RawRow]:
    """A ``.json`` file: one JSON array of row objects (row i is element i, 1-based), or JSON lines."""
    data = path.read_bytes()
    refuse_binary(path, data[:SNIFF_BYTES], "JSON")
    is_array = data.lstrip(UTF8_BOM).lstrip()[:1] == b"["  # rows are elements, not lines

    def line_of(raw: bytes, offset: int) -> int | None:
        return None if is_array else raw.count(b"\n", 0, offset) + 1

    text = decode_utf8(path, data, line_of)
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            records = json.loads(text, object_pairs_hook=_unique_keys)
        except _DuplicateKey as dup:
            raise _duplicate_key_error(dup.key, str(path), _locate_json_duplicate(text)) from None
        except json.JSONDecodeError as exc:
            raise DataError(
                f"invalid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})", file=str(path)
            ) from None
        yield from enumerate(records[:limit] if limit is not None else records, start=1)
        return
    if stripped.startswith("{") and sum(1 for line in text.splitlines() if line.strip()) > 1:
        try:
            document = json.loads(text, object_pairs_hook=_unique_keys)
        except (json.JSONDecodeError, _DuplicateKey):
            document = None  # JSON lines (several objects) or a broken line: read line by line
        if isinstance(document, dict):
            raise DataError(_single_object_reason(document, path), file=str(path))
    yield from read_jsonl(path, limit)  # ".json" files are often JSON lines
