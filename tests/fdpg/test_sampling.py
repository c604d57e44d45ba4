"""Ancestral sampling on a tiny random Llama: exact log-probs, exact frequencies, warping, seeding."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch
from scipy.stats import chisquare
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from distalign.models.sampling import sample_completions, score_completions, warped_log_probs
from distalign.targets import BooleanConstraint, Target, build_feature, lm_proposer, qrs_sample


def unbatched_logprob(
    model, tokenizer, prompt: str, completion: list[int], warping=(1.0, None, None)
) -> float:
    """A fresh forward on the single unpadded sequence, no cache: sum of (warped) token log-probs."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1]
    processors = [TemperatureLogitsWarper(warping[0])]
    processors += [TopKLogitsWarper(warping[1])] if warping[1] else []
    processors += [TopPLogitsWarper(warping[2])] if warping[2] else []
    total = 0.0
    for step, token in enumerate(completion):
        scores = logits[step : step + 1].float()
        for processor in processors:
            scores = processor(ids[:, : len(prompt_ids) + step], scores)
        total += torch.log_softmax(scores, dim=-1)[0, token].item()
    return total


PROMPTS = ["<bos> x y z", "<bos>", "<bos> w v v w x y"]


def test_sampled_logprobs_equal_teacher_forced(model, tokenizer):
    generator = torch.Generator().manual_seed(0)
    samples = sample_completions(
        model, tokenizer, PROMPTS, num_samples=4, max_new_tokens=8, batch_size=5, generator=generator
    )
    assert samples.ended_with_eos.any() and not samples.ended_with_eos.all()  # both kinds are covered
    scored = score_completions(model, tokenizer, samples.prompts, samples.completion_ids, batch_size=3)
    torch.testing.assert_close(samples.logprobs, scored, atol=1e-5, rtol=0)
    fresh = [
        unbatched_logprob(model, tokenizer, p, c) for p, c in zip(samples.prompts, samples.completion_ids)
    ]
    torch.testing.assert_close(samples.logprobs, torch.tensor(fresh), atol=1e-5, rtol=0)


def test_scoring_normalises_a_few_rows_at_a_time_with_the_whole_batch_values():
    """Teacher-forced scoring bounds its [rows, T, V] log-softmax; the values are bit for bit those of
    one log-softmax over the whole batch."""
    from distalign.models.sampling import _token_logprobs

    logits = torch.randn(11, 5, 300, generator=torch.Generator().manual_seed(0)) * 4
    tokens = torch.randint(0, 300, (11, 5), generator=torch.Generator().manual_seed(1))
    whole = torch.log_softmax(logits, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)
    assert torch.equal(_token_logprobs(logits, tokens), whole)


def test_sample_fields(model, tokenizer):
    model.train()
    samples = sample_completions(
        model, tokenizer, PROMPTS, num_samples=3, max_new_tokens=6, generator=torch.Generator().manual_seed(1)
    )
    assert model.training  # mode restored
    model.eval()
    assert len(samples) == 9
    assert samples.prompts == [p for p in PROMPTS for _ in range(3)]
    assert samples.context_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert samples.logprobs.dtype == torch.float32 and (samples.logprobs <= 0).all()
    eos = tokenizer.eos_token_id
    for ids, ended, text in zip(
        samples.completion_ids, samples.ended_with_eos.tolist(), samples.completion_texts
    ):
        assert ended == (len(ids) > 0 and ids[-1] == eos)
        assert eos not in ids[:-1]
        assert ended or len(ids) == 6
        assert text == tokenizer.decode(ids, skip_special_tokens=True)


def enumerate_completions(vocab_size: int, eos: int, max_new_tokens: int) -> list[list[int]]:
    """Every outcome of sampling up to ``max_new_tokens`` tokens: EOS-ended or cut at the limit."""
    others = [t for t in range(vocab_size) if t != eos]
    outcomes = []
    for length in range(max_new_tokens):
        outcomes += [[*prefix, eos] for prefix in itertools.product(others, repeat=length)]
    return outcomes + [list(prefix) for prefix in itertools.product(others, repeat=max_new_tokens)]


@pytest.mark.parametrize("prompt_index", [0, 2])
def test_sampler_frequencies_match_exact_probabilities(model, tokenizer, prompt_index):
    """Chi-square goodness of fit over all 57 outcomes (cells with expected count < 5 pooled)."""
    outcomes = enumerate_completions(len(tokenizer), tokenizer.eos_token_id, max_new_tokens=2)
    prompt = PROMPTS[prompt_index]
    exact = (
        score_completions(model, tokenizer, [prompt] * len(outcomes), outcomes, batch_size=64).double().exp()
    )
    assert exact.sum().item() == pytest.approx(
        1.0, abs=1e-5
    )  # truncated prefixes + EOS-ended = one distribution
    generator = torch.Generator().manual_seed(2)
    samples = sample_completions(
        model, tokenizer, PROMPTS, num_samples=3000, max_new_tokens=2, batch_size=1024, generator=generator
    )
    mine = [
        tuple(c) for c, i in zip(samples.completion_ids, samples.context_index.tolist()) if i == prompt_index
    ]
    counts = Counter(mine)
    observed = torch.tensor([counts.get(tuple(o), 0) for o in outcomes], dtype=torch.float64)
    assert observed.sum() == 3000
    expected = exact / exact.sum() * 3000
    small = expected < 5
    observed = torch.cat([observed[~small], observed[small].sum().reshape(1)])
    expected = torch.cat([expected[~small], expected[small].sum().reshape(1)])
    assert chisquare(observed.numpy(), expected.numpy()).pvalue > 1e-3


def test_warping_requires_warped_logprobs(model, tokenizer):
    for warping in ({"temperature": 0.7}, {"top_k": 3}, {"top_p": 0.9}):
        with pytest.raises(ValueError, match="warped_logprobs=True"):
            sample_completions(model, tokenizer, PROMPTS, **warping)
    with pytest.raises(ValueError, match="temperature"):
        sample_completions(model, tokenizer, PROMPTS, temperature=0.0, warped_logprobs=True)
    sample_completions(model, tokenizer, PROMPTS, top_p=1.0, max_new_tokens=1)  # top_p = 1 is no warping


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"), [(0.5, None, None), (1.0, 3, None), (1.3, None, 0.7), (0.8, 4, 0.5)]
)
def test_warped_log_probs_match_transformers_warpers(temperature, top_k, top_p):
    logits = 3 * torch.randn(6, 11, generator=torch.Generator().manual_seed(3))
    scores = logits.clone()
    for processor in (
        [TemperatureLogitsWarper(temperature)]
        + ([TopKLogitsWarper(top_k)] if top_k else [])
        + ([TopPLogitsWarper(top_p)] if top_p else [])
    ):
        scores = processor(None, scores)
    expected = torch.log_softmax(scores, dim=-1)
    ours = warped_log_probs(logits, temperature, top_k, top_p)
    assert torch.equal(torch.isinf(ours), torch.isinf(expected))
    finite = torch.isfinite(expected)
    torch.testing.assert_close(ours[finite], expected[finite])


def test_warped_sampling_returns_warped_logprobs(model, tokenizer):
    warping = (0.7, 4, 0.9)
    samples = sample_completions(
        model,
        tokenizer,
        PROMPTS,
        num_samples=3,
        max_new_tokens=4,
        temperature=0.7,
        top_k=4,
        top_p=0.9,
        warped_logprobs=True,
        generator=torch.Generator().manual_seed(4),
    )
    fresh = [
        unbatched_logprob(model, tokenizer, p, c, warping)
        for p, c in zip(samples.prompts, samples.completion_ids)
    ]
    torch.testing.assert_close(samples.logprobs, torch.tensor(fresh), atol=1e-5, rtol=0)
    unwarped = score_completions(model, tokenizer, samples.prompts, samples.completion_ids)
    assert not torch.allclose(samples.logprobs, unwarped, atol=1e-3)


def test_generator_makes_sampling_reproducible(model, tokenizer):
    def draw(seed: int):
        return sample_completions(
            model,
            tokenizer,
            PROMPTS,
            num_samples=4,
            max_new_tokens=5,
            batch_size=4,
            generator=torch.Generator().manual_seed(seed),
        )

    first, again, other = draw(5), draw(5), draw(6)
    assert first.completion_ids == again.completion_ids and torch.equal(first.logprobs, again.logprobs)
    assert first.completion_ids != other.completion_ids


def test_repeated_prompts_share_a_context(model, tokenizer):
    samples = sample_completions(
        model, tokenizer, ["<bos> x", "<bos> y", "<bos> x"], num_samples=2, max_new_tokens=1
    )
    assert samples.context_index.tolist() == [0, 0, 1, 1, 0, 0]


def test_qrs_with_a_language_model_proposal(model, tokenizer):
    """q = a and P = a * 1[contains "x"], beta = 1: QRS is exact rejection sampling of a( . | b = 1)."""
    target = Target([BooleanConstraint(build_feature({"name": "contains_word", "word": "x"}))])
    generator = torch.Generator().manual_seed(7)
    propose = lm_proposer(
        model, tokenizer, "<bos> y", target, max_new_tokens=4, batch_size=64, generator=generator
    )
    result = qrs_sample(propose, log_beta=0.0, num_samples=50, batch_size=64, generator=generator)
    assert len(result.samples) == 50 and 0 < result.acceptance_rate < 1
    assert all("x" in text.split() for _, text in result.samples)
    assert torch.equal(
        result.target_log_unnormalized, result.proposal_logps
    )  # accepted: log P = log a = log q
    # with the base model given explicitly (here the same model), log a is teacher-forced instead
    propose = lm_proposer(
        model, tokenizer, "<bos> y", target, base_model=model, max_new_tokens=4, generator=generator
    )
    items, log_target, log_q = propose(8)
    finite = torch.isfinite(log_target)
    torch.testing.assert_close(log_target[finite], log_q[finite], atol=1e-5, rtol=0)


def test_empty_prompt_is_refused(model, tokenizer):
    with pytest.raises(ValueError, match="no tokens"):
        sample_completions(model, tokenizer, [""])
    assert score_completions(model, tokenizer, ["<bos>"], [[]]).tolist() == [0.0]
