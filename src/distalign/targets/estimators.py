"""Estimators for f-DPG: log Z, baselines, importance weights, divergence and moment monitors.

All inputs are per-sample log-probabilities in nats (sequence sums incl. EOS), float tensors [N]:
``policy_logps`` log pi(x|c), ``proposal_logps`` log q(x|c) of the distribution the samples were
drawn from, ``target_log_unnormalized`` log P(x|c). Computation is float64 on CPU-sized vectors.

Confidence intervals: self-normalised estimates (Z estimated from the same samples) use a percentile
bootstrap that resamples within each context, so the uncertainty of Z is included; estimates with a
given log Z are means of i.i.d. terms and use the normal interval mean +- z * sd / sqrt(n); importance-
weighted means E_pi[v] use the delta-method variance of the ratio estimator,
sum_j wbar_j^2 (v_j - mean)^2 * n / (n - 1), wbar the normalised weights.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import torch

from distalign.losses.fdivergence import f_perspective


@dataclass
class Estimate:
    """A scalar Monte Carlo estimate with its standard error, ``confidence`` interval and ESS."""

    value: float
    stderr: float
    ci_low: float
    ci_high: float
    ess: float
    num_samples: int

    def as_dict(self, prefix: str) -> dict[str, float]:
        """Flat metrics ``{prefix: value, prefix/stderr: ..., ...}`` for logging."""
        return {
            prefix: self.value,
            f"{prefix}/stderr": self.stderr,
            f"{prefix}/ci_low": self.ci_low,
            f"{prefix}/ci_high": self.ci_high,
            f"{prefix}/ess": self.ess,
        }


def _z_value(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence} must be in (0, 1)")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def log_mean_exp(values: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """log(mean(exp(values))) along ``dim``, stable for any magnitude."""
    return torch.logsumexp(values, dim=dim) - math.log(values.shape[dim])


def effective_sample_size(log_weights: torch.Tensor) -> float:
    """Kish ESS (sum w)^2 / sum w^2 of unnormalised weights given as logs: in [1, N] (0 if all w = 0)."""
    log_weights = log_weights.double()
    if not torch.isfinite(log_weights).any():
        return 0.0
    return float(torch.exp(2 * torch.logsumexp(log_weights, 0) - torch.logsumexp(2 * log_weights, 0)))


# --- log Z -----------------------------------------------------------------------------------------------
class LogZEstimator:
    """Running log Z_c = log mean_j P(x_j|c) / q_j(x_j|c) over *all* samples seen (fdpg.md).

    Each weight P/q is unbiased for Z under whichever proposal drew it, so samples from old policies stay
    valid. Keys are contexts for a conditional target and ``None`` otherwise (see
    ``Target.log_z_keys``). Per key it keeps count, log sum w and log sum w^2, so the estimate, ESS and
    the delta-method variance Var[log Z_hat] ~= 1/ESS - 1/n are available at any time. To stay
    consistent across ranks, update every rank with the gathered (all-ranks) log-weights.
    """

    def __init__(self) -> None:
        self._stats: dict[Hashable, tuple[int, float, float]] = {}

    def update(
        self,
        target_log_unnormalized: torch.Tensor,
        proposal_logps: torch.Tensor,
        keys: Sequence[Hashable] | None = None,
    ) -> None:
        """Add samples: log P [N], log q [N], ``keys`` [N] (``None`` = one shared key)."""
        log_weights = (target_log_unnormalized.detach().double() - proposal_logps.detach().double()).cpu()
        keys = [None] * len(log_weights) if keys is None else list(keys)
        if len(keys) != len(log_weights):
            raise ValueError(f"{len(log_weights)} samples but {len(keys)} keys")
        groups: dict[Hashable, list[int]] = {}
        for i, key in enumerate(keys):
            groups.setdefault(key, []).append(i)
        for key, index in groups.items():
            lw = log_weights[index]
            count, log_sum, log_sum_sq = self._stats.get(key, (0, -math.inf, -math.inf))
            log_sum = float(
                torch.logaddexp(torch.tensor(log_sum, dtype=torch.float64), torch.logsumexp(lw, 0))
            )
            log_sum_sq = float(
                torch.logaddexp(torch.tensor(log_sum_sq, dtype=torch.float64), torch.logsumexp(2 * lw, 0))
            )
            self._stats[key] = (count + len(index), log_sum, log_sum_sq)

    def _get(self, key: Hashable) -> tuple[int, float, float]:
        if key not in self._stats:
            raise KeyError(f"no samples seen for log Z key {key!r}")
        return self._stats[key]

    def log_z(self, key: Hashable = None) -> float:
        """Current log Z estimate for ``key`` (-inf while every weight seen is zero)."""
        count, log_sum, _ = self._get(key)
        return log_sum - math.log(count)

    def log_z_for(self, keys: Sequence[Hashable]) -> torch.Tensor:
        """log Z of each sample's key: [N] float64 (feed to the pseudo-rewards)."""
        return torch.tensor([self.log_z(k) for k in keys], dtype=torch.float64)

    def num_samples(self, key: Hashable = None) -> int:
        return self._get(key)[0]

    def ess(self, key: Hashable = None) -> float:
        """Kish ESS of all weights seen for ``key``."""
        _, log_sum, log_sum_sq = self._get(key)
        return math.exp(2 * log_sum - log_sum_sq) if math.isfinite(log_sum) else 0.0

    def log_z_variance(self, key: Hashable = None) -> float:
        """Delta-method variance of log Z_hat: (E[w^2]/E[w]^2 - 1)/n = 1/ESS - 1/n (inf if no mass)."""
        ess = self.ess(key)
        return max(1.0 / ess - 1.0 / self.num_samples(key), 0.0) if ess > 0 else math.inf

    def keys(self) -> list[Hashable]:
        return list(self._stats)

    def state_dict(self) -> dict[str, list]:
        """Checkpointable state (keys must be JSON-able to write it as JSON)."""
        return {"keys": list(self._stats), "stats": [list(v) for v in self._stats.values()]}

    def load_state_dict(self, state: dict[str, list]) -> None:
        self._stats = {
            k: (int(v[0]), float(v[1]), float(v[2])) for k, v in zip(state["keys"], state["stats"])
        }


# --- baselines -------------------------------------------------------------------------------------------
def leave_one_out_baseline(rewards: torch.Tensor, context_index: torch.Tensor) -> torch.Tensor:
    """Per-context leave-one-out mean: B_j = mean of the *other* rewards of x_j's context ([N] -> [N]).

    Independent of R_j, so R_j - B_j keeps the estimator unbiased; 0 for a context with one sample.
    ``rewards`` must be finite.
    """
    _, group = torch.unique(context_index, return_inverse=True)
    totals = torch.zeros(int(group.max()) + 1 if group.numel() else 0, dtype=rewards.dtype).index_add(
        0, group, rewards
    )
    counts = torch.bincount(group).to(rewards.dtype)
    others = counts[group] - 1
    return torch.where(others > 0, (totals[group] - rewards) / others.clamp(min=1), torch.zeros_like(rewards))


class WindowedMeanBaseline:
    """Mean of the last ``window`` pseudo-rewards seen. Read ``value()`` *before* ``update`` with the
    current batch so the baseline does not depend on the rewards it is subtracted from."""

    def __init__(self, window: int = 1024) -> None:
        if window < 1:
            raise ValueError("window must be >= 1")
        self._values: deque[float] = deque(maxlen=window)

    def value(self) -> float:
        return sum(self._values) / len(self._values) if self._values else 0.0

    def update(self, rewards: torch.Tensor) -> None:
        self._values.extend(rewards.detach().double().flatten().tolist())

    def state_dict(self) -> dict[str, list[float]]:
        """Checkpointable state (JSON-able): the rewards in the window, oldest first."""
        return {"values": list(self._values)}

    def load_state_dict(self, state: dict[str, list[float]]) -> None:
        self._values.clear()
        self._values.extend(float(v) for v in state["values"])


# --- importance weights and proposal refresh -------------------------------------------------------------
@dataclass
class ImportanceWeights:
    """Off-policy weights w = min(pi/q, max_weight) [N] and diagnostics of the *unclipped* ratios."""

    weights: torch.Tensor
    ess: float
    ess_fraction: float
    clipped_fraction: float


def clipped_importance_weights(
    policy_logps: torch.Tensor, proposal_logps: torch.Tensor, max_weight: float | None = None
) -> ImportanceWeights:
    """pi/q truncated at ``max_weight`` (biased towards q, bounded variance); ESS of the raw ratios.

    ESS/N near 1 means q still represents pi; a collapse signals that q should be refreshed.
    """
    log_ratio = policy_logps.detach().double() - proposal_logps.detach().double()
    raw = torch.exp(log_ratio)
    weights = raw if max_weight is None else raw.clamp(max=max_weight)
    ess = effective_sample_size(log_ratio)
    clipped = 0.0 if max_weight is None else float((raw > max_weight).double().mean())
    return ImportanceWeights(
        weights=weights, ess=ess, ess_fraction=ess / max(len(raw), 1), clipped_fraction=clipped
    )


@dataclass
class ProposalRefreshRule:
    """When to replace a frozen proposal q by the current policy pi (GDC's adaptive rule + ESS guard).

    Refresh when the estimated divergence of pi to the target is below q's (both estimated from the same
    samples of q, e.g. with :func:`estimate_divergence` on ``policy_logps`` and on ``proposal_logps``),
    or when the ESS fraction of pi/q falls below ``min_ess_fraction``.
    """

    min_ess_fraction: float = 0.1

    def should_refresh(
        self, policy_divergence: float, proposal_divergence: float, ess_fraction: float
    ) -> tuple[bool, str]:
        """(refresh?, reason) where reason is "closer_to_target", "ess_collapsed" or ""."""
        if policy_divergence < proposal_divergence:
            return True, "closer_to_target"
        if ess_fraction < self.min_ess_fraction:
            return True, "ess_collapsed"
        return False, ""


# --- divergence and expectation monitors -----------------------------------------------------------------
def _grouped_log_mean_exp(values: torch.Tensor, group: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Per-group log-mean-exp over the last dim: values [B, N], group [N] -> [B, num_groups]."""
    index = group.expand_as(values)
    peak = torch.full((values.shape[0], num_groups), -math.inf, dtype=values.dtype)
    peak = peak.scatter_reduce(1, index, values, reduce="amax", include_self=True)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    sums = torch.zeros_like(peak).scatter_add(1, index, torch.exp(values - peak.gather(1, index)))
    counts = torch.bincount(group, minlength=num_groups).to(values.dtype)
    return torch.log(sums) + peak - torch.log(counts)


def _stratified_indices(
    group: torch.Tensor, num_groups: int, replicates: int, generator: torch.Generator | None
) -> torch.Tensor:
    """[replicates, N] bootstrap indices; position j is always redrawn from group[j]'s members."""
    order = torch.argsort(group, stable=True)
    counts = torch.bincount(group, minlength=num_groups)
    starts = torch.cumsum(counts, 0) - counts
    uniform = torch.rand((replicates, group.shape[0]), generator=generator, dtype=torch.float64)
    offsets = (uniform * counts[group].double()).long().clamp(max=(counts[group] - 1))
    return order[starts[group] + offsets]


def estimate_divergence(
    name: str,
    policy_logps: torch.Tensor,
    target_log_unnormalized: torch.Tensor,
    proposal_logps: torch.Tensor,
    *,
    log_z: torch.Tensor | float | None = None,
    context_index: torch.Tensor | None = None,
    confidence: float = 0.95,
    num_bootstrap: int = 200,
    generator: torch.Generator | None = None,
    **params: float,
) -> Estimate:
    """D_f(pi || p) by importance sampling from q: mean_j p_j f(pi_j/p_j) / q_j  (fdpg.md, "Monitors").

    ``name``: a registered f-divergence (``forward_kl`` = KL(p||pi), ``reverse_kl`` = KL(pi||p),
    ``total_variation``, ``jensen_shannon`` = 2 x textbook JS, ...). With ``log_z`` (scalar or [N]) p is
    P / Z; without it Z is estimated from these samples (per context when ``context_index`` [N] is
    given: a conditional target's E_c D_f(pi_c || p_c)) and the CI is bootstrapped. ``ess`` is the Kish
    ESS of the target weights P/q. For q = pi pass ``proposal_logps = policy_logps``.
    """
    lp, lq, lP = (t.detach().double().cpu() for t in (policy_logps, proposal_logps, target_log_unnormalized))
    n = lp.shape[0]
    ess = effective_sample_size(lP - lq)
    if log_z is not None:
        log_p = lP - torch.as_tensor(log_z, dtype=torch.float64)
        terms = f_perspective(name, lp - lq, log_p - lq, **params)
        value = float(terms.mean())
        stderr = float(terms.std()) / math.sqrt(n) if n > 1 else math.inf
        half = _z_value(confidence) * stderr
        return Estimate(value, stderr, value - half, value + half, ess, n)
    groups = (
        torch.zeros(n, dtype=torch.long)
        if context_index is None
        else torch.unique(context_index, return_inverse=True)[1]
    )
    num_groups = int(groups.max()) + 1

    def estimate(index: torch.Tensor) -> torch.Tensor:  # index [B, N] -> estimates [B]
        log_w = (lP - lq)[index]
        log_z_hat = _grouped_log_mean_exp(log_w, groups, num_groups).gather(1, groups.expand_as(log_w))
        return f_perspective(name, (lp - lq)[index], log_w - log_z_hat, **params).mean(dim=1)

    value = float(estimate(torch.arange(n)[None])[0])
    replicates = estimate(_stratified_indices(groups, num_groups, num_bootstrap, generator))
    tail = (1 - confidence) / 2
    low, high = torch.quantile(replicates, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return Estimate(value, float(replicates.std()), low, high, ess, n)


def importance_weighted_mean(
    values: torch.Tensor,
    policy_logps: torch.Tensor | None = None,
    proposal_logps: torch.Tensor | None = None,
    *,
    confidence: float = 0.95,
) -> Estimate:
    """E_pi[v] from samples of q: sum_j w_j v_j / sum_j w_j, w = pi/q (plain mean when on-policy).

    ``values`` [N]; pass both log-prob tensors [N] for off-policy samples, neither when q = pi.
    """
    values = values.detach().double().cpu()
    n = values.shape[0]
    if (policy_logps is None) != (proposal_logps is None):
        raise ValueError("pass both policy_logps and proposal_logps (off-policy) or neither (on-policy)")
    log_w = torch.zeros(n, dtype=torch.float64)
    if policy_logps is not None:
        log_w = policy_logps.detach().double().cpu() - proposal_logps.detach().double().cpu()
    normalized = torch.softmax(log_w, dim=0)
    mean = float(normalized @ values)
    variance = float((normalized**2 * (values - mean) ** 2).sum()) * n / max(n - 1, 1)
    stderr = math.sqrt(variance)
    half = _z_value(confidence) * stderr
    return Estimate(mean, stderr, mean - half, mean + half, effective_sample_size(log_w), n)


def estimate_policy_moments(
    feature_values: torch.Tensor,
    policy_logps: torch.Tensor | None = None,
    proposal_logps: torch.Tensor | None = None,
) -> list[Estimate]:
    """E_pi[phi_k] for each column of ``feature_values`` [N, K] (self-normalised IS from q)."""
    return [importance_weighted_mean(column, policy_logps, proposal_logps) for column in feature_values.T]


def estimate_kl_to_base(
    policy_logps: torch.Tensor,
    base_logps: torch.Tensor,
    proposal_logps: torch.Tensor | None = None,
) -> Estimate:
    """KL(pi || a) = E_pi[log pi - log a] (nats) from samples of q (q = pi if ``proposal_logps`` is None)."""
    differences = policy_logps.detach().double() - base_logps.detach().double()
    if proposal_logps is None:
        return importance_weighted_mean(differences)
    return importance_weighted_mean(differences, policy_logps, proposal_logps)


def estimate_alignment(
    scores: torch.Tensor,
    policy_logps: torch.Tensor | None = None,
    proposal_logps: torch.Tensor | None = None,
) -> Estimate:
    """Alignment E_pi[b] (constraint satisfaction rate, b in {0, 1}) or E_pi[r] for a reward."""
    return importance_weighted_mean(scores.double(), policy_logps, proposal_logps)
