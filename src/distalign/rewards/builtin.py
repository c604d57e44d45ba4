"""Built-in reward factories that need no model: sentiment, readability, length, keyword, regex, callable.

Every factory takes keyword-only settings and returns a batched scorer ``(prompts, completions) -> [N]``.
Unless stated otherwise a scorer reads only the completion. Raw values are in the units given per
factory; use the reward spec's ``direction`` / ``normalize`` to orient and rescale them.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

from distalign.plugins import compile_regex, import_callable, keyword_pattern
from distalign.rewards.base import REWARDS, Scorer, check_choice


@functools.cache
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


@REWARDS.register("vader_sentiment")
def vader_sentiment(*, field: str = "compound") -> Scorer:
    """VADER lexicon sentiment of the completion (``vaderSentiment``): ``compound`` in [-1, 1] (default),
    or the ``pos`` / ``neg`` / ``neu`` proportions in [0, 1]."""
    check_choice("field", field, ("compound", "pos", "neg", "neu"))

    def score(prompts: list[str], completions: list[str]) -> list[float]:
        analyzer = _vader()
        return [analyzer.polarity_scores(text)[field] for text in completions]

    return score


@functools.cache
def _textstat():
    from textstat.textstat import textstatistics

    stats = textstatistics()
    # textstat looks English ("en") syllables up in NLTK's CMU dictionary, downloading it on first use.
    # "en-US" selects the same English formula constants but counts syllables with pyphen's bundled
    # en_US hyphenation dictionary, so scores never need a network and are identical on every machine.
    stats.set_lang("en-US")
    return stats


@REWARDS.register("readability_flesch")
def readability_flesch() -> Scorer:
    """Flesch reading ease of the completion (``textstat``; higher = easier; about 0-100 for prose,
    unbounded for extreme texts; 0.0 for an empty text). Syllables are counted with pyphen (en_US)."""

    def score(prompts: list[str], completions: list[str]) -> list[float]:
        stats = _textstat()
        return [float(stats.flesch_reading_ease(text)) for text in completions]

    return score


@REWARDS.register("readability_grade")
def readability_grade() -> Scorer:
    """Flesch-Kincaid grade level of the completion (``textstat``; US school grade, higher = harder;
    0.0 for an empty text). Use ``direction: minimize`` to prefer simpler text."""

    def score(prompts: list[str], completions: list[str]) -> list[float]:
        stats = _textstat()
        return [float(stats.flesch_kincaid_grade(text)) for text in completions]

    return score


def count_length(text: str, unit: str) -> int:
    """Length of ``text`` in whitespace-separated words or in characters."""
    return len(text.split()) if unit == "words" else len(text)


@REWARDS.register("length")
def length(*, target: int | None = None, unit: str = "words") -> Scorer:
    """Length reward of the completion, in ``unit`` ("words": whitespace-separated; or "characters").

    Without ``target``: brevity, ``-length`` (shorter is better). With ``target``: ``-|length - target|``
    (0 at the target, one unit lower per word/character away from it).
    """
    check_choice("unit", unit, ("words", "characters"))
    if target is not None and (not isinstance(target, int) or target < 0):
        raise ValueError(f"target={target!r} must be a non-negative integer or null")

    def score(prompts: list[str], completions: list[str]) -> list[float]:
        lengths = np.array([count_length(text, unit) for text in completions], dtype=np.float64)
        # 0.0 - x rather than -x: an exact hit scores 0.0, not -0.0
        return -lengths if target is None else 0.0 - np.abs(lengths - target)

    return score


@REWARDS.register("keyword")
def keyword(
    *,
    keywords: str | Sequence[str],
    mode: str = "presence",
    match: str = "any",
    whole_word: bool = True,
    case_sensitive: bool = False,
) -> Scorer:
    """Keyword constraint on the completion.

    ``match``: "any" (1.0 if any keyword occurs), "all" (1.0 if every keyword occurs) or "fraction"
    (share of keywords that occur, in [0, 1]). ``mode="absence"`` returns ``1 - presence``.
    ``whole_word`` matches only where the keyword is not part of a longer word ("cat" not in "concat").
    """
    words = [keywords] if isinstance(keywords, str) else list(keywords)
    if not words or any(not isinstance(w, str) or not w for w in words):
        raise ValueError(f"keywords={keywords!r} must be a non-empty string or list of non-empty strings")
    check_choice("mode", mode, ("presence", "absence"))
    check_choice("match", match, ("any", "all", "fraction"))
    patterns = [keyword_pattern(w, whole_word=whole_word, case_sensitive=case_sensitive) for w in words]

    def one(text: str) -> float:
        hits = [p.search(text) is not None for p in patterns]
        present = {"any": float(any(hits)), "all": float(all(hits)), "fraction": sum(hits) / len(hits)}[match]
        return present if mode == "presence" else 1.0 - present

    def score(prompts: list[str], completions: list[str]) -> list[float]:
        return [one(text) for text in completions]

    return score


@REWARDS.register("regex")
def regex(*, pattern: str, mode: str = "presence", flags: str = "") -> Scorer:
    """Regular-expression reward on the completion (Python ``re`` syntax, searched anywhere).

    ``mode``: "presence" (1.0 if it matches), "absence" (1.0 if it does not) or "count" (number of
    non-overlapping matches). ``flags``: any of "imsx" (ignore case, multiline, dot-all, verbose).
    """
    check_choice("mode", mode, ("presence", "absence", "count"))
    compiled = compile_regex(pattern, flags)

    def one(text: str) -> float:
        if mode == "count":
            return float(sum(1 for _ in compiled.finditer(text)))
        found = compiled.search(text) is not None
        return float(found if mode == "presence" else not found)

    def score(prompts: list[str], completions: list[str]) -> list[float]:
        return [one(text) for text in completions]

    return score


@REWARDS.register("callable")
def python_callable(*, path: str, kwargs: dict[str, Any] | None = None, batched: bool = True) -> Scorer:
    """A user function imported from ``path`` ("package.module:function").

    Batched (default): ``fn(prompts: list[str], completions: list[str], **kwargs) -> N floats``.
    ``batched=False``: ``fn(prompt: str, completion: str, **kwargs) -> float``, called per pair.
    The fingerprint covers the path and kwargs, not the function's code: after editing the function,
    clear the cache directory.
    """
    fn = import_callable(path)
    options = dict(kwargs or {})

    def score(prompts: list[str], completions: list[str]) -> Any:
        if batched:
            return fn(prompts, completions, **options)
        return [float(fn(p, c, **options)) for p, c in zip(prompts, completions)]

    return score
