"""Robust aggregators: DoRA and the distributionally robust family around it (docs/robust.md).

Every one reduces per-example losses ``l`` [N] with row weights ``w`` (the data's ``weight`` column;
all expectations below are ``w``-weighted means over the batch) and is batch-coupled: the loop
evaluates it on the global optimizer batch, so a log-mean-exp really runs over every example of the
batch (the public DoRA script runs one example per device, which collapses it to plain reweighting).

Each reports the plain weighted mean of the losses (``aggregate/mean``, comparable across steps and
methods, unlike the robust objective itself) and the weights it effectively puts on examples on top of
the row weights (from ``d loss / d l_i``, normalised to mean 1; :func:`weight_diagnostics`):
``weights/ess`` (effective sample size as a fraction of the batch), ``weights/max``, and
``weights/source=<code>`` (mean weight of each source, when the data has a ``source`` column).
"""

from __future__ import annotations

import math

import torch

from distalign.data.signals import GROUP_SIZE
from distalign.losses.aggregators import register_aggregator, weight_diagnostics
from distalign.losses.base import LossResult, check_positive, weighted_mean

DENSITY_RATIO = "density_ratio"


def _probabilities(weights: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    weights = weights.detach().to(like.dtype)
    return weights / weights.sum().clamp(min=torch.finfo(like.dtype).tiny)


def _log_mean_exp(values: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``log sum_i p_i exp(v_i)`` with zero-probability rows excluded (stable)."""
    log_p = torch.where(p > 0, p.log(), torch.full_like(p, -torch.inf))
    return torch.logsumexp(values + log_p, dim=0)


def _with_diagnostics(loss_fn, losses, weights, signals, extra=None) -> LossResult:
    """Evaluate ``loss_fn(losses)`` and attach the weights it applies (autograd on a detached copy)."""
    with torch.enable_grad():
        leaf = losses.detach().clone().requires_grad_(True)
        (effective,) = torch.autograd.grad(loss_fn(leaf), leaf)
    metrics = weight_diagnostics(effective, weights, signals) | (extra or {})
    # The plain (row-weighted) mean beside the robust objective: comparable across steps and methods.
    metrics["aggregate/mean"] = weighted_mean(losses.detach(), weights).float()
    return LossResult(loss_fn(losses), metrics)


@register_aggregator(
    "importance_weighted",
    batch_coupled=False,
    signals=(DENSITY_RATIO,),
    paper="importance-weighted ERM E_P[h l] (the lambda -> infinity limit of DoRA)",
)
def importance_weighted(losses, *, weights, signals, state) -> LossResult:
    """``E_P[h l] = sum_i w_i h_i l_i / sum_i w_i`` with ``h`` the per-row density ratio
    ``dQ_target / dP`` (data column ``density_ratio``, e.g. from ``distalign shift score``).

    Decomposable (a weighted mean with weights ``w h`` over the normaliser ``sum w``) — but the
    normaliser is ``sum w``, not ``sum w h``: with a mean ratio of 1 over the data both agree in
    expectation, and this is the unbiased estimate of the target risk.
    """
    h = signals[DENSITY_RATIO].to(losses.dtype)
    p = _probabilities(weights, losses)
    return _with_diagnostics(lambda x: (p * h * x).sum(), losses, weights, signals)


@register_aggregator(
    "dora",
    batch_coupled=True,
    signals=(DENSITY_RATIO,),
    paper="Zhu et al. 2025, DoRA, arXiv 2504.05831 (KL-DRO with the density ratio inside the exponent)",
)
def dora(losses, *, weights, signals, state, temperature: float = 1.0) -> LossResult:
    """DoRA: ``lambda log E_P[exp(h l / lambda)]`` with ``lambda = temperature`` and ``h`` the density
    ratio (data column ``density_ratio``).

    Its gradient weighs example i by ``softmax_i(h l / lambda) h_i``: target-like, high-loss examples
    dominate. ``temperature -> infinity`` gives ``E_P[h l]`` (``importance_weighted``); small
    temperatures approach the worst case.
    """
    check_positive("temperature", temperature)
    h = signals[DENSITY_RATIO].to(losses.dtype)
    p = _probabilities(weights, losses)
    return _with_diagnostics(
        lambda x: temperature * _log_mean_exp(h * x / temperature, p), losses, weights, signals
    )


@register_aggregator(
    "kl_dro",
    batch_coupled=True,
    paper="KL-constrained DRO, fixed dual variable (Hu & Hong 2013; the DoRA objective without h)",
)
def kl_dro(losses, *, weights, signals, state, temperature: float = 1.0) -> LossResult:
    """``lambda log E_P[exp(l / lambda)]``: the KL-DRO dual at a fixed ``lambda = temperature``
    (DoRA with ``h = 1``): up-weights high-loss examples by ``softmax(l / lambda)``."""
    check_positive("temperature", temperature)
    p = _probabilities(weights, losses)
    return _with_diagnostics(
        lambda x: temperature * _log_mean_exp(x / temperature, p), losses, weights, signals
    )


@register_aggregator(
    "kldpo",
    batch_coupled=True,
    paper="Xu et al. 2025, KLDPO, arXiv 2502.01930 (clamped exponential weights, stop-gradient)",
)
def kldpo(losses, *, weights, signals, state, tau: float = 0.05, max_weight: float = 10.0) -> LossResult:
    """KLDPO: ``E_P[p_i l_i]`` with ``p_i = sg(min(exp((l_i - E_P[l]) / tau), max_weight))``.

    The weights are constants (stop-gradient), unlike the KL-DRO softmax they are not normalised, and
    the clamp bounds any one example's influence. Metrics add ``weights/clipped`` (fraction of rows at
    the clamp).
    """
    check_positive("tau", tau)
    check_positive("max_weight", max_weight)
    p = _probabilities(weights, losses)
    with torch.no_grad():
        centred = losses.detach() - (p * losses.detach()).sum()
        raw = torch.exp((centred / tau).clamp(max=math.log(max_weight) + 1.0))
        example = raw.clamp(max=max_weight)
        clipped = ((raw >= max_weight) & (p > 0)).double().sum() / (p > 0).sum().clamp(min=1)
    return _with_diagnostics(
        lambda x: (p * example * x).sum(), losses, weights, signals, {"weights/clipped": clipped.float()}
    )


@register_aggregator(
    "dr_dpo",
    batch_coupled=True,
    paper="Wu et al. 2025, Dr.DPO (ICLR), -beta' log E[exp(-l / beta')]",
)
def dr_dpo(losses, *, weights, signals, state, beta_prime: float = 1.0) -> LossResult:
    """Dr.DPO: ``-beta' log E_P[exp(-l / beta')]``, a soft minimum that *down*-weights high-loss (likely
    mislabelled) examples by ``softmax(-l / beta')`` — the mirror image of KL-DRO. ``beta' -> infinity``
    gives the mean."""
    check_positive("beta_prime", beta_prime)
    p = _probabilities(weights, losses)
    return _with_diagnostics(
        lambda x: -beta_prime * _log_mean_exp(-x / beta_prime, p), losses, weights, signals
    )


def chi2_worst_case(losses: torch.Tensor, p: torch.Tensor, radius: float) -> torch.Tensor:
    """The worst-case distribution ``q`` [N] (float64, sums to 1) of
    ``sup_{Q: chi2(Q||P) <= radius} E_Q[l]`` with ``chi2 = E_P[(dQ/dP - 1)^2] / 2``, exactly.

    The dual, ``min_eta eta + sqrt(1 + 2 rho) sqrt(E_P[(l - eta)_+^2])`` (Duchi & Namkoong 2021), is
    convex in ``eta``, and its minimiser gives ``q_i ∝ p_i (l_i - eta)_+``. Two cases:

    * the point mass on the largest loss (``p`` restricted to the rows that hold it) lies in the ball,
      ``(1 + 2 rho) P(top) >= 1``: it is the worst case. The dual's minimiser is then ``eta = max l``,
      where the square root has no derivative, so a generic minimiser of the dual fails there;
    * otherwise the minimiser lies below ``max l``. Between two consecutive distinct losses the rows
      above ``eta`` are a fixed top set S, and the dual's stationary point has a closed form,
      ``eta = mean_S - sqrt(var_S / ((1 + 2 rho) P_S - 1))`` (p-weighted mean and variance within S).
      The dual is evaluated at each top set's best point in its interval (that point clamped into it)
      and the smallest is taken: no search bracket, so no radius is too small (for small radii ``eta``
      lies far below every loss, near ``mean - std / sqrt(2 rho)``). One sort, O(N log N).

    Rows with ``p = 0`` get ``q = 0``. Where the point mass is strictly inside the ball and several rows
    tie at the top, every distribution over them is a worst case; ``p`` restricted to them is returned.
    """
    loss = losses.detach().double()
    p = p.detach().double()
    live = p > 0
    p = torch.where(live, p, 0.0)
    top = loss[live].max()
    at_top = live & (loss == top)
    top_mass = p[at_top].sum()
    if (1 + 2 * radius) * top_mass >= p.sum():
        return torch.where(at_top, p / top_mass, 0.0)
    # Sorted largest first, shifted so the top loss is 0 (keeps the moments exact for large losses).
    order = torch.argsort(loss[live], descending=True)
    x, w = loss[live][order] - top, p[live][order]
    last = torch.cat([x[1:] != x[:-1], x.new_ones(1, dtype=torch.bool)]).nonzero().squeeze(1)
    values = x[last]  # distinct shifted losses, largest first; top set S_k = rows with x >= values[k]
    mass = torch.cumsum(w, 0)[last]
    first_moment = torch.cumsum(w * x, 0)[last]
    second_moment = torch.cumsum(w * x * x, 0)[last]
    outside = torch.cat([torch.cumsum(w.flip(0), 0).flip(0)[1:], w.new_zeros(1)])[last]
    mean = first_moment / mass
    variance = (second_moment / mass - mean**2).clamp(min=0)
    # (1 + 2 rho) P_S - 1, written as 2 rho P_S - P(outside S): no cancellation for tiny radii.
    curvature = 2 * radius * mass - outside
    stationary = mean - torch.sqrt(variance / curvature.clamp(min=1e-300))
    below = torch.cat([values[1:], values.new_full((1,), -math.inf)])  # the next loss; -inf under the last
    # Where (1 + 2 rho) P_S <= 1 the dual increases over the whole interval: its best point is its bottom.
    candidates = torch.where(curvature > 0, torch.minimum(torch.maximum(stationary, below), values), below)
    # E_P[(x - eta)_+^2] over S_k at eta in S_k's interval; the last set's bottom (-inf) is never best.
    square = second_moment - 2 * candidates * first_moment + candidates**2 * mass
    dual = candidates + math.sqrt(1 + 2 * radius) * torch.sqrt(square.clamp(min=0))
    dual = torch.where(torch.isfinite(candidates), dual, math.inf)
    eta = top + candidates[int(torch.argmin(dual))]
    shifted = p * (loss - eta).clamp(min=0)
    return shifted / shifted.sum()


@register_aggregator(
    "chi2_dro",
    batch_coupled=True,
    paper="Duchi & Namkoong 2021 (Ann. Stat.), chi-square DRO dual",
)
def chi2_dro(losses, *, weights, signals, state, radius: float = 1.0) -> LossResult:
    """chi-square DRO: ``sup_{Q: chi2(Q||P) <= rho} E_Q[l]`` with ``chi2 = E_P[(dQ/dP - 1)^2] / 2`` and
    ``rho = radius``, exactly: ``E_Q*[l]`` with the worst case ``Q*`` of :func:`chi2_worst_case` held
    constant. By Danskin's theorem that is the supremum's gradient (``Q*`` is unique); where the ball
    holds the point mass on the largest loss, ``(1 + 2 rho) P(top) >= 1`` (always for one row), the
    supremum is that loss and the gradient is ``p`` restricted to the rows that hold it."""
    check_positive("radius", radius)
    p = _probabilities(weights, losses)
    q = chi2_worst_case(losses, p, radius).to(losses.dtype)
    return _with_diagnostics(lambda x: (q * x).sum(), losses, weights, signals)


@register_aggregator(
    "group_dro",
    batch_coupled=True,
    stateful=True,
    signals=("group",),
    paper="Sagawa et al. 2020 (online group DRO); Ramesh et al. 2024, group-robust preference optimisation",
)
def group_dro(
    losses, *, weights, signals, state, step_size: float = 0.01, adjustment: float = 0.0
) -> LossResult:
    """Group DRO by mirror ascent: ``min_theta max_{alpha in simplex} sum_g alpha_g L_g``.

    Per step, ``L_g`` is the (row-weighted) mean loss of group g's rows in the batch; the group weights
    are updated first, ``alpha_g <- alpha_g exp(step_size (L_g + adjustment / sqrt(n_g)))`` for the
    groups present and renormalised, then the objective is ``sum_g alpha_g L_g`` over the present groups
    (alpha constant). ``n_g`` is group g's size in the *training set* (Sagawa et al. 2020, §5: the
    adjustment favours small groups, whose training loss underestimates their risk), read from the
    ``group_size`` signal the data carries (:func:`distalign.data.signals.signal_table` derives it);
    it is needed only when ``adjustment`` is not 0. ``alpha`` starts uniform and is the aggregator's
    state (checkpointed). Groups are the data's ``group`` codes; a group seen for the first time
    enters with the mean of the current weights. Metrics: ``group/weight=<code>`` and
    ``group/loss=<code>``.
    """
    check_positive("step_size", step_size)
    codes = signals["group"].to(losses.device).long()
    if bool((codes < 0).any()):
        raise ValueError("group_dro needs a group on every row (data column 'group')")
    if adjustment != 0 and GROUP_SIZE not in signals:
        raise ValueError(
            f"group_dro's adjustment needs each group's training-set size (signal {GROUP_SIZE!r}, which "
            "the training loop derives from the data's group column)"
        )
    p = _probabilities(weights, losses)
    size = int(codes.max()) + 1 if codes.numel() else 0
    alpha = torch.ones(0, dtype=torch.float64) if state is None else state["alpha"].detach().double().cpu()
    if alpha.numel() < size:  # first step, or groups not seen before
        fill = alpha.mean() if alpha.numel() else torch.tensor(1.0, dtype=torch.float64)
        alpha = torch.cat([alpha, fill.repeat(size - alpha.numel())])
        alpha = alpha / alpha.sum()
    group_losses, present = [], []
    for g in range(size):
        rows = (codes == g) & (p > 0)
        if bool(rows.any()):
            present.append(g)
            group_losses.append(weighted_mean(losses[rows], p[rows]))
    with torch.no_grad():
        index = torch.tensor(present, dtype=torch.long)
        values = torch.tensor([float(gl) for gl in group_losses], dtype=torch.float64)
        exponent = values
        if adjustment != 0:
            sizes, codes_cpu = signals[GROUP_SIZE].double().cpu(), codes.cpu()
            group_sizes = torch.tensor(
                [float(sizes[codes_cpu == g][0]) for g in present], dtype=torch.float64
            )
            exponent = values + adjustment / group_sizes.sqrt()
        alpha = alpha.clone()
        alpha[index] = alpha[index] * torch.exp(step_size * exponent)
        alpha = alpha / alpha.sum()
    mixture = alpha[index].to(losses.dtype).to(losses.device)

    def objective(x: torch.Tensor) -> torch.Tensor:
        means = [weighted_mean(x[(codes == g) & (p > 0)], p[(codes == g) & (p > 0)]) for g in present]
        return (mixture * torch.stack(means)).sum() if present else x.sum() * 0

    result = _with_diagnostics(objective, losses, weights, signals)
    metrics = result.metrics | {f"group/weight={g}": alpha[g].float() for g in range(size)}
    metrics |= {f"group/loss={g}": values[k].float() for k, g in enumerate(present)}
    return LossResult(result.loss, metrics, {"alpha": alpha})
