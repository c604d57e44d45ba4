"""A built-in distribution-shift task: preference pairs from a mixture of response sources.

DoRA's setting (docs/robust.md): the training responses come from a mixture ``P = alpha Q_0 +
sum_i beta_i Q_i`` of a *golden* source ``Q_0`` (the distribution we want the policy to serve) and
synthetic sources ``Q_i``. Here every source is the same base model sampled differently:

* ``golden``: the task's own prompt, temperature 1 (what ``distalign eval`` samples from);
* ``hot``: temperature 1.6 — rambling, less coherent text;
* ``hype``: a hidden system prompt asking for an over-the-top advertising voice;
* ``terse``: a hidden system prompt asking for a few words only.

:data:`WIDE_SOURCES` (``--sources wide``) swaps the two styles SmolLM2-135M barely shows for ones a
classifier can see: ``cold`` (temperature 0.3) and ``pirate`` (a hidden instruction after the user's
prompt). Each training prompt is assigned one source (proportions from the source set, equal in both,
so ``alpha = 1/4`` as in the paper's released configuration); the source samples ``k``
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
    """One response source: a sampling temperature, an optional hidden system prompt (which replaces
    the task's own while sampling) and an optional hidden ``instruction`` (appended to the user's
    prompt while sampling; SmolLM2-135M follows these far more often than system prompts)."""

    name: str
    proportion: float
    temperature: float = 1.0
    system_prompt: str | None = None
    instruction: str | None = None


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


#: A mixture a classifier can see (checked on SmolLM2-135M-Instruct samples): ``hot`` writes
#: incoherent word salad; ``cold`` fluent, generic, repetitive text; ``pirate`` follows its hidden
#: instruction in about half the samples (the rest read like golden ones, so expect its density ratio
#: h near 1 on many rows, and cold's nearer 1 than hot's). A "Reply in French." source was left out:
#: VADER scores most French text 0, so its k samples tie and are dropped, and the pairs that survive
#: are the least French ones. With ``k=3``, ties are rare for these four.
WIDE_SOURCES: tuple[ShiftSource, ...] = (
    ShiftSource(GOLDEN, 0.25),
    ShiftSource("hot", 0.25, temperature=1.6),
    ShiftSource("cold", 0.25, temperature=0.3),
    ShiftSource("pirate", 0.25, instruction="Answer like a pirate."),
)

#: Named source sets (``distalign data make --kind shift --sources NAME``).
SOURCE_SETS: dict[str, tuple[ShiftSource, ...]] = {"default": DEFAULT_SOURCES, "wide": WIDE_SOURCES}


@dataclass
class InstructedTask(Task):
    """A task whose user turns carry a hidden instruction after the prompt (what a source samples)."""

    instruction: str = ""

    def messages(self, prompt: str) -> list[dict[str, str]]:
        return super().messages(f"{prompt} {self.instruction}")


def check_sources(sources: Sequence[ShiftSource]) -> None:
    names = [s.name for s in sources]
    if GOLDEN not in names or len(set(names)) != len(names):
        raise ValueError(f"shift sources need unique names including {GOLDEN!r}, got {names}")
    total = sum(s.proportion for s in sources)
    if any(s.proportion <= 0 for s in sources) or abs(total - 1.0) > 1e-9:
        raise ValueError(f"shift source proportions must be positive and sum to 1, got {total}")


def source_task(task: Task, source: ShiftSource) -> Task:
    """The task as ``source`` samples it (its hidden system prompt in place of the task's, its hidden
    instruction after each user prompt)."""
    if source.system_prompt:
        task = dataclasses.replace(task, system_prompt=source.system_prompt)
    if source.instruction:
        fields = {f.name: getattr(task, f.name) for f in dataclasses.fields(Task)}
        task = InstructedTask(**fields, instruction=source.instruction)
    return task


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
    samples = {
        source.name: sample_and_score(source_task(task, source), samplers[source.name], mine, k=k)
        for source, mine in source_prompts(task, sources, seed=seed, num_prompts=num_prompts, split=split)
    }
    return pair_shift_samples(samples, label_noise=label_noise, seed=seed)


def source_prompts(
    task: Task,
    sources: Sequence[ShiftSource],
    *,
    seed: int,
    num_prompts: int | None,
    split: Split = "train",
) -> list[tuple[ShiftSource, list[str]]]:
    """Each source with the prompts it samples (seeded choice of prompts, then of their sources)."""
    prompts = select_prompts(task, split=split, num_prompts=num_prompts, seed=seed)
    assigned = assign_sources(len(prompts), sources, seed)
    return [(s, [p for p, name in zip(prompts, assigned) if name == s.name]) for s in sources]


def pair_shift_samples(
    samples: dict[str, list[dict[str, Any]]], *, label_noise: float, seed: int
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Best-vs-worst rows (tagged with their ``source`` and ``group``) from each source's listwise
    ``samples`` (in the sources' order), labels flipped at rate ``label_noise``, and the counts."""
    rows: list[dict[str, Any]] = []
    num_prompts = sum(len(listwise) for listwise in samples.values())
    counts: dict[str, Any] = {"prompts": num_prompts, "ties_skipped": 0, "flipped": 0, "per_source": {}}
    for name, listwise_rows in samples.items():
        kept = 0
        for listwise in listwise_rows:
            row, _ = pair_best_worst(listwise)
            if row is None:
                counts["ties_skipped"] += 1
                continue
            rows.append({**row, "source": name, "group": name, "label_flipped": False})
            kept += 1
        counts["per_source"][name] = kept
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


def shift_provenance(
    task: Task,
    sources: Sequence[ShiftSource],
    *,
    model: str,
    sampling: dict[str, Any],
    seed: int,
    settings: dict[str, Any],
    counts: dict[str, Any],
) -> dict[str, Any]:
    """The provenance record of a written shift dataset (``write_jsonl_with_provenance`` adds the rest)."""
    return {
        "task": task.name,
        "task_settings": task.settings,
        "gold_reward": task.gold_reward.spec(),
        "kind": "shift",
        "model": model,
        "sources": [dataclasses.asdict(s) for s in sources],
        "sampling": sampling,
        "seed": seed,
        "settings": settings,
        "counts": counts,
    }
