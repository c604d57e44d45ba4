"""A built-in distribution-shift task: preference pairs from a mixture of response sources.

DoRA's setting (docs/robust.md): the training responses come from a mixture ``P = alpha Q_0 +
sum_i beta_i Q_i`` of a *golden* source ``Q_0`` (the distribution we want the policy to serve) and
synthetic sources ``Q_i``. Here every source is the same base model sampled differently:

* ``golden``: the task's own prompt, temperature 1 (what ``distalign eval`` samples from);
* ``hot``: temperature 1.6 — rambling, less coherent text;
* ``hype``: a hidden system prompt asking for an over-the-top advertising voice;
* ``terse``: a hidden system prompt asking for a few words only.

Each training prompt is assigned one source (proportions from :data:`DEFAULT_SOURCES`, by default
equal, so ``alpha = 1/4`` as in the paper's released configuration); the source samples ``k``
completions, the gold reward labels the best-vs-worst pair, and the row records its ``source`` (also
as its ``group``, for group DRO). The row's prompt is always the task's plain prompt: the style instruction is a property of the generator,
hidden from the learner, as with real synthetic data. ``label_noise`` flips that fraction of pairs
uniformly at random (``label_flipped`` records which), for robustness experiments.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from distalign.tasks.base import Split, Task
from distalign.tasks.builders import SampleFn, pair_best_worst, sample_and_score, select_prompts


@dataclass(frozen=True)
class ShiftSource:
    """One response source: a sampling temperature and an optional hidden system prompt (which
    replaces the task's own while sampling)."""

    name: str
    proportion: float
    temperature: float = 1.0
    system_prompt: str | None = None


GOLDEN = "golden"
DEFAULT_SOURCES: tuple[ShiftSource, ...] = (
    ShiftSource(GOLDEN, 0.25),
    ShiftSource("hot", 0.25, temperature=1.6),
    ShiftSource(
        "hype",
        0.25,
        system_prompt="Answer like an over-the-top advertisement: capital letters, exclamation marks, superlatives.",
    ),
    ShiftSource("terse", 0.25, system_prompt="Answer in at most five words."),
)


def check_sources(sources: Sequence[ShiftSource]) -> None:
    names = [s.name for s in sources]
    if GOLDEN not in names or len(set(names)) != len(names):
        raise ValueError(f"shift sources need unique names including {GOLDEN!r}, got {names}")
    total = sum(s.proportion for s in sources)
    if any(s.proportion <= 0 for s in sources) or abs(total - 1.0) > 1e-9:
        raise ValueError(f"shift source proportions must be positive and sum to 1, got {total}")


def source_task(task: Task, source: ShiftSource) -> Task:
    """The task as ``source`` samples it (its hidden system prompt in place of the task's)."""
    return dataclasses.replace(task, system_prompt=source.system_prompt) if source.system_prompt else task


def assign_sources(num_prompts: int, sources: Sequence[ShiftSource], seed: int) -> list[str]:
    """A source per prompt: exact proportions (rounded), in a seeded random order."""
    counts = [int(round(s.proportion * num_prompts)) for s in sources]
    counts[0] += num_prompts - sum(counts)
    names = [s.name for s, c in zip(sources, counts) for _ in range(c)]
    order = np.random.default_rng(np.random.SeedSequence([seed, 1])).permutation(num_prompts)
    return [names[i] for i in order]


def build_shift_dataset(
    task: Task,
    samplers: dict[str, SampleFn],
    *,
    sources: Sequence[ShiftSource] = DEFAULT_SOURCES,
    k: int = 2,
    seed: int = 0,
    num_prompts: int | None = None,
    label_noise: float = 0.0,
    split: Split = "train",
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Paired rows ``{prompt, chosen, rejected, chosen_reward, rejected_reward, source, label_flipped}``
    and counts per source. ``samplers[name]`` samples for source ``name`` (see
    :func:`source_task` for the prompt it must condition on)."""
    check_sources(sources)
    if not 0.0 <= label_noise < 0.5:
        raise ValueError(f"label_noise={label_noise} must lie in [0, 0.5)")
    missing = {s.name for s in sources} - set(samplers)
    if missing:
        raise ValueError(f"no sampler for source(s) {sorted(missing)}")
    prompts = select_prompts(task, split=split, num_prompts=num_prompts, seed=seed)
    assigned = assign_sources(len(prompts), sources, seed)
    rows: list[dict[str, Any]] = []
    counts: dict[str, Any] = {"prompts": len(prompts), "ties_skipped": 0, "flipped": 0, "per_source": {}}
    for source in sources:
        mine = [p for p, name in zip(prompts, assigned) if name == source.name]
        samples = sample_and_score(source_task(task, source), samplers[source.name], mine, k=k)
        kept = 0
        for listwise in samples:
            row, _ = pair_best_worst(listwise)
            if row is None:
                counts["ties_skipped"] += 1
                continue
            rows.append({**row, "source": source.name, "group": source.name, "label_flipped": False})
            kept += 1
        counts["per_source"][source.name] = kept
    # Noise is drawn after all sources are sampled, in a fixed row order, so a noise level changes
    # which labels flip and nothing else.
    rows = flip_labels(rows, label_noise, seed)
    counts["flipped"] = sum(row["label_flipped"] for row in rows)
    counts["pairs"] = len(rows)
    return rows, counts


def flip_labels(rows: Sequence[dict[str, Any]], rate: float, seed: int) -> list[dict[str, Any]]:
    """Copies of paired ``rows`` with a ``rate`` fraction of labels flipped at random (seeded); flips
    toggle ``label_flipped``. For building noisy variants of one sampled dataset."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 3]))
    out = []
    for row in rows:
        row = dict(row)
        if rng.random() < rate:
            row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
            if "chosen_reward" in row:
                row["chosen_reward"], row["rejected_reward"] = row["rejected_reward"], row["chosen_reward"]
            row["label_flipped"] = not row.get("label_flipped", False)
        out.append(row)
    return out
