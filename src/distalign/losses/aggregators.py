"""Aggregators: per-example losses [N] -> one scalar objective, and their registry.

An aggregator is a pure function ``fn(losses, *, weights, signals, state, **options) -> LossResult``:

* ``losses`` [N]: per-example losses (gradient flows through them);
* ``weights`` [N]: per-row weights (constants, ones by default);
* ``signals``: per-row data columns by name, e.g. ``group`` codes for group-DRO (constants);
* ``state``: what the aggregator carried over from the previous optimizer step (``None`` at the first
  step and for stateless aggregators); the returned ``LossResult.state`` is the state after this step.

Its other keyword-only parameters are its options (``aggregator.<option>`` in the config). An
aggregator that weighs examples by where they sit in the batch (CVaR, DRO) is ``batch_coupled``: the
loop then evaluates it on the global optimizer batch, exactly, whatever the micro-batching and the
number of processes. The only decomposable aggregator is the weighted mean, which the loop may
evaluate micro-batch by micro-batch.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from distalign.losses.base import LossResult, checked_weights, weighted_mean
from distalign.registry import Registry

#: Parameters every aggregator receives from the loop; the remaining keyword-only ones are options.
AGGREGATOR_INPUTS = frozenset({"weights", "signals", "state"})

Aggregator = Callable[..., LossResult]


@dataclass(frozen=True)
class AggregatorSpec:
    """A registered aggregator and what the loop must honour: ``batch_coupled`` (evaluate it on the
    global batch), ``stateful`` (checkpoint its state) and the per-row ``signals`` it reads."""

    name: str
    function: Aggregator
    batch_coupled: bool
    stateful: bool
    paper: str
    signals: tuple[str, ...] = ()

    @property
    def options(self) -> dict[str, Any]:
        """Option names and defaults: keyword-only parameters other than the loop's inputs."""
        params = inspect.signature(self.function).parameters.values()
        return {
            p.name: p.default
            for p in params
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in AGGREGATOR_INPUTS
        }

    def __call__(
        self,
        losses: torch.Tensor,
        *,
        weights: torch.Tensor | None = None,
        signals: dict[str, torch.Tensor] | None = None,
        state: dict[str, torch.Tensor] | None = None,
        **options: Any,
    ) -> LossResult:
        if weights is None:
            weights = torch.ones_like(losses)
        return self.function(losses, weights=weights, signals=signals or {}, state=state, **options)


AGGREGATORS: Registry[AggregatorSpec] = Registry("aggregator")


def register_aggregator(
    name: str, *, batch_coupled: bool, stateful: bool = False, paper: str = "", signals: tuple[str, ...] = ()
) -> Callable[[Aggregator], Aggregator]:
    """Register ``fn(losses, *, weights, signals, state, option=default, ...) -> LossResult``."""

    def decorator(fn: Aggregator) -> Aggregator:
        AGGREGATORS.add(name, AggregatorSpec(name, fn, batch_coupled, stateful, paper, signals))
        return fn

    return decorator


def get_aggregator(name: str) -> AggregatorSpec:
    return AGGREGATORS.get(name)


def weight_diagnostics(
    effective: torch.Tensor, weights: torch.Tensor, signals: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Metrics of the weights an aggregator puts on examples, on top of the data's row weights.

    ``effective`` [N] = ``d loss / d l_i`` (constants); with row probabilities ``p`` (the normalised row
    weights) the aggregator's own weight of row i is ``q_i ∝ effective_i / p_i``, normalised to mean 1
    under ``p`` (the weighted mean has q = 1 everywhere). Reported: ``weights/ess`` = 1 / E_p[q^2], the
    effective sample size as a fraction of the batch (1 = every row counts equally); ``weights/max`` =
    the largest q; ``weights/source=<code>`` = the p-weighted mean q of each source (data ``source``).
    """
    with torch.no_grad():
        p = weights.detach().double()
        p = p / p.sum().clamp(min=1e-300)
        kept = p > 0
        q = torch.where(kept, effective.detach().double() / torch.where(kept, p, torch.ones_like(p)), 0.0)
        q = q / (p * q).sum().clamp(min=1e-300)
        metrics = {
            "weights/ess": (1.0 / (p * q**2).sum().clamp(min=1e-300)).float(),
            "weights/max": q.max().float(),
        }
        if "source" in signals:
            codes = signals["source"].to(q.device)
            for code in torch.unique(codes[kept]).tolist():
                rows = (codes == code) & kept
                metrics[f"weights/source={code}"] = ((p * q)[rows].sum() / p[rows].sum()).float()
        return metrics


@register_aggregator("mean", batch_coupled=False, paper="empirical risk (weighted mean)")
def mean_aggregator(losses, *, weights, signals, state) -> LossResult:
    """The weighted mean ``sum_i w_i l_i / sum_i w_i`` (plain mean for unit weights)."""
    return LossResult(weighted_mean(losses, weights))


def cvar_weights(losses: torch.Tensor, weights: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-example weights ``q`` [N] with ``sum(q) = 1`` that put the worst ``alpha`` of the weighted
    empirical distribution's mass on the largest losses (the boundary example fractionally).

    ``CVaR_alpha(L) = sum_i q_i l_i`` (Rockafellar & Uryasev 2000): the mean of the upper
    ``alpha``-tail. ``q`` is piecewise constant in the losses, so treating it as a constant gives the
    exact (sub)gradient.
    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"cvar alpha must lie in (0, 1], got {alpha}")
    weights = checked_weights(losses, weights)
    with torch.no_grad():
        mass = weights.double() / weights.double().sum().clamp(min=torch.finfo(torch.float64).tiny)
        order = torch.argsort(losses.detach(), descending=True, stable=True)
        mass_before = torch.cumsum(mass[order], 0) - mass[order]
        taken = torch.minimum(mass[order], (alpha - mass_before).clamp(min=0.0))
        q = torch.zeros_like(mass)
        q[order] = taken / alpha
    return q.to(losses.dtype)


@register_aggregator(
    "cvar",
    batch_coupled=True,
    paper="Rockafellar & Uryasev 2000 (CVaR); as a DRO objective: Duchi & Namkoong 2021",
)
def cvar_aggregator(losses, *, weights, signals, state, alpha: float = 0.1) -> LossResult:
    """CVaR at level ``alpha``: the weighted mean of the worst ``alpha``-fraction of the losses.

    ``alpha = 1`` is the weighted mean; small ``alpha`` approaches the maximum. Metrics:
    ``aggregate/var`` (the loss at the tail's boundary, the value-at-risk), ``aggregate/mean`` (the
    weighted mean, for comparison) and ``aggregate/tail_rows`` (rows with positive tail weight).
    """
    q = cvar_weights(losses, weights, alpha)
    with torch.no_grad():
        tail = losses.detach()[q > 0]
        metrics = {
            "aggregate/var": (tail.min() if tail.numel() else losses.new_zeros(())).float(),
            "aggregate/mean": weighted_mean(losses.detach(), weights).float(),
            "aggregate/tail_rows": torch.tensor(float(tail.numel())),
        }
    return LossResult((q * losses).sum(), metrics | weight_diagnostics(q, weights, signals))
