"""The bootstrap over prompts (several samples per prompt) on constructed inputs."""

from __future__ import annotations

import numpy as np
import pytest

from distalign.stats.metrics import (
    bootstrap_ci,
    evaluate_samples,
    kl_estimate,
    mean_with_ci,
    win_rate,
    win_rate_with_ci,
)


def test_one_item_per_group_is_the_plain_bootstrap():
    values = np.random.default_rng(3).normal(size=25)
    plain = bootstrap_ci(np.mean, values, n_boot=300, seed=7)
    grouped = bootstrap_ci(np.mean, values, n_boot=300, seed=7, groups=np.arange(25))
    assert grouped == plain


def test_group_labels_only_matter_through_their_partition():
    values = np.random.default_rng(4).normal(size=12)
    labels = np.repeat([5, 1, 9, 3], 3)  # unsorted labels, numbered by first appearance
    renamed = np.repeat([0, 1, 2, 3], 3)
    assert bootstrap_ci(np.mean, values, n_boot=200, groups=labels) == bootstrap_ci(
        np.mean, values, n_boot=200, groups=renamed
    )


def test_identical_samples_within_a_prompt_add_no_information():
    # Each of 10 prompts has 4 identical samples: resampling prompts must give the interval of the
    # 10 distinct values, not the 4x narrower-looking interval of 40 "independent" ones.
    distinct = np.random.default_rng(0).normal(size=10)
    repeated, groups = np.repeat(distinct, 4), np.repeat(np.arange(10), 4)
    clustered = mean_with_ci(repeated, n_boot=500, seed=1, groups=groups)
    reference = mean_with_ci(distinct, n_boot=500, seed=1)
    assert clustered.value == pytest.approx(reference.value)
    assert (clustered.low, clustered.high) == pytest.approx((reference.low, reference.high))
    naive = mean_with_ci(repeated, n_boot=500, seed=1)
    assert naive.high - naive.low < 0.7 * (clustered.high - clustered.low)


def test_unequal_group_sizes_keep_groups_whole():
    # Groups {0}, {1, 2}, {3, 4, 5}: the value of a group's members is the group's size, so every
    # resample's mean is sum(size^2) / sum(size) over the drawn groups; all must be reachable values.
    values = np.array([1.0, 2.0, 2.0, 3.0, 3.0, 3.0])
    groups = np.array([0, 1, 1, 2, 2, 2])
    seen = set()

    def record(sample):
        seen.add(round(float(np.mean(sample)), 9))
        return float(np.mean(sample))

    bootstrap_ci(record, values, n_boot=400, seed=0, groups=groups)
    possible = set()
    for a in range(3):
        for b in range(3):
            for c in range(3):
                sizes = np.array([a, b, c]) + 1
                possible.add(round(float((sizes**2).sum() / sizes.sum()), 9))
    assert seen <= possible and len(seen) >= 5


def test_grouped_win_rate_and_kl_by_hand():
    policy = np.array([2.0, 2.0, 0.0, 1.0])
    reference = np.array([1.0, 1.0, 1.0, 1.0])  # wins 1, 1, 0, tie -> (1 + 1 + 0 + 0.5) / 4
    groups = np.array([0, 0, 1, 1])
    estimate = win_rate_with_ci(policy, reference, n_boot=200, groups=groups)
    assert estimate.value == pytest.approx(0.625) == win_rate(policy, reference)
    # Resampling whole prompts: prompt 0 alone wins 1.0, prompt 1 alone 0.25, so the bounds lie there.
    assert 0.25 <= estimate.low <= estimate.high <= 1.0
    kl = kl_estimate([-1.0, -2.0, -3.0, -4.0], [-1.5, -2.5, -3.5, -4.5], n_boot=50, groups=groups)
    assert kl.k1.value == pytest.approx(0.5) and kl.k1.low == pytest.approx(0.5)


def test_evaluate_samples_counts_prompts_not_samples():
    texts = ["good", "fine", "bad", "ok"]
    result = evaluate_samples(
        texts, [1.0, 0.5, 0.0, 0.2], texts[::-1], [0.0, 0.1, 0.2, 0.3], n_boot=20, groups=[0, 0, 1, 1]
    )
    assert result.num_prompts == 2
    assert "cluster" in result.settings["bootstrap"]
