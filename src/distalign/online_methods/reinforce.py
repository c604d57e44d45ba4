"""KL-regularised REINFORCE: maximise E[r] - kl_coef KL(pi || a), a the initial policy. Its per-sample
reward is the shaped reward R = r - kl_coef (log pi - log a), with any baseline (``online.baseline``)."""

from __future__ import annotations

import torch

from distalign.errors import SetupError
from distalign.online_methods.base import ONLINE_METHODS, OnlineMethodSpec, StepSamples


def shaped_rewards(samples: StepSamples, log_z: torch.Tensor | None, *, kl_coef: float) -> torch.Tensor:
    """R = r - kl_coef (log pi - log a) [N]."""
    rewards = samples.rewards.double() - kl_coef * (samples.policy_logps - samples.base_logps)
    if not bool(torch.isfinite(rewards).all()):
        raise SetupError(
            "non-finite shaped reward r - kl_coef (log pi - log a): the reward function returned NaN or "
            "an infinite value; check it on these completions"
        )
    return rewards


ONLINE_METHODS.add(
    "reinforce",
    OnlineMethodSpec(
        name="reinforce",
        rewards=shaped_rewards,
        scored_by="reward",
        options=("kl_coef",),
        reward_metric="shaped_reward",
        paper="KL-regularised REINFORCE as in Ahmadian et al. 2024, arXiv 2402.14740",
    ),
)
