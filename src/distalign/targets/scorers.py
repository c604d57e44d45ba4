"""Log-space factors of an energy-based target: P(x|c) = a(x|c) * prod_k score_k(x, c).

Every scorer meets one batched contract,

    scorer.log_score(completions: list[str], contexts: list[str] | None) -> Tensor[N] float64,

returning log score_k (nats; -inf for zero). Built-ins:

* :class:`BooleanConstraint` - GDC pointwise constraint, log b in {0, -inf};
* :class:`MomentTilt` - exp(lambda . phi), lambda given or fitted so that E_p[phi] = mu;
* :class:`RewardTilt` - exp(r / beta), the RLHF target (max E[r] - beta KL(pi||a) <=> min KL(pi||p)).

Factories in :data:`SCORERS` build them from config dicts ``{"kind": ..., ...}``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from distalign.registry import Registry
from distalign.targets.features import Feature, as_feature_values, build_feature, evaluate_features
from distalign.targets.moments import MomentFit, fit_moment_tilt


@runtime_checkable
class Scorer(Protocol):
    """One factor of a target, in log space."""

    def log_score(self, completions: list[str], contexts: list[str] | None = None) -> torch.Tensor:
        """log score(x_j, c_j) for each completion: [N] float64 (may be -inf)."""
        ...


class BooleanConstraint:
    """b(x, c) = 1[feature(x, c) == 1] (or == 0 with ``negate``); the feature must be boolean.

    ``epsilon`` > 0 makes the constraint soft: a violating sample scores ``epsilon`` instead of 0, so
    P > 0 everywhere and divergences that are infinite when the policy leaves the support (reverse KL)
    stay finite; p then puts mass epsilon (1 - Z) / (Z + epsilon (1 - Z)) on violations (Z = E_a[b]).
    """

    def __init__(self, feature: Feature, negate: bool = False, epsilon: float = 0.0) -> None:
        if not 0.0 <= epsilon < 1.0:
            raise ValueError(f"epsilon={epsilon} must be in [0, 1) (0 = hard constraint)")
        self.feature = feature
        self.negate = negate
        self.epsilon = float(epsilon)

    def satisfied(self, completions: list[str], contexts: list[str] | None = None) -> torch.Tensor:
        """b(x_j, c_j) as a [N] bool tensor."""
        values = as_feature_values(self.feature(completions, contexts), len(completions), repr(self.feature))
        if not ((values == 0) | (values == 1)).all():
            raise ValueError(
                f"constraint feature {self.feature!r} returned non-boolean values (expected 0/1)"
            )
        return values == (0.0 if self.negate else 1.0)

    def log_score(self, completions: list[str], contexts: list[str] | None = None) -> torch.Tensor:
        ok = self.satisfied(completions, contexts)
        violated = math.log(self.epsilon) if self.epsilon > 0 else float("-inf")
        return torch.where(ok, 0.0, violated).to(torch.float64)


class MomentTilt:
    """exp(sum_i lambda_i phi_i(x, c)), with lambda given or fitted to moments mu (see ``fit``).

    A fitted lambda_i = +-inf (boolean feature with moment 1 / 0) acts as the constraint
    1[phi_i(x) = mu_i], so an all-boolean, all-moment-1 tilt is exactly the product of constraints.
    """

    def __init__(
        self,
        features: Sequence[Feature],
        *,
        moments: Sequence[float] | None = None,
        lambdas: Sequence[float] | torch.Tensor | None = None,
    ) -> None:
        if moments is None and lambdas is None:
            raise ValueError("a moment tilt needs target `moments` (to fit) or fixed `lambdas`")
        self.features = list(features)
        self.moments = None if moments is None else torch.as_tensor(moments, dtype=torch.float64).reshape(-1)
        self.lambdas = None if lambdas is None else torch.as_tensor(lambdas, dtype=torch.float64).reshape(-1)
        for name, vector in (("moments", self.moments), ("lambdas", self.lambdas)):
            if vector is not None and vector.shape[0] != len(self.features):
                raise ValueError(f"{len(self.features)} features but {vector.shape[0]} {name}")
        self.fit_result: MomentFit | None = None

    def fit(
        self,
        completions: list[str],
        contexts: list[str] | None = None,
        log_weights: torch.Tensor | None = None,
        **solver_options: Any,
    ) -> MomentFit:
        """Fit lambda on samples (see :func:`fit_moment_tilt` for ``log_weights``); stores and returns it."""
        if self.moments is None:
            raise ValueError("this tilt has fixed lambdas and no target moments to fit")
        values = evaluate_features(self.features, completions, contexts)
        self.fit_result = fit_moment_tilt(values, self.moments, log_weights, **solver_options)
        self.lambdas = self.fit_result.lambdas
        return self.fit_result

    def log_score(self, completions: list[str], contexts: list[str] | None = None) -> torch.Tensor:
        if self.lambdas is None:
            raise RuntimeError("moment tilt used before fitting: call Target.fit_moments(...) first")
        values = evaluate_features(self.features, completions, contexts)
        finite = torch.isfinite(self.lambdas)
        scores = values[:, finite] @ self.lambdas[finite]
        if not bool(finite.all()):
            required = (self.lambdas[~finite] > 0).double()  # +inf: phi must be 1; -inf: phi must be 0
            violated = (values[:, ~finite] != required).any(dim=1)
            scores = scores.masked_fill(violated, float("-inf"))
        return scores


class RewardTilt:
    """exp(r(x, c) / beta): ``reward(prompts [N], completions [N]) -> [N]`` as in distalign.rewards."""

    def __init__(self, reward: Callable[[list[str], list[str]], Any], beta: float) -> None:
        if beta <= 0:
            raise ValueError(f"beta={beta} must be > 0")
        self.reward = reward
        self.beta = float(beta)

    def log_score(self, completions: list[str], contexts: list[str] | None = None) -> torch.Tensor:
        prompts = list(contexts) if contexts is not None else [""] * len(completions)
        rewards = as_feature_values(self.reward(prompts, list(completions)), len(completions), "reward")
        return rewards / self.beta


#: Scorer factories by ``kind``: config settings in, a :class:`Scorer` out.
SCORERS: Registry[Callable[..., Scorer]] = Registry("scorer")


@SCORERS.register("constraint")
def constraint_scorer(
    *, feature: dict[str, Any] | Feature, negate: bool = False, epsilon: float = 0.0
) -> Scorer:
    """Pointwise constraint on a boolean feature spec, e.g. ``{"name": "contains_word", "word": "x"}``;
    ``epsilon`` > 0 scores violations epsilon instead of 0 (a soft constraint)."""
    return BooleanConstraint(build_feature(feature), negate=negate, epsilon=epsilon)


@SCORERS.register("moments")
def moments_scorer(*, features: list[dict[str, Any] | Feature], moments: list[float]) -> Scorer:
    """Distributional constraints E_p[phi_i] = moments[i]; fitted by ``Target.fit_moments``."""
    return MomentTilt([build_feature(f) for f in features], moments=moments)


@SCORERS.register("tilt")
def tilt_scorer(*, features: list[dict[str, Any] | Feature], lambdas: list[float]) -> Scorer:
    """A fixed exponential tilt exp(lambdas . phi)."""
    return MomentTilt([build_feature(f) for f in features], lambdas=lambdas)


@SCORERS.register("reward_tilt")
def reward_tilt_scorer(*, reward: dict[str, Any] | Feature, beta: float) -> Scorer:
    """exp(r / beta); ``reward`` is a feature spec (``{"name": "reward", "reward": <registered name>}``)."""
    feature = build_feature(reward)
    return RewardTilt(lambda prompts, completions: feature(completions, prompts), beta)


def build_scorer(spec: dict[str, Any] | Scorer) -> Scorer:
    """A scorer from ``{"kind": <registered kind>, **settings}``; scorer objects pass through."""
    if isinstance(spec, Scorer):
        return spec
    if not isinstance(spec, dict) or "kind" not in spec:
        raise ValueError(
            f"a scorer spec must be a dict with a 'kind' (one of {SCORERS.names()}), got {spec!r}"
        )
    settings = {k: v for k, v in spec.items() if k != "kind"}
    try:
        return SCORERS.get(spec["kind"])(**settings)
    except TypeError as err:
        raise ValueError(f"scorer {spec['kind']!r}: {err}") from None
