"""The fast parts of sampling stay exact: the two-level inverse-CDF token draw (frequencies, zero-mass
tokens, the log-prob it returns) and the prompt forward shared by the samples of one prompt (the same
log-probs as a forward of every row, with the tiny random Llama)."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from distalign.models import sampling
from distalign.models.sampling import sample_completions, score_completions
from distalign.models.token_draw import CDF_BLOCK, _first_above, draw_from_logits, inverse_cdf_draw


def _chi_square_pvalue(draws: torch.Tensor, probs: torch.Tensor) -> float:
    """Goodness of fit over the tokens with mass (cells expecting fewer than 5 draws pooled)."""
    possible = probs > 0
    observed = torch.bincount(draws, minlength=len(probs)).double()[possible]
    expected = probs[possible].double() / probs.sum() * len(draws)
    small = expected < 5
    if bool(small.any()):
        observed = torch.cat([observed[~small], observed[small].sum().reshape(1)])
        expected = torch.cat([expected[~small], expected[small].sum().reshape(1)])
    expected *= observed.sum() / expected.sum()  # scipy wants equal totals to ~1e-8
    return chisquare(observed.numpy(), expected.numpy()).pvalue


@pytest.mark.parametrize("vocab", [7, CDF_BLOCK, 3 * CDF_BLOCK + 45])
def test_inverse_cdf_draws_follow_the_probabilities_and_never_a_zero(vocab):
    generator = torch.Generator().manual_seed(vocab)
    probs = torch.rand(vocab, generator=generator) ** 4  # uneven, unnormalised
    probs[torch.randperm(vocab, generator=generator)[: vocab // 3]] = 0.0
    probs[-1] = 0.0  # the last token (and the padding after it) must not catch rounding overflow
    rows = probs.expand(20000, vocab).contiguous()
    draws = inverse_cdf_draw(rows, generator)
    assert draws.shape == (20000,) and draws.dtype == torch.long
    assert bool((probs[draws] > 0).all())
    assert _chi_square_pvalue(draws, probs) > 1e-3


def test_a_target_past_the_end_of_the_cdf_lands_on_the_last_token_with_mass():
    cdf = torch.tensor([[0.0, 0.25, 0.25, 1.0, 1.0, 1.0]], dtype=torch.float64)
    assert _first_above(cdf, torch.tensor([[1.0]], dtype=torch.float64)).item() == 3
    assert _first_above(cdf, torch.tensor([[0.25]], dtype=torch.float64)).item() == 3  # skips index 2
    assert _first_above(cdf, torch.tensor([[0.0]], dtype=torch.float64)).item() == 1  # index 0 has none


def test_drawn_log_probs_are_those_of_the_drawn_tokens():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 1000, generator=generator) * 4
    logits[:, :500] = float("-inf")  # as top-k leaves them
    tokens, logps = draw_from_logits(logits, generator)
    assert bool((tokens >= 500).all())
    expected = torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
    torch.testing.assert_close(logps, expected, atol=1e-6, rtol=0)


PROMPTS = ["<bos> x y z", "<bos>", "<bos> w v v w x y"]


def _every_row_forward(monkeypatch):
    """Make the samplers treat every row as a prompt of its own (the forward the sharing replaces)."""
    monkeypatch.setattr(sampling, "_repeat_index", lambda ids: (list(range(len(ids))), list(range(len(ids)))))


def test_repeated_prompts_share_one_prompt_forward(model, tokenizer, monkeypatch):
    calls = []
    forward = model.forward

    def counting_forward(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape)
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", counting_forward)
    sample_completions(model, tokenizer, PROMPTS, num_samples=4, max_new_tokens=3, batch_size=12)
    assert calls[0][0] == 3  # the prompt forward ran the 3 distinct prompts, not 12 rows
    assert all(shape[0] == 12 for shape in calls[1:])  # then every sample decodes on its own


def test_shared_prompt_scoring_equals_a_forward_of_every_row(model, tokenizer, monkeypatch):
    generator = torch.Generator().manual_seed(3)
    samples = sample_completions(
        model, tokenizer, PROMPTS, num_samples=5, max_new_tokens=6, batch_size=15, generator=generator
    )
    assert len({len(c) for c in samples.completion_ids}) > 1  # ragged completions, some ended by EOS
    shared = score_completions(model, tokenizer, samples.prompts, samples.completion_ids, batch_size=15)
    torch.testing.assert_close(shared, samples.logprobs, atol=1e-5, rtol=0)
    with monkeypatch.context() as patch:
        _every_row_forward(patch)
        every_row = score_completions(
            model, tokenizer, samples.prompts, samples.completion_ids, batch_size=15
        )
    torch.testing.assert_close(shared, every_row, atol=1e-5, rtol=0)


def test_shared_prompt_sampling_draws_what_a_forward_of_every_row_draws(model, tokenizer, monkeypatch):
    """Same generator, same distributions, so the same tokens (up to float ties, absent here)."""

    def draw():
        generator = torch.Generator().manual_seed(11)
        return sample_completions(
            model, tokenizer, PROMPTS, num_samples=4, max_new_tokens=5, batch_size=6, generator=generator
        )

    shared = draw()
    with monkeypatch.context() as patch:
        _every_row_forward(patch)
        every_row = draw()
    assert shared.completion_ids == every_row.completion_ids
    torch.testing.assert_close(shared.logprobs, every_row.logprobs, atol=1e-5, rtol=0)
