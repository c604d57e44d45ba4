"""The online loop's update: back-propagate mean_j(-w_j A_j log pi(x_j)) micro-batch by micro-batch, and
say when that forward may also supply the log pi the signal needs.

The surrogate is linear in log pi with constant (detached) coefficients, so the forward that carries
the gradient can come *before* the signal: its detached output is log pi of the samples, the advantages
and weights are computed from it on the global batch, and the backward follows on the same graph. That
replaces the separate no-grad pass over the same tokens that an off-policy step otherwise needs for
log pi (on-policy, log pi is the sampler's log q and no pass is needed). It is done only where the
value is the same as that pass's (:func:`update_forward_scores_policy`).
"""

from __future__ import annotations

import torch

from distalign.data.collate import PackingLayout, collate_sequences, pack_sequences, to_device, token_counts
from distalign.losses.fdivergence import fdpg_policy_gradient_loss
from distalign.models.logprobs import batch_logprobs
from distalign.train.engine import Engine
from distalign.train.online.setup import Rollout


def policy_forward(
    engine: Engine, rollout: Rollout, start: int, stop: int, pad_id: int, packing: PackingLayout | None = None
) -> torch.Tensor:
    """[stop - start] float32 log pi of samples start:stop, summed over completion tokens, with the graph
    for a backward (one forward of the prepared model). ``packing``: the run's packing layout (``data.packing``;
    with shared prompts, a prompt's samples share one copy of it), None: padded."""
    prompts, completions = rollout.prompt_ids[start:stop], rollout.completion_ids[start:stop]
    if packing is None:
        host_batch = collate_sequences(prompts, completions, pad_id)
    else:
        host_batch = pack_sequences(prompts, completions, pad_id, rows=packing.rows)
    tokens, positions, forwarded = token_counts(host_batch)
    engine.count_tokens(tokens, positions, forwarded=forwarded)
    batch = to_device(host_batch, engine.device)
    with engine.accelerator.autocast():
        logps, _ = batch_logprobs(engine.model, batch)
    return logps.float()


def policy_gradient_backward(
    engine: Engine,
    rollout: Rollout,
    advantages: torch.Tensor,
    weights: torch.Tensor | None,
    global_count: int,
    micro_batch_size: int,
    pad_id: int,
    forwarded: torch.Tensor | None = None,
    packing: PackingLayout | None = None,
) -> torch.Tensor:
    """Back-propagate this process's share of mean_j(-w_j A_j log pi(x_j)) over the ``global_count``
    samples of the step, micro-batch by micro-batch; ``advantages``, ``weights`` [len(rollout)]. Returns
    that share's value (summed over processes: the step's surrogate loss), a scalar tensor on the
    device: nothing in the micro-batch loop is read back to the host. ``forwarded``: the output of
    :func:`policy_forward` for all of ``rollout`` (one micro-batch), whose graph is used instead of a
    new forward; ``packing`` as for :func:`policy_forward`."""
    total = torch.zeros((), dtype=torch.float64, device=engine.device)
    starts = list(range(0, len(rollout), micro_batch_size))
    if forwarded is not None and len(starts) != 1:
        raise ValueError("a forwarded log pi covers exactly one micro-batch")
    for k, start in enumerate(starts):
        stop = min(start + micro_batch_size, len(rollout))
        with engine.sync_context(k == len(starts) - 1):
            logps = (
                forwarded
                if forwarded is not None
                else policy_forward(engine, rollout, start, stop, pad_id, packing)
            )
            w = None if weights is None else weights[start:stop].to(engine.device)
            result = fdpg_policy_gradient_loss(logps, advantages[start:stop].to(engine.device), w)
            share = result.loss * (stop - start) / global_count
            engine.backward(share)
        total += share.detach()
    return total


def update_forward_scores_policy(engine: Engine, samples: int, micro_batch_size: int) -> bool:
    """Whether the update's forward may give the signal its log pi (off-policy steps), for ``samples``
    samples on this process: only when

    * they fit in one micro-batch (otherwise every micro-batch's graph would be held until the signal
      is known: more memory than the separate no-grad pass costs in time);
    * no autocast (its low-precision log pi would enter the importance weights pi/q, which the no-grad
      pass computes at the weights' own precision);
    * no dropout in training mode (the update's forward would be a random perturbation of log pi).
    """
    return (
        samples <= micro_batch_size
        and engine.accelerator.mixed_precision == "no"
        and not has_active_dropout(engine.unwrapped())
    )


def has_active_dropout(model: torch.nn.Module) -> bool:
    """True if a forward in training mode drops anything: a dropout module with p > 0, or a dropout
    probability > 0 in a transformers config (attention dropout is a functional call, not a module)."""
    configs = {}
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0:
            return True
        config = getattr(module, "config", None)
        if hasattr(config, "to_dict"):
            configs[id(config)] = config
    for config in configs.values():
        for name, value in config.to_dict().items():
            dropout_setting = "dropout" in name or name.endswith("pdrop")
            if dropout_setting and isinstance(value, float) and value > 0:
                return True
    return False
