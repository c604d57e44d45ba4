"""KTO as a registered loss: per-row losses around a batch KL anchor (Ethayarajh et al. 2024).

The pure per-row function is :func:`kto_loss`; the registered objective adds the anchor ``z`` from
mismatched prompt/completion pairs and the metrics.
"""

from __future__ import annotations

import torch

from distalign.losses.base import PerExampleLosses, UnpairedStats, check_positive, register_loss


def kto_loss(
    logratios: torch.Tensor,
    labels: torch.Tensor,
    kl_reference: torch.Tensor | float,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> torch.Tensor:
    """KTO loss per row; Ethayarajh et al. 2024, the KTO loss ``lambda_y - v(x, y)``.

    Desirable rows: ``w_D (1 - sigmoid(beta (rho - z)))``; undesirable rows:
    ``w_U (1 - sigmoid(beta (z - rho)))``, computed as ``sigmoid`` of the negated argument so nothing
    cancels. ``z = kl_reference`` is the reference point: it is detached here and clamped at 0 (a KL
    divergence estimate cannot be negative), so callers may pass the raw batch estimate. The paper
    recommends ``w_D n_D / (w_U n_U)`` in [1, 4/3].

    Args:
        logratios: [B] ``rho = log pi(y|x) - log pi_ref(y|x)`` in nats.
        labels: [B] 1 for desirable, 0 for undesirable (bool, int or float).
        kl_reference: scalar ``z`` in nats.
        beta: value-function sharpness (> 0).
        desirable_weight: ``w_D`` (>= 0).
        undesirable_weight: ``w_U`` (>= 0).

    Returns:
        [B] per-row loss in [0, max(w_D, w_U)].
    """
    check_positive("beta", beta)
    if desirable_weight < 0 or undesirable_weight < 0:
        raise ValueError(f"KTO weights must be >= 0, got {desirable_weight=}, {undesirable_weight=}")
    if not bool(((labels == 0) | (labels == 1)).all()):
        raise ValueError("KTO labels must be 1 (desirable) or 0 (undesirable)")
    z = torch.as_tensor(kl_reference, dtype=logratios.dtype, device=logratios.device).detach().clamp(min=0)
    desirable = labels.to(torch.bool)
    desirable_loss = desirable_weight * torch.sigmoid(beta * (z - logratios))
    undesirable_loss = undesirable_weight * torch.sigmoid(beta * (logratios - z))
    return torch.where(desirable, desirable_loss, undesirable_loss)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # An empty side (e.g. a micro-batch with no undesirable rows) reports 0; the counts say so.
    count = mask.sum()
    return torch.where(mask, values, torch.zeros_like(values)).sum() / count.clamp(min=1)


def _kto_metrics(
    stats: UnpairedStats, logratios: torch.Tensor, z: torch.Tensor, beta: float
) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        desirable = stats.labels.detach().to(torch.bool)
        undesirable = ~desirable
        rewards = beta * logratios.detach().float()
        logps = stats.policy_logps.detach().float()
        chosen_reward = _masked_mean(rewards, desirable)
        rejected_reward = _masked_mean(rewards, undesirable)
        return {
            "rewards/chosen": chosen_reward,
            "rewards/rejected": rejected_reward,
            "rewards/margins": chosen_reward - rejected_reward,
            "logps/chosen": _masked_mean(logps, desirable),
            "logps/rejected": _masked_mean(logps, undesirable),
            "count/desirable": desirable.sum().float(),
            "count/undesirable": undesirable.sum().float(),
            "kl": z.detach().float(),
        }


@register_loss(
    "kto",
    data_kind="unpaired",
    needs_reference=True,
    batch_coupled=True,
    needs_kl_pairs=True,
    paper="Ethayarajh et al. 2024, KTO (loss lambda_y - v(x, y); z_ref from mismatched pairs)",
)
def kto_per_example(
    stats: UnpairedStats,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> PerExampleLosses:
    """KTO per row (:func:`kto_loss`) with ``z = max(0, mean(kl_policy_logps - kl_ref_logps))``, detached.

    The KL rows pair each prompt with another row's completion (Ethayarajh et al. 2024), so ``z``
    estimates ``KL(pi || pi_ref)`` over the batch; that anchor is why the loss is batch-coupled. Given
    ``z`` the per-row losses are ordinary per-example losses, so KTO composes with every aggregator.
    """
    if stats.ref_logps is None:
        raise ValueError("loss 'kto' needs reference log-probs (ref_logps)")
    if stats.kl_policy_logps is None or stats.kl_ref_logps is None:
        raise ValueError(
            "loss 'kto' needs kl_policy_logps and kl_ref_logps: log-probs of mismatched prompt/completion "
            "pairs under the policy and the reference, used for the KL reference point z_ref"
        )
    logratios = stats.policy_logps - stats.ref_logps
    z = (stats.kl_policy_logps - stats.kl_ref_logps).detach().mean().clamp(min=0)
    per_row = kto_loss(
        logratios,
        stats.labels,
        z,
        beta=beta,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
    )
    return PerExampleLosses(per_row, _kto_metrics(stats, logratios, z, beta))
