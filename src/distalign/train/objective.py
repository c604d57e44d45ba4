"""The training objective: a registered loss's per-example values, the optional SFT term, reduced by a
registered aggregator. One object the loop calls on statistics, micro-batch or global batch alike.

``batch_coupled = loss.batch_coupled or aggregator.batch_coupled``: the loop makes any coupled
combination exact over the global batch (``coupling.py``). A stateful aggregator (e.g. group-DRO's
group weights) reads ``state`` and returns the next one; the loop advances it once per optimizer step
(:meth:`BatchObjective.advance`) and checkpoints it (:func:`state_to_json`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from distalign.losses.aggregators import AggregatorSpec, get_aggregator
from distalign.losses.base import LossResult, LossSpec, Stats, get_loss, row_weights, weighted_mean
from distalign.losses.preference import positive_nll


@dataclass
class BatchObjective:
    """``aggregator(loss(stats).losses + sft_weight * nll, weights, signals, state)`` with both metric
    dicts; callable as ``objective(stats) -> LossResult``."""

    loss: LossSpec
    aggregator: AggregatorSpec
    loss_options: dict[str, Any] = field(default_factory=dict)
    aggregator_options: dict[str, Any] = field(default_factory=dict)
    sft_weight: float = 0.0
    state: dict[str, torch.Tensor] | None = None

    @property
    def batch_coupled(self) -> bool:
        return self.loss.is_batch_coupled(self.loss_options) or self.aggregator.batch_coupled

    @property
    def heads(self) -> tuple[str, ...]:
        return self.loss.heads

    @property
    def term_names(self) -> tuple[str, ...]:
        """The parts of the per-example values (``LossResult.terms``; ``train/grad_shares.py``): the loss's
        declared terms (``loss`` for a loss of one part), and ``sft`` when the SFT term is on."""
        return (self.loss.terms or ("loss",)) + (("sft",) if self.sft_weight else ())

    def __call__(self, stats: Stats) -> LossResult:
        per_example = self.loss.per_example(stats, **self.loss_options)
        losses, metrics = per_example.losses, dict(per_example.metrics)
        terms = dict(per_example.terms) or {"loss": losses}
        weights = row_weights(stats).to(losses.dtype)
        if self.sft_weight:
            # Per example, so the SFT term is weighted, aggregated and logged like the loss itself.
            nll = positive_nll(stats)
            terms["sft"] = self.sft_weight * nll
            losses = losses + terms["sft"]
            metrics["sft_nll"] = weighted_mean(nll.detach(), weights).float()
        result = self.aggregator(
            losses, weights=weights, signals=stats.signals, state=self.state, **self.aggregator_options
        )
        return LossResult(result.loss, {**metrics, **result.metrics}, result.state, losses, terms)

    def advance(self, result: LossResult) -> None:
        """Adopt the aggregator state after an optimizer step (no-op for stateless aggregators)."""
        if self.aggregator.stateful:
            self.state = result.state


def build_objective(config) -> BatchObjective:
    """The objective a :class:`~distalign.config.RunConfig` names (already validated)."""
    return BatchObjective(
        loss=get_loss(config.loss.name),
        aggregator=get_aggregator(config.aggregator.name),
        loss_options=config.loss.loss_options(),
        aggregator_options=config.aggregator.options(),
        sft_weight=config.train.sft_weight,
    )


def state_to_json(state: dict[str, torch.Tensor] | None) -> dict[str, Any] | None:
    """Aggregator state as JSON-able lists (Python floats round-trip float64 exactly)."""
    if state is None:
        return None
    return {
        name: {"dtype": str(t.dtype).removeprefix("torch."), "values": t.tolist()}
        for name, t in state.items()
    }


def state_from_json(saved: dict[str, Any] | None, device) -> dict[str, torch.Tensor] | None:
    if saved is None:
        return None
    return {
        name: torch.tensor(entry["values"], dtype=getattr(torch, entry["dtype"]), device=device)
        for name, entry in saved.items()
    }
