"""The DPO family of offline preference losses: pure per-example functions and registered objectives.

Notation (methods/baselines.md): for a pair (x, y_w, y_l) the log-ratios are
``rho_w = log pi(y_w|x) - log pi_ref(y_w|x)`` and ``rho_l`` likewise (nats, summed over completion
tokens unless a loss says "length-normalised"), and the margin is ``m = rho_w - rho_l``.

Every pure function maps tensors of shape [B] to a per-example loss of shape [B] with no reduction and
no config. They are written with ``logsigmoid`` / ``sigmoid`` of the signed argument so that value and
gradient stay finite at ``|m| = 1e4`` in float32 and bfloat16 (``log(sigmoid(x))`` underflows to
``log(0)``).

The registered objectives turn :class:`~distalign.losses.base.PairedStats` /
:class:`~distalign.losses.base.UnpairedStats` into a batch loss (a weighted mean when per-row weights
are given, see :func:`weighted_batch_mean`) and the metrics every preference run logs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distalign.losses.base import LossResult, PairedStats, UnpairedStats, register_loss

__all__ = [
    "dpo_loss",
    "hinge_loss",
    "ipo_loss",
    "kto_loss",
    "preference_metrics",
    "robust_dpo_loss",
    "sft_loss",
    "simpo_loss",
    "token_mean_logps",
    "weighted_batch_mean",
]


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def _check_noise_rate(name: str, value: float) -> None:
    # At 0.5 a label carries no information, and rDPO's 1 / (1 - 2 eps) blows up.
    if not 0.0 <= value < 0.5:
        raise ValueError(f"{name} must lie in [0, 0.5), got {value}")


# ----------------------------------------------------------------------------------------------------
# Pure per-example losses
# ----------------------------------------------------------------------------------------------------


def dpo_loss(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Sigmoid DPO loss per pair; Rafailov et al. 2023, eq. 7 (cDPO label smoothing: Mitchell 2023).

    ``-(1 - eps) log sigmoid(beta m) - eps log sigmoid(-beta m)`` with ``m = rho_w - rho_l`` and
    ``eps = label_smoothing`` (the assumed probability that a label is flipped; 0 gives plain DPO).

    Args:
        chosen_logratios: [B] ``rho_w`` in nats.
        rejected_logratios: [B] ``rho_l`` in nats.
        beta: KL-regularisation strength (> 0).
        label_smoothing: cDPO flip rate in [0, 0.5).

    Returns:
        [B] per-pair loss in nats.
    """
    _check_positive("beta", beta)
    _check_noise_rate("label_smoothing", label_smoothing)
    logits = beta * (chosen_logratios - rejected_logratios)
    loss = -F.logsigmoid(logits)
    if label_smoothing > 0:
        loss = (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-logits)
    return loss


def robust_dpo_loss(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    *,
    beta: float = 0.1,
    eps: float = 0.1,
) -> torch.Tensor:
    """Robust DPO (rDPO) loss per pair; Chowdhury et al. 2024, "Provably Robust DPO", unbiased loss.

    ``[(1 - eps) l(m) - eps l(-m)] / (1 - 2 eps)`` with ``l(m) = -log sigmoid(beta m)``. If each
    observed label is flipped independently with probability ``eps``, its expectation over the flip
    equals the clean DPO loss ``l(m)``. Unlike DPO it is unbounded below (``-eps l(-m)``).

    Args:
        chosen_logratios: [B] ``rho_w`` in nats.
        rejected_logratios: [B] ``rho_l`` in nats.
        beta: KL-regularisation strength (> 0).
        eps: known label-flip rate in [0, 0.5).

    Returns:
        [B] per-pair loss in nats (may be negative).
    """
    _check_positive("beta", beta)
    _check_noise_rate("eps", eps)
    logits = beta * (chosen_logratios - rejected_logratios)
    loss_as_labelled = -F.logsigmoid(logits)
    loss_if_flipped = -F.logsigmoid(-logits)
    return ((1 - eps) * loss_as_labelled - eps * loss_if_flipped) / (1 - 2 * eps)


def ipo_loss(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    *,
    beta: float = 0.1,
) -> torch.Tensor:
    """IPO loss per pair; Azar et al. 2023, empirical IPO loss (eq. 17), ``tau = beta``.

    ``(m - 1 / (2 beta))^2``: a squared regression of the margin onto ``1 / (2 beta)``, so the minimum
    is at ``m = 1 / (2 beta)``. Pass length-normalised log-ratios (per-token means, see
    :func:`token_mean_logps`), as the registered ``"ipo"`` objective does.

    Args:
        chosen_logratios: [B] length-normalised ``rho_w`` in nats per token.
        rejected_logratios: [B] length-normalised ``rho_l`` in nats per token.
        beta: regularisation strength (> 0).

    Returns:
        [B] per-pair loss in (nats per token)^2.
    """
    _check_positive("beta", beta)
    margin = chosen_logratios - rejected_logratios
    return (margin - 1 / (2 * beta)) ** 2


def hinge_loss(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    *,
    beta: float = 0.1,
) -> torch.Tensor:
    """Hinge loss per pair; SLiC (Zhao et al. 2023) with RSO's normalisation (Liu et al. 2023).

    ``max(0, 1 - beta m)``: zero once the scaled margin exceeds 1, so confident pairs stop contributing.

    Args:
        chosen_logratios: [B] ``rho_w`` in nats.
        rejected_logratios: [B] ``rho_l`` in nats.
        beta: scale of the margin (> 0); the margin target in nats is ``1 / beta``.

    Returns:
        [B] per-pair loss (dimensionless).
    """
    _check_positive("beta", beta)
    return torch.relu(1 - beta * (chosen_logratios - rejected_logratios))


def simpo_loss(
    chosen_avg_logps: torch.Tensor,
    rejected_avg_logps: torch.Tensor,
    *,
    beta: float = 2.0,
    gamma: float = 0.5,
) -> torch.Tensor:
    """SimPO loss per pair (reference-free); Meng et al. 2024, eq. 6.

    ``-log sigmoid(beta (avg_w - avg_l) - gamma)`` where ``avg`` is the policy's per-token mean
    log-probability. ``gamma`` is the target reward margin itself, in the same units as
    ``beta * avg`` (as in eq. 6). The authors' released configs set the ratio ``gamma / beta`` instead
    (e.g. 0.5 at ``beta = 2.0``, i.e. ``gamma = 1.0`` here); the default ``gamma = 0.5`` matches TRL's
    ``simpo_gamma``.

    Args:
        chosen_avg_logps: [B] ``log pi(y_w|x) / |y_w|`` in nats per token.
        rejected_avg_logps: [B] ``log pi(y_l|x) / |y_l|`` in nats per token.
        beta: reward scale (> 0).
        gamma: target reward margin (reward units, not divided by ``beta``).

    Returns:
        [B] per-pair loss in nats.
    """
    _check_positive("beta", beta)
    return -F.logsigmoid(beta * (chosen_avg_logps - rejected_avg_logps) - gamma)


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
    _check_positive("beta", beta)
    if desirable_weight < 0 or undesirable_weight < 0:
        raise ValueError(f"KTO weights must be >= 0, got {desirable_weight=}, {undesirable_weight=}")
    if not bool(((labels == 0) | (labels == 1)).all()):
        raise ValueError("KTO labels must be 1 (desirable) or 0 (undesirable)")
    z = torch.as_tensor(kl_reference, dtype=logratios.dtype, device=logratios.device).detach().clamp(min=0)
    desirable = labels.to(torch.bool)
    desirable_loss = desirable_weight * torch.sigmoid(beta * (z - logratios))
    undesirable_loss = undesirable_weight * torch.sigmoid(beta * (logratios - z))
    return torch.where(desirable, desirable_loss, undesirable_loss)


def token_mean_logps(logps: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Per-token mean log-probability ``logps / lengths``; [B] nats and [B] token counts -> [B].

    Lengths are clamped at 1: an empty completion has summed log-prob 0, so its mean is 0, not NaN.
    """
    return logps / lengths.to(logps.dtype).clamp(min=1)


def sft_loss(policy_logps: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Supervised fine-tuning loss per sequence: token-mean negative log-likelihood ``-logp / length``.

    Args:
        policy_logps: [B] summed completion log-probs in nats.
        lengths: [B] completion token counts.

    Returns:
        [B] nats per token.
    """
    return -token_mean_logps(policy_logps, lengths)


# ----------------------------------------------------------------------------------------------------
# Reduction and metrics
# ----------------------------------------------------------------------------------------------------


def weighted_batch_mean(per_example: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """``sum(w l) / sum(w)`` over the batch, or the plain mean when ``weights`` is None; [B] -> [].

    A batch whose weights are all zero contributes a loss of 0 (with zero gradient) rather than NaN.
    """
    if weights is None:
        return per_example.mean()
    weights = weights.to(per_example.dtype)
    total_weight = weights.sum().clamp(min=torch.finfo(per_example.dtype).tiny)
    return (weights * per_example).sum() / total_weight


def preference_metrics(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    beta: float,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The metrics every paired preference run logs; detached scalar means over the batch given.

    ``rewards/*`` are implicit rewards ``beta * rho`` (nats scaled by ``beta``), ``rewards/margins`` their
    difference, ``rewards/accuracies`` the fraction of pairs with ``rho_w > rho_l``, and ``logps/*``
    the policy's summed sequence log-probs (nats). All inputs have shape [B].
    """
    with torch.no_grad():
        chosen_rewards = beta * chosen_logratios.detach().float()
        rejected_rewards = beta * rejected_logratios.detach().float()
        return {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "logps/chosen": policy_chosen_logps.detach().float().mean(),
            "logps/rejected": policy_rejected_logps.detach().float().mean(),
        }


# ----------------------------------------------------------------------------------------------------
# Registered objectives
# ----------------------------------------------------------------------------------------------------


def _paired_logratios(stats: PairedStats, loss_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if stats.ref_chosen_logps is None or stats.ref_rejected_logps is None:
        raise ValueError(
            f"loss {loss_name!r} needs reference log-probs (ref_chosen_logps / ref_rejected_logps)"
        )
    return (
        stats.policy_chosen_logps - stats.ref_chosen_logps,
        stats.policy_rejected_logps - stats.ref_rejected_logps,
    )


def _paired_result(
    stats: PairedStats, per_pair: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor, beta: float
) -> LossResult:
    metrics = preference_metrics(
        chosen, rejected, beta, stats.policy_chosen_logps, stats.policy_rejected_logps
    )
    return LossResult(loss=weighted_batch_mean(per_pair, stats.weights), metrics=metrics)


@register_loss(
    "dpo",
    data_kind="paired",
    needs_reference=True,
    paper="Rafailov et al. 2023, DPO eq. 7; label smoothing: Mitchell 2023 cDPO",
)
def dpo_objective(stats: PairedStats, *, beta: float = 0.1, label_smoothing: float = 0.0) -> LossResult:
    """Batch sigmoid DPO (:func:`dpo_loss`) on summed log-ratios."""
    chosen, rejected = _paired_logratios(stats, "dpo")
    per_pair = dpo_loss(chosen, rejected, beta=beta, label_smoothing=label_smoothing)
    return _paired_result(stats, per_pair, chosen, rejected, beta)


@register_loss(
    "robust_dpo",
    data_kind="paired",
    needs_reference=True,
    paper="Chowdhury et al. 2024, Provably Robust DPO (rDPO unbiased loss)",
)
def robust_dpo_objective(stats: PairedStats, *, beta: float = 0.1, eps: float = 0.1) -> LossResult:
    """Batch rDPO (:func:`robust_dpo_loss`) on summed log-ratios."""
    chosen, rejected = _paired_logratios(stats, "robust_dpo")
    per_pair = robust_dpo_loss(chosen, rejected, beta=beta, eps=eps)
    return _paired_result(stats, per_pair, chosen, rejected, beta)


@register_loss("ipo", data_kind="paired", needs_reference=True, paper="Azar et al. 2023, IPO eq. 17")
def ipo_objective(stats: PairedStats, *, beta: float = 0.1) -> LossResult:
    """Batch IPO (:func:`ipo_loss`) on length-normalised log-ratios; rewards are per-token too."""
    chosen, rejected = _paired_logratios(stats, "ipo")
    chosen = token_mean_logps(chosen, stats.chosen_lengths)
    rejected = token_mean_logps(rejected, stats.rejected_lengths)
    per_pair = ipo_loss(chosen, rejected, beta=beta)
    return _paired_result(stats, per_pair, chosen, rejected, beta)


@register_loss(
    "hinge",
    data_kind="paired",
    needs_reference=True,
    paper="Zhao et al. 2023 SLiC; Liu et al. 2023 RSO (hinge on normalised likelihood)",
)
def hinge_objective(stats: PairedStats, *, beta: float = 0.1) -> LossResult:
    """Batch hinge (:func:`hinge_loss`) on summed log-ratios."""
    chosen, rejected = _paired_logratios(stats, "hinge")
    per_pair = hinge_loss(chosen, rejected, beta=beta)
    return _paired_result(stats, per_pair, chosen, rejected, beta)


@register_loss("simpo", data_kind="paired", needs_reference=False, paper="Meng et al. 2024, SimPO eq. 6")
def simpo_objective(stats: PairedStats, *, beta: float = 2.0, gamma: float = 0.5) -> LossResult:
    """Batch SimPO (:func:`simpo_loss`); reference log-probs, if present, are ignored.

    Its implicit rewards are ``beta * avg logp`` (reference-free), reported as ``rewards/*``.
    """
    chosen = token_mean_logps(stats.policy_chosen_logps, stats.chosen_lengths)
    rejected = token_mean_logps(stats.policy_rejected_logps, stats.rejected_lengths)
    per_pair = simpo_loss(chosen, rejected, beta=beta, gamma=gamma)
    return _paired_result(stats, per_pair, chosen, rejected, beta)


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
    paper="Ethayarajh et al. 2024, KTO (loss lambda_y - v(x, y); z_ref from mismatched pairs)",
)
def kto_objective(
    stats: UnpairedStats,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> LossResult:
    """Batch KTO (:func:`kto_loss`) with ``z = max(0, mean(kl_policy_logps - kl_ref_logps))``, detached.

    The KL rows pair each prompt with another row's completion (Ethayarajh et al. 2024), so ``z``
    estimates ``KL(pi || pi_ref)`` over the batch; that coupling is why the loss is batch-coupled.
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
    return LossResult(
        loss=weighted_batch_mean(per_row, stats.weights), metrics=_kto_metrics(stats, logratios, z, beta)
    )


@register_loss(
    "sft", data_kind="paired", needs_reference=False, paper="supervised fine-tuning (token-mean NLL)"
)
def sft_objective(stats: PairedStats) -> LossResult:
    """Batch token-mean NLL of the chosen completion (:func:`sft_loss`); the rejected one is unused.

    No reference is involved, so only ``logps/*`` (summed, nats) and ``nll`` are reported.
    """
    per_row = sft_loss(stats.policy_chosen_logps, stats.chosen_lengths)
    with torch.no_grad():
        metrics = {
            "logps/chosen": stats.policy_chosen_logps.detach().float().mean(),
            "logps/rejected": stats.policy_rejected_logps.detach().float().mean(),
            "nll": per_row.detach().float().mean(),
        }
    return LossResult(loss=weighted_batch_mean(per_row, stats.weights), metrics=metrics)
