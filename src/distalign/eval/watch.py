"""``distalign report --watch``: rewrite the report whenever a run's inputs change, by polling.

A run's inputs are the files the report reads that grow or appear during a long run: ``config.yaml``,
``metrics.jsonl``, ``eval/eval.json`` and ``eval/samples.jsonl``. Their state (modification time and
size, or absence) is the run's *signature*; :func:`regenerate_if_changed` rewrites the page once when
the signature differs from the last one, and :func:`watch` polls that every ``interval`` seconds.
The page then carries a ``<meta http-equiv="refresh">`` so an open browser tab follows along.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from distalign.eval.report import write_report

#: Files of a run directory whose change triggers a new report.
WATCHED = ("config.yaml", "metrics.jsonl", "eval/eval.json", "eval/samples.jsonl")

Signature = tuple[tuple[str, int, int] | None, ...]


def input_signature(run_dirs: Sequence[str | Path]) -> Signature:
    """``(path, mtime_ns, size)`` of every watched file of every run, ``None`` for a missing one."""
    entries: list[tuple[str, int, int] | None] = []
    for run_dir in run_dirs:
        for name in WATCHED:
            path = Path(run_dir) / name
            try:
                stat = path.stat()
            except OSError:
                entries.append(None)
                continue
            entries.append((str(path), stat.st_mtime_ns, stat.st_size))
    return tuple(entries)


def regenerate_if_changed(
    run_dirs: Sequence[str | Path],
    output: str | Path,
    last: Signature | None,
    *,
    refresh_seconds: float | None = None,
    on_error: Callable[[Exception], None] | None = None,
) -> tuple[Signature, Path | None]:
    """Write the report when the runs' inputs differ from ``last`` (``None``: always). Returns the
    signature the page was written from (or the unchanged one) and the page, ``None`` when unchanged.
    The signature is taken before writing, so a change during the write triggers the next one. With
    ``on_error``, a failed write is passed to it and retried at the next change instead of raising."""
    current = input_signature(run_dirs)
    if current == last:
        return current, None
    try:
        return current, write_report(run_dirs, output, refresh_seconds=refresh_seconds)
    except Exception as err:
        if on_error is None:
            raise
        on_error(err)
        return current, None


def watch(
    run_dirs: Sequence[str | Path],
    output: str | Path,
    *,
    interval: float = 10.0,
    on_write: Callable[[Path], None] = lambda page: None,
    on_error: Callable[[Exception], None] = lambda err: None,
    should_stop: Callable[[], bool] = lambda: False,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Poll every ``interval`` seconds and rewrite the report on change (the page reloads itself every
    ``interval`` seconds too), calling ``on_write(page)`` after each write and ``on_error(err)`` after
    a failed one (a long run should not lose its live view to one bad moment), until ``should_stop()``
    (checked after each poll) or Ctrl-C (KeyboardInterrupt, left to the caller). Returns the number
    of writes."""
    if interval <= 0:
        raise ValueError(f"interval must be positive, got {interval}")
    signature: Signature | None = None
    writes = 0
    while True:
        signature, page = regenerate_if_changed(
            run_dirs, output, signature, refresh_seconds=interval, on_error=on_error
        )
        if page is not None:
            writes += 1
            on_write(page)
        if should_stop():
            return writes
        sleep(interval)
