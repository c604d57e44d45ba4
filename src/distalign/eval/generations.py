"""Example generations for the report: held-out prompts where the policies changed the gold reward the
most, the least and in between, with the reference's completions beside each policy's.

Reads ``RUN_DIR/eval/samples.jsonl`` (one row per sample: ``model`` policy|reference, ``prompt``,
``completion``, ``gold_reward``, ...). A prompt's *change* for one run is the mean gold reward of the
policy's samples minus the mean of the reference's samples on that prompt; across several runs it is
the mean of the runs' changes. Prompts are ranked by change and the best, the median and the worst are
shown (:func:`pick_prompts`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distalign.eval.page import escape, swatch, text_block


def read_samples(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a samples.jsonl; ``[]`` when it is missing or unreadable, malformed lines skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("model") in ("policy", "reference") and "prompt" in row:
            rows.append(row)
    return rows


@dataclass
class PromptSamples:
    """One run's samples on one prompt: ``(completion, gold reward)`` per model, in sample order."""

    policy: list[tuple[str, float]] = field(default_factory=list)
    reference: list[tuple[str, float]] = field(default_factory=list)

    @property
    def change(self) -> float:
        """Mean gold reward of the policy's samples minus the reference's (NaN when either has none)."""
        if not self.policy or not self.reference:
            return math.nan
        return _mean(r for _, r in self.policy) - _mean(r for _, r in self.reference)


def _mean(values: Any) -> float:
    values = list(values)
    return sum(values) / len(values)


def by_prompt(rows: Sequence[Mapping[str, Any]]) -> dict[str, PromptSamples]:
    """samples.jsonl rows grouped by prompt text, in first-seen order; rows without a finite gold
    reward are left out."""
    prompts: dict[str, PromptSamples] = {}
    for row in rows:
        reward = row.get("gold_reward")
        if not isinstance(reward, int | float) or isinstance(reward, bool) or not math.isfinite(reward):
            continue
        entry = prompts.setdefault(str(row["prompt"]), PromptSamples())
        getattr(entry, row["model"]).append((str(row.get("completion", "")), float(reward)))
    return prompts


@dataclass
class Example:
    """A prompt chosen for the page: why (``kind``), its mean change across runs, each run's samples."""

    kind: str
    prompt: str
    change: float
    runs: dict[str, PromptSamples]


def pick_prompts(
    samples: Mapping[str, Mapping[str, PromptSamples]], per_end: int | None = None
) -> list[Example]:
    """Examples from ``{run: by_prompt(...)}``: the ``per_end`` prompts with the best mean change, the
    median one and the ``per_end`` worst, best first, each prompt once (fewer when there are fewer
    prompts; ``per_end`` default: 2 from 10 prompts on, else 1). Only prompts every run with samples
    evaluated, with a finite change in each, take part."""
    runs = {name: prompts for name, prompts in samples.items() if prompts}
    if not runs:
        return []
    common = [p for p in next(iter(runs.values())) if all(p in prompts for prompts in runs.values())]
    scored = []
    for prompt in common:
        changes = [prompts[prompt].change for prompts in runs.values()]
        if all(math.isfinite(c) for c in changes):
            scored.append((_mean(changes), prompt))
    if not scored:
        return []
    per_end = per_end if per_end is not None else (2 if len(scored) >= 10 else 1)
    order = sorted(range(len(scored)), key=lambda i: -scored[i][0])  # best first; ties: first seen
    picks: dict[int, str] = {}
    for position in order[:per_end]:
        picks.setdefault(position, "best change")
    for position in reversed(order[len(order) - per_end :]):
        picks.setdefault(position, "worst change")
    picks.setdefault(order[(len(order) - 1) // 2], "median change")
    chosen = sorted(picks, key=order.index)
    return [
        Example(
            picks[i], scored[i][1], scored[i][0], {n: prompts[scored[i][1]] for n, prompts in runs.items()}
        )
        for i in chosen
    ]


def _cell(title: str, color: str, samples: list[tuple[str, float]], max_samples: int) -> str:
    shown = samples[:max_samples]
    mean = f"mean gold reward {_mean(r for _, r in samples):.3g} over {len(samples)} sample(s)"
    body = "".join(
        f'<div class="reward">sample {i + 1}: gold reward {reward:.3g}</div>'
        f'<div class="completion">{text_block(text)}</div>'
        for i, (text, reward) in enumerate(shown)
    )
    return (
        f'<div class="gen"><h4>{swatch(color)}{escape(title)}</h4>'
        f'<div class="reward">{escape(mean)}</div>{body}</div>'
    )


def generations_section(
    samples: Mapping[str, Mapping[str, PromptSamples]],
    colors: Mapping[str, str],
    *,
    per_end: int | None = None,
    max_samples: int = 2,
) -> str:
    """The "Example generations" section (anchor ``#generations``): for each example prompt, the
    reference's completions (from the first run) and each policy's, side by side, with gold rewards.
    Empty string when no run has samples."""
    examples = pick_prompts(samples, per_end)
    if not examples:
        return ""
    parts = [
        '<h2 id="generations">Example generations</h2>',
        '<p class="muted">Held-out prompts with the best, the median and the worst change in gold reward '
        "(policy minus reference, averaged over the prompt's samples and over the runs). Each policy is "
        "compared with its own run's reference samples; the reference column shows the first run's.</p>",
    ]
    for example in examples:
        first = next(iter(example.runs.values()))
        columns = [_cell("reference", colors.get("reference", "#4d4d4d"), first.reference, max_samples)]
        for name, prompt in example.runs.items():
            title = f"{name} (change {prompt.change:+.3g})"
            columns.append(_cell(title, colors.get(name, "#1f77b4"), prompt.policy, max_samples))
        width = min(len(columns), 4)
        parts.append(
            f'<div class="prompt"><span class="muted">{escape(example.kind)}, {example.change:+.3g}:</span> '
            f'<span class="text">{text_block(example.prompt)}</span></div>'
            f'<div class="gens" style="grid-template-columns: repeat({width}, minmax(0, 1fr))">'
            + "".join(columns)
            + "</div>"
        )
    return "".join(parts)
