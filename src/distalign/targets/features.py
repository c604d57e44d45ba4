"""Features phi(x, c) of completions, the building blocks of energy-based targets.

A feature is a batched callable ``feature(completions: list[str], contexts: list[str] | None) ->
Tensor[N] float64``. Boolean features (values 0/1) become pointwise constraints, real-valued ones
enter exponential tilts and moment constraints. Built-ins are factories in :data:`FEATURES`, so a
config names them: ``{"name": "contains_word", "word": "amazing"}``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from distalign.plugins import compile_regex, import_callable, keyword_pattern
from distalign.registry import Registry

#: ``feature(completions [N], contexts [N] | None) -> Tensor[N] float64``.
Feature = Callable[[list[str], "list[str] | None"], torch.Tensor]

#: Feature factories by name: keyword-only settings in, a :data:`Feature` out.
FEATURES: Registry[Callable[..., Feature]] = Registry("feature")


def as_feature_values(values: Any, count: int, label: str) -> torch.Tensor:
    """Convert a scorer's output (list, array or tensor) to a finite [count] float64 tensor."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double()
    tensor = torch.as_tensor(np.asarray(values, dtype=np.float64)).reshape(-1)
    if tensor.shape[0] != count:
        raise ValueError(f"feature {label!r} returned {tensor.shape[0]} values for {count} completions")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"feature {label!r} returned a non-finite value")
    return tensor


class _TextFeature:
    """Applies ``fn(text) -> float`` to each completion (contexts are ignored)."""

    def __init__(self, label: str, fn: Callable[[str], float]) -> None:
        self.label = label
        self.fn = fn

    def __call__(self, completions: list[str], contexts: list[str] | None = None) -> torch.Tensor:
        return torch.tensor([float(self.fn(text)) for text in completions], dtype=torch.float64)

    def __repr__(self) -> str:
        return f"Feature({self.label})"


@FEATURES.register("contains_word")
def contains_word(*, word: str, case_sensitive: bool = False) -> Feature:
    """1.0 if ``word`` occurs as a whole word (not inside a longer word: "cat" not in "concat"), else 0.0."""
    if not word:
        raise ValueError("contains_word needs a non-empty word")
    pattern = keyword_pattern(word, case_sensitive=case_sensitive)
    return _TextFeature(f"contains_word({word!r})", lambda text: float(pattern.search(text) is not None))


@FEATURES.register("regex")
def regex(*, pattern: str, flags: str = "", count: bool = False) -> Feature:
    """1.0 if ``pattern`` (Python ``re``) occurs in the completion, else 0.0; with ``count``, the matches.

    ``flags``: any of "imsx" (ignore case, multiline, dot-all, verbose).
    """
    compiled = compile_regex(pattern, flags)
    if count:
        return _TextFeature(f"regex_count({pattern!r})", lambda text: float(len(compiled.findall(text))))
    return _TextFeature(f"regex({pattern!r})", lambda text: float(compiled.search(text) is not None))


class _ClassifierFeature:
    def __init__(
        self, classify: Callable, threshold: float | None, column: int | None, include_context: bool
    ):
        self.classify = classify
        self.threshold = threshold
        self.column = column
        self.include_context = include_context

    def __call__(self, completions: list[str], contexts: list[str] | None = None) -> torch.Tensor:
        texts = completions
        if self.include_context:
            texts = [c + x for c, x in zip(contexts or [""] * len(completions), completions)]
        raw = self.classify(texts)
        raw = (
            raw.detach().cpu().numpy() if isinstance(raw, torch.Tensor) else np.asarray(raw, dtype=np.float64)
        )
        if raw.ndim == 2:
            if self.column is None:
                raise ValueError(
                    "the classifier returned a matrix of scores; set `column` to the class to use"
                )
            raw = raw[:, self.column]
        scores = as_feature_values(raw, len(completions), "classifier")
        return scores if self.threshold is None else (scores >= self.threshold).double()


@FEATURES.register("classifier")
def classifier(
    *,
    classify: Callable | str,
    threshold: float | None = None,
    column: int | None = None,
    include_context: bool = False,
) -> Feature:
    """Score of a text classifier: ``classify(texts [N]) -> [N]`` (or [N, C] with ``column``).

    ``classify`` is a callable or a ``"package.module:function"`` path. With ``threshold`` the
    feature is boolean, 1[score >= threshold]. ``include_context`` classifies context + completion.
    """
    fn = import_callable(classify) if isinstance(classify, str) else classify
    return _ClassifierFeature(fn, threshold, column, include_context)


@FEATURES.register("callable")
def user_callable(*, path: str, kwargs: dict[str, Any] | None = None) -> Feature:
    """A user function ``"package.module:function"``: ``fn(completions, contexts, **kwargs) -> N floats``."""
    fn = import_callable(path)
    options = dict(kwargs or {})

    def feature(completions: list[str], contexts: list[str] | None = None) -> torch.Tensor:
        return as_feature_values(fn(completions, contexts, **options), len(completions), path)

    return feature


@FEATURES.register("reward")
def reward(*, reward: str, **settings: Any) -> Feature:
    """Any reward registered in :data:`distalign.rewards.base.REWARDS`, by name, with its settings.

    Rewards take (prompts, completions); missing contexts are passed as empty prompts.
    """
    from distalign.rewards.base import REWARDS  # lazy: rewards pull optional dependencies

    scorer = REWARDS.get(reward)(**settings)

    def feature(completions: list[str], contexts: list[str] | None = None) -> torch.Tensor:
        prompts = list(contexts) if contexts is not None else [""] * len(completions)
        return as_feature_values(scorer(prompts, list(completions)), len(completions), reward)

    return feature


def build_feature(spec: dict[str, Any] | Feature) -> Feature:
    """A feature from a config spec ``{"name": <registered name>, **settings}`` (callables pass through)."""
    if callable(spec):
        return spec
    if not isinstance(spec, dict) or "name" not in spec:
        raise ValueError(
            f"a feature spec must be a dict with a 'name' (one of {FEATURES.names()}), got {spec!r}"
        )
    settings = {k: v for k, v in spec.items() if k != "name"}
    factory = FEATURES.get(spec["name"])
    try:
        return factory(**settings)
    except TypeError as err:
        raise ValueError(f"feature {spec['name']!r}: {err}") from None


def evaluate_features(
    features: Sequence[Feature], completions: list[str], contexts: list[str] | None = None
) -> torch.Tensor:
    """Stack feature values: [N, K] float64 for K features."""
    columns = [as_feature_values(f(completions, contexts), len(completions), repr(f)) for f in features]
    return torch.stack(columns, dim=1) if columns else torch.zeros((len(completions), 0), dtype=torch.float64)
