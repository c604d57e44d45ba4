"""Features, scorers, targets and the moment-constraint fit (exact on the enumerable toy)."""

from __future__ import annotations

import math

import pytest
import torch
from distalign_testing.toy import TabularPolicy, ToySpace, ToyTarget

from distalign.registry import UnknownNameError
from distalign.targets import (
    BooleanConstraint,
    MomentTilt,
    RewardTilt,
    Target,
    build_feature,
    build_scorer,
    fit_moment_tilt,
)

SPACE = ToySpace(num_symbols=3, max_length=3)
TEXTS = ["The cat sat.", "concatenate", "CAT!", "cats and dogs", "a cat"]


def test_contains_word_is_whole_word_with_case_option():
    insensitive = build_feature({"name": "contains_word", "word": "cat"})
    sensitive = build_feature({"name": "contains_word", "word": "cat", "case_sensitive": True})
    assert insensitive(TEXTS, None).tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert sensitive(TEXTS, None).tolist() == [1.0, 0.0, 0.0, 0.0, 1.0]


def test_regex_presence_and_count():
    presence = build_feature({"name": "regex", "pattern": r"\bc\w+"})
    count = build_feature({"name": "regex", "pattern": "a", "count": True, "flags": "i"})
    assert presence(TEXTS, None).tolist() == [1.0, 1.0, 0.0, 1.0, 1.0]
    assert count(["aAa", "b", "A cat"], None).tolist() == [3.0, 0.0, 2.0]
    with pytest.raises(ValueError, match="invalid regular expression"):
        build_feature({"name": "regex", "pattern": "("})


def test_user_callable_by_dotted_path(tmp_path, monkeypatch):
    (tmp_path / "my_user_features.py").write_text(
        "def words_times(completions, contexts, scale=1.0):\n"
        "    extra = [len(c) for c in contexts] if contexts else [0] * len(completions)\n"
        "    return [scale * len(c.split()) + e for c, e in zip(completions, extra)]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    feature = build_feature(
        {"name": "callable", "path": "my_user_features:words_times", "kwargs": {"scale": 2.0}}
    )
    assert feature(["a b", "c"], ["xy", ""]).tolist() == [6.0, 2.0]
    with pytest.raises(ValueError, match="package.module:function"):
        build_feature({"name": "callable", "path": "my_user_features.words_times"})
    with pytest.raises(ValueError, match="no attribute"):
        build_feature({"name": "callable", "path": "my_user_features:missing"})


def test_classifier_feature_column_threshold_and_context():
    seen: list[list[str]] = []

    def classify(texts):
        seen.append(texts)
        return [[1 - 0.1 * len(t), 0.1 * len(t)] for t in texts]  # [N, 2] "probabilities"

    feature = build_feature({"name": "classifier", "classify": classify, "column": 1, "threshold": 0.3})
    assert feature(["ab", "abcd"], None).tolist() == [0.0, 1.0]
    with_context = build_feature(
        {"name": "classifier", "classify": classify, "column": 1, "include_context": True}
    )
    assert with_context(["ab"], ["xyz"]).tolist() == [pytest.approx(0.5)]
    assert seen[-1] == ["xyzab"]
    with pytest.raises(ValueError, match="column"):
        build_feature({"name": "classifier", "classify": classify})(["a"], None)


def test_unknown_names_list_valid_ones():
    with pytest.raises(UnknownNameError, match="contains_word"):
        build_feature({"name": "contains"})
    with pytest.raises(UnknownNameError, match="reward_tilt"):
        build_scorer({"kind": "reward-tilt"})
    with pytest.raises(ValueError, match="unexpected keyword"):
        build_feature({"name": "contains_word", "wrd": "x"})


def test_scorers_in_log_space():
    constraint = BooleanConstraint(build_feature({"name": "contains_word", "word": "cat"}))
    assert constraint.log_score(TEXTS).tolist() == [0.0, -math.inf, 0.0, -math.inf, 0.0]
    negated = BooleanConstraint(build_feature({"name": "contains_word", "word": "cat"}), negate=True)
    assert negated.log_score(TEXTS).tolist() == [-math.inf, 0.0, -math.inf, 0.0, -math.inf]
    with pytest.raises(ValueError, match="non-boolean"):
        BooleanConstraint(build_feature({"name": "regex", "pattern": "a", "count": True})).log_score(["aa"])
    reward = RewardTilt(
        lambda prompts, completions: [len(c) + len(p) for p, c in zip(prompts, completions)], beta=0.5
    )
    assert reward.log_score(["ab", "abc"], ["x", ""]).tolist() == [6.0, 6.0]  # (len + context len) / 0.5
    tilt = MomentTilt([build_feature({"name": "regex", "pattern": "a", "count": True})], lambdas=[0.7])
    torch.testing.assert_close(tilt.log_score(["aa", "b"]), torch.tensor([1.4, 0.0], dtype=torch.float64))


def test_target_combines_base_and_scorers_from_config():
    target = Target.from_config(
        {
            "scorers": [
                {"kind": "constraint", "feature": {"name": "contains_word", "word": "cat"}},
                {
                    "kind": "tilt",
                    "features": [{"name": "regex", "pattern": "s", "count": True}],
                    "lambdas": [0.5],
                },
                {"kind": "reward_tilt", "reward": {"name": "regex", "pattern": "!"}, "beta": 0.25},
            ],
            "conditional": True,
        }
    )
    base = torch.tensor([-1.0, -2.0, -3.0, -4.0, -5.0])
    expected = torch.tensor([-1.0 + 0.5 * 1, -math.inf, -3.0 + 4.0, -math.inf, -5.0], dtype=torch.float64)
    torch.testing.assert_close(target.log_unnormalized(base, TEXTS, ["c"] * 5), expected)
    assert target.log_z_keys(["c1", "c2"], 2) == ["c1", "c2"]
    assert Target().log_z_keys(["c1", "c2"], 2) == [None, None]
    with pytest.raises(ValueError, match="unknown keys"):
        Target.from_config({"scorer": []})


def test_constraint_target_on_toy_is_exact_conditioning():
    """P = a * 1[contains a]: p = a( . | b = 1) and Z = a(b = 1), checked with plain string tests."""
    base = TabularPolicy.random(SPACE, seed=1)
    target = Target([BooleanConstraint(build_feature({"name": "contains_word", "word": "a"}))])
    toy = ToyTarget(target.log_unnormalized(base.log_probs().detach(), SPACE.texts))
    a = base.log_probs().detach().exp()
    has_a = torch.tensor(["a" in text.split() for text in SPACE.texts])
    assert toy.log_z.exp().item() == pytest.approx(a[has_a].sum().item(), rel=1e-12)
    torch.testing.assert_close(toy.p, torch.where(has_a, a / a[has_a].sum(), torch.zeros_like(a)))


def _exact_moments(log_unnormalized: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    return torch.softmax(log_unnormalized, dim=0) @ features


@pytest.mark.parametrize("shift", [0.0, 1e4])
def test_moment_fit_by_enumeration_hits_exact_moments(shift):
    """Weighting all 40 sequences by a is the exact expectation, so the fitted tilt is the I-projection.

    float64 computes these moments (values <= 3, 40 terms) to ~1e-15 (a full Newton step lands at
    4e-16..9e-16), so 1e-10 leaves five orders of margin for any BLAS or thread count. A constant
    ``shift`` of the log-weights leaves the target and its moments unchanged but puts the dual value
    at ~1e4, whose rounding (~1e-12) swamps the decrease of the last Newton steps (~|grad|^2): an
    Armijo test on the value alone stalled at |grad| ~ 1e-10 there (and at shift 0 with ATen's avx2
    kernels, ATEN_CPU_CAPABILITY=avx2), running out its 100 iterations.
    """
    base = TabularPolicy.random(SPACE, seed=2).log_probs().detach()
    features = torch.stack([SPACE.count("a"), SPACE.lengths()], dim=1)
    moments = torch.tensor([1.2, 2.1], dtype=torch.float64)
    fit = fit_moment_tilt(features, moments, log_weights=base + shift, tolerance=1e-10)
    assert fit.converged and fit.max_abs_error <= 1e-10 and fit.iterations < 30
    exact = _exact_moments(base + features @ fit.lambdas, features)
    torch.testing.assert_close(exact, moments, rtol=0, atol=1e-9)
    assert fit.effective_sample_size <= len(SPACE)


def test_moment_fit_below_float64_resolution_stays_at_the_floor():
    """Asked for more than float64 resolves, the fit stays at the rounding floor and says it did not converge.

    With the log-weights shifted by 1e4 each logit is rounded to ~2e-12, so the moments cannot be
    matched much better than ~1e-12 (5e-14..5e-13 measured); the value-only Armijo search wandered
    off the floor to ~1e-10 instead.
    """
    base = TabularPolicy.random(SPACE, seed=2).log_probs().detach()
    features = torch.stack([SPACE.count("a"), SPACE.lengths()], dim=1)
    fit = fit_moment_tilt(features, [1.2, 2.1], log_weights=base + 1e4, tolerance=1e-30)
    assert not fit.converged and fit.max_abs_error < 1e-11


def test_moment_fit_from_samples_of_a_proposal():
    """Samples from q != a with log-weights log a - log q: achieved moments within tolerance, exact close."""
    base = TabularPolicy.random(SPACE, seed=3).log_probs().detach()
    proposal = TabularPolicy.random(SPACE, seed=4, scale=0.5)
    index = proposal.sample(20_000, torch.Generator().manual_seed(0))
    features = torch.stack([SPACE.count("b"), SPACE.lengths()], dim=1)
    moments = [0.8, 2.0]
    fit = fit_moment_tilt(
        features[index], moments, base[index] - proposal.log_probs().detach()[index], tolerance=1e-8
    )
    assert fit.converged and fit.max_abs_error <= 1e-8 and fit.iterations < 30
    exact = _exact_moments(base + features @ fit.lambdas, features)
    torch.testing.assert_close(exact, torch.tensor(moments, dtype=torch.float64), rtol=0, atol=0.05)
    assert fit.report()["converged"] is True


def test_boolean_moment_one_reduces_to_product_of_constraints():
    has_a, has_b = (build_feature({"name": "contains_word", "word": w}) for w in ("a", "b"))
    tilt = MomentTilt([has_a, has_b], moments=[1.0, 0.0])
    fit = tilt.fit(SPACE.texts)
    assert fit.lambdas.tolist() == [math.inf, -math.inf] and fit.converged
    product = BooleanConstraint(has_a).log_score(SPACE.texts) + BooleanConstraint(
        has_b, negate=True
    ).log_score(SPACE.texts)
    assert torch.equal(tilt.log_score(SPACE.texts), product)


def test_hybrid_target_fits_moments_under_the_constraint():
    """P = a * 1[contains a] * exp(lambda #b): E_p[#b] = 0.9 exactly, with the constraint in the weights."""
    base = TabularPolicy.random(SPACE, seed=5).log_probs().detach()
    count_b = {"name": "regex", "pattern": r"\bb\b", "count": True}
    target = Target.from_config(
        {
            "scorers": [
                {"kind": "constraint", "feature": {"name": "contains_word", "word": "a"}},
                {"kind": "moments", "features": [count_b], "moments": [0.9]},
            ]
        }
    )
    with pytest.raises(RuntimeError, match="fit_moments"):
        target.log_unnormalized(base, SPACE.texts)
    uniform = torch.full_like(base, -math.log(len(SPACE)))  # "samples" = every sequence once, q uniform
    (fit,) = target.fit_moments(SPACE.texts, None, base, proposal_logprobs=uniform, tolerance=1e-10)
    log_p = target.log_unnormalized(base, SPACE.texts)
    assert _exact_moments(log_p, SPACE.count("b")[:, None]).item() == pytest.approx(0.9, abs=1e-9)
    assert torch.isneginf(log_p[SPACE.count("a") == 0]).all()
    assert fit.converged


def test_unreachable_moment_is_an_error():
    features = torch.tensor([[0.0], [1.0], [2.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match="not strictly inside"):
        fit_moment_tilt(features, [2.0])
    with pytest.raises(ValueError, match="no sample satisfies"):
        fit_moment_tilt(torch.tensor([[0.0], [0.0]], dtype=torch.float64), [1.0])
