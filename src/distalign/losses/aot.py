"""AOT: Alignment via Optimal Transport (Melnyk et al., NeurIPS 2024, arXiv 2406.05882).

AOT asks the reward distribution of positive samples to first-order stochastically dominate that of
negative samples, ``Q_U(t) >= Q_V(t)`` for all quantile levels ``t``. The paper relaxes the violation
of dominance to ``integral_0^1 h(Q_U(t) - Q_V(t)) dt`` with a convex cost ``h``; in one dimension this
is the optimal-transport cost ``min_coupling E[h(u - v)]``, attained by the sorted (comonotone)
coupling, so on a batch it is computed by sorting. Rewards are sequence log-ratios
``r = log pi_theta(y|x) - log pi_ref(y|x)`` in nats; ``beta`` is a parameter of ``h``, not of ``r``.

Everything here is a pure function of tensors. Gradients flow through the sorted values (sorting is
piecewise linear), so ``dL/du_j = mass_j * h'(u_j - v_matched(j))``: the envelope-theorem gradient.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass

import torch

from distalign.losses.aot_costs import COSTS, Cost, cost_values, resolve_cost  # noqa: F401  (public AOT API)
from distalign.losses.base import PairedStats, PerExampleLosses, UnpairedStats, register_loss
from distalign.losses.quantiles import QuantileGrid, checked_weights, quantile_grid

PAPER = (
    "Melnyk et al. 2024, Distributional Preference Alignment of LLMs via Optimal Transport, arXiv 2406.05882"
)

# ------------------------------------------------------------------------------------------- losses


def aot_unpaired_loss(
    positive_rewards: torch.Tensor,
    negative_rewards: torch.Tensor,
    *,
    cost: str = "logistic",
    beta: float = 0.01,
    label_smoothing: float = 0.0,
    soft_sort: bool = False,
    soft_sort_strength: float = 1.0,
    positive_weights: torch.Tensor | None = None,
    negative_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Unpaired AOT: ``integral_0^1 h(Q_U(t) - Q_V(t)) dt`` over the merged quantile grid.

    With ``n == m`` and no weights this is ``(1/n) sum_i h(u_(i) - v_(i))`` on sorted samples, the
    paper's closed form of the relaxed dominance violation; with ``n != m`` it integrates
    ``h(u_(ceil(tn)) - v_(ceil(tm)))`` exactly (piecewise constant in t). Both samples carry gradient.

    Args:
        positive_rewards: shape [n], rewards of positive samples (nats).
        negative_rewards: shape [m], rewards of negative samples (nats).
        cost, beta, label_smoothing: see :data:`COSTS` and :func:`cost_values`.
        soft_sort, soft_sort_strength, positive_weights, negative_weights: see :func:`quantile_grid`.

    Returns:
        scalar loss (dtype at least float32).
    """
    resolve_cost(cost, beta, label_smoothing)
    grid = quantile_grid(
        positive_rewards,
        negative_rewards,
        positive_weights=positive_weights,
        negative_weights=negative_weights,
        soft_sort=soft_sort,
        soft_sort_strength=soft_sort_strength,
    )
    return (grid.mass * cost_values(grid.gaps, cost=cost, beta=beta, label_smoothing=label_smoothing)).sum()


def aot_paired_loss(
    policy_margins: torch.Tensor,
    reference_margins: torch.Tensor,
    *,
    cost: str = "logistic",
    beta: float = 0.01,
    label_smoothing: float = 0.0,
    soft_sort: bool = False,
    soft_sort_strength: float = 1.0,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Paired AOT: ``Z_theta >=_FSD Z_ref`` relaxed, ``(1/N) sum_i h(Z_theta_(i) - Z_ref_(i))`` sorted.

    Args:
        policy_margins: shape [N], ``Z_theta = log pi_theta(y+|x) - log pi_theta(y-|x)`` (nats).
        reference_margins: shape [N], the same under pi_ref; treated as a constant (detached).
        weights: optional shape [N] per-pair weights, applied to both distributions.
        other options: as :func:`aot_unpaired_loss`.

    Returns:
        scalar loss; gradient flows only into ``policy_margins``.
    """
    if policy_margins.shape != reference_margins.shape:
        raise ValueError(
            f"policy and reference margins must have the same shape, got {tuple(policy_margins.shape)} "
            f"and {tuple(reference_margins.shape)}"
        )
    return aot_unpaired_loss(
        policy_margins,
        reference_margins.detach(),
        cost=cost,
        beta=beta,
        label_smoothing=label_smoothing,
        soft_sort=soft_sort,
        soft_sort_strength=soft_sort_strength,
        positive_weights=weights,
        negative_weights=weights,
    )


def identity_coupling_cost(
    positive: torch.Tensor,
    negative: torch.Tensor,
    *,
    cost: str = "logistic",
    beta: float = 0.01,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """DPO-style cost of the identity coupling, ``(1/N) sum_i h(u_i - v_i)``: shapes [N], [N] -> scalar.

    With ``cost="logistic"`` and ``u - v`` = DPO's log-ratio margin, this is exactly the DPO loss; AOT
    replaces this coupling by the sorted one, which is never more expensive for a convex cost.
    """
    if positive.shape != negative.shape or positive.dim() != 1:
        raise ValueError(
            f"expected two 1-D tensors of one shape, got {tuple(positive.shape)}, {tuple(negative.shape)}"
        )
    return cost_values(positive - negative, cost=cost, beta=beta, label_smoothing=label_smoothing).mean()


def dominance_summary(
    grid: QuantileGrid, *, cost: str = "logistic", beta: float = 0.01
) -> dict[str, torch.Tensor]:
    """Dominance metrics of a (hard-sorted) quantile grid; detached scalars keyed ``aot/...``.

    ``violation_rate``: mass of t with ``Q_U(t) < Q_V(t)`` (0 iff U dominates V on the sample);
    ``ot_cost``: ``integral h(Q_U - Q_V)`` without label smoothing (the loss for hard sort, eps = 0);
    ``w1_gap``: 1-Wasserstein distance ``integral |Q_U - Q_V|``; ``w1_violation``: its violating part
    ``integral max(0, Q_V - Q_U)``; ``mean_gap``: signed ``integral (Q_U - Q_V) = mean(U) - mean(V)``.
    """
    gaps, mass = grid.gaps.detach(), grid.mass
    return {
        "aot/violation_rate": (mass * (gaps < 0)).sum(),
        "aot/ot_cost": (mass * cost_values(gaps, cost=cost, beta=beta)).sum(),
        "aot/w1_gap": (mass * gaps.abs()).sum(),
        "aot/w1_violation": (mass * torch.relu(-gaps)).sum(),
        "aot/mean_gap": (mass * gaps).sum(),
    }


# --------------------------------------------------------------------------------------- objectives


def _mean(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    values = values.detach().float()
    return values.mean() if weights is None else (values * weights).sum() / weights.sum()


def _pairwise_win_rate(
    positive: torch.Tensor,
    negative: torch.Tensor,
    pos_weights: torch.Tensor | None,
    neg_weights: torch.Tensor | None,
) -> torch.Tensor:
    """(Weighted) fraction of all (positive, negative) pairs with positive > negative; O((n+m) log m)."""
    positive, negative = positive.detach().double(), negative.detach().double()
    pos_w = torch.ones_like(positive) if pos_weights is None else pos_weights.double()
    neg_w = torch.ones_like(negative) if neg_weights is None else neg_weights.double()
    sorted_negative, order = torch.sort(negative)
    below_weight = torch.cat([neg_w.new_zeros(1), torch.cumsum(neg_w[order], 0)])
    wins = below_weight[torch.searchsorted(sorted_negative, positive)]  # weight of negatives strictly below
    return ((pos_w * wins).sum() / (pos_w.sum() * neg_w.sum())).float()


def _per_token(logps: torch.Tensor, lengths: torch.Tensor, length_normalize: bool) -> torch.Tensor:
    # Empty completions would divide by zero; one token is the smallest meaningful length.
    return logps / lengths.clamp(min=1) if length_normalize else logps


@dataclass(frozen=True)
class AOTOptions:
    """The options of both registered AOT losses (``loss.<name>`` in the config)."""

    cost: str = "logistic"
    """Transport cost h: see :data:`COSTS`."""
    beta: float = 0.01
    """Parameter of h (its meaning depends on the cost)."""
    label_smoothing: float = 0.0
    """Label-flip probability, see :func:`cost_values`."""
    soft_sort: bool = False
    """Differentiable soft sort instead of the hard sort (no per-row weights)."""
    soft_sort_strength: float = 1.0
    """Soft-sort regularisation strength (smaller = closer to the hard sort)."""
    length_normalize: bool = False
    """Rewards from per-token mean log-probs instead of sums."""

    def loss_options(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "length_normalize"}


AOT_AGGREGATOR_NOTE = (
    "AOT's per-example values are the transport cost of each row's slab of the sorted coupling; only "
    "their weighted mean is the AOT objective (robust aggregators reweight rows, which changes the "
    "distributions being compared rather than the coupling: weight the rows instead)"
)


def _unit_weights_as_none(weights: torch.Tensor | None, size: int) -> torch.Tensor | None:
    # The training loop always passes a weight tensor; all-equal weights define the unweighted
    # distributions, whose exact integer grid is cheaper and bit-identical to the unweighted loss.
    weights = checked_weights(weights, size, "weights")
    if weights is not None and bool((weights == weights[0]).all()):
        return None
    return weights


def _slab_losses(
    index: torch.Tensor, piece_costs: torch.Tensor, row_mass: torch.Tensor, share: float
) -> torch.Tensor:
    """Per-row losses whose ``row_mass``-weighted sum is ``share`` x the transport cost.

    ``piece_costs`` [K] = mass x cost of each slab of the coupling; ``index`` [K] the row each belongs
    to; ``row_mass`` [R] the row's probability mass in the batch (constants). A row of zero mass owns no
    slab and gets 0.
    """
    owned = torch.zeros(row_mass.shape[0], dtype=piece_costs.dtype, device=piece_costs.device)
    owned = owned.index_add(0, index, piece_costs)
    safe_mass = torch.where(row_mass > 0, row_mass, torch.ones_like(row_mass))
    return torch.where(row_mass > 0, share * owned / safe_mass, torch.zeros_like(owned))


def _dominance_grid_and_cost(
    positive: torch.Tensor,
    negative: torch.Tensor,
    positive_weights: torch.Tensor | None,
    negative_weights: torch.Tensor | None,
    options: AOTOptions,
) -> tuple[QuantileGrid, torch.Tensor, dict[str, torch.Tensor]]:
    """The coupling's grid, each slab's ``mass x cost`` [K], and the ``aot/*`` metrics (which always
    use the hard sort and no smoothing)."""
    resolve_cost(options.cost, options.beta, options.label_smoothing)
    grid = quantile_grid(
        positive,
        negative,
        positive_weights=positive_weights,
        negative_weights=negative_weights,
        soft_sort=options.soft_sort,
        soft_sort_strength=options.soft_sort_strength,
    )
    piece_costs = grid.mass * cost_values(
        grid.gaps, cost=options.cost, beta=options.beta, label_smoothing=options.label_smoothing
    )
    hard = quantile_grid(
        positive.detach(),
        negative.detach(),
        positive_weights=positive_weights,
        negative_weights=negative_weights,
    )
    return grid, piece_costs, dominance_summary(hard, cost=options.cost, beta=options.beta)


def _row_mass(weights: torch.Tensor | None, size: int, like: torch.Tensor) -> torch.Tensor:
    if weights is None:
        return torch.full((size,), 1.0 / size, dtype=like.dtype, device=like.device)
    weights = weights.to(like.dtype)
    return weights / weights.sum()


def _register_aot(name: str, data_kind: str):
    """Register an AOT loss function ``fn(stats, options: AOTOptions)`` with AOTOptions' fields as its
    options (one option list for both losses)."""

    def decorator(fn):
        def loss(stats, **options) -> PerExampleLosses:
            return fn(stats, AOTOptions(**options))

        parameters = [inspect.Parameter("stats", inspect.Parameter.POSITIONAL_OR_KEYWORD)] + [
            inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default)
            for f in dataclasses.fields(AOTOptions)
        ]
        loss.__signature__ = inspect.Signature(parameters)
        loss.__name__, loss.__doc__ = fn.__name__, fn.__doc__
        register_loss(
            name,
            data_kind=data_kind,
            needs_reference=True,
            batch_coupled=True,
            paper=PAPER,
            aggregators=("mean",),
            aggregator_note=AOT_AGGREGATOR_NOTE,
        )(loss)
        return loss

    return decorator


@_register_aot("aot_paired", "paired")
def aot_paired(stats: PairedStats, options: AOTOptions) -> PerExampleLosses:
    """Paired AOT on a whole (global) batch of preference pairs; see :func:`aot_paired_loss`.

    ``Z = chosen - rejected`` log-probs (per-token means when ``length_normalize``). Per-example losses:
    the transport cost of pair i's slab of the sorted coupling per unit of its mass, so their (weighted)
    mean is the AOT loss. Metrics: the ``aot/*`` dominance metrics of Z_theta against Z_ref (hard sort),
    and unscaled log-ratio rewards ``rewards/chosen|rejected`` (beta is a cost parameter in AOT, so it is
    not folded in), ``rewards/margins`` = mean of Z_theta - Z_ref, ``rewards/accuracies`` = fraction of
    pairs with a positive margin.
    """
    if stats.ref_chosen_logps is None or stats.ref_rejected_logps is None:
        raise ValueError(
            "aot_paired needs reference log-probs (ref_chosen_logps / ref_rejected_logps are None)"
        )
    weights = _unit_weights_as_none(stats.weights, len(stats))
    normalize = options.length_normalize
    chosen = _per_token(stats.policy_chosen_logps, stats.chosen_lengths, normalize)
    rejected = _per_token(stats.policy_rejected_logps, stats.rejected_lengths, normalize)
    ref_chosen = _per_token(stats.ref_chosen_logps, stats.chosen_lengths, normalize)
    ref_rejected = _per_token(stats.ref_rejected_logps, stats.rejected_lengths, normalize)
    policy_margins, reference_margins = chosen - rejected, (ref_chosen - ref_rejected).detach()
    grid, piece_costs, metrics = _dominance_grid_and_cost(
        policy_margins, reference_margins, weights, weights, options
    )
    row_mass = _row_mass(weights, len(stats), piece_costs)
    losses = _slab_losses(grid.positive_index, piece_costs, row_mass, 1.0)
    chosen_rewards, rejected_rewards = (chosen - ref_chosen).detach(), (rejected - ref_rejected).detach()
    metrics |= {
        "rewards/chosen": _mean(chosen_rewards, weights),
        "rewards/rejected": _mean(rejected_rewards, weights),
        "rewards/margins": _mean(chosen_rewards - rejected_rewards, weights),
        "rewards/accuracies": _mean((chosen_rewards > rejected_rewards).float(), weights),
    }
    return PerExampleLosses(losses, metrics)


@_register_aot("aot_unpaired", "unpaired")
def aot_unpaired(stats: UnpairedStats, options: AOTOptions) -> PerExampleLosses:
    """Unpaired AOT: rewards of label-1 rows must dominate those of label-0 rows.

    ``r = log pi_theta - log pi_ref`` per row (per-token means when ``length_normalize``); the counts of
    positives and negatives may differ (see :func:`aot_unpaired_loss`). Per-example losses: each slab's
    cost is shared half by its positive and half by its negative row, per unit of the row's mass among
    all rows, so their (weighted) mean is the AOT loss. Metrics: ``aot/*`` dominance metrics,
    ``rewards/positive|negative`` (unscaled means), ``rewards/margins`` (their difference) and
    ``rewards/accuracies`` = fraction of all (positive, negative) pairs ranked correctly.
    """
    if stats.ref_logps is None:
        raise ValueError("aot_unpaired needs reference log-probs (ref_logps is None)")
    labels = stats.labels.detach()
    if not bool(((labels == 0) | (labels == 1)).all()):
        raise ValueError("aot_unpaired labels must be 1.0 (positive) or 0.0 (negative)")
    weights = _unit_weights_as_none(stats.weights, len(stats))
    normalize = options.length_normalize
    rewards = _per_token(stats.policy_logps, stats.lengths, normalize) - _per_token(
        stats.ref_logps, stats.lengths, normalize
    )
    is_positive = labels == 1
    positive, negative = rewards[is_positive], rewards[~is_positive]
    pos_weights = None if weights is None else weights[is_positive]
    neg_weights = None if weights is None else weights[~is_positive]
    grid, piece_costs, metrics = _dominance_grid_and_cost(
        positive, negative, pos_weights, neg_weights, options
    )
    row_mass = _row_mass(weights, len(stats), piece_costs)
    rows = torch.arange(len(stats), device=rewards.device)
    losses = _slab_losses(rows[is_positive][grid.positive_index], piece_costs, row_mass, 0.5) + _slab_losses(
        rows[~is_positive][grid.negative_index], piece_costs, row_mass, 0.5
    )
    mean_positive, mean_negative = _mean(positive, pos_weights), _mean(negative, neg_weights)
    metrics |= {
        "rewards/positive": mean_positive,
        "rewards/negative": mean_negative,
        "rewards/margins": mean_positive - mean_negative,
        "rewards/accuracies": _pairwise_win_rate(positive, negative, pos_weights, neg_weights),
    }
    return PerExampleLosses(losses, metrics)
