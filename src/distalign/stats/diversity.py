"""Diversity and length of generated texts: distinct-n, self-BLEU, token entropy, length statistics.

Texts are tokenised by splitting on whitespace (``str.split()``), case and punctuation kept, so the
numbers compare models on equal footing without depending on any model's tokenizer.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np


def _tokens(text: str) -> list[str]:
    return text.split()


def _ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n: unique n-grams / total n-grams over the whole set (n-grams do not cross texts).

    In [0, 1]; 1.0 means no n-gram repeats anywhere. 0.0 when no text has n tokens.
    """
    if n < 1:
        raise ValueError(f"n={n} must be at least 1")
    grams = [g for text in texts for g in _ngrams(_tokens(text), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def _ngram_counts(tokens: Sequence[str], max_n: int) -> list[Counter]:
    """Counts of the n-grams of ``tokens`` for n = 1..max_n (index n - 1)."""
    return [Counter(_ngrams(tokens, n)) for n in range(1, max_n + 1)]


def _bleu(hyp: list[Counter], hyp_len: int, refs: Sequence[list[Counter]], ref_lens: Sequence[int]) -> float:
    log_precisions = []
    for n in range(1, min(len(hyp), hyp_len) + 1):
        counts = hyp[n - 1]
        clipped = sum(min(c, max(ref[n - 1].get(g, 0) for ref in refs)) for g, c in counts.items())
        total = sum(counts.values())
        if n == 1 and clipped == 0:
            return 0.0
        precision = clipped / total if n == 1 else (clipped + 1) / (total + 1)
        log_precisions.append(math.log(precision))
    r = min(ref_lens, key=lambda length: (abs(length - hyp_len), length))
    brevity = 1.0 if hyp_len >= r else math.exp(1 - r / hyp_len)
    return brevity * math.exp(sum(log_precisions) / len(log_precisions))


def sentence_bleu(hypothesis: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4) -> float:
    """BLEU of one tokenised hypothesis against tokenised references, in [0, 1].

    Clipped n-gram precisions p_n for n = 1..min(max_n, len(hypothesis)) (orders longer than the
    hypothesis are dropped and the uniform weights renormalised, so short texts are not scored 0 by
    construction). Smoothing: add-one on numerator and denominator for n >= 2 (Lin & Och, 2004); p_1 is
    unsmoothed, so no shared unigram gives 0. Brevity penalty exp(1 - r/c) when the hypothesis length c
    is below the closest reference length r (ties to the shorter).
    """
    if not hypothesis or not references:
        return 0.0
    refs = [_ngram_counts(ref, max_n) for ref in references]
    return _bleu(_ngram_counts(hypothesis, max_n), len(hypothesis), refs, [len(ref) for ref in references])


def self_bleu(texts: Sequence[str], max_n: int = 4, seed: int = 0, max_refs: int | None = 100) -> float:
    """Self-BLEU: mean :func:`sentence_bleu` of each text against the other texts (higher = less diverse).

    With more than ``max_refs`` other texts, a seeded random subset of ``max_refs`` is used as the
    references of each hypothesis (cost O(N * max_refs)). Empty texts are skipped as hypotheses.
    """
    tokenised = [_tokens(t) for t in texts]
    if len(tokenised) < 2:
        raise ValueError("self_bleu needs at least 2 texts")
    counts = [_ngram_counts(tokens, max_n) for tokens in tokenised]
    rng = np.random.default_rng(seed)
    scores = []
    for i, hypothesis in enumerate(tokenised):
        if not hypothesis:
            continue
        others = [j for j in range(len(tokenised)) if j != i]
        if max_refs is not None and len(others) > max_refs:
            others = sorted(rng.choice(others, size=max_refs, replace=False).tolist())
        scores.append(
            _bleu(
                counts[i], len(hypothesis), [counts[j] for j in others], [len(tokenised[j]) for j in others]
            )
        )
    return float(np.mean(scores)) if scores else 0.0


def token_entropy(texts: Sequence[str]) -> float:
    """Entropy (bits) of the unigram distribution of whitespace tokens pooled over all texts; 0.0 if empty."""
    counts = np.array(
        list(Counter(tok for text in texts for tok in _tokens(text)).values()), dtype=np.float64
    )
    if counts.size == 0:
        return 0.0
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def diversity_stats(texts: Sequence[str], *, seed: int = 0, max_refs: int | None = 100) -> dict[str, float]:
    """distinct_1, distinct_2, self_bleu (NaN-free: 0.0 for fewer than 2 texts) and token_entropy (bits)."""
    return {
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "self_bleu": self_bleu(texts, seed=seed, max_refs=max_refs) if len(texts) >= 2 else 0.0,
        "token_entropy": token_entropy(texts),
    }


def length_stats(texts: Sequence[str]) -> dict[str, dict[str, float]]:
    """Mean, median and 90th percentile (linear interpolation) of lengths in ``words`` (whitespace
    tokens) and ``chars`` (characters)."""
    if not texts:
        raise ValueError("length_stats needs at least one text")
    out = {}
    for unit, lengths in (("words", [len(_tokens(t)) for t in texts]), ("chars", [len(t) for t in texts])):
        arr = np.asarray(lengths, dtype=np.float64)
        out[unit] = {
            "mean": float(arr.mean()),
            "median": float(np.median(arr)),
            "p90": float(np.percentile(arr, 90)),
        }
    return out
