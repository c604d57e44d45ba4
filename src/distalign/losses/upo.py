"""UPO: user preferences plus designer objectives, offline (Badrinath, Agarwal, Xu 2025, arXiv 2405.17956),
and the two designer-aware DPO baselines it is compared with.

The KL-regularised optimum ``pi* ~ pi_ref exp(r_pref / beta) exp(r_aux / beta)`` factorises, and UPO
trains each factor with its own maximum-likelihood-style loss on the offline data:

* ``L_pref``: DPO on pairs (loss ``upo``) or KTO on unpaired rows (``upo_kto``, the paper's own base);
* ``L_aux = -E[w log pi(y|x)]`` over the dataset's own responses (both responses of a pair), with
  advantage weights ``w = sg(exp(A / beta_a))``, ``A = r_aux(x, y) - V(x)``: advantage-weighted
  regression, no sampling, no ratios;
* ``L_V = E[|tau - 1(u < 0)| u^2]``, ``u = r_aux - V(x)``: expectile regression of a prompt-only value
  head ``V`` (``heads["value"]``, the policy's last-prompt-token state; see models/heads.py).

Per example: ``L_pref + lambda_aux * L_aux + value_weight * L_V`` (a pair's two responses each count
1/2 in ``L_aux`` and ``L_V``). ``r_aux = sum_k w_k normalise(r_k)`` arrives as the per-row signal
``chosen_reward/designer`` / ``rejected_reward/designer`` (``reward/designer`` for unpaired rows),
computed once over the data from the config's ``designer:`` section (``data/designer.py``).

Baselines reading the same signal, so a comparison differs only in the objective:

* ``modpo``: the designer reward folded into DPO's margin (MODPO, Zhou et al. 2024):
  ``-log sigmoid(beta m - lambda_aux (r_aux(y_w) - r_aux(y_l)))``: the implicit reward must then
  account for the designer score as well as the preference;
* ``dpo_relabel``: DPO on pairs relabelled by a compound score ``s(y) = 1(y preferred) + lambda_aux
  r_aux(y)``: a pair is swapped when the designer disagrees with the label by more than
  ``1 / lambda_aux`` (in normalised reward units).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from distalign.losses.base import PairedStats, PerExampleLosses, UnpairedStats, check_positive, register_loss
from distalign.losses.kto import kto_per_example
from distalign.losses.preference import dpo_loss, paired_inputs, preference_metrics, token_mean_logps

#: The per-row signal names of the composite designer reward (data/designer.py writes them).
DESIGNER = "designer"
CHOSEN_DESIGNER, REJECTED_DESIGNER, UNPAIRED_DESIGNER = (
    f"chosen_reward/{DESIGNER}",
    f"rejected_reward/{DESIGNER}",
    f"reward/{DESIGNER}",
)
UPO_PAPER = "Badrinath, Agarwal, Xu 2025, UPO (arXiv 2405.17956), L = L_pref + lambda L_aux + L_V"

Likelihood = Literal["sequence", "token_mean"]


def expectile_loss(residuals: torch.Tensor, tau: float) -> torch.Tensor:
    """``|tau - 1(u < 0)| u^2`` per element (asymmetric least squares; Newey & Powell 1987).

    Minimised over a constant c with ``u = r - c``, it gives the tau-expectile of r: the mean at
    ``tau = 0.5``, towards the maximum as tau -> 1.
    """
    if not 0.0 < tau < 1.0:
        raise ValueError(f"expectile tau must lie in (0, 1), got {tau}")
    # Built in the residuals' dtype: torch.where on Python scalars would round tau to float32.
    weight = torch.where(residuals < 0, residuals.new_tensor(1.0 - tau), residuals.new_tensor(tau))
    return weight * residuals.square()


@dataclass
class AdvantageWeights:
    """``w`` [M] (detached) and the diagnostics every UPO run logs."""

    weights: torch.Tensor
    clipped_fraction: torch.Tensor
    effective_sample_size: torch.Tensor


def advantage_weights(
    advantages: torch.Tensor, *, temperature: float, clip: float | None, normalize: bool
) -> AdvantageWeights:
    """``w = exp(A / temperature)`` (detached), optionally divided by its batch mean, then clipped at
    ``clip``. Computed from ``A / temperature - max`` when normalising, so a large advantage cannot
    overflow; unnormalised weights are capped in log space (``min(a, log clip)``) for the same reason.

    ``effective_sample_size`` is ``(sum w)^2 / (M sum w^2)`` in (0, 1]: 1 when all weights are equal,
    1/M when one response carries all the weight.
    """
    check_positive("advantage_temperature", temperature)
    if clip is not None:
        check_positive("weight_clip", clip)
    scaled = advantages.detach() / temperature
    if normalize:
        weights = torch.exp(scaled - scaled.max())
        weights = weights / weights.mean()
        clipped = weights > clip if clip is not None else torch.zeros_like(weights, dtype=torch.bool)
        if clip is not None:
            weights = weights.clamp(max=clip)
    elif clip is not None:
        # exp(min(a, log clip)) = min(exp(a), clip) without forming exp(a) when a is huge.
        clipped = scaled > math.log(clip)
        weights = torch.exp(scaled.clamp(max=math.log(clip)))
    else:
        weights = torch.exp(scaled)
        clipped = torch.zeros_like(weights, dtype=torch.bool)
    ess = weights.sum().square() / (weights.numel() * weights.square().sum()).clamp(min=1e-30)
    return AdvantageWeights(weights, clipped.float().mean(), ess)


#: The parts of UPO's loss, per row (``PerExampleLosses.terms``): L_pref, lambda_aux L_aux, value_weight L_V.
UPO_TERMS = ("upo/preference", "upo/aux", "upo/value")


@dataclass
class DesignerTerms:
    """UPO's designer-side losses per response ([M] each), already weighted (``lambda_aux`` x L_aux,
    ``value_weight`` x L_V), and their metrics."""

    aux: torch.Tensor
    value: torch.Tensor
    metrics: dict[str, torch.Tensor]


def designer_terms(
    logps: torch.Tensor,
    lengths: torch.Tensor,
    designer_rewards: torch.Tensor,
    values: torch.Tensor,
    *,
    lambda_aux: float,
    value_weight: float,
    advantage_temperature: float,
    expectile: float,
    weight_clip: float | None,
    normalize_weights: bool,
    aux_likelihood: Likelihood,
) -> DesignerTerms:
    """``lambda_aux`` x ``-w log pi(y|x)`` and ``value_weight`` x ``|tau - 1(u<0)| u^2`` for M responses
    with rewards ``r_aux`` and values ``V(x)`` (UPO's designer side; the metrics are unweighted).

    ``aux_likelihood``: "sequence" uses the summed log-prob (the paper's ``log pi(y|x)``), "token_mean"
    divides it by the completion length so long responses do not dominate.
    """
    if lambda_aux < 0 or value_weight < 0:
        raise ValueError(f"lambda_aux and value_weight must be >= 0, got {lambda_aux=}, {value_weight=}")
    if aux_likelihood not in ("sequence", "token_mean"):
        raise ValueError(f"aux_likelihood must be 'sequence' or 'token_mean', got {aux_likelihood!r}")
    rewards = designer_rewards.to(logps.dtype)
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError(
            "the designer reward signal has missing or non-finite values: every row needs r_aux "
            "(configure the designer: section, or give every row the reward column)"
        )
    residuals = rewards - values
    weighted = advantage_weights(
        residuals, temperature=advantage_temperature, clip=weight_clip, normalize=normalize_weights
    )
    loglik = logps if aux_likelihood == "sequence" else token_mean_logps(logps, lengths)
    aux = -weighted.weights * loglik
    value = expectile_loss(residuals, expectile)
    with torch.no_grad():
        metrics = {
            "upo/aux_loss": aux.detach().float().mean(),
            "upo/value_loss": value.detach().float().mean(),
            "upo/value_mean": values.detach().float().mean(),
            "upo/advantage_mean": residuals.detach().float().mean(),
            "upo/weight_mean": weighted.weights.float().mean(),
            "upo/weight_max": weighted.weights.float().max(),
            "upo/clipped_fraction": weighted.clipped_fraction,
            "upo/weight_ess": weighted.effective_sample_size.float(),
        }
    return DesignerTerms(lambda_aux * aux, value_weight * value, metrics)


def _signal(stats: PairedStats | UnpairedStats, name: str, loss_name: str) -> torch.Tensor:
    if name not in stats.signals:
        raise ValueError(
            f"loss {loss_name!r} needs the per-row signal {name!r}: add a designer: section to the config "
            "(designer rewards computed over the data), see docs/upo.md"
        )
    return stats.signals[name]


def _value_head(stats: PairedStats | UnpairedStats, loss_name: str) -> torch.Tensor:
    if "value" not in stats.heads:
        raise ValueError(f"loss {loss_name!r} needs the value head's outputs (heads['value'])")
    return stats.heads["value"]


@register_loss(
    "upo",
    data_kind="paired",
    needs_reference=True,
    paper=UPO_PAPER + " with DPO (Rafailov et al. 2023) as L_pref",
    signals=(CHOSEN_DESIGNER, REJECTED_DESIGNER),
    heads=("value",),
    coupled_by=("normalize_weights",),
    terms=UPO_TERMS,
)
def upo_per_example(
    stats: PairedStats,
    *,
    beta: float = 0.1,
    lambda_aux: float = 1.0,
    advantage_temperature: float = 1.0,
    expectile: float = 0.5,
    value_weight: float = 1.0,
    weight_clip: float | None = 20.0,
    normalize_weights: bool = False,
    aux_likelihood: Likelihood = "token_mean",
) -> PerExampleLosses:
    """UPO per pair: DPO + ``lambda_aux`` x advantage-weighted NLL of both responses + the value loss.

    ``normalize_weights`` divides ``w`` by its mean over the optimizer batch (then the loss is
    batch-coupled, and the loop makes it exact over the global batch).
    """
    chosen, rejected = paired_inputs(stats, "upo", "logratios")
    preference = dpo_loss(chosen, rejected, beta=beta)
    value = _value_head(stats, "upo")
    terms = designer_terms(
        torch.cat([stats.policy_chosen_logps, stats.policy_rejected_logps]),
        torch.cat([stats.chosen_lengths, stats.rejected_lengths]),
        torch.cat([_signal(stats, CHOSEN_DESIGNER, "upo"), _signal(stats, REJECTED_DESIGNER, "upo")]),
        torch.cat([value, value]),
        lambda_aux=lambda_aux,
        value_weight=value_weight,
        advantage_temperature=advantage_temperature,
        expectile=expectile,
        weight_clip=weight_clip,
        normalize_weights=normalize_weights,
        aux_likelihood=aux_likelihood,
    )
    n = len(stats)
    parts = dict(  # a pair's two responses count 1/2 each
        zip(
            UPO_TERMS,
            (preference, 0.5 * (terms.aux[:n] + terms.aux[n:]), 0.5 * (terms.value[:n] + terms.value[n:])),
        )
    )
    metrics = preference_metrics(
        chosen, rejected, beta, stats.policy_chosen_logps, stats.policy_rejected_logps
    )
    metrics["upo/preference_loss"] = preference.detach().float().mean()
    return _sum_of_parts(parts, {**metrics, **terms.metrics, **_designer_means(stats)})


def _sum_of_parts(parts: dict[str, torch.Tensor], metrics: dict[str, torch.Tensor]) -> PerExampleLosses:
    """The per-example loss as the sum of its named parts, which it also returns (the loop can split the
    gradient by part: ``train.grad_shares``)."""
    losses = sum(parts.values(), torch.zeros_like(next(iter(parts.values()))))
    return PerExampleLosses(losses, metrics, parts)


@register_loss(
    "upo_kto",
    data_kind="unpaired",
    needs_reference=True,
    batch_coupled=True,
    needs_kl_pairs=True,
    paper=UPO_PAPER + " with KTO (Ethayarajh et al. 2024) as L_pref, the paper's base",
    signals=(UNPAIRED_DESIGNER,),
    heads=("value",),
    terms=UPO_TERMS,
)
def upo_kto_per_example(
    stats: UnpairedStats,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    lambda_aux: float = 1.0,
    advantage_temperature: float = 1.0,
    expectile: float = 0.5,
    value_weight: float = 1.0,
    weight_clip: float | None = 20.0,
    normalize_weights: bool = False,
    aux_likelihood: Likelihood = "token_mean",
) -> PerExampleLosses:
    """UPO per row on unpaired data: KTO (batch KL anchor, hence batch-coupled) + ``lambda_aux`` x
    advantage-weighted NLL of the row's response (desirable or not) + the value loss."""
    kto = kto_per_example(
        stats, beta=beta, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight
    )
    terms = designer_terms(
        stats.policy_logps,
        stats.lengths,
        _signal(stats, UNPAIRED_DESIGNER, "upo_kto"),
        _value_head(stats, "upo_kto"),
        lambda_aux=lambda_aux,
        value_weight=value_weight,
        advantage_temperature=advantage_temperature,
        expectile=expectile,
        weight_clip=weight_clip,
        normalize_weights=normalize_weights,
        aux_likelihood=aux_likelihood,
    )
    metrics = {**kto.metrics, "upo/preference_loss": kto.losses.detach().float().mean(), **terms.metrics}
    parts = dict(zip(UPO_TERMS, (kto.losses, terms.aux, terms.value)))
    return _sum_of_parts(parts, {**metrics, **_designer_means(stats)})


def _designer_means(stats: PairedStats | UnpairedStats) -> dict[str, torch.Tensor]:
    names = {CHOSEN_DESIGNER: "designer/chosen", REJECTED_DESIGNER: "designer/rejected"}
    names[UNPAIRED_DESIGNER] = "designer/mean"
    return {
        label: stats.signals[name].detach().float().mean()
        for name, label in names.items()
        if name in stats.signals
    }


def _designer_margin(stats: PairedStats, loss_name: str) -> torch.Tensor:
    chosen = _signal(stats, CHOSEN_DESIGNER, loss_name)
    rejected = _signal(stats, REJECTED_DESIGNER, loss_name)
    margin = (chosen - rejected).to(stats.policy_chosen_logps.dtype)
    if not bool(torch.isfinite(margin).all()):
        raise ValueError(f"loss {loss_name!r}: the designer reward signal has missing or non-finite values")
    return margin


@register_loss(
    "modpo",
    data_kind="paired",
    needs_reference=True,
    paper="Zhou et al. 2024, MODPO (designer reward folded into the DPO margin)",
    signals=(CHOSEN_DESIGNER, REJECTED_DESIGNER),
)
def modpo_per_example(stats: PairedStats, *, beta: float = 0.1, lambda_aux: float = 1.0) -> PerExampleLosses:
    """``-log sigmoid(beta m - lambda_aux (r_aux(y_w) - r_aux(y_l)))`` per pair (MODPO's margin term with
    the preference weight 1): the policy's implicit reward models preference + ``lambda_aux`` x designer."""
    check_positive("beta", beta)
    chosen, rejected = paired_inputs(stats, "modpo", "logratios")
    designer_margin = _designer_margin(stats, "modpo")
    losses = -F.logsigmoid(beta * (chosen - rejected) - lambda_aux * designer_margin)
    metrics = preference_metrics(
        chosen, rejected, beta, stats.policy_chosen_logps, stats.policy_rejected_logps
    )
    return PerExampleLosses(losses, {**metrics, **_designer_means(stats)})


@register_loss(
    "dpo_relabel",
    data_kind="paired",
    needs_reference=True,
    paper="baseline: DPO (Rafailov et al. 2023) on pairs relabelled by preference + lambda_aux x designer",
    signals=(CHOSEN_DESIGNER, REJECTED_DESIGNER),
)
def dpo_relabel_per_example(
    stats: PairedStats, *, beta: float = 0.1, lambda_aux: float = 1.0
) -> PerExampleLosses:
    """DPO with each pair oriented by the compound score ``1(preferred) + lambda_aux r_aux``: swapped
    when ``lambda_aux (r_aux(y_l) - r_aux(y_w)) > 1``. Logs the swapped fraction."""
    check_positive("beta", beta)
    chosen, rejected = paired_inputs(stats, "dpo_relabel", "logratios")
    swapped = lambda_aux * _designer_margin(stats, "dpo_relabel") < -1.0
    sign = torch.where(swapped, -1.0, 1.0).to(chosen.dtype)
    losses = -F.logsigmoid(beta * sign * (chosen - rejected))
    metrics = preference_metrics(
        chosen, rejected, beta, stats.policy_chosen_logps, stats.policy_rejected_logps
    )
    metrics["relabel/swapped_fraction"] = swapped.float().mean()
    return PerExampleLosses(losses, {**metrics, **_designer_means(stats)})
