"""Resumable sampling of a shift dataset: each source's prompts in chunks, each chunk saved on its own.

:func:`~distalign.tasks.shift.build_shift_dataset` samples everything in one call, with one sampler
stream per source. A large dataset on a CPU takes hours, so :func:`sample_shift_chunks` cuts each
source's prompts into chunks of ``chunk_size`` and gives every chunk its own sampler, seeded from
``(seed, source index, chunk index)``: a chunk's samples depend on nothing sampled before it. Each
finished chunk is written atomically to ``work_dir/SOURCE-NNNN.json``; a run that is killed and started
again with the same settings loads the finished chunks and samples only the rest, so it ends with
exactly the rows an uninterrupted run gives. ``work_dir/plan.json`` holds the settings; a restart with
different settings is refused rather than mixing two datasets. (Chunked sampling draws other samples
than ``build_shift_dataset``'s per-source streams: the two are different, each reproducible, datasets.)
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from distalign.tasks.base import Split, Task
from distalign.tasks.builders import SampleFn, sample_and_score
from distalign.tasks.io import atomic_write
from distalign.tasks.shift import (
    ShiftSource,
    check_sources,
    pair_shift_samples,
    source_prompts,
    source_task,
)

#: ``make_sampler(source, sampler_seed) -> SampleFn`` for one chunk of ``source``'s prompts.
SamplerFactory = Callable[[ShiftSource, int], SampleFn]
#: ``on_chunk(source name, prompts in the chunk, whether it was loaded from disk)``.
ChunkCallback = Callable[[str, int, bool], None]


def chunk_seed(seed: int, source_index: int, chunk_index: int) -> int:
    """The sampler seed of one chunk: independent streams per (seed, source, chunk)."""
    state = np.random.SeedSequence([seed, source_index, chunk_index]).generate_state(1, dtype=np.uint32)
    return int(state[0])


def shift_plan(
    task: Task,
    sources: Sequence[ShiftSource],
    *,
    k: int,
    seed: int,
    num_prompts: int | None,
    split: Split,
    chunk_size: int,
    sampling: dict[str, Any],
) -> dict[str, Any]:
    """Everything that decides the samples; a resumed run must match it exactly."""
    return {
        "task": task.name,
        "task_settings": task.settings,
        "sources": [dataclasses.asdict(s) for s in sources],
        "k": k,
        "seed": seed,
        "num_prompts": num_prompts,
        "split": split,
        "chunk_size": chunk_size,
        "sampling": sampling,
    }


def check_plan(work_dir: Path, plan: dict[str, Any]) -> None:
    """Write ``plan.json`` in a fresh ``work_dir``; refuse one holding chunks of another plan."""
    path = work_dir / "plan.json"
    wanted = json.loads(json.dumps(plan, default=str))
    if path.exists():
        found = json.loads(path.read_text(encoding="utf-8"))
        if found != wanted:
            changed = sorted(key for key in {**found, **wanted} if found.get(key) != wanted.get(key))
            raise ValueError(
                f"{work_dir} holds chunks sampled with other settings ({', '.join(changed)}); "
                "use another directory or delete it"
            )
        return
    atomic_write(path, json.dumps(wanted, indent=2) + "\n")


def sample_shift_chunks(
    task: Task,
    make_sampler: SamplerFactory,
    work_dir: str | Path,
    *,
    sources: Sequence[ShiftSource],
    k: int,
    seed: int = 0,
    num_prompts: int | None = None,
    split: Split = "train",
    chunk_size: int = 32,
    sampling: dict[str, Any] | None = None,
    on_chunk: ChunkCallback | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Each source's listwise samples ``{prompt, responses, scores}``, chunk by chunk, resuming from
    the chunks already in ``work_dir``. ``sampling`` describes the sampler (recorded in the plan)."""
    check_sources(sources)
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be at least 1")
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    plan = shift_plan(
        task,
        sources,
        k=k,
        seed=seed,
        num_prompts=num_prompts,
        split=split,
        chunk_size=chunk_size,
        sampling=sampling or {},
    )
    check_plan(work_dir, plan)
    samples: dict[str, list[dict[str, Any]]] = {}
    assigned = source_prompts(task, sources, seed=seed, num_prompts=num_prompts, split=split)
    for source_index, (source, mine) in enumerate(assigned):
        samples[source.name] = []
        for chunk_index, start in enumerate(range(0, len(mine), chunk_size)):
            prompts = mine[start : start + chunk_size]
            path = work_dir / f"{source.name}-{chunk_index:04d}.json"
            loaded = path.exists()
            if loaded:
                rows = json.loads(path.read_text(encoding="utf-8"))
                if [row["prompt"] for row in rows] != prompts:
                    raise ValueError(f"{path} holds other prompts than this plan assigns it")
            else:
                sampler = make_sampler(source, chunk_seed(seed, source_index, chunk_index))
                rows = sample_and_score(source_task(task, source), sampler, prompts, k=k)
                atomic_write(path, json.dumps(rows, ensure_ascii=False) + "\n")
            samples[source.name] += rows
            if on_chunk is not None:
                on_chunk(source.name, len(prompts), loaded)
    return samples


def build_shift_dataset_chunked(
    task: Task,
    make_sampler: SamplerFactory,
    work_dir: str | Path,
    *,
    sources: Sequence[ShiftSource],
    k: int = 2,
    seed: int = 0,
    num_prompts: int | None = None,
    label_noise: float = 0.0,
    split: Split = "train",
    chunk_size: int = 32,
    sampling: dict[str, Any] | None = None,
    on_chunk: ChunkCallback | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """:func:`~distalign.tasks.shift.build_shift_dataset`'s rows and counts, sampled resumably by
    :func:`sample_shift_chunks` (label noise drawn at the end, as there)."""
    if not 0.0 <= label_noise < 0.5:
        raise ValueError(f"label_noise={label_noise} must lie in [0, 0.5)")
    samples = sample_shift_chunks(
        task,
        make_sampler,
        work_dir,
        sources=sources,
        k=k,
        seed=seed,
        num_prompts=num_prompts,
        split=split,
        chunk_size=chunk_size,
        sampling=sampling,
        on_chunk=on_chunk,
    )
    return pair_shift_samples(samples, label_noise=label_noise, seed=seed)
