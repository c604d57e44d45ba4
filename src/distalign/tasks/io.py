"""Writing generated datasets as JSONL next to a provenance record (what made them, and how)."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

_VERSIONED = ("distalign", "torch", "transformers", "vaderSentiment", "textstat")


def library_versions() -> dict[str, str]:
    """Versions of Python and the libraries that shape generated data ("not installed" when absent)."""
    versions = {"python": platform.python_version()}
    for package in _VERSIONED:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def provenance_path(path: str | Path) -> Path:
    """``data.jsonl`` -> ``data.provenance.json`` (the sidecar written by :func:`write_jsonl_with_provenance`)."""
    return Path(path).with_suffix(".provenance.json")


def atomic_write(path: Path, text: str) -> None:
    # Temp file in the same directory + rename: readers see the old file or the whole new one.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_jsonl_with_provenance(
    rows: Sequence[dict[str, Any]], path: str | Path, provenance: dict[str, Any]
) -> Path:
    """Write ``rows`` as JSONL (UTF-8, one object per line) to ``path`` and a provenance sidecar.

    The sidecar, ``path.with_suffix(".provenance.json")``, holds ``provenance`` (the caller's model,
    seed, settings, counts) plus ``rows`` (count), ``file``, ``sha256`` (of the JSONL bytes),
    ``created_at`` (UTC, ISO 8601) and ``versions``. Both files are written atomically, data first.
    Returns the JSONL path.
    """
    path = Path(path)
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    atomic_write(path, text)
    record = {
        **provenance,
        "rows": len(rows),
        "file": path.name,
        "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": library_versions(),
    }
    atomic_write(provenance_path(path), json.dumps(record, indent=2, ensure_ascii=False, default=str) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file; a malformed line raises ``ValueError`` naming the file and line number."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
    return rows
