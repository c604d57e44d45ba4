"""The verdict sentence on constructed numbers: dominates / does not beat / mixed, and the gold-reward
difference it is computed from (paired from the samples, or approximated from eval.json)."""

from __future__ import annotations

import numpy as np
import pytest

from distalign.eval.verdict import (
    BETTER,
    UNCLEAR,
    WORSE,
    gold_difference,
    paired_differences,
    run_verdict,
    signal,
    verdict,
)
from distalign.stats.metrics import Estimate, evaluate_samples


def est(value, low, high, n=64):
    return Estimate(value, low, high, n)


def test_signal_uses_the_whole_interval():
    assert signal(est(0.2, 0.01, 0.3), 0.0) == BETTER
    assert signal(est(0.2, 0.0, 0.3), 0.0) == UNCLEAR  # touching no change is not beyond noise
    assert signal(est(-0.2, -0.3, -0.1), 0.0) == WORSE
    assert signal(est(0.5, 0.5, 0.5), 0.5) == UNCLEAR


def test_dominates():
    found = verdict(est(0.21, 0.12, 0.30), est(0.68, 0.61, 0.75), est(3.1, 2.8, 3.4))
    assert found.kind == "dominates"
    assert found.sentence == (
        "dominates the reference: gold reward +0.21 [0.12, 0.3] (win rate 0.68 [0.61, 0.75]) at KL 3.1 nats"
    )


def test_does_not_beat_when_nothing_clears_no_change():
    found = verdict(est(-0.05, -0.14, 0.03), est(0.47, 0.40, 0.55), est(0.8, 0.6, 1.0))
    assert found.kind == "does_not_beat"
    assert found.sentence.startswith("does not beat the reference (no difference beyond noise): ")
    assert "gold reward -0.05 [-0.14, 0.03] (win rate 0.47 [0.4, 0.55]) at KL 0.8 nats" in found.sentence


def test_does_not_beat_when_worse():
    found = verdict(est(-0.3, -0.4, -0.2), est(0.3, 0.2, 0.4), est(5.0, 4.0, 6.0))
    assert found.kind == "does_not_beat"
    assert "(lower mean gold reward and a win rate below 0.5)" in found.sentence


def test_mixed_higher_mean_but_win_rate_includes_half():
    found = verdict(est(0.2, 0.05, 0.35), est(0.55, 0.45, 0.65), est(2.0, 1.5, 2.5))
    assert found.kind == "mixed"
    assert found.sentence.startswith("mixed (higher mean gold reward but the win rate's CI includes 0.5): ")


def test_mixed_wins_more_often_but_mean_unclear():
    found = verdict(est(0.05, -0.02, 0.12), est(0.6, 0.53, 0.67))
    assert found.kind == "mixed"
    assert "(a win rate above 0.5 but the gold-reward difference's CI includes 0)" in found.sentence
    assert found.sentence.endswith("(KL not measured)")


def test_designer_difference_is_mentioned_but_does_not_change_the_kind():
    plain = verdict(est(0.2, 0.1, 0.3), est(0.7, 0.6, 0.8), est(1.0, 0.9, 1.1))
    with_designer = verdict(est(0.2, 0.1, 0.3), est(0.7, 0.6, 0.8), est(1.0, 0.9, 1.1), est(-0.4, -0.5, -0.3))
    assert with_designer.kind == plain.kind == "dominates"
    assert with_designer.sentence == plain.sentence + "; designer score -0.4 [-0.5, -0.3] vs the reference"


def test_one_signal_alone_and_none():
    assert verdict(est(0.2, 0.1, 0.3), None).kind == "dominates"
    assert verdict(None, est(0.5, 0.4, 0.6)).kind == "does_not_beat"
    assert verdict(None, None).kind == "unknown"


def rows_for(policy, reference, per_prompt=2):
    rows = []
    for model, rewards in (("policy", policy), ("reference", reference)):
        for i, reward in enumerate(rewards):
            rows.append(
                {"model": model, "prompt": f"p{i // per_prompt}", "completion": "x", "gold_reward": reward}
            )
    return rows


def test_paired_differences_pair_sample_j_on_each_prompt():
    diffs, groups = paired_differences(rows_for([1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 1.0, 5.0]))
    assert diffs.tolist() == [1.0, 2.0, 2.0, -1.0] and groups == ["p0", "p0", "p1", "p1"]


def test_gold_difference_paired_and_approximate():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=60)
    policy = reference + 0.3 + rng.normal(scale=0.05, size=60)
    result = evaluate_samples(
        ["a"] * 60, policy, ["b"] * 60, reference, n_boot=200, groups=np.arange(60) // 2
    )
    paired, is_paired = gold_difference(result, rows_for(policy.tolist(), reference.tolist()))
    assert is_paired and paired.value == pytest.approx(0.3, abs=0.02) and paired.low > 0.25
    approx, is_paired = gold_difference(result)
    assert not is_paired and approx.value == pytest.approx(paired.value)
    assert approx.high - approx.low > paired.high - paired.low  # the pairing removes the prompt noise
    found, diff = run_verdict(result, rows_for(policy.tolist(), reference.tolist()))
    assert found.kind == "dominates" and diff == paired
    # Without the samples the unpaired interval is wider: here it includes 0 (conservative).
    found, diff = run_verdict(result)
    assert diff == approx and found.kind == "mixed" and found.sentence.endswith("samples.jsonl missing)")
