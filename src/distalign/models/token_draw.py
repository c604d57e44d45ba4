"""The next-token distribution: warping (temperature, top-k, top-p) and exact draws from it, with the
drawn token's log-probability.

``torch.multinomial`` is exact but slow on CPU: for 32 rows over SmolLM2's 49,152-token vocabulary,
log_softmax + multinomial take about 45 ms a call, once per decoded token; softmax + inverting the CDF
with one uniform per row take about 1.5 ms (docs/benchmarks.md). A plain float32 cumulative sum would not be exact enough:
each entry is rounded to an ulp of the running total (6e-8), which moves up to that much probability
between neighbouring tokens, a large relative error for rare tokens (and up to ~1e-3 in total variation
over a large vocabulary). So the CDF has two levels: block totals accumulated in float64, then a
float64 cumulative sum inside the one block each row falls in. What is left is the float32 rounding of
the probabilities themselves, as in ``torch.multinomial``. A token with probability 0 (removed by
top-k / top-p) is never drawn.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Tokens per block of the two-level CDF: small enough for an exact float64 cumsum inside one block,
#: large enough that the float64 cumsum over block totals is short.
CDF_BLOCK = 256


def draw_from_logits(
    logits: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row from softmax(``logits``) [B, V] (float32; -inf for excluded tokens).

    Returns the tokens [B] long and their log-probabilities [B] float32: the log of the very
    probability each token was drawn with. (``torch.softmax`` is one fused kernel; on CPU a logsumexp
    and a separate exp take about 10x longer over a 49k vocabulary.)
    """
    probs = torch.softmax(logits, dim=-1)
    tokens = inverse_cdf_draw(probs, generator)
    return tokens, torch.log(probs.gather(-1, tokens[:, None])).squeeze(-1)


def inverse_cdf_draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row of ``probs`` [B, V] (non-negative, positive row sums, need not sum to 1), drawn
    with probability probs[b, i] / sum_i probs[b, i]; one uniform per row from ``generator``."""
    rows, vocab = probs.shape
    width = -(-vocab // CDF_BLOCK) * CDF_BLOCK
    blocks = (F.pad(probs, (0, width - vocab)) if width != vocab else probs).reshape(rows, -1, CDF_BLOCK)
    block_cdf = blocks.sum(dim=-1).double().cumsum(dim=-1)  # [B, blocks]
    device = generator.device if generator is not None else probs.device
    uniform = torch.rand(rows, 1, dtype=torch.float64, device=device, generator=generator).to(probs.device)
    target = uniform * block_cdf[:, -1:]
    block = _first_above(block_cdf, target)  # [B, 1]
    below = torch.where(block > 0, block_cdf.gather(-1, (block - 1).clamp(min=0)), 0.0)
    chosen = blocks.gather(1, block[:, :, None].expand(rows, 1, CDF_BLOCK)).squeeze(1)
    offset = _first_above(chosen.double().cumsum(dim=-1), target - below)
    return (block * CDF_BLOCK + offset).squeeze(-1)


def _first_above(cdf: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Per row of the non-decreasing ``cdf`` [B, K], the first index whose entry exceeds ``value`` [B, 1]
    (so never one that adds no mass); past the end (rounding), the last index that adds mass."""
    index = torch.searchsorted(cdf, value, right=True)
    last_with_mass = (cdf < cdf[:, -1:]).sum(dim=-1, keepdim=True)
    return torch.minimum(index, last_with_mass)


def is_warped(temperature: float, top_k: int | None, top_p: float | None) -> bool:
    return temperature != 1.0 or top_k is not None or (top_p is not None and top_p < 1.0)


def check_warping(temperature: float, top_k: int | None, top_p: float | None, warped_logprobs: bool) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0 (greedy decoding has no sampling log-prob)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1 or None")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1] or None")
    if is_warped(temperature, top_k, top_p) and not warped_logprobs:
        raise ValueError(
            f"temperature={temperature}, top_k={top_k}, top_p={top_p} warp the model's distribution: samples "
            "would no longer come from the model, and log-probs under the model would make importance "
            "weights, pseudo-rewards and log Z estimates wrong. Sample with temperature=1.0, top_k=None, "
            "top_p=None, or pass warped_logprobs=True to get log-probs under the warped distribution."
        )


def warped_log_probs(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """Log-probs of the next-token distribution after temperature, top-k and top-p (nucleus) warping.

    ``logits`` [B, V] -> [B, V] float32 (removed tokens get -inf). Order as in HF generate: divide by
    temperature, keep the k largest (ties with the k-th value are kept), then keep the smallest set of
    most likely tokens whose probability reaches ``top_p`` (always at least one token).
    """
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        remove_sorted = mass_before >= top_p  # the first token is never removed (mass_before = 0)
        remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return torch.log_softmax(logits, dim=-1)
