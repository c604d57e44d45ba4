"""Exact batch coupling over the global batch: gather detached statistics, linearise, back-propagate.

A batch-coupled objective L(s_1, ..., s_N) (AOT's sorted matching, KTO's batch KL anchor, DRO
aggregators) depends on every sample of the optimizer batch. Its parameter gradient is
``sum_i dL/ds_i * ds_i/dtheta``. So once the detached statistics of the whole batch are gathered from
every micro-batch and process, ``dL/ds_i`` is a fixed coefficient per sample, and each micro-batch can
back-propagate the linear surrogate ``sum_{i in micro-batch} c_i * s_i`` on its own. The sum of those
gradients equals the gradient of the global objective exactly, for any objective, without deriving a
surrogate per loss (for AOT it reproduces the envelope-theorem surrogate of the AOT paper, docs/paper_index.md).
"""

from __future__ import annotations

import torch

from distalign.losses.base import LossResult, Stats, carries_gradient, stats_fields, stats_from_fields


def concat_stats(parts: list[Stats]) -> Stats:
    """Concatenate statistics of several micro-batches (same type, same fields present)."""
    flat = [stats_fields(p) for p in parts]
    names = flat[0].keys()
    if any(f.keys() != names for f in flat):
        raise ValueError("micro-batch statistics disagree on their fields; cannot concatenate them")
    return stats_from_fields(type(parts[0]), {name: torch.cat([f[name] for f in flat]) for name in names})


def detach_stats(stats: Stats) -> Stats:
    return stats_from_fields(type(stats), {name: t.detach() for name, t in stats_fields(stats).items()})


def slice_stats(stats: Stats, start: int, stop: int) -> Stats:
    """Rows ``start:stop`` of every per-row field (``kl_*`` fields are per batch, kept whole)."""
    sliced = {
        name: (t if name.startswith("kl_") else t[start:stop]) for name, t in stats_fields(stats).items()
    }
    return stats_from_fields(type(stats), sliced)


def gradient_leaves(stats: Stats) -> tuple[Stats, dict[str, torch.Tensor]]:
    """``stats`` (detached) with every gradient-carrying field — the policy's log-probs and every
    model-head output — replaced by a fresh leaf that requires grad, and those leaves by name."""
    fields = stats_fields(stats)
    leaves = {
        name: tensor.detach().clone().requires_grad_(True)
        for name, tensor in fields.items()
        if carries_gradient(name)
    }
    return stats_from_fields(type(stats), {**fields, **leaves}), leaves


def field_coefficients(
    value: torch.Tensor, leaves: dict[str, torch.Tensor], *, retain_graph: bool = False
) -> dict[str, torch.Tensor]:
    """``d value / d leaf`` for every leaf of :func:`gradient_leaves` (zeros where it does not depend on it)."""
    grads = torch.autograd.grad(value, list(leaves.values()), allow_unused=True, retain_graph=retain_graph)
    return {
        name: (grad if grad is not None else torch.zeros_like(leaf))
        for (name, leaf), grad in zip(leaves.items(), grads)
    }


def coupling_coefficients(objective, global_stats: Stats) -> tuple[dict[str, torch.Tensor], LossResult]:
    """``dL/ds`` for every gradient-carrying field of the (detached) global statistics — the policy's
    log-probs and every model-head output — and L itself."""
    stats, leaves = gradient_leaves(global_stats)
    with torch.enable_grad():
        result = objective(stats)
        coefficients = field_coefficients(result.loss, leaves)
    detached = LossResult(
        result.loss.detach(), {k: v.detach() for k, v in result.metrics.items()}, result.state
    )
    return coefficients, detached


def gather_stats(engine, local: Stats) -> tuple[Stats, int]:
    """Global statistics in global-batch order, and where this process's rows start in them (every
    process holds equally many rows of the global batch: ``split_for_process``)."""
    fields = {name: engine.gather_rows(tensor) for name, tensor in stats_fields(local).items()}
    return stats_from_fields(type(local), fields), engine.rank * len(local)


def linear_surrogate(local_stats: Stats, coefficients: dict[str, torch.Tensor], start: int) -> torch.Tensor:
    """``sum_i c_i s_i`` over the rows of ``local_stats``, which sit at ``start`` in the global batch."""
    fields = stats_fields(local_stats)
    total = torch.zeros((), device=next(iter(fields.values())).device)
    for name, coefficient in coefficients.items():
        values = fields[name]
        total = total + (coefficient[start : start + values.shape[0]].to(values.device) * values).sum()
    return total
