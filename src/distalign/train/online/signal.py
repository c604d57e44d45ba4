"""The signal of one online step: pure functions of the global batch and config values.

Nothing here holds or changes state (no model, no process group, no estimator): the running estimates
the signal depends on come in as arguments, the per-sample log Z and the window baseline's mean of
earlier rewards. ``LoopState.step_signal`` (setup.py) advances those estimates around
:func:`compute_signal`.

f-DPG (fdpg.md): pseudo-rewards R = -f'(pi/p) with l = log pi - log P + log Z, log Z being a running
log-mean-exp of log P - log q over every sample seen (per context for a conditional target).
KL-regularised REINFORCE / RLOO: R = r - beta (log pi - log a). Both then subtract a baseline (per-prompt
leave-one-out, the mean of a window of earlier rewards, or none) and, off-policy, carry importance
weights pi/q clipped at a maximum.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distalign.config.online import OnlineConfig
from distalign.online_methods import get_online_method
from distalign.targets import clipped_importance_weights, leave_one_out_baseline


@dataclass
class GlobalBatch:
    """The step's samples from every process, in rank order; tensors [N] float64 unless noted.

    ``policy_logps``: log pi under the policy being trained (= ``proposal_logps`` on-policy);
    ``target_logps``: log P (f-DPG) and ``rewards``: r (RLOO), the other one None; ``groups`` [N] long:
    leave-one-out groups; ``keys``: log Z keys; ``monitors``: per-sample values (alignment, reward ...);
    ``sampler_logprob_gap``: a token-ids-only sampler's own log-prob minus log q (a diagnostic), or None.
    """

    policy_logps: torch.Tensor
    proposal_logps: torch.Tensor
    base_logps: torch.Tensor
    target_logps: torch.Tensor | None
    rewards: torch.Tensor | None
    groups: torch.Tensor
    keys: list
    monitors: dict[str, torch.Tensor]
    texts: list[str]
    completion_tokens: torch.Tensor
    ended_with_eos: torch.Tensor
    sampler_logprob_gap: torch.Tensor | None = None


@dataclass
class Signal:
    """What the surrogate needs: R [N], A = R - baseline [N], clipped weights pi/q [N] (None on-policy)."""

    rewards: torch.Tensor
    advantages: torch.Tensor
    weights: torch.Tensor | None
    metrics: dict[str, float]


def signal_rewards(cfg: OnlineConfig, batch: GlobalBatch, log_z: torch.Tensor | None) -> torch.Tensor:
    """R [N]: the per-sample reward of the run's online method (``distalign.online_methods``), e.g.
    f-DPG's pseudo-rewards given the per-sample ``log_z`` [N], or RLOO's r - beta (log pi - log a)."""
    spec = get_online_method(cfg.method)
    return spec.rewards(batch, log_z, **spec.options_of(cfg))


def subtract_baseline(
    kind: str, rewards: torch.Tensor, groups: torch.Tensor, window_mean: float = 0.0
) -> torch.Tensor:
    """A = R - B: per-group leave-one-out mean, ``window_mean`` (the mean of *earlier* rewards, so B does
    not depend on R_j), or no baseline."""
    if kind == "loo":
        return rewards - leave_one_out_baseline(rewards, groups)
    if kind == "window":
        return rewards - window_mean
    return rewards


def compute_signal(
    cfg: OnlineConfig, batch: GlobalBatch, log_z: torch.Tensor | None = None, window_mean: float = 0.0
) -> Signal:
    """The method's rewards (pseudo-rewards for f-DPG, KL-regularised rewards for RLOO), baseline and
    importance weights.

    ``log_z`` [N]: log Z of each sample's key, already including this batch (methods scored by a
    target only);
    ``window_mean``: the window baseline before this batch (``cfg.baseline == "window"`` only).
    """
    rewards = signal_rewards(cfg, batch, log_z)
    advantages = subtract_baseline(cfg.baseline, rewards, batch.groups, window_mean)
    weights = None
    metrics: dict[str, float] = {}
    if cfg.proposal == "offline":
        ratios = clipped_importance_weights(
            batch.policy_logps, batch.proposal_logps, cfg.max_importance_weight
        )
        weights = ratios.weights
        metrics.update(
            {"is/ess_fraction": ratios.ess_fraction, "is/clipped_fraction": ratios.clipped_fraction}
        )
    metrics.update(_summary(get_online_method(cfg.method).reward_metric, rewards))
    metrics["advantage/abs_mean"] = float(advantages.abs().mean())
    return Signal(rewards, advantages, weights, metrics)


def _summary(prefix: str, values: torch.Tensor) -> dict[str, float]:
    return {
        f"{prefix}/mean": float(values.mean()),
        f"{prefix}/std": float(values.std()) if values.numel() > 1 else 0.0,
        f"{prefix}/max": float(values.max()),
        f"{prefix}/min": float(values.min()),
    }


# --- health of a step: is there anything to learn from it? -------------------------------------------
#: |w_j A_j| at or below this, relative to the largest |R_j| (at least 1), counts as zero: the
#: leave-one-out mean of equal rewards equals them only up to rounding.
ZERO_ADVANTAGE_TOLERANCE = 1e-9


def samples_in_support(batch: GlobalBatch) -> int | None:
    """f-DPG: how many of the step's samples satisfy the target's constraints (the ``alignment`` monitor:
    with hard constraints, exactly the samples with P(x) > 0; soft ones count too, since samples that
    all violate them carry no information about the target either), or have P(x) > 0 when the target
    has no constraint. None without a target (RLOO / REINFORCE)."""
    if batch.target_logps is None:
        return None
    if "alignment" in batch.monitors:
        return int((batch.monitors["alignment"] > 0).sum())
    return int((batch.target_logps > -torch.inf).sum())


def has_learning_signal(signal: Signal) -> bool:
    """False when every advantage (times its importance weight) is zero: the step's gradient is zero."""
    weighted = signal.advantages if signal.weights is None else signal.advantages * signal.weights
    if weighted.numel() == 0:
        return False
    scale = max(1.0, float(signal.rewards.abs().max()))
    return bool((weighted.abs() > ZERO_ADVANTAGE_TOLERANCE * scale).any())


def non_finite_inputs(batch: GlobalBatch) -> str | None:
    """What is NaN or infinite among the step's per-sample inputs where it must be finite (log pi,
    log q, log a, rewards; log P may be -inf, outside the support), or None when all is well."""
    checks = {
        "log pi (the policy's log-probabilities)": (batch.policy_logps, False),
        "log q (the proposal's log-probabilities)": (batch.proposal_logps, False),
        "log a (the base model's log-probabilities)": (batch.base_logps, False),
        "log P (the target's unnormalised log-probabilities)": (batch.target_logps, True),
        "the reward": (batch.rewards, False),
    }
    for name, (values, minus_inf_allowed) in checks.items():
        if values is None:
            continue
        bad = torch.isnan(values) | (values == torch.inf)
        if not minus_inf_allowed:
            bad |= values == -torch.inf
        if bool(bad.any()):
            example = float(values[bad][0])
            return f"{name} is {example} for {int(bad.sum())} of the {values.numel()} samples"
    return None


def non_finite_signal(signal: Signal) -> str | None:
    """What is NaN or infinite in the step's advantages or importance weights, or None."""
    for name, values in (("an advantage", signal.advantages), ("an importance weight", signal.weights)):
        if values is not None and not bool(torch.isfinite(values).all()):
            return f"{name} is {float(values[~torch.isfinite(values)][0])}"
    return None
