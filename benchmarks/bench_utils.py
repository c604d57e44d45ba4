"""Shared helpers for the benchmark scripts: worker subprocesses, memory, step timing, tables.

Every measured run happens in a fresh subprocess (``python SCRIPT --worker ... --result FILE``) so that
its peak resident memory is its own; the worker writes one JSON object to FILE and the parent collects
them. Nothing here is imported by the library.
"""

from __future__ import annotations

import functools
import json
import os
import resource
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "testing"))  # the test helpers (not installed)
from distalign_testing.processes import run_in_own_group  # noqa: E402

# Keep every worker offline and quiet in the same way, whatever the framework.
WORKER_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONWARNINGS": "ignore",
}


def _status_kib(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (VmHWM; ru_maxrss where /proc is missing)."""
    kib = _status_kib("VmHWM")
    if kib is None:
        kib = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux
    return kib / 1024.0


def current_rss_mb() -> float:
    """Current resident set size of this process, in MB."""
    kib = _status_kib("VmRSS")
    return (kib or 0.0) / 1024.0


def load_average() -> str:
    """The 1/5/15-minute load averages, for noting how busy the shared machine was."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def command_line() -> str:
    """How this script was invoked, as a copy-pastable shell command."""
    script = os.path.relpath(sys.argv[0]) if os.path.isabs(sys.argv[0]) else sys.argv[0]
    return shlex.join(["python", script, *sys.argv[1:]])


def run_worker(
    script: str,
    worker_args: Sequence[str],
    *,
    timeout: float,
    env: dict[str, str] | None = None,
    launcher: Sequence[str] | None = None,
) -> dict:
    """Run ``python script --worker ... --result FILE`` in a fresh process; return the JSON it wrote.

    ``launcher`` replaces ``python`` (e.g. ``python -m torch.distributed.run --nproc_per_node 2``). Files
    ``FILE.rank<N>`` that ranks write next to FILE are collected into ``result["ranks"]``, in rank order.
    """
    with tempfile.TemporaryDirectory(prefix="distalign_bench_") as scratch:
        result_path = Path(scratch) / "result.json"
        command = [*(launcher or [sys.executable]), script, *worker_args]
        command += ["--result", str(result_path), "--scratch", scratch]
        full_env = {**os.environ, **WORKER_ENV, **(env or {})}
        started = time.perf_counter()
        completed = run_in_own_group(command, timeout=timeout, env=full_env)
        if completed.returncode != 0 or not result_path.exists():
            tail = (completed.stdout + completed.stderr)[-4000:]
            raise RuntimeError(f"worker failed (exit {completed.returncode}): {shlex.join(command)}\n{tail}")
        result = json.loads(result_path.read_text())
        rank_files = sorted(
            Path(scratch).glob("result.json.rank*"), key=lambda p: int(p.name.rsplit("rank", 1)[1])
        )
        if rank_files:
            result["ranks"] = [json.loads(p.read_text()) for p in rank_files]
    result["process_wall_s"] = time.perf_counter() - started
    return result


def thread_env(threads: int) -> dict[str, str]:
    """Environment pinning a worker's intra-op thread pools (torch reads OMP_NUM_THREADS at start-up)."""
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def write_result(path: str | Path, result: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(result, indent=1))


def steady_state(step_times: Sequence[float], warmup: int) -> dict[str, float]:
    """Throughput over the steps after ``warmup``: total time / steps (not a mean of rates).

    ``step_times[k]`` is the wall time of optimizer step k + 1 (end of previous step to end of this one).
    """
    measured = list(step_times[warmup:])
    if not measured:
        raise ValueError(f"no steps left to measure after {warmup} warm-up steps; raise --steps")
    total = sum(measured)
    return {
        "steps_per_s": len(measured) / total,
        "s_per_step": total / len(measured),
        "median_step_s": statistics.median(measured),
        "measured_steps": len(measured),
    }


def distalign_step_times(run_dir: str | Path) -> tuple[list[float], list[float]]:
    """Per-step wall times and attended tokens per step from a run's ``metrics.jsonl`` (log_every=1).

    The engine stamps each record with the rate since the previous record, so with one record per step
    ``1 / steps_per_s`` is that step's wall time (the first one also covers the run's setup).
    """
    times, tokens = [], []
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        seconds = 1.0 / record["steps_per_s"]
        times.append(seconds)
        tokens.append(record["tokens_per_s"] * seconds)
    return times, tokens


def call_after(owner: Any, name: str, hook: Callable[[], None]) -> None:
    """Make every call of ``owner.name`` (a class or an instance) run ``hook()`` after it: measurement
    only, the method's own behaviour and result are unchanged."""
    method = getattr(owner, name)

    @functools.wraps(method)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        result = method(*args, **kwargs)
        hook()
        return result

    setattr(owner, name, wrapped)


def apply_preset(args: Any, preset: dict[str, Any]) -> None:
    """Set every argument the command line left unset (None) from ``preset``."""
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)


def median_of(results: Iterable[dict], key: str) -> float:
    values = [r[key] for r in results if r.get(key) is not None]
    return statistics.median(values) if values else float("nan")


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub-markdown table; floats get 3 significant decimals."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "n/a" if value != value else f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def environment_note(worker_threads: int | None = None) -> str:
    """Versions, CPU count and intra-op threads (of the worker processes when given, else this one's)."""
    import torch
    import transformers

    threads = (
        f"{worker_threads} intra-op thread(s) per worker process"
        if worker_threads is not None
        else f"torch threads {torch.get_num_threads()}"
    )
    return (
        f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{os.cpu_count()} CPUs, {threads}"
    )
