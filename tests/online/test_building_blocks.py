"""The pieces this loop added to the f-DPG building blocks: soft constraints, exact prompt ids, the
NaN-free pseudo-reward for contexts without target mass, checkpointable windows, moment fits on a."""

from __future__ import annotations

import math

import pytest
import torch

from distalign.losses.fdivergence import fdpg_pseudo_rewards
from distalign.models.sampling import sample_completions, score_completions
from distalign.models.tiny import build_tiny_model
from distalign.targets import SCORERS, Target, WindowedMeanBaseline


def test_soft_constraint_scores_violations_epsilon():
    scorer = SCORERS.get("constraint")(feature={"name": "contains_word", "word": "cat"}, epsilon=0.01)
    scores = scorer.log_score(["a cat sat", "a dog sat"])
    assert scores.tolist() == [0.0, pytest.approx(math.log(0.01))]
    hard = SCORERS.get("constraint")(feature={"name": "contains_word", "word": "cat"})
    assert hard.log_score(["a dog"]).tolist() == [-math.inf]
    with pytest.raises(ValueError, match="epsilon"):
        SCORERS.get("constraint")(feature={"name": "contains_word", "word": "cat"}, epsilon=1.0)


def test_pseudo_reward_of_an_excluded_sample_is_finite_even_when_log_z_is_minus_infinity():
    # Context without any P > 0 sample yet: log Z_c = -inf and log P = -inf; pi/p is +inf, not NaN.
    rewards = fdpg_pseudo_rewards(
        torch.tensor([-3.0, -2.0]),
        torch.tensor([-math.inf, -math.inf]),
        torch.tensor([-math.inf, -1.0]),
        "jensen_shannon",
    )
    assert rewards.tolist() == [-math.log(2), -math.log(2)]


def test_windowed_baseline_round_trips_through_json_state():
    window = WindowedMeanBaseline(window=3)
    window.update(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    restored = WindowedMeanBaseline(window=3)
    restored.load_state_dict(window.state_dict())
    assert restored.value() == window.value() == 3.0
    restored.update(torch.tensor([5.0]))
    assert restored.value() == 4.0  # the window length survives the round trip


def test_moment_fit_without_proposal_treats_the_samples_as_draws_of_a():
    # Samples of a, equally weighted: one of four has phi = 1, so lambda must move E_p[phi] from 1/4 to 1/2,
    # whatever the base log-probs of the samples are (they only matter for samples of another q).
    target = Target.from_config(
        {"scorers": [{"kind": "moments", "features": [{"name": "regex", "pattern": "x"}], "moments": [0.5]}]}
    )
    texts = ["x", "a", "b", "c"]
    (fit,) = target.fit_moments(texts, None, torch.tensor([-1.0, -5.0, -9.0, -2.0], dtype=torch.float64))
    assert float(fit.lambdas[0]) == pytest.approx(math.log(3.0), abs=1e-6)  # e^l / (e^l + 3) = 1/2


def test_given_prompt_ids_are_what_sampling_and_scoring_condition_on():
    model, tokenizer = build_tiny_model(seed=0)
    ids = [[2, 60, 61], [2]]  # need not be what tokenising any text gives
    generator = torch.Generator().manual_seed(0)
    samples = sample_completions(
        model,
        tokenizer,
        ["first", "second"],
        prompt_ids=ids,
        num_samples=3,
        max_new_tokens=5,
        generator=generator,
    )
    assert samples.prompts == ["first"] * 3 + ["second"] * 3
    by_ids = score_completions(
        model, tokenizer, samples.prompts, samples.completion_ids, prompt_ids=[ids[0]] * 3 + [ids[1]] * 3
    )
    assert torch.allclose(by_ids, samples.logprobs, atol=1e-4)
    by_text = score_completions(model, tokenizer, samples.prompts, samples.completion_ids)
    assert not torch.allclose(by_text, samples.logprobs, atol=1e-2)  # tokenising the labels differs
    with pytest.raises(ValueError, match="prompt_ids"):
        sample_completions(model, tokenizer, ["a"], prompt_ids=[[]])


def test_exact_target_samples_give_kl_minus_log_z_when_the_policy_is_the_base():
    from distalign.train.online.evaluation import kl_target_to_policy, sample_constraint_target
    from distalign.train.online.setup import PromptSet

    model, tokenizer = build_tiny_model(seed=0)
    prompts = PromptSet(ids=[[2]], keys=[""], contexts=[""])
    target = Target.from_config(
        {"scorers": [{"kind": "constraint", "feature": {"name": "regex", "pattern": "s"}}]}
    )
    samples = sample_constraint_target(model, tokenizer, prompts, target, num_samples=40, max_new_tokens=8)
    assert len(samples) == 40 and all("s" in tokenizer.decode(c) for c in samples.completion_ids)
    assert 0.2 < math.exp(samples.log_z) < 0.6  # about 37% of the tiny model's samples contain an "s"
    # p = a(. | b): log P - log a = 0 on every accepted sample, so KL(p || a) = -log Z exactly.
    estimate = kl_target_to_policy(samples, model, tokenizer)
    assert estimate.value == pytest.approx(-samples.log_z, abs=1e-4)
    assert estimate.ci_low < estimate.value < estimate.ci_high and estimate.ess == 40
    tilt = Target.from_config(
        {"scorers": [{"kind": "tilt", "features": [{"name": "regex", "pattern": "s"}], "lambdas": [1.0]}]}
    )
    with pytest.raises(ValueError, match="constraint targets"):
        sample_constraint_target(model, tokenizer, prompts, tilt, num_samples=5, max_new_tokens=8)
