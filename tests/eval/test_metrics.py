"""Evaluation metrics on constructed inputs with hand-derived values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distalign.stats.diversity import distinct_n, length_stats, self_bleu, sentence_bleu, token_entropy
from distalign.stats.metrics import (
    Estimate,
    EvalResult,
    bootstrap_ci,
    evaluate_samples,
    kl_estimate,
    mean_with_ci,
    quantile_curve,
    win_rate,
    win_rate_with_ci,
)


def test_win_rate_known_three_quarters():
    assert win_rate([1, 2, 3, 4], [0, 0, 0, 5]) == 0.75


def test_win_rate_tie_policies():
    policy, reference = [1.0, 1.0, 2.0, 0.0], [1.0, 0.0, 1.0, 1.0]  # tie, win, win, loss
    assert win_rate(policy, reference, ties="half") == pytest.approx(2.5 / 4)
    assert win_rate(policy, reference, ties="loss") == pytest.approx(2 / 4)
    assert win_rate(policy, reference, ties="exclude") == pytest.approx(2 / 3)
    assert math.isnan(win_rate([1.0], [1.0], ties="exclude"))
    with pytest.raises(ValueError, match="ties='draw'"):
        win_rate(policy, reference, ties="draw")


def test_win_rate_accepts_tensors_and_checks_lengths():
    assert win_rate(torch.tensor([2.0, 0.0]), np.array([1.0, 1.0])) == 0.5
    with pytest.raises(ValueError, match="equal length"):
        win_rate([1.0, 2.0], [1.0])


def test_all_wins_give_one_with_degenerate_interval():
    estimate = win_rate_with_ci(np.arange(10) + 1.0, np.zeros(10), n_boot=200)
    assert (estimate.value, estimate.low, estimate.high, estimate.n) == (1.0, 1.0, 1.0, 10)


def test_bootstrap_resamples_prompts_jointly():
    # Identical paired arrays: any joint resample gives a zero difference; independent ones would not.
    values = np.random.default_rng(0).normal(size=50)
    assert bootstrap_ci(lambda a, b: float(np.mean(a - b)), values, values.copy(), n_boot=300) == (0.0, 0.0)


def test_bootstrap_is_seeded():
    values = np.random.default_rng(1).normal(size=40)
    assert bootstrap_ci(np.mean, values, seed=5) == bootstrap_ci(np.mean, values, seed=5)
    assert bootstrap_ci(np.mean, values, seed=5) != bootstrap_ci(np.mean, values, seed=6)


def synthetic_wins(n: int, p: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Policy beats the reference on each prompt independently with probability p (no ties)."""
    wins = np.random.default_rng(seed).random(n) < p
    return np.where(wins, 1.0, -1.0), np.zeros(n)


def test_win_rate_interval_covers_truth_with_normal_theory_width_and_shrinks():
    p = 0.7
    large = win_rate_with_ci(*synthetic_wins(4000, p, seed=0), n_boot=1000, seed=0)
    small = win_rate_with_ci(*synthetic_wins(250, p, seed=0), n_boot=1000, seed=0)
    assert large.low <= p <= large.high
    theory_width = 2 * 1.96 * math.sqrt(p * (1 - p) / 4000)
    assert large.high - large.low == pytest.approx(theory_width, rel=0.15)
    # width scales as 1/sqrt(n): 16x the prompts, about a quarter of the width
    assert (large.high - large.low) / (small.high - small.low) == pytest.approx(0.25, rel=0.25)


def test_mean_with_ci_matches_normal_theory():
    noise = np.random.default_rng(2).normal(0.0, 1.0, size=2000)
    values = noise - noise.mean() + 3.0  # sample mean exactly 3
    estimate = mean_with_ci(values, n_boot=1000)
    assert estimate.value == pytest.approx(3.0)
    assert estimate.low < 3.0 < estimate.high
    theory_width = 2 * 1.96 * values.std() / math.sqrt(values.size)
    assert estimate.high - estimate.low == pytest.approx(theory_width, rel=0.15)
    constant = mean_with_ci([2.0] * 5, n_boot=50)
    assert (constant.low, constant.high) == (2.0, 2.0)


def test_kl_estimators_with_constant_log_ratio_by_hand():
    log_pi = np.full(8, -3.0)
    log_ref = log_pi - 0.5  # log pi - log ref = 0.5 on every sample
    kl = kl_estimate(log_pi, log_ref, n_boot=50)
    assert kl.k1.value == pytest.approx(0.5)
    assert kl.k3.value == pytest.approx(math.exp(-0.5) - 1 + 0.5)
    same = kl_estimate(log_pi, log_pi, n_boot=50)
    assert same.k1.value == same.k3.value == 0.0


def test_kl_estimators_are_unbiased_for_gaussians_and_k3_has_lower_variance():
    # pi = N(0, 1), ref = N(mu, 1): KL(pi || ref) = mu^2 / 2.
    mu = 0.5
    x = np.random.default_rng(3).normal(size=20000)
    log_pi = -0.5 * x**2
    log_ref = -0.5 * (x - mu) ** 2  # shared normalising constants cancel in the ratio
    kl = kl_estimate(log_pi, log_ref, n_boot=400)
    for estimate in (kl.k1, kl.k3):
        assert estimate.low <= mu**2 / 2 <= estimate.high
    assert kl.k3.high - kl.k3.low < kl.k1.high - kl.k1.low


def test_distinct_n_by_hand():
    texts = ["a b a", "a c"]
    assert distinct_n(texts, 1) == pytest.approx(3 / 5)  # a, b, a, a, c
    assert distinct_n(texts, 2) == 1.0  # (a b), (b a), (a c): bigrams do not cross texts
    assert distinct_n(["a a a a"], 2) == pytest.approx(1 / 3)
    assert distinct_n(["a", ""], 2) == 0.0


def bleu(hypothesis: str, *references: str) -> float:
    return sentence_bleu(hypothesis.split(" "), [ref.split(" ") for ref in references])


def test_sentence_bleu_by_hand():
    # p1 = 2/3; p2 = (1 + 1) / (2 + 1); p3 = (0 + 1) / (1 + 1); 4-grams dropped (3 tokens); BP = 1
    assert bleu("a b c", "a b d") == pytest.approx((2 / 3 * 2 / 3 * 1 / 2) ** (1 / 3))
    # clipping: "a" may count once; p = 1/4, 1/4, 1/3, 1/2
    assert bleu("a a a a", "a") == pytest.approx((1 / 96) ** 0.25)
    # brevity: c = 2 < r = 4, all precisions 1 -> exp(1 - 4/2)
    assert bleu("a b", "a b c d") == pytest.approx(math.exp(-1))
    # closest reference length wins: r = 2 (not 5), so no brevity penalty
    assert bleu("a b", "a b", "a b c d e") == pytest.approx(1.0)
    assert bleu("x y", "a b") == 0.0


def test_self_bleu_by_hand():
    assert self_bleu(["a b c d", "a b c d", "a b c d"]) == pytest.approx(1.0)
    assert self_bleu(["a b c", "a b d"]) == pytest.approx((2 / 9) ** (1 / 3))
    assert self_bleu(["a b", "c d"]) == 0.0
    with pytest.raises(ValueError, match="at least 2"):
        self_bleu(["only one"])


def test_self_bleu_reference_subsampling_is_seeded():
    """The same seed gives the same subset of references, another seed another one; with max_refs at
    least the number of other texts every text is a reference (the exhaustive mean of sentence_bleu)."""
    texts = [" ".join(np.random.default_rng(i).choice(list("abcdef"), 6)) for i in range(30)]
    assert self_bleu(texts, max_refs=3, seed=1) == self_bleu(texts, max_refs=3, seed=1)
    assert self_bleu(texts, max_refs=3, seed=1) != self_bleu(texts, max_refs=3, seed=2)
    tokens = [t.split() for t in texts]
    exhaustive = np.mean(
        [sentence_bleu(t, [o for j, o in enumerate(tokens) if j != i]) for i, t in enumerate(tokens)]
    )
    assert self_bleu(texts, max_refs=29) == pytest.approx(exhaustive)
    assert self_bleu(texts, max_refs=None, seed=7) == pytest.approx(exhaustive)
    assert self_bleu(texts, max_refs=3, seed=1) != pytest.approx(exhaustive)


def test_token_entropy_by_hand():
    assert token_entropy(["a b", "c d"]) == pytest.approx(2.0)
    assert token_entropy(["a a b b"]) == pytest.approx(1.0)
    assert token_entropy(["a a a"]) == 0.0 and token_entropy([]) == 0.0


def test_length_stats_by_hand():
    stats = length_stats(["a", "a b", "a b c"])
    assert stats["words"] == pytest.approx({"mean": 2.0, "median": 2.0, "p90": 2.8})
    assert stats["chars"] == pytest.approx({"mean": 3.0, "median": 3.0, "p90": 4.6})  # lengths 1, 3, 5


def test_quantile_curve_by_hand():
    levels, values = quantile_curve([1.0, 2.0, 3.0, 4.0, 5.0], levels=5)
    assert levels == [0.0, 0.25, 0.5, 0.75, 1.0] and values == [1.0, 2.0, 3.0, 4.0, 5.0]


def test_evaluate_samples_and_json_round_trip(tmp_path):
    policy_texts = ["good day", "great day", "fine"]
    reference_texts = ["bad day", "great day", "meh"]
    result = evaluate_samples(
        policy_texts,
        [1.0, 2.0, 0.5],
        reference_texts,
        [0.0, 2.0, 0.0],
        policy_logprobs=[-1.0, -2.0, -3.0],
        reference_logprobs=[-1.5, -2.5, -3.5],
        task="sentiment",
        reward="vader",
        settings={"max_new_tokens": 16},
        n_boot=100,
    )
    assert result.win_rate.value == pytest.approx(2.5 / 3)
    assert result.kl.k1.value == pytest.approx(0.5)
    assert result.gold_reward["reference"].value == pytest.approx(2 / 3)
    assert result.quantiles["policy"][0] == 0.5 and result.quantiles["policy"][-1] == 2.0
    assert result.settings == {"max_new_tokens": 16, "n_boot": 100, "alpha": 0.05, "seed": 0}
    loaded = EvalResult.load(result.save(tmp_path / "eval" / "eval.json"))
    assert loaded == result


def test_evaluate_samples_without_reference_or_logprobs():
    result = evaluate_samples(["a", "b"], [1.0, 0.0], n_boot=20)
    assert result.win_rate is None and result.kl is None and set(result.gold_reward) == {"policy"}
    assert EvalResult.from_dict(result.to_dict()) == result
    assert isinstance(result.gold_reward["policy"], Estimate)
