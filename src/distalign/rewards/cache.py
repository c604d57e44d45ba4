"""A cache of raw reward scores: in memory, optionally backed by SQLite on disk.

Entries are keyed by ``(fingerprint, text_key)``: the reward's fingerprint (name + resolved settings)
and a hash of the (prompt, completion) pair. Only *raw* scores are stored, so changing a reward's
direction or normalisation reuses them. The on-disk store is one SQLite file (``rewards.sqlite``) in
``cache_dir``; SQLite's own locking makes it safe to share between processes (e.g. accelerate ranks),
and every write is a transaction, so an interrupted run never leaves a half-written entry.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterable
from pathlib import Path

_SCHEMA = "CREATE TABLE IF NOT EXISTS scores (fingerprint TEXT, text_key TEXT, value REAL, PRIMARY KEY (fingerprint, text_key))"
_CHUNK = 500  # stays below SQLite's bound-parameter limit on old builds (999)


def text_key(prompt: str, completion: str) -> str:
    """Hash of a (prompt, completion) pair; the prompt length prefix keeps ("ab","c") apart from ("a","bc")."""
    blob = f"{len(prompt)}:{prompt}{completion}".encode()
    return hashlib.blake2b(blob, digest_size=16).hexdigest()


class RewardCache:
    """Raw reward scores by (reward fingerprint, text key); memory only when ``cache_dir`` is ``None``."""

    def __init__(self, cache_dir: str | Path | None = None) -> None:
        self._memory: dict[tuple[str, str], float] = {}
        self.path: Path | None = None
        if cache_dir is not None:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            self.path = Path(cache_dir) / "rewards.sqlite"
            conn = self._connect()
            try:
                with conn:
                    conn.execute(_SCHEMA)
            finally:
                conn.close()

    def _connect(self) -> sqlite3.Connection:
        # A fresh connection per operation: connections must not cross fork() into worker processes.
        assert self.path is not None
        return sqlite3.connect(self.path, timeout=60)

    def __len__(self) -> int:
        return len(self._memory)

    def lookup(self, fingerprint: str, keys: Iterable[str]) -> dict[str, float]:
        """Known scores among ``keys`` (memory first, then disk; disk hits are kept in memory)."""
        found: dict[str, float] = {}
        absent: list[str] = []
        for key in dict.fromkeys(keys):
            value = self._memory.get((fingerprint, key))
            if value is None:
                absent.append(key)
            else:
                found[key] = value
        if absent and self.path is not None:
            conn = self._connect()
            try:
                for start in range(0, len(absent), _CHUNK):
                    chunk = absent[start : start + _CHUNK]
                    marks = ",".join("?" * len(chunk))
                    rows = conn.execute(
                        f"SELECT text_key, value FROM scores WHERE fingerprint = ? AND text_key IN ({marks})",
                        [fingerprint, *chunk],
                    ).fetchall()
                    for key, value in rows:
                        found[key] = float(value)
                        self._memory[(fingerprint, key)] = float(value)
            finally:
                conn.close()
        return found

    def store(self, fingerprint: str, items: dict[str, float]) -> None:
        """Remember ``items`` (text key -> raw score) for ``fingerprint`` in memory and on disk."""
        for key, value in items.items():
            self._memory[(fingerprint, key)] = float(value)
        if self.path is not None and items:
            conn = self._connect()
            try:
                with conn:  # one transaction: all of the batch or none of it
                    conn.executemany(
                        "INSERT OR REPLACE INTO scores VALUES (?, ?, ?)",
                        [(fingerprint, key, float(value)) for key, value in items.items()],
                    )
            finally:
                conn.close()

    def clear_memory(self) -> None:
        """Drop the in-memory entries (the on-disk store is kept)."""
        self._memory.clear()
