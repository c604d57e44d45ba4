"""Raw rows from each container ``load_rows`` reads, and what to do about a file it cannot read.

Containers: JSON lines (``.jsonl``; ``.json`` holding JSON lines or one JSON array of objects; read
in :mod:`distalign.data.json_readers`), CSV
(``.csv``) and tab-separated values (``.tsv``), Parquet, a directory (written by
``datasets.save_to_disk``, or data files ``datasets.load_dataset`` reads), ``builtin:NAME`` and hub
ids. Text must be UTF-8; a UTF-8 byte-order mark is skipped.

Every problem with a file as a whole is a ``DataError`` naming the file (and the row where one is
known) and saying what to do: bytes that are not UTF-8 (with their offset and a likely encoding), a
file that is not what its suffix says (and what it looks like), a directory without data files, a
JSON object with a key given twice (JSON allows it and readers keep the last value silently).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

from distalign.data.file_diagnosis import (
    FILE_SUFFIXES,
    SNIFF_BYTES,
    conversion_hint,
    decode_utf8,
    refuse_binary,
    sniff,
    unsupported_file,
)
from distalign.data.formats import DataError
from distalign.data.json_readers import RawRow, read_json, read_jsonl

BUILTIN_PREFIX = "builtin:"
# Data files a directory may hold for ``datasets.load_dataset`` (the ones this package reads, plus arrow).
DIRECTORY_DATA_SUFFIXES = (*FILE_SUFFIXES, ".arrow")
# Names with these endings are local files, never hub ids (so a missing one is "file not found").
_OTHER_FILE_SUFFIXES = (".txt", ".xlsx", ".xls", ".ods", ".gz", ".zip", ".arrow", ".ndjson", ".yaml", ".yml")
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


def resource_path(name: str) -> Path:
    """Path of a data file shipped in ``distalign/resources`` (e.g. ``"quickstart_pairs.jsonl"``)."""
    root = resources.files("distalign") / "resources"
    candidate = root / name
    if not candidate.is_file():
        available = sorted(p.name for p in root.iterdir() if p.name.endswith(FILE_SUFFIXES))
        raise DataError(f"no built-in data file {name!r}; available: {', '.join(available)}", file=name)
    return Path(str(candidate))


# ---------------------------------------------------------------------------------------------------
# CSV / TSV


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


def _csv_row_at(delimiter: str) -> Any:
    def locate(data: bytes, offset: int) -> int | None:
        """The data row (1-based, header not counted) of the record holding byte ``offset``."""
        line_start = data.rfind(b"\n", 0, offset) + 1
        prefix = data[:line_start].decode("utf-8", errors="replace")
        records = 0
        try:  # strict: a prefix ending inside a quoted field raises instead of yielding it
            for record in csv.reader(io.StringIO(prefix, newline=""), delimiter=delimiter, strict=True):
                records += bool(record)
        except csv.Error:
            pass
        return records or None  # records counts the header, so it is the number of the next data row

    return locate


def read_csv(path: Path, limit: int | None, delimiter: str = ",") -> Iterator[RawRow]:
    """One row per CSV record; the row number is the data row (the header is not counted).

    Header names are stripped of surrounding spaces (``prompt, chosen`` names ``chosen``)."""
    data = path.read_bytes()
    expected = "CSV" if delimiter == "," else "tab-separated values"
    refuse_binary(path, data[:SNIFF_BYTES], expected)
    text = decode_utf8(path, data, _csv_row_at(delimiter))
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    if reader.fieldnames is None:
        return
    header = [name.strip() for name in reader.fieldnames]
    if header and header[0].startswith(("{", "[")):
        kind, description = sniff(data[:SNIFF_BYTES])
        raise DataError(
            f"the header line starts with {header[0][:1]!r}: this is {description}, not {expected}; "
            f"{conversion_hint(kind, path.name)}",
            file=str(path),
        )
    seen: set[str] = set()
    for name in header:
        if name in seen and name:
            raise DataError(
                f"column {name!r} appears twice in the header, so one of its values would be lost: "
                "rename or remove one",
                file=str(path),
                field=name,
            )
        seen.add(name)
    reader.fieldnames = header
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


def read_tsv(path: Path, limit: int | None) -> Iterator[RawRow]:
    """Tab-separated values, read as CSV with a tab delimiter."""
    return read_csv(path, limit, delimiter="\t")


# ---------------------------------------------------------------------------------------------------
# Parquet, datasets, directories, the hub


def _not_parquet(path: Path, exc: Exception) -> DataError:
    with path.open("rb") as handle:
        head = handle.read(SNIFF_BYTES)
        handle.seek(0, 2)
        size = handle.tell()
        handle.seek(max(0, size - 4))
        tail = handle.read(4)
    if head.startswith(b"PAR1") and tail != b"PAR1":
        reason = (
            "truncated or corrupt Parquet file (it starts like Parquet but has no PAR1 footer): the copy is "
            "probably incomplete; download or export it again"
        )
    elif head.startswith(b"PAR1"):
        reason = f"corrupt Parquet file ({exc}); export it again"
    else:
        kind, description = sniff(head)
        reason = (
            f"not a Parquet file (Parquet files start with the bytes PAR1); it looks like {description}: "
            f"{conversion_hint(kind, path.name)}"
        )
    return DataError(reason, file=str(path))


def read_parquet(path: Path, limit: int | None) -> Iterator[RawRow]:
    """One row per table row; the row number is the 1-based row index."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise _not_parquet(path, exc) from None
    row_number = 0
    try:
        for batch in parquet.iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                row_number += 1
                if limit is not None and row_number > limit:
                    return
                yield row_number, record
    except (pa.ArrowException, OSError) as exc:
        raise DataError(
            f"corrupt Parquet data after row {row_number} ({exc}); export the file again",
            file=str(path),
            row=row_number + 1,
        ) from None


def read_dataset(dataset: Any, limit: int | None) -> Iterator[RawRow]:
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    yield from enumerate(dataset, start=1)


def _pick_split(loaded: Any, split: str, file: str) -> Any:
    import datasets

    if isinstance(loaded, (datasets.DatasetDict, dict)):
        if split not in loaded:
            raise DataError(f"no split {split!r}; available splits: {', '.join(sorted(loaded))}", file=file)
        return loaded[split]
    return loaded


def load_directory(path: Path, split: str, subset: str | None) -> Any:
    """A ``datasets.save_to_disk`` directory, or a directory of data files (``subset`` names one of
    the configurations a dataset repository's README declares)."""
    import datasets

    file = str(path)
    if any((path / marker).exists() for marker in _DATASET_DIR_MARKERS):
        if subset is not None:
            raise DataError(
                f"subset {subset!r} given, but this is a saved `datasets` directory, which has no subsets; "
                "leave data.subset unset",
                file=file,
            )
        try:
            return _pick_split(datasets.load_from_disk(file), split, file)
        except DataError:
            raise
        except Exception as exc:  # a damaged save_to_disk directory
            raise DataError(
                f"cannot read this saved `datasets` directory ({type(exc).__name__}: {exc}); save it again",
                file=file,
            ) from exc
    found = [p for p in path.rglob("*") if p.is_file() and not _hidden(p.relative_to(path))]
    data_files = [p for p in found if p.suffix.lower() in DIRECTORY_DATA_SUFFIXES]
    if not data_files:
        listing = ", ".join(sorted(str(p.relative_to(path)) for p in found)[:5]) or "nothing"
        more = f" and {len(found) - 5} more" if len(found) > 5 else ""
        raise DataError(
            f"directory with no data files (it holds {listing}{more}); point data.path at a data file, a "
            f"directory written by datasets.save_to_disk, or a directory of {', '.join(DIRECTORY_DATA_SUFFIXES)} "
            "files",
            file=file,
        )
    args = (file,) if subset is None else (file, subset)
    try:
        loaded = datasets.load_dataset(*args, split=None)
    except Exception as exc:  # unreadable files, mixed columns, unknown subset: the user's data
        raise DataError(
            f"datasets.load_dataset could not read this directory ({type(exc).__name__}: {exc})", file=file
        ) from exc
    return _pick_split(loaded, split, file)


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def load_hub_dataset(name: str, split: str, subset: str | None) -> Any:
    """``datasets.load_dataset(name, subset, split=split)`` (``subset`` left out when unset)."""
    import datasets

    args = (name,) if subset is None else (name, subset)
    try:
        return datasets.load_dataset(*args, split=split)
    except Exception as exc:  # offline, unknown id, missing split: all end the same way for the user
        which = f"split {split!r}" + (f", subset {subset!r}" if subset is not None else "")
        reason = (
            f"not an existing local path, and loading it as a Hugging Face hub dataset ({which}) "
            f"failed: {type(exc).__name__}: {exc}. Hub ids need network access or a populated datasets cache."
        )
        raise DataError(reason, file=name) from exc


def looks_like_local_path(text: str) -> bool:
    return (
        text.lower().endswith(FILE_SUFFIXES + _OTHER_FILE_SUFFIXES)
        or text.startswith((".", "/", "~"))
        or "\\" in text
        or text.count("/") > 1
    )


_READERS = {
    ".jsonl": read_jsonl,
    ".json": read_json,
    ".csv": read_csv,
    ".tsv": read_tsv,
    ".parquet": read_parquet,
}


def read_raw(path_text: str, split: str, subset: str | None, limit: int | None) -> Iterator[RawRow]:
    """The raw rows of ``path_text`` (see the module docstring for the forms it takes)."""
    if path_text.startswith(BUILTIN_PREFIX):
        path = resource_path(path_text[len(BUILTIN_PREFIX) :])
    else:
        path = Path(path_text).expanduser()
    if path.is_dir():
        return read_dataset(load_directory(path, split, subset), limit)
    if path.is_file():
        reader = _READERS.get(path.suffix.lower())
        if reader is None:
            raise unsupported_file(path, path_text)
        if subset is not None:
            raise DataError(
                f"subset {subset!r} given, but this is a single file, which has no subsets; leave data.subset "
                "unset (subsets are configurations of hub datasets)",
                file=path_text,
            )
        return reader(path, limit)
    if looks_like_local_path(path_text):
        raise DataError("file not found", file=path_text)
    return read_dataset(load_hub_dataset(path_text, split, subset), limit)
