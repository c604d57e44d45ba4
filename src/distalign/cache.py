"""Cache directory location and build-once, race-safe directory creation.

Every artifact distalign caches (the tiny model, converted GGUF models, reference log-probs) is a
directory that is built in a private temporary directory next to its final place and then renamed
into place. A rename within one filesystem is atomic, so a reader sees either no directory or a
complete one; a ``COMPLETE`` marker written last additionally rejects directories that were put there
by anything else (a copy interrupted half-way, a user's ``mkdir``). An advisory file lock keeps
concurrent processes (the ranks of a distributed run) from doing the same expensive build twice; the
rename alone keeps them correct where locks are unreliable (some network filesystems).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The distalign cache directory: ``cache_dir``, else ``$DISTALIGN_CACHE``, else ``~/.cache/distalign``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env_dir = os.environ.get("DISTALIGN_CACHE")
    if env_dir:
        return Path(env_dir).expanduser()
    return Path.home() / ".cache" / "distalign"


def settings_key(settings: dict[str, Any], length: int = 16) -> str:
    """A short hex digest of a JSON-serialisable settings dict (key order does not matter)."""
    canonical = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:length]


def is_complete(directory: Path) -> bool:
    """Whether ``directory`` was finished by :func:`build_once` (its marker file exists)."""
    return (directory / COMPLETE_MARKER).is_file()


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # no advisory locks (Windows): the atomic rename still keeps results correct
        yield
        return
    with open(lock_path, "a+") as lock_file:
        fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)


def remove_directory(directory: Path) -> None:
    """Delete ``directory`` by first renaming it aside, so no reader ever sees it half-deleted."""
    if not directory.exists():
        return
    doomed = directory.with_name(f".{directory.name}.removing-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(directory, doomed)
    except FileNotFoundError:  # someone else removed it first
        return
    shutil.rmtree(doomed, ignore_errors=True)


def publish_directory(staging: Path, final_dir: Path, *, replace: bool) -> bool:
    """Rename the finished ``staging`` directory to ``final_dir``.

    With ``replace`` an existing ``final_dir`` is swapped out (old one renamed aside, then deleted);
    without it an existing complete ``final_dir`` wins and ``staging`` is discarded. Returns whether
    ``staging`` became ``final_dir``.
    """
    if replace:
        remove_directory(final_dir)
    try:
        os.rename(staging, final_dir)
        return True
    except OSError:
        # A concurrent writer published first (rename onto a non-empty directory fails on POSIX).
        if not is_complete(final_dir):
            raise
        shutil.rmtree(staging, ignore_errors=True)
        return False


def require_saved_model(directory: Path) -> None:
    """Raise unless ``save_pretrained`` left a model's config and weights in ``directory``.

    transformers (5.24 and 5.25 at least) returns from ``save_pretrained`` without writing the model on
    any process but rank 0 once a torch.distributed process group exists; the tokenizer is still
    written. A cached build that another rank won the lock for would then be marked complete without
    weights, and every later load would fail. distalign builds its cached models before the process
    group starts (``build_cached_model`` in the engine); this keeps any other path from caching a
    broken directory."""
    has_weights = any(directory.glob("*.safetensors")) or any(directory.glob("*.bin"))
    if not (directory / "config.json").is_file() or not has_weights:
        raise RuntimeError(
            f"saving the model into {directory} wrote no config or weights: transformers saves models "
            "only on rank 0 of a torch.distributed process group; build cached models before the "
            "process group starts"
        )


def build_once(final_dir: str | os.PathLike[str], build: Callable[[Path], None]) -> Path:
    """Return ``final_dir``, first building it with ``build(staging_dir)`` unless it is already complete.

    ``build`` writes the artifact's files into the empty staging directory it is given; the directory
    is then marked complete and renamed to ``final_dir`` atomically. An incomplete ``final_dir`` (no
    marker) is removed and rebuilt. Safe when several processes call this at the same time.
    """
    final_dir = Path(final_dir)
    if is_complete(final_dir):
        return final_dir
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(final_dir.parent / f".{final_dir.name}.lock"):
        if is_complete(final_dir):  # built by the process that held the lock before us
            return final_dir
        if final_dir.exists():
            logger.warning("removing incomplete cache directory %s and rebuilding it", final_dir)
            remove_directory(final_dir)
        staging = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.tmp-", dir=final_dir.parent))
        try:
            build(staging)
            (staging / COMPLETE_MARKER).write_text("ok\n")
            publish_directory(staging, final_dir, replace=False)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return final_dir
