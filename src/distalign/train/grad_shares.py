"""How much of a step's gradient each part of the objective supplies: ``<family>/grad_share_<part>``.

A loss that is a sum of named parts declares them (``register_loss(terms=...)``) and returns them per row,
``t_k,i`` with ``sum_k t_k,i = l_i`` (UPO: ``upo/preference``, ``upo/aux`` = lambda_aux L_aux,
``upo/value`` = value_weight L_V); the objective adds ``sft`` when ``train.sft_weight`` is set. The
aggregator reduces the per-example values, ``A(l)``, so the step's gradient splits exactly into one
gradient per part:

    g = sum_i c_i dl_i/dθ = sum_k g_k,      g_k = sum_i c_i dt_k,i/dθ,      c_i = dA/dl_i (held fixed).

The share of part k is ``||g_k|| / sum_j ||g_j||`` over all trainable parameters (the value head's
included). Loss values of the parts cannot be compared (L_aux has a floor near mean(w) x the
likelihood's entropy); their gradients act on the same parameters and can.

Exact under accumulation and across processes. ``c`` and each part's coefficients
``d(sum_i c_i t_k,i)/ds`` are taken on the statistics of the whole global batch (every micro-batch and
process), like a batch-coupled objective's (``coupling.py``): each micro-batch back-propagates part k's
linear surrogate, the per-part gradients are summed over micro-batches and processes, and only then are
norms taken. So ``sum_k g_k`` is the gradient the step applies (before clipping), for a decomposable or
a batch-coupled objective alike. Under ``train.coupling_scope=micro_batch`` each micro-batch's own
objective is split the same way, with the step's 1 / (micro-batches x processes) weight.

Cost (``train.grad_shares``, off by default): on a logged step only, before the step, one forward
without gradient per micro-batch (skipped when there is one micro-batch) and one forward with K
backward passes per micro-batch, K the number of parts, plus K gradient-sized buffers held until the
norms are taken (UPO: 3, i.e. three float32 copies of the trainable parameters' gradient). Dropout draws
are forked, so a run with it on takes the same steps as one with it off. The parameters must be whole on
each process: a single process or DDP (FSDP2 and DeepSpeed are refused at start).
"""

from __future__ import annotations

import torch

from distalign.losses.base import Stats
from distalign.train.coupling import (
    concat_stats,
    detach_stats,
    field_coefficients,
    gather_stats,
    gradient_leaves,
    linear_surrogate,
)

PartCoefficients = dict[str, dict[str, torch.Tensor]]


def grad_share_metric(part: str) -> str:
    """The metric of a part's share: ``upo/aux`` -> ``upo/grad_share_aux``, ``sft`` -> ``grad_share_sft``."""
    family, sep, name = part.rpartition("/")
    return f"{family}{sep}grad_share_{name}"


def part_coefficients(objective, stats: Stats, scale: float = 1.0) -> PartCoefficients:
    """For each part k of ``objective`` on ``stats`` (detached): ``d(scale x sum_i c_i t_k,i)/ds`` for
    every gradient-carrying field s, with ``c = dA/dl`` fixed at these statistics."""
    leaf_stats, leaves = gradient_leaves(stats)
    with torch.enable_grad():
        result = objective(leaf_stats)
        (weights,) = torch.autograd.grad(result.loss, result.per_example, retain_graph=True)
        weights = weights.detach() * scale
        return {
            part: field_coefficients((weights * term).sum(), leaves, retain_graph=True)
            for part, term in result.terms.items()
        }


def gradient_shares(
    engine, objective, compute, micro_batches: list[list[int]], *, coupling_scope: str = "global"
) -> dict[str, torch.Tensor]:
    """``{grad_share_metric(part): share}`` at the current parameters for the step over ``micro_batches``
    (this process's), identical on every process, as tensors on the device (nothing is read here).
    ``compute``: the loop's statistics computer (``compute(rows, count_tokens=False)``). Leaves every
    parameter's ``.grad`` as it found it: None (call before the step's own backward)."""
    params = [p for p in engine.model.parameters() if p.requires_grad]
    if any(p.grad is not None for p in params):
        raise RuntimeError("gradient_shares runs before the step's backward, on parameters without gradients")
    per_micro_batch = objective.batch_coupled and coupling_scope == "micro_batch"
    sums: dict[str, torch.Tensor] = {}
    with torch.random.fork_rng(devices=_rng_devices(engine.device)):
        live = None
        if not per_micro_batch:
            if len(micro_batches) == 1:
                live = _forward(engine, compute, micro_batches[0])
                detached = [detach_stats(live)]
            else:  # the coupling first, from a pass that keeps no activations
                with torch.no_grad():
                    detached = [compute(rows, count_tokens=False) for rows in micro_batches]
            global_stats, offset = gather_stats(engine, concat_stats(detached))
            coefficients = part_coefficients(objective, global_stats)
        for rows in micro_batches:
            stats = live if live is not None else _forward(engine, compute, rows)
            if per_micro_batch:
                scale = 1.0 / (len(micro_batches) * engine.world_size)
                coefficients, offset = part_coefficients(objective, detach_stats(stats), scale), 0
            for k, (part, fields) in enumerate(coefficients.items()):
                linear_surrogate(stats, fields, offset).backward(retain_graph=k < len(coefficients) - 1)
                flat = torch.cat([_take_grad(p) for p in params])
                sums[part] = sums[part] + flat if part in sums else flat
            offset += len(rows)
    norms = {part: engine.reduce_sum(total).norm() for part, total in sums.items()}
    whole = torch.stack(list(norms.values())).sum().clamp(min=torch.finfo(torch.float32).tiny)
    return {grad_share_metric(part): norm / whole for part, norm in norms.items()}


def _forward(engine, compute, rows: list[int]) -> Stats:
    """Statistics of ``rows`` with gradient, through the prepared model without DDP's synchronisation
    (the per-part gradients are summed over processes here, explicitly)."""
    with engine.sync_context(False):
        return compute(rows, count_tokens=False)


def _take_grad(param: torch.Tensor) -> torch.Tensor:
    """The parameter's gradient, flattened in at least float32 (zeros where none reached it), and its
    ``.grad`` cleared for the next part."""
    dtype = torch.promote_types(param.dtype, torch.float32)
    grad = param.grad
    param.grad = None
    return (
        torch.zeros(param.numel(), dtype=dtype, device=param.device)
        if grad is None
        else grad.flatten().to(dtype)
    )


def _rng_devices(device: torch.device) -> list[int]:
    return [device.index or 0] if device.type == "cuda" else []
