"""The report's verdict: one sentence per run, computed from the numbers, that says whether the policy
beats the reference and at what KL cost.

Two signals judge the policy against the reference, each with its confidence interval (CI):

* ``d``, the gold-reward difference *policy minus reference* (paired by prompt and sample index when
  the samples are known, see :func:`gold_difference`);
* ``w``, the win rate against the reference (ties count 1/2), whose "no change" value is 0.5.

Each signal is **better** when its whole CI lies above no change (``d.low > 0``, ``w.low > 0.5``),
**worse** when its whole CI lies below (``d.high < 0``, ``w.high < 0.5``), else **unclear** (the CI
includes no change; a degenerate CI exactly at no change is unclear too). Then:

* ``dominates``: every measured signal is better (both, or the only one measured);
* ``mixed``: one signal is better and the other is not (unclear or worse);
* ``does_not_beat``: no signal is better (both unclear, one or both worse);
* ``unknown``: neither signal is measured (no reference samples): no verdict.

The sentence names the kind — for ``mixed`` and ``does_not_beat`` with the reason in brackets, e.g.
"mixed (higher mean gold reward but the win rate's CI includes 0.5)" — then the numbers, ``gold reward
+0.21 [0.12, 0.3] (win rate 0.68 [0.61, 0.75]) at KL 3.1 nats``, then the designer score difference
(policy minus reference) when there is one. The
designer score does not change the kind: it is the designer's objective, not the gold reward.
The KL is KL(policy || reference) in nats per sequence (the k1 estimate); it is reported, not judged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from distalign.eval.generations import by_prompt
from distalign.stats.metrics import Estimate, EvalResult, mean_with_ci

BETTER, UNCLEAR, WORSE = 1, 0, -1


@dataclass(frozen=True)
class Verdict:
    """``kind``: ``dominates`` | ``mixed`` | ``does_not_beat`` | ``unknown``; ``sentence``: the text."""

    kind: str
    sentence: str


def signal(estimate: Estimate, null: float) -> int:
    """:data:`BETTER` when the CI lies above ``null``, :data:`WORSE` when below, else :data:`UNCLEAR`."""
    if estimate.low > null:
        return BETTER
    if estimate.high < null:
        return WORSE
    return UNCLEAR


def signed(estimate: Estimate, digits: int = 3) -> str:
    """``+0.21 [0.12, 0.3]``: a difference with its sign, and its CI, to ``digits`` significant digits."""
    return f"{estimate.value:+.{digits}g} [{estimate.low:.{digits}g}, {estimate.high:.{digits}g}]"


def _plain(estimate: Estimate) -> str:
    return f"{estimate.value:.3g} [{estimate.low:.3g}, {estimate.high:.3g}]"


def _why(gold: int | None, win: int | None) -> str:
    """Why a verdict is mixed or negative, in words, from the two signals (``None``: not measured)."""
    gold_text = {
        BETTER: "higher mean gold reward",
        UNCLEAR: "the gold-reward difference's CI includes 0",
        WORSE: "lower mean gold reward",
    }
    win_text = {
        BETTER: "a win rate above 0.5",
        UNCLEAR: "the win rate's CI includes 0.5",
        WORSE: "a win rate below 0.5",
    }
    if gold == BETTER and win is not None and win != BETTER:
        return f"{gold_text[gold]} but {win_text[win]}"
    if win == BETTER and gold is not None and gold != BETTER:
        return f"{win_text[win]} but {gold_text[gold]}"
    measured = [(s, text) for s, text in ((gold, gold_text), (win, win_text)) if s is not None]
    if all(s == UNCLEAR for s, _ in measured):
        return "no difference beyond noise"
    return " and ".join(text[s] for s, text in measured)


def verdict(
    gold_diff: Estimate | None,
    win_rate: Estimate | None,
    kl: Estimate | None = None,
    designer_diff: Estimate | None = None,
) -> Verdict:
    """The verdict of one run from its gold-reward difference (policy minus reference), win rate, KL
    (nats per sequence) and designer score difference, each with its CI; rules in the module docstring."""
    gold = signal(gold_diff, 0.0) if gold_diff is not None else None
    win = signal(win_rate, 0.5) if win_rate is not None else None
    measured = [s for s in (gold, win) if s is not None]
    if not measured:
        return Verdict("unknown", "no verdict: no reference to compare with")
    if all(s == BETTER for s in measured):
        kind, head = "dominates", "dominates the reference"
    elif BETTER in measured:
        kind, head = "mixed", "mixed"
    else:
        kind, head = "does_not_beat", "does not beat the reference"
    numbers = []
    if gold_diff is not None:
        numbers.append(f"gold reward {signed(gold_diff)}")
    if win_rate is not None:
        numbers.append(f"(win rate {_plain(win_rate)})" if numbers else f"win rate {_plain(win_rate)}")
    kl_text = f"at KL {kl.value:.2g} nats" if kl is not None else "(KL not measured)"
    if kind != "dominates":
        head = f"{head} ({_why(gold, win)})"
    sentence = f"{head}: {' '.join(numbers)} {kl_text}"
    if designer_diff is not None:
        sentence += f"; designer score {signed(designer_diff)} vs the reference"
    return Verdict(kind, sentence)


def paired_differences(rows: Sequence[dict[str, Any]]) -> tuple[np.ndarray, list[str]]:
    """Gold-reward differences policy minus reference from samples.jsonl rows, pairing sample j of the
    policy with sample j of the reference on the same prompt (as ``distalign eval`` pairs them), and
    the prompt of each difference (for a bootstrap over prompts)."""
    diffs: list[float] = []
    groups: list[str] = []
    for prompt, samples in by_prompt(rows).items():
        for (_, policy), (_, reference) in zip(samples.policy, samples.reference):
            diffs.append(policy - reference)
            groups.append(prompt)
    return np.asarray(diffs, dtype=np.float64), groups


def gold_difference(result: EvalResult, rows: Sequence[dict[str, Any]] = ()) -> tuple[Estimate | None, bool]:
    """``(difference, paired)``: the mean gold-reward difference policy minus reference with its CI.

    From the samples (``rows`` of samples.jsonl) when there are any: paired differences with the
    bootstrap of ``distalign eval`` (its n_boot, alpha and seed, whole prompts resampled);
    ``paired=True``. Otherwise from the two means in eval.json, the CI's half-widths combined as for
    independent estimates (``sqrt(a**2 + b**2)``), which ignores the pairing; ``paired=False``.
    ``(None, False)`` without a reference.
    """
    diffs, groups = paired_differences(rows)
    if diffs.size:
        settings = result.settings
        estimate = mean_with_ci(
            diffs,
            n_boot=int(settings.get("n_boot", 1000)),
            alpha=float(settings.get("alpha", 0.05)),
            seed=int(settings.get("seed", 0)),
            groups=groups,
        )
        return estimate, True
    policy, reference = result.gold_reward.get("policy"), result.gold_reward.get("reference")
    if policy is None or reference is None:
        return None, False
    value = policy.value - reference.value
    below = math.hypot(policy.value - policy.low, reference.high - reference.value)
    above = math.hypot(policy.high - policy.value, reference.value - reference.low)
    return Estimate(value, value - below, value + above, min(policy.n, reference.n)), False


def run_verdict(result: EvalResult, rows: Sequence[dict[str, Any]] = ()) -> tuple[Verdict, Estimate | None]:
    """The verdict of one evaluated run and the gold-reward difference it used (see :func:`gold_difference`)."""
    diff, paired = gold_difference(result, rows)
    designer = result.designer.get("designer", {}).get("difference")
    found = verdict(diff, result.win_rate, result.kl.k1 if result.kl else None, designer)
    if diff is not None and not paired:
        found = Verdict(found.kind, found.sentence + " (gold-reward CI approximate: samples.jsonl missing)")
    return found, diff
