"""What a data file that cannot be read as it claims really is, and what to do about it.

``sniff`` recognises a file's content from its first bytes (JSON lines, a JSON array or object, CSV,
Parquet, Excel/zip, gzip, UTF-16, binary); ``conversion_hint`` says how to turn it into a format
``load_rows`` reads; ``decode_utf8`` decodes text and, for bytes that are not UTF-8, names the row, the
byte offset and a likely encoding. Used by ``readers.py``; every problem is a ``DataError``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distalign.data.formats import DataError

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
UTF8_BOM = b"\xef\xbb\xbf"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
SNIFF_BYTES = 4096


def looks_utf16(head: bytes) -> bool:
    start = head[:64]
    return head.startswith(_UTF16_BOMS) or (len(start) >= 4 and start.count(0) >= len(start) // 4)


def sniff(head: bytes) -> tuple[str, str]:
    """``(kind, description)`` of what the first bytes of a file look like; ``kind`` keys the
    conversion hints of :func:`conversion_hint`."""
    if not head.strip():
        return "empty", "an empty file"
    if head.startswith(b"PAR1"):
        return "parquet", "a Parquet file"
    if head.startswith(b"PK\x03\x04"):
        return "spreadsheet", "a ZIP archive (an .xlsx or .ods spreadsheet, or zipped files)"
    if head.startswith(b"\xd0\xcf\x11\xe0"):
        return "spreadsheet", "an Excel 97-2003 (.xls) workbook"
    if head.startswith(b"\x1f\x8b"):
        return "gzip", "gzip-compressed data"
    if looks_utf16(head):
        return "utf16", "UTF-16 encoded text"
    if b"\x00" in head:
        return "binary", "binary data"
    text = head.decode("utf-8", errors="replace").lstrip("\ufeff").lstrip()
    first_line = text.splitlines()[0] if text else ""
    if text.startswith("["):
        return "json_array", "a JSON array"
    if text.startswith("{"):
        return "jsonl", "JSON objects (JSON lines)"
    if "\t" in first_line:
        return "tsv", "tab-separated values"
    if "," in first_line:
        return "csv", "comma-separated values"
    return "text", "plain text"


def output_name(name: str, suffix: str) -> str:
    """The file a conversion of ``name`` writes: ``STEM.SUFFIX``, or ``STEM.fixed.SUFFIX`` if that is ``name``."""
    stem = Path(name).stem
    return f"{stem}.fixed{suffix}" if f"{stem}{suffix}" == name else f"{stem}{suffix}"


def conversion_hint(kind: str, name: str) -> str:
    """What to do with a file of ``kind`` (see :func:`sniff`) named ``name``."""
    stem = Path(name).stem
    jsonl, csv_name = output_name(name, ".jsonl"), output_name(name, ".csv")
    hints = {
        "empty": "the file is empty; write rows into it",
        "parquet": f"rename it to {stem}.parquet",
        "spreadsheet": f"export it as CSV (in the spreadsheet program: Save As > CSV UTF-8), or: python -c "
        f"\"import pandas as pd; pd.read_excel('{name}').to_csv('{csv_name}', index=False)\"",
        "gzip": f"decompress it first: gunzip -k {name}",
        "utf16": f"re-save it as UTF-8: iconv -f utf-16 -t utf-8 {name} > {stem}.utf8{Path(name).suffix}",
        "binary": "write the rows as JSON lines, CSV or Parquet",
        "json_array": f"write one object per line (JSON lines): jq -c '.[]' {name} > {jsonl}",
        "jsonl": f"rename it to {stem}.jsonl",
        "tsv": f"rename it to {stem}.tsv",
        "csv": f"rename it to {stem}.csv",
        "text": f"for prompt-only data with one prompt per line: jq -R -c '{{prompt: .}}' {name} > {jsonl}",
    }
    return hints[kind]


def file_head(path: Path) -> bytes:
    with path.open("rb") as handle:
        return handle.read(SNIFF_BYTES)


def unsupported_file(path: Path, shown: str) -> DataError:
    """The error for a file whose suffix this package does not read, saying what it looks like."""
    kind, description = sniff(file_head(path))
    supported = ", ".join(FILE_SUFFIXES)
    return DataError(
        f"unsupported file type {path.suffix or '(no suffix)'!r} (supported: {supported}, or a directory); "
        f"it looks like {description}: {conversion_hint(kind, path.name)}",
        file=shown,
    )


def refuse_binary(path: Path, head: bytes, expected: str) -> None:
    """A text container (JSONL/JSON/CSV) whose first bytes are UTF-16, compressed or binary."""
    kind, description = sniff(head)
    if kind in ("parquet", "spreadsheet", "gzip", "utf16", "binary"):
        raise DataError(
            f"not {expected}: the file holds {description}; {conversion_hint(kind, path.name)}",
            file=str(path),
        )


# ---------------------------------------------------------------------------------------------------
# Text decoding


def guess_encoding(sample: bytes) -> str:
    """The likeliest legacy encoding of bytes that are not UTF-8, named as iconv knows it."""
    try:
        sample.decode("cp1252")
    except UnicodeDecodeError:
        return "latin1"
    # bytes 0x80-0x9f are control codes in latin1 but curly quotes, dashes, euro in Windows-1252
    return "cp1252" if any(0x80 <= byte <= 0x9F for byte in sample) else "latin1"


def not_utf8(path: Path, sample: bytes, byte: int, offset: int, row: int | None, what: str = "") -> DataError:
    encoding = guess_encoding(sample)
    fixed = f"{path.stem}.utf8{path.suffix}"
    return DataError(
        f"not UTF-8 (byte 0x{byte:02x} at offset {offset}{what}): re-save the file as UTF-8, e.g. "
        f"iconv -f {encoding} -t utf-8 {path.name} > {fixed}",
        file=str(path),
        row=row,
    )


def decode_utf8(path: Path, data: bytes, locate_row: Any) -> str:
    """``data`` as UTF-8 text without a byte-order mark; ``locate_row(offset)`` gives the row (or
    ``None``) reported for an undecodable byte at that offset of ``data``."""
    skip = len(UTF8_BOM) if data.startswith(UTF8_BOM) else 0
    try:
        return data[skip:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = skip + exc.start
        line = data.count(b"\n", 0, offset) + 1
        row = locate_row(data, offset)
        raise not_utf8(path, data, data[offset], offset, row, f", line {line}") from None


# ---------------------------------------------------------------------------------------------------
# JSON
