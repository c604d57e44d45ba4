"""AOT's transport costs ``h(z; beta)`` on a reward gap ``z = u - v`` (nats), and their registry.

Every cost is convex, so the sorted (comonotone) coupling stays optimal for it (see ``aot.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from distalign.registry import Registry


@dataclass(frozen=True)
class Cost:
    """A convex transport cost ``h(z; beta)`` on a reward gap ``z = u - v`` (nats)."""

    name: str
    function: Callable[[torch.Tensor, float], torch.Tensor]
    beta_meaning: str
    beta_must_be_positive: bool


COSTS: Registry[Cost] = Registry("AOT cost")


def _register_cost(name: str, *, beta_meaning: str, beta_must_be_positive: bool):
    def decorator(function: Callable[[torch.Tensor, float], torch.Tensor]):
        COSTS.add(name, Cost(name, function, beta_meaning, beta_must_be_positive))
        return function

    return decorator


@_register_cost(
    "logistic",
    beta_meaning="inverse temperature (> 0): the gap is scaled by beta before the logistic loss, as DPO's beta",
    beta_must_be_positive=True,
)
def logistic_cost(gaps: torch.Tensor, beta: float) -> torch.Tensor:
    """``h(z) = log(1 + exp(-beta z)) = -log sigmoid(beta z)``, elementwise; softplus keeps it finite."""
    return F.softplus(-beta * gaps)


@_register_cost(
    "squared_hinge",
    beta_meaning="margin (>= 0, nats): gaps above beta cost nothing",
    beta_must_be_positive=False,
)
def squared_hinge_cost(gaps: torch.Tensor, beta: float) -> torch.Tensor:
    """``h(z) = max(0, beta - z)^2``, elementwise."""
    return torch.relu(beta - gaps).square()


@_register_cost(
    "least_squares",
    beta_meaning="target margin (>= 0, nats): every gap is pulled to beta from both sides (IPO-like)",
    beta_must_be_positive=False,
)
def least_squares_cost(gaps: torch.Tensor, beta: float) -> torch.Tensor:
    """``h(z) = (beta - z)^2``, elementwise. Not a relaxation of the 0/1 violation: it also penalises
    gaps larger than ``beta``."""
    return (beta - gaps).square()


def resolve_cost(cost: str, beta: float, label_smoothing: float = 0.0) -> Cost:
    """Look up ``cost`` and validate ``beta`` and ``label_smoothing`` for it (ValueError names the fix)."""
    spec = COSTS.get(cost)
    if spec.beta_must_be_positive and not beta > 0:
        raise ValueError(f"AOT cost {cost!r} needs beta > 0 ({spec.beta_meaning}); got {beta}")
    if not spec.beta_must_be_positive and not beta >= 0:
        raise ValueError(f"AOT cost {cost!r} needs beta >= 0 ({spec.beta_meaning}); got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(
            f"label_smoothing is a label-flip probability and must lie in [0, 0.5); got {label_smoothing}"
        )
    return spec


def cost_values(
    gaps: torch.Tensor, *, cost: str = "logistic", beta: float = 0.01, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Elementwise cost of reward gaps, with optional label smoothing.

    Label smoothing ``eps`` models each preference label as flipped with probability ``eps``:
    ``h_eps(z) = (1 - eps) h(z) + eps h(-z)`` for every cost (for ``logistic`` this is TRL's
    conservative DPO / ``aot`` smoothing). ``h_eps`` stays convex, so the sorted coupling stays optimal.
    For ``least_squares`` it equals least squares with margin ``(1 - 2 eps) beta`` plus a constant.

    Args:
        gaps: any shape, reward gaps ``u - v`` in nats. Computed in the dtype of ``gaps``.

    Returns:
        same shape as ``gaps``, non-negative.
    """
    spec = resolve_cost(cost, beta, label_smoothing)
    values = spec.function(gaps, beta)
    if label_smoothing == 0.0:
        return values
    return (1.0 - label_smoothing) * values + label_smoothing * spec.function(-gaps, beta)
