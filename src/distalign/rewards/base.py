"""The batched reward interface, its normalisation, and the reward registry.

A reward maps a batch of (prompt, completion) pairs to one float per pair. Built-in rewards are
*factories* registered in :data:`REWARDS`: keyword-only settings in, a batched ``scorer`` out. A
:class:`RewardFn` wraps a scorer with what every reward needs the same way:

* a **direction**: ``"maximize"`` keeps raw scores, ``"minimize"`` negates them, so the value a
  ``RewardFn`` returns is always *higher is better* (e.g. Flesch-Kincaid grade with ``"minimize"``);
* an optional **normalisation**, applied after the direction (see :class:`Normalization`);
* a **cache** of raw scores keyed by the reward's fingerprint (name + resolved settings) and a hash of
  the text pair, so a reward is computed once over a dataset (see :mod:`distalign.rewards.cache`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch

from distalign.registry import Registry
from distalign.rewards.cache import RewardCache, text_key

#: A batched scorer: ``(prompts [N], completions [N]) -> N floats`` (list, numpy array or tensor).
Scorer = Callable[[list[str], list[str]], Any]

#: Reward factories by name. A factory takes keyword-only settings and returns a :data:`Scorer`.
REWARDS: Registry[Callable[..., Scorer]] = Registry("reward")

Direction = Literal["maximize", "minimize"]
NormKind = Literal["none", "zscore", "minmax"]

#: Bumped when the raw value of a built-in changes meaning, so stale on-disk caches are not reused.
FINGERPRINT_VERSION = 1


def check_choice(setting: str, value: Any, choices: Sequence[Any]) -> None:
    """Raise ``ValueError`` naming ``setting`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{setting}={value!r} is not valid; choose one of {', '.join(map(repr, choices))}")


@dataclass
class Normalization:
    """An affine map applied to (direction-oriented) rewards.

    * ``"zscore"``: ``(r - mean) / std``; ``std`` is floored at 1e-8 so a constant reward maps to 0.
    * ``"minmax"``: ``(r - low) / (high - low)`` maps the fitted range to [0, 1]; values outside the
      fitted range extrapolate linearly unless ``clip`` is set, which clamps the result to [0, 1].
    * ``"none"``: identity.

    The statistics are either given (e.g. from a config) or fitted on a dataset with :meth:`fit`.
    """

    kind: NormKind = "none"
    mean: float | None = None
    std: float | None = None
    low: float | None = None
    high: float | None = None
    clip: bool = False

    def __post_init__(self) -> None:
        check_choice("normalize.kind", self.kind, ("none", "zscore", "minmax"))

    @property
    def is_fitted(self) -> bool:
        if self.kind == "zscore":
            return self.mean is not None and self.std is not None
        if self.kind == "minmax":
            return self.low is not None and self.high is not None
        return True

    @classmethod
    def fit(cls, kind: NormKind, values: np.ndarray, clip: bool = False) -> Normalization:
        """Statistics of ``values`` ([N], oriented rewards) for ``kind``: mean/std (population) or min/max."""
        values = np.asarray(values, dtype=np.float64)
        if values.size == 0:
            raise ValueError("cannot fit a reward normalisation on an empty dataset")
        if kind == "zscore":
            return cls(kind, mean=float(values.mean()), std=float(values.std()), clip=clip)
        if kind == "minmax":
            return cls(kind, low=float(values.min()), high=float(values.max()), clip=clip)
        return cls(kind, clip=clip)

    def apply(self, values: np.ndarray) -> np.ndarray:
        """Normalise ``values`` ([N] float64); raises if the statistics were never fitted."""
        if not self.is_fitted:
            raise ValueError(
                f"{self.kind} normalisation has no statistics; call RewardFn.fit_normalization(prompts, "
                "completions) on a dataset first, or give them in the spec"
            )
        if self.kind == "zscore":
            return (values - self.mean) / max(float(self.std), 1e-8)  # type: ignore[arg-type]
        if self.kind == "minmax":
            scaled = (values - self.low) / max(float(self.high) - float(self.low), 1e-8)  # type: ignore[operator]
            return np.clip(scaled, 0.0, 1.0) if self.clip else scaled
        return values


class RewardFn:
    """A batched reward: ``reward(prompts, completions) -> torch.Tensor [N] float32``, higher is better.

    ``name`` is the registry name; ``alias`` a display name (defaults to ``name``); ``settings`` the
    resolved factory settings (JSON-serialisable; they form the cache fingerprint).
    """

    def __init__(
        self,
        name: str,
        scorer: Scorer,
        *,
        settings: dict[str, Any] | None = None,
        direction: Direction = "maximize",
        normalization: Normalization | None = None,
        cache: RewardCache | None = None,
        alias: str | None = None,
    ) -> None:
        check_choice("direction", direction, ("maximize", "minimize"))
        self.name = name
        self.alias = alias or name
        self.scorer = scorer
        self.settings = dict(settings or {})
        self.direction: Direction = direction
        self.normalization = normalization or Normalization()
        self.cache = cache
        self.scorer_calls = 0  # number of scorer invocations; lets tests and logs see cache hits

    @property
    def fingerprint(self) -> str:
        """Hex digest of name + settings (+ any ``fingerprint_extra`` the scorer declares, e.g. model files)."""
        extra = getattr(self.scorer, "fingerprint_extra", None)
        payload = {"name": self.name, "settings": self.settings, "extra": extra, "v": FINGERPRINT_VERSION}
        blob = json.dumps(payload, sort_keys=True, default=str)
        return hashlib.blake2b(blob.encode("utf-8"), digest_size=16).hexdigest()

    def raw_scores(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        """Raw scores ([N] float64, the scorer's own units, before direction and normalisation), cached."""
        prompts, completions = list(prompts), list(completions)
        if len(prompts) != len(completions):
            raise ValueError(
                f"reward {self.alias!r}: {len(prompts)} prompts but {len(completions)} completions"
            )
        if not prompts:
            return np.zeros(0, dtype=np.float64)
        if self.cache is None:
            return self._score(prompts, completions)
        keys = [text_key(p, c) for p, c in zip(prompts, completions)]
        known = self.cache.lookup(self.fingerprint, keys)
        missing: dict[str, int] = {}  # key -> first index; duplicates inside the batch are scored once
        for i, key in enumerate(keys):
            if key not in known and key not in missing:
                missing[key] = i
        if missing:
            idx = list(missing.values())
            fresh = self._score([prompts[i] for i in idx], [completions[i] for i in idx])
            computed = dict(zip(missing, fresh.tolist()))
            self.cache.store(self.fingerprint, computed)
            known.update(computed)
        return np.array([known[k] for k in keys], dtype=np.float64)

    def _score(self, prompts: list[str], completions: list[str]) -> np.ndarray:
        self.scorer_calls += 1
        out = self.scorer(prompts, completions)
        if isinstance(out, torch.Tensor):
            out = out.detach().cpu().double().numpy()
        values = np.asarray(out, dtype=np.float64).reshape(-1)
        if values.shape[0] != len(prompts):
            raise ValueError(
                f"reward {self.alias!r} returned {values.shape[0]} scores for {len(prompts)} texts"
            )
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            raise ValueError(
                f"reward {self.alias!r} returned a non-finite score at batch index {int(bad[0])}"
            )
        return values

    def oriented(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        """Raw scores with the direction applied ([N] float64), before normalisation."""
        raw = self.raw_scores(prompts, completions)
        return -raw if self.direction == "minimize" else raw

    def fit_normalization(
        self, prompts: Sequence[str], completions: Sequence[str], kind: NormKind | None = None
    ) -> Normalization:
        """Fit the normalisation statistics on a dataset (``kind`` defaults to the configured one)."""
        kind = kind or self.normalization.kind
        self.normalization = Normalization.fit(
            kind, self.oriented(prompts, completions), self.normalization.clip
        )
        return self.normalization

    def scores(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        """Rewards for N pairs as float64 numpy [N]: oriented (higher is better) and normalised."""
        return self.normalization.apply(self.oriented(prompts, completions))

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        """Rewards for N pairs: float32 tensor [N], oriented (higher is better) and normalised."""
        return torch.as_tensor(self.scores(prompts, completions), dtype=torch.float32)

    def spec(self) -> dict[str, Any]:
        """A spec that :func:`distalign.rewards.build_reward` turns back into an equivalent reward."""
        norm = {k: v for k, v in asdict(self.normalization).items() if v is not None}
        out: dict[str, Any] = {"name": self.name, **self.settings, "direction": self.direction}
        out["normalize"] = norm
        if self.alias != self.name:
            out["alias"] = self.alias
        return out

    def __repr__(self) -> str:
        return f"RewardFn({self.alias!r}, name={self.name!r}, direction={self.direction!r})"
