"""The signal of one online step, as pure functions of the global batch (no model, no process group).

f-DPG (fdpg.md): log Z is a running log-mean-exp of log P - log q over every sample seen (per context
for a conditional target); pseudo-rewards R = -f'(pi/p) with l = log pi - log P + log Z. KL-regularised
REINFORCE / RLOO: R = r - beta (log pi - log a). Both then subtract a baseline (per-prompt leave-one-out,
a window of earlier rewards, or none) and, off-policy, carry importance weights pi/q clipped at a maximum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from distalign.configs.online import OnlineConfig
from distalign.errors import SetupError
from distalign.losses.fdivergence import fdpg_pseudo_rewards
from distalign.targets import (
    LogZEstimator,
    WindowedMeanBaseline,
    clipped_importance_weights,
    leave_one_out_baseline,
)
from distalign.train.online_setup import FrozenProposal


@dataclass
class GlobalBatch:
    """The step's samples from every process, in rank order; tensors [N] float64 unless noted.

    ``policy_logps``: log pi under the policy being trained (= ``proposal_logps`` on-policy);
    ``target_logps``: log P (f-DPG) and ``rewards``: r (RLOO), the other one None; ``groups`` [N] long:
    leave-one-out groups; ``keys``: log Z keys; ``monitors``: per-sample values (alignment, reward ...).
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


@dataclass
class Signal:
    """What the surrogate needs: R [N], A = R - baseline [N], clipped weights pi/q [N] (None on-policy)."""

    rewards: torch.Tensor
    advantages: torch.Tensor
    weights: torch.Tensor | None
    metrics: dict[str, float]


class LoopState:
    """Everything besides weights and optimizer that a resumed run needs to continue exactly."""

    def __init__(self, window: int, proposal: FrozenProposal | None) -> None:
        self.log_z = LogZEstimator()
        self.window = WindowedMeanBaseline(window)
        self.proposal = proposal
        self.moment_lambdas: list[list[float]] = []

    def state_dict(self) -> dict:
        return {
            "log_z": self.log_z.state_dict(),
            "window": self.window.state_dict(),
            "proposal": None if self.proposal is None else self.proposal.loop_state(),
            "moment_lambdas": self.moment_lambdas,
        }

    def load_state_dict(self, state: dict) -> None:
        self.log_z.load_state_dict(state["log_z"])
        self.window.load_state_dict(state["window"])
        if self.proposal is not None:
            self.proposal.load_loop_state(state["proposal"])
        self.moment_lambdas = state["moment_lambdas"]


# --- the signal: pure functions of the global batch ----------------------------------------------------
def subtract_baseline(kind: str, rewards: torch.Tensor, groups: torch.Tensor, window: WindowedMeanBaseline):
    """A = R - B: per-group leave-one-out mean, windowed mean of *earlier* rewards, or no baseline."""
    if kind == "loo":
        return rewards - leave_one_out_baseline(rewards, groups)
    if kind == "window":
        baseline = window.value()  # read before adding this batch: B must not depend on R_j
        window.update(rewards)
        return rewards - baseline
    return rewards


def compute_signal(cfg: OnlineConfig, batch: GlobalBatch, state: LoopState) -> Signal:
    """Pseudo-rewards (f-DPG) or KL-regularised rewards (RLOO), baseline and importance weights."""
    metrics: dict[str, float] = {}
    if cfg.method == "fdpg":
        state.log_z.update(batch.target_logps, batch.proposal_logps, batch.keys)
        log_z = state.log_z.log_z_for(batch.keys)
        rewards = fdpg_pseudo_rewards(
            batch.policy_logps, batch.target_logps, log_z, cfg.divergence, **cfg.divergence_params
        )
        metrics.update(log_z_metrics(state.log_z, batch.keys))
    else:
        rewards = batch.rewards.double() - cfg.kl_coef * (batch.policy_logps - batch.base_logps)
    if not bool(torch.isfinite(rewards).all()):
        raise SetupError(
            f"non-finite {'pseudo-' if cfg.method == 'fdpg' else ''}reward: with divergence {cfg.divergence!r} "
            "the divergence is infinite at these samples (reverse KL, Neyman chi^2 and alpha >= 1 are infinite "
            "when the policy samples x with P(x) = 0): give the constraint an epsilon > 0 (soft constraint) or "
            "use forward_kl, jensen_shannon or total_variation"
        )
    advantages = subtract_baseline(cfg.baseline, rewards, batch.groups, state.window)
    weights = None
    if cfg.proposal == "offline":
        ratios = clipped_importance_weights(
            batch.policy_logps, batch.proposal_logps, cfg.max_importance_weight
        )
        weights = ratios.weights
        metrics.update(
            {"is/ess_fraction": ratios.ess_fraction, "is/clipped_fraction": ratios.clipped_fraction}
        )
    metrics.update(_summary("pseudo_reward" if cfg.method == "fdpg" else "shaped_reward", rewards))
    metrics["advantage/abs_mean"] = float(advantages.abs().mean())
    return Signal(rewards, advantages, weights, metrics)


def log_z_metrics(estimator: LogZEstimator, keys: list) -> dict[str, float]:
    """log Z with its ESS and standard error; for a conditional target, averaged over the batch's contexts."""
    distinct = list(dict.fromkeys(keys))
    values = [estimator.log_z(k) for k in distinct]
    finite = [v for v in values if math.isfinite(v)]
    metrics = {
        "log_z": sum(finite) / len(finite) if finite else -math.inf,
        "log_z/ess": min(estimator.ess(k) for k in distinct),
        "log_z/stderr": max(math.sqrt(estimator.log_z_variance(k)) for k in distinct),
    }
    if distinct != [None]:
        metrics["log_z/contexts_seen"] = float(len(estimator.keys()))
    return metrics


def _summary(prefix: str, values: torch.Tensor) -> dict[str, float]:
    return {
        f"{prefix}/mean": float(values.mean()),
        f"{prefix}/std": float(values.std()) if values.numel() > 1 else 0.0,
        f"{prefix}/max": float(values.max()),
        f"{prefix}/min": float(values.min()),
    }
