"""RLOO (Ahmadian et al. 2024, arXiv 2402.14740): KL-regularised REINFORCE whose baseline is the mean
of the other samples of the same prompt (leave-one-out), so it allows only ``online.baseline: loo``."""

from __future__ import annotations

from distalign.online_methods.base import ONLINE_METHODS, OnlineMethodSpec
from distalign.online_methods.reinforce import shaped_rewards

ONLINE_METHODS.add(
    "rloo",
    OnlineMethodSpec(
        name="rloo",
        rewards=shaped_rewards,
        scored_by="reward",
        options=("kl_coef",),
        reward_metric="shaped_reward",
        baselines=("loo",),
        paper="Ahmadian et al. 2024, Back to Basics: Revisiting REINFORCE Style Optimization for Learning "
        "from Human Feedback in LLMs (RLOO), arXiv 2402.14740",
    ),
)
