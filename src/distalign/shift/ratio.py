"""The DoRA density ratio ``h = dQ_0 / dP`` from per-source classifiers, and the mixture proportions.

The training data is a mixture ``P = alpha Q_0 + sum_i beta_i Q_i`` of the target ("golden") source
``Q_0`` and synthetic sources ``Q_i`` (DoRA, step 1; docs/robust.md). Classifier ``i`` separates golden
responses from source-``i`` responses and returns ``c_i = P(golden | z)`` under its own class sizes;
with ``gamma_i = n_i / n_0`` (source-``i`` examples per golden example in the set the probabilities were
fitted on), Bayes' rule gives ``Q_0 / Q_i = gamma_i c_i / (1 - c_i)``, hence

    h = dQ_0 / dP = [ alpha + sum_i beta_i (1 - c_i) / (gamma_i c_i) ]^{-1}

Every term of the sum is >= 0, so ``0 <= h <= 1 / alpha``. Special cases worth knowing:

* an indifferent classifier (``c_i = 1 / (1 + gamma_i)``, the prior) gives ``Q_0 = Q_i``; with all of
  them indifferent ``h = 1``;
* ``gamma_i = n - 1`` for every source, equal proportions ``1/n`` and one ``c`` (the released DoRA
  configuration: a golden-vs-rest classifier seeing ``n - 1`` synthetic responses per golden one, n = 4)
  gives ``h = n c``. With ``gamma_i = 1`` (balanced per-source classifiers) ``h = n c`` holds only for
  ``n = 2``; for ``n > 2`` it is ``n c / ((n - 1) - (n - 2) c)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from distalign.errors import SetupError

PROPORTION_TOLERANCE = 1e-6
GIVEN_SUM_TOLERANCE = 1e-3  # typed fractions (0.333,0.333,0.334); they are then renormalised exactly


def density_ratio(
    probabilities: np.ndarray,
    *,
    alpha: float,
    betas: Sequence[float],
    gammas: Sequence[float],
) -> np.ndarray:
    """``h`` per row from ``probabilities`` [N, k] (``c_i`` of each synthetic source's classifier).

    ``alpha`` is the target's proportion, ``betas`` [k] the synthetic sources' (``alpha + sum betas``
    must be 1), ``gammas`` [k] each classifier's class-size ratio ``n_i / n_0``. ``c_i = 0`` gives
    ``h = 0`` (certainly not golden), ``c_i = 1`` a zero term. Returns float64 [N], in ``[0, 1/alpha]``.
    """
    c = np.asarray(probabilities, dtype=np.float64)
    if c.ndim == 1:
        c = c[:, None]
    betas_a = np.asarray(betas, dtype=np.float64)
    gammas_a = np.asarray(gammas, dtype=np.float64)
    if c.shape[1] != len(betas_a) or len(betas_a) != len(gammas_a):
        raise ValueError(
            f"{c.shape[1]} classifier columns, {len(betas_a)} betas and {len(gammas_a)} gammas; expected one per source"
        )
    if not alpha > 0 or (betas_a < 0).any() or not (gammas_a > 0).all():
        raise ValueError("alpha must be > 0, betas >= 0 and gammas > 0")
    if abs(alpha + betas_a.sum() - 1.0) > PROPORTION_TOLERANCE:
        raise ValueError(f"alpha + sum(betas) = {alpha + betas_a.sum()}, expected 1")
    if ((c < 0) | (c > 1) | np.isnan(c)).any():
        raise ValueError("classifier probabilities must lie in [0, 1]")
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        odds_against = np.where(c > 0, (1.0 - c) / (gammas_a * c), np.inf)
        terms = np.where(betas_a > 0, betas_a * odds_against, 0.0)
        h = 1.0 / (alpha + terms.sum(axis=1))
    return np.clip(h, 0.0, 1.0 / alpha)


def parse_proportions(text: str) -> dict[str, float]:
    """``"golden=0.25,gpt=0.75"`` -> ``{"golden": 0.25, "gpt": 0.75}`` (SetupError when malformed)."""
    proportions: dict[str, float] = {}
    for item in text.split(","):
        name, sep, value = item.strip().rpartition("=")
        name = name.strip()
        if not sep or not name:
            raise SetupError(f"--proportions: expected NAME=FRACTION items separated by commas, got {item!r}")
        if name in proportions:
            raise SetupError(f"--proportions: source {name!r} given twice")
        try:
            proportions[name] = float(value)
        except ValueError:
            raise SetupError(f"--proportions: {name}={value!r} is not a number") from None
    return proportions


def resolve_proportions(
    counts: Mapping[str, int], given: Mapping[str, float] | None = None
) -> dict[str, float]:
    """The mixture proportion of every source: ``counts`` (rows per source) normalised, or ``given``
    checked against the data: the same sources, each proportion in (0, 1], summing to 1 (within
    ``GIVEN_SUM_TOLERANCE``, then renormalised)."""
    total = sum(counts.values())
    if given is None:
        return {name: count / total for name, count in sorted(counts.items())}
    missing = sorted(set(counts) - set(given))
    unknown = sorted(set(given) - set(counts))
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"missing sources present in the data: {', '.join(missing)}")
        if unknown:
            parts.append(f"sources not in the data: {', '.join(unknown)}")
        raise SetupError(f"--proportions: {'; '.join(parts)} (data sources: {', '.join(sorted(counts))})")
    for name, value in given.items():
        if not (math.isfinite(value) and 0 < value <= 1):
            raise SetupError(f"--proportions: {name}={value} must be in (0, 1]")
    total_given = sum(given.values())
    if abs(total_given - 1.0) > GIVEN_SUM_TOLERANCE:
        raise SetupError(f"--proportions: the fractions sum to {total_given:g}, expected 1")
    return {name: float(given[name]) / total_given for name in sorted(counts)}
