"""Exact batch coupling over the global batch: gather detached statistics, linearise, back-propagate.

A batch-coupled objective L(s_1, ..., s_N) (AOT's sorted matching, KTO's batch KL anchor, DRO
aggregators) depends on every sample of the optimizer batch. Its parameter gradient is
``sum_i dL/ds_i * ds_i/dtheta``. So once the detached statistics of the whole batch are gathered from
every micro-batch and process, ``dL/ds_i`` is a fixed coefficient per sample, and each micro-batch can
back-propagate the linear surrogate ``sum_{i in micro-batch} c_i * s_i`` on its own. The sum of those
gradients equals the gradient of the global objective exactly, for any objective, without deriving a
surrogate per loss (for AOT it reproduces the envelope-theorem surrogate of methods/aot.md).
"""

from __future__ import annotations

import dataclasses

import torch

from distalign.losses.base import GRAD_FIELDS, LossResult, Stats, stats_fields


def concat_stats(parts: list[Stats]) -> Stats:
    """Concatenate statistics of several micro-batches (same type, same fields present)."""
    first = parts[0]
    merged = {name: torch.cat([stats_fields(p)[name] for p in parts]) for name in stats_fields(first)}
    return type(first)(**merged)


def detach_stats(stats: Stats) -> Stats:
    return type(stats)(**{name: t.detach() for name, t in stats_fields(stats).items()})


def slice_stats(stats: Stats, start: int, stop: int) -> Stats:
    """Rows ``start:stop`` of every per-row field (``kl_*`` fields are per batch, kept whole)."""
    sliced = {
        name: (t if name.startswith("kl_") else t[start:stop]) for name, t in stats_fields(stats).items()
    }
    return type(stats)(**sliced)


def coupling_coefficients(objective, global_stats: Stats) -> tuple[dict[str, torch.Tensor], LossResult]:
    """``dL/ds`` for every gradient-carrying field of the (detached) global statistics, and L itself."""
    leaves = {
        name: tensor.detach().clone().requires_grad_(True)
        for name, tensor in stats_fields(global_stats).items()
        if name in GRAD_FIELDS
    }
    with torch.enable_grad():
        result = objective(dataclasses.replace(global_stats, **leaves))
        grads = torch.autograd.grad(result.loss, list(leaves.values()), allow_unused=True)
    coefficients = {
        name: (grad if grad is not None else torch.zeros_like(leaf))
        for (name, leaf), grad in zip(leaves.items(), grads)
    }
    detached = LossResult(result.loss.detach(), {k: v.detach() for k, v in result.metrics.items()})
    return coefficients, detached


def linear_surrogate(local_stats: Stats, coefficients: dict[str, torch.Tensor], start: int) -> torch.Tensor:
    """``sum_i c_i s_i`` over the rows of ``local_stats``, which sit at ``start`` in the global batch."""
    fields = stats_fields(local_stats)
    total = torch.zeros((), device=next(iter(fields.values())).device)
    for name, coefficient in coefficients.items():
        values = fields[name]
        total = total + (coefficient[start : start + values.shape[0]].to(values.device) * values).sum()
    return total
