"""f-DPG (Go et al., ICML 2023, arXiv 2302.08215): minimise D_f(pi || p) to a target distribution
p = P / Z. Its per-sample reward is the pseudo-reward R = -f'(pi/p), with pi/p = pi Z / P and log Z the
running estimate over every sample seen (per prompt for a conditional target, CDPG)."""

from __future__ import annotations

import torch

from distalign.errors import SetupError
from distalign.losses.fdivergence import fdpg_pseudo_rewards
from distalign.online_methods.base import ONLINE_METHODS, OnlineMethodSpec, StepSamples


def pseudo_rewards(
    samples: StepSamples, log_z: torch.Tensor | None, *, divergence: str, divergence_params: dict[str, float]
) -> torch.Tensor:
    """R = -f'(pi/p) [N] for the divergence ``divergence`` (with ``divergence_params``)."""
    if log_z is None:
        raise ValueError("f-DPG pseudo-rewards need the per-sample log Z")
    rewards = fdpg_pseudo_rewards(
        samples.policy_logps, samples.target_logps, log_z, divergence, **divergence_params
    )
    if not bool(torch.isfinite(rewards).all()):
        raise SetupError(
            f"non-finite pseudo-reward: with divergence {divergence!r} the divergence is infinite at "
            "these samples (reverse KL, Neyman chi^2 and alpha >= 1 are infinite when the policy samples "
            "x with P(x) = 0): give the constraint an epsilon > 0 (soft constraint) or use forward_kl, "
            "jensen_shannon or total_variation"
        )
    return rewards


ONLINE_METHODS.add(
    "fdpg",
    OnlineMethodSpec(
        name="fdpg",
        rewards=pseudo_rewards,
        scored_by="target",
        options=("divergence", "divergence_params"),
        reward_metric="pseudo_reward",
        label_option="divergence",
        paper="Go et al., ICML 2023, f-DPG: aligning language models with preferences through "
        "f-divergence minimization, arXiv 2302.08215",
    ),
)
