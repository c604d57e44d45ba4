"""The DPO family of offline preference losses: pure per-example functions and registered objectives.

Notation (docs/paper_index.md, "Offline losses"): for a pair (x, y_w, y_l) the log-ratios are
``rho_w = log pi(y_w|x) - log pi_ref(y_w|x)`` and ``rho_l`` likewise (nats, summed over completion
tokens unless a loss says "length-normalised"), and the margin is ``m = rho_w - rho_l``.

Every pure function maps tensors of shape [B] to a per-example loss of shape [B] with no reduction and
no config. They are written with ``logsigmoid`` / ``sigmoid`` of the signed argument so that value and
gradient stay finite at ``|m| = 1e4`` in float32 and bfloat16 (``log(sigmoid(x))`` underflows to
``log(0)``).

The registered losses turn :class:`~distalign.losses.base.PairedStats` /
:class:`~distalign.losses.base.UnpairedStats` into per-example losses and the metrics every preference
run logs; the five pairwise ones share one pattern (:func:`register_pairwise`). Reducing them over the
batch is an aggregator's job (:mod:`distalign.losses.aggregators`).
"""

from __future__ import annotations

import inspect
from typing import Literal

import torch
import torch.nn.functional as F

from distalign.losses.base import PairedStats, PerExampleLosses, UnpairedStats, check_positive, register_loss

PairedInputs = Literal["logratios", "token_mean_logratios", "token_mean_logps"]

__all__ = [
    "dpo_loss",
    "hinge_loss",
    "ipo_loss",
    "positive_nll",
    "preference_metrics",
    "register_pairwise",
    "robust_dpo_loss",
    "sft_loss",
    "simpo_loss",
    "token_mean_logps",
]


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
    check_positive("beta", beta)
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
    check_positive("beta", beta)
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
    check_positive("beta", beta)
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
    check_positive("beta", beta)
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
    check_positive("beta", beta)
    return -F.logsigmoid(beta * (chosen_avg_logps - rejected_avg_logps) - gamma)


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
# Metrics
# ----------------------------------------------------------------------------------------------------


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
# Registered losses: statistics -> per-example losses [N] + metrics
# ----------------------------------------------------------------------------------------------------


def paired_inputs(
    stats: PairedStats, loss_name: str, inputs: PairedInputs
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (chosen, rejected) values a pairwise loss compares, [N] each.

    ``inputs``: "logratios" (``log pi - log pi_ref``, summed over tokens), "token_mean_logratios" (the
    same per token) or "token_mean_logps" (the policy's per-token log-probs; reference-free).
    """
    if inputs == "token_mean_logps":
        return (
            token_mean_logps(stats.policy_chosen_logps, stats.chosen_lengths),
            token_mean_logps(stats.policy_rejected_logps, stats.rejected_lengths),
        )
    if stats.ref_chosen_logps is None or stats.ref_rejected_logps is None:
        raise ValueError(
            f"loss {loss_name!r} needs reference log-probs (ref_chosen_logps / ref_rejected_logps)"
        )
    chosen = stats.policy_chosen_logps - stats.ref_chosen_logps
    rejected = stats.policy_rejected_logps - stats.ref_rejected_logps
    if inputs == "token_mean_logratios":
        return token_mean_logps(chosen, stats.chosen_lengths), token_mean_logps(
            rejected, stats.rejected_lengths
        )
    return chosen, rejected


def register_pairwise(
    name: str, pairwise_loss, *, inputs: PairedInputs = "logratios", paper: str, summary: str
):
    """Register the pure pairwise function ``pairwise_loss(chosen [N], rejected [N], **options) -> [N]``
    as the loss ``name``: its keyword-only parameters become the loss's options, and every paired
    loss reports the same metrics (:func:`preference_metrics`; ``rewards/*`` scaled by ``beta``)."""
    option_params = [
        p for p in inspect.signature(pairwise_loss).parameters.values() if p.kind is p.KEYWORD_ONLY
    ]

    def loss(stats: PairedStats, **options) -> PerExampleLosses:
        chosen, rejected = paired_inputs(stats, name, inputs)
        per_pair = pairwise_loss(chosen, rejected, **options)
        beta = options.get("beta", inspect.signature(pairwise_loss).parameters["beta"].default)
        metrics = preference_metrics(
            chosen, rejected, beta, stats.policy_chosen_logps, stats.policy_rejected_logps
        )
        return PerExampleLosses(per_pair, metrics)

    loss.__name__ = f"{name}_per_example"
    loss.__doc__ = (
        f"{summary} Per pair, on {inputs.replace('_', ' ')} (see :func:`{pairwise_loss.__name__}`)."
    )
    stats_param = inspect.Parameter("stats", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    loss.__signature__ = inspect.Signature([stats_param, *option_params])
    register_loss(name, data_kind="paired", needs_reference=inputs != "token_mean_logps", paper=paper)(loss)
    return loss


register_pairwise(
    "dpo",
    dpo_loss,
    paper="Rafailov et al. 2023, DPO eq. 7; label smoothing: Mitchell 2023 cDPO",
    summary="Sigmoid DPO.",
)
register_pairwise(
    "robust_dpo",
    robust_dpo_loss,
    paper="Chowdhury et al. 2024, Provably Robust DPO (rDPO unbiased loss)",
    summary="Robust DPO (rDPO).",
)
register_pairwise(
    "ipo",
    ipo_loss,
    inputs="token_mean_logratios",
    paper="Azar et al. 2023, IPO eq. 17",
    summary="IPO; its rewards are per token too.",
)
register_pairwise(
    "hinge",
    hinge_loss,
    paper="Zhao et al. 2023 SLiC; Liu et al. 2023 RSO (hinge on normalised likelihood)",
    summary="Hinge (SLiC).",
)
register_pairwise(
    "simpo",
    simpo_loss,
    inputs="token_mean_logps",
    paper="Meng et al. 2024, SimPO eq. 6",
    summary="SimPO (reference-free; implicit rewards beta * avg logp; reference log-probs are ignored).",
)


@register_loss(
    "sft", data_kind="paired", needs_reference=False, paper="supervised fine-tuning (token-mean NLL)"
)
def sft_per_example(stats: PairedStats) -> PerExampleLosses:
    """Token-mean NLL of the chosen completion per pair (:func:`sft_loss`); the rejected one is unused.

    No reference is involved, so only ``logps/*`` (summed, nats) and ``nll`` are reported.
    """
    per_row = sft_loss(stats.policy_chosen_logps, stats.chosen_lengths)
    with torch.no_grad():
        metrics = {
            "logps/chosen": stats.policy_chosen_logps.detach().float().mean(),
            "logps/rejected": stats.policy_rejected_logps.detach().float().mean(),
            "nll": per_row.detach().float().mean(),
        }
    return PerExampleLosses(per_row, metrics)


def positive_nll(stats: PairedStats | UnpairedStats) -> torch.Tensor:
    """Token-mean NLL of each row's chosen / positive completion, [N]; 0 for negative unpaired rows.

    The ``sft_weight`` term adds ``sft_weight x`` this to every per-example loss, so it is weighted,
    aggregated and logged exactly like the loss it is added to.
    """
    if isinstance(stats, PairedStats):
        return sft_loss(stats.policy_chosen_logps, stats.chosen_lengths)
    if isinstance(stats, UnpairedStats):
        return sft_loss(stats.policy_logps, stats.lengths) * stats.labels.to(stats.policy_logps.dtype)
    raise ValueError("sft_weight needs paired or unpaired rows")
