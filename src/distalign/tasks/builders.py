"""Datasets built from a task: preference pairs labelled by the gold reward, unpaired and prompt-only rows.

Pairs follow the usual synthetic-preference recipe: sample ``k`` completions per prompt from the base
model, score each with the task's gold reward, and pair the best against the worst. Optional
Bradley-Terry noise turns the gold reward into a noisy labeller: a pair keeps its order with probability
``sigmoid((r_w - r_l) / T)`` and is swapped with probability ``sigmoid(-(r_w - r_l) / T)``, ``T`` being
``bt_noise``; the swaps are drawn from a generator seeded by ``seed``, so a dataset is reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from distalign.tasks.base import Split, Task

#: ``sample_fn(prompts [P], k) -> P lists of k completions`` (e.g. ancestral samples from the base model).
SampleFn = Callable[[list[str], int], list[list[str]]]


@dataclass
class PreferenceDataset:
    """Result of :func:`build_preference_dataset`.

    ``rows``: paired rows ``{"prompt", "chosen", "rejected", "chosen_reward", "rejected_reward"}``.
    ``samples``: listwise rows ``{"prompt", "responses", "scores"}``, every scored completion.
    ``counts``: ``prompts``, ``samples``, ``pairs``, ``ties_skipped`` (best and worst score equal),
    ``flipped`` (pairs swapped by Bradley-Terry noise).
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)


def _rngs(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    # Independent streams: changing num_prompts must not shift which pairs get flipped, and vice versa.
    selection, flips = np.random.SeedSequence(seed).spawn(2)
    return np.random.default_rng(selection), np.random.default_rng(flips)


def select_prompts(
    task: Task, *, split: Split = "train", num_prompts: int | None = None, seed: int = 0
) -> list[str]:
    """``num_prompts`` prompts of ``split`` in a seeded random order (all of them when ``None``)."""
    prompts = task.prompts(split)
    if num_prompts is not None and not 0 < num_prompts <= len(prompts):
        raise ValueError(
            f"num_prompts={num_prompts} must lie in [1, {len(prompts)}] for task {task.name!r} ({split})"
        )
    order = _rngs(seed)[0].permutation(len(prompts))
    return [prompts[i] for i in order[:num_prompts]]


def sample_and_score(
    task: Task, sample_fn: SampleFn, prompts: Sequence[str], *, k: int, batch_size: int = 32
) -> list[dict[str, Any]]:
    """Listwise rows ``{"prompt", "responses" [k], "scores" [k]}``: ``k`` samples per prompt, gold-scored.

    ``sample_fn`` is called on chunks of at most ``batch_size`` prompts.
    """
    if k < 1:
        raise ValueError(f"k={k} must be at least 1")
    rows: list[dict[str, Any]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        completions = sample_fn(chunk, k)
        if len(completions) != len(chunk) or any(len(c) != k for c in completions):
            raise ValueError(f"sample_fn must return {len(chunk)} lists of {k} completions")
        flat_prompts = [p for p in chunk for _ in range(k)]
        flat_completions = [c for group in completions for c in group]
        scores = task.gold_reward.scores(flat_prompts, flat_completions).reshape(len(chunk), k).tolist()
        rows.extend(
            {"prompt": p, "responses": list(c), "scores": s} for p, c, s in zip(chunk, completions, scores)
        )
    return rows


def bt_flip_probability(reward_gap: float, temperature: float) -> float:
    """Probability that Bradley-Terry noise swaps a pair whose gold rewards differ by ``reward_gap`` >= 0."""
    return 1.0 / (1.0 + math.exp(reward_gap / temperature))


def pair_best_worst(
    listwise: dict[str, Any], *, flip_rng: np.random.Generator | None = None, bt_noise: float | None = None
) -> tuple[dict[str, Any] | None, bool]:
    """Best-vs-worst pair of one listwise row, and whether noise swapped it; ``(None, False)`` on a tie.

    Best and worst are the first completions with the highest and lowest score.
    """
    scores = np.asarray(listwise["scores"], dtype=np.float64)
    best, worst = int(scores.argmax()), int(scores.argmin())
    if scores[best] == scores[worst]:
        return None, False
    flipped = False
    if bt_noise is not None:
        assert flip_rng is not None
        flipped = bool(flip_rng.random() < bt_flip_probability(scores[best] - scores[worst], bt_noise))
    chosen, rejected = (worst, best) if flipped else (best, worst)
    responses = listwise["responses"]
    row = {
        "prompt": listwise["prompt"],
        "chosen": responses[chosen],
        "rejected": responses[rejected],
        "chosen_reward": float(scores[chosen]),
        "rejected_reward": float(scores[rejected]),
    }
    return row, flipped


def build_preference_dataset(
    task: Task,
    sample_fn: SampleFn,
    *,
    k: int = 4,
    seed: int = 0,
    bt_noise: float | None = None,
    num_prompts: int | None = None,
    split: Split = "train",
    batch_size: int = 32,
) -> PreferenceDataset:
    """Sample ``k`` completions for ``num_prompts`` prompts, gold-score them, pair best vs worst.

    ``bt_noise``: Bradley-Terry temperature ``T`` > 0 in gold-reward units (``None``: labels follow the
    gold reward exactly). ``seed`` fixes the prompt choice and the noise; ``sample_fn`` owns its own
    sampling seed. Ties (all k scores equal) are skipped and counted.
    """
    if bt_noise is not None and bt_noise <= 0:
        raise ValueError(f"bt_noise={bt_noise} must be a positive temperature or None")
    if k < 2:
        raise ValueError(f"k={k}: a preference pair needs at least 2 completions per prompt")
    prompts = select_prompts(task, split=split, num_prompts=num_prompts, seed=seed)
    samples = sample_and_score(task, sample_fn, prompts, k=k, batch_size=batch_size)
    flip_rng = _rngs(seed)[1]
    result = PreferenceDataset(samples=samples)
    ties = flips = 0
    for listwise in samples:
        row, flipped = pair_best_worst(listwise, flip_rng=flip_rng, bt_noise=bt_noise)
        if row is None:
            ties += 1
            continue
        flips += flipped
        result.rows.append(row)
    result.counts = {
        "prompts": len(prompts),
        "samples": len(prompts) * k,
        "pairs": len(result.rows),
        "ties_skipped": ties,
        "flipped": flips,
    }
    return result


def unpaired_rows(pairs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each pair split into ``{"prompt", "completion", "label": True, "reward"}`` (chosen) and a
    ``label: False`` row (rejected): the TRL unpaired format used by KTO-style losses."""
    rows = []
    for pair in pairs:
        for side, label in (("chosen", True), ("rejected", False)):
            row = {"prompt": pair["prompt"], "completion": pair[side], "label": label}
            if f"{side}_reward" in pair:
                row["reward"] = pair[f"{side}_reward"]
            rows.append(row)
    return rows


def prompt_only_rows(
    task: Task, *, split: Split = "train", num_prompts: int | None = None, seed: int = 0
) -> list[dict[str, Any]]:
    """``{"prompt"}`` rows for sampling-based methods (f-DPG, online baselines), seeded like the pairs."""
    return [{"prompt": p} for p in select_prompts(task, split=split, num_prompts=num_prompts, seed=seed)]


def to_conversational(task: Task, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows in TRL's conversational form: ``prompt`` as chat messages (with the task's system prompt),
    ``chosen`` / ``rejected`` / ``completion`` as one assistant message; other fields unchanged."""
    out = []
    for row in rows:
        new = dict(row)
        new["prompt"] = task.messages(row["prompt"])
        for key in ("chosen", "rejected", "completion"):
            if key in row:
                new[key] = [{"role": "assistant", "content": row[key]}]
        out.append(new)
    return out
