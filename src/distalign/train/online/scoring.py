"""What an online run scores its samples with, built once at its start: the f-DPG target (with its
moment constraints fitted on base samples, or restored from a checkpoint) or the reward."""

from __future__ import annotations

import torch

from distalign.config import RunConfig
from distalign.errors import SetupError
from distalign.targets import Target
from distalign.train.engine import Engine
from distalign.train.online.setup import (
    BaseScorer,
    PromptSet,
    draw_rollout,
    repeat_prompts,
    seeded_generator,
)


def build_target(config: RunConfig) -> Target:
    """The f-DPG target from ``online.target``; a bad scorer spec is a SetupError naming it."""
    spec = config.online.target
    try:
        return Target.from_config({"scorers": spec.scorers, "conditional": spec.conditional})
    except (ValueError, KeyError) as err:
        raise SetupError(f"online.target.scorers: {err}") from None


def build_online_reward(config: RunConfig):
    """The RLOO / REINFORCE reward from ``online.reward``."""
    from distalign.rewards import build_reward

    try:
        return build_reward(config.online.reward)
    except (ValueError, KeyError) as err:
        raise SetupError(f"online.reward: {err}") from None


def fit_target_moments(
    target: Target, base: BaseScorer, tokenizer, prompts: PromptSet, config: RunConfig, engine: Engine
) -> list[list[float]]:
    """Fit every moment tilt on samples of the base a; returns the lambdas.

    Every process draws the same samples (same seed), so all get the same lambdas without a gather.
    """
    if not target.moment_tilts():
        return []
    cfg = config.online
    order = torch.randperm(
        len(prompts), generator=seeded_generator(torch.device("cpu"), config.train.seed, "fit")
    )
    chosen = order[: cfg.target.fit_prompts].tolist()
    with base.as_model(engine.device) as model:
        rollout = draw_rollout(
            model,
            tokenizer,
            prompts,
            *repeat_prompts(chosen, cfg.target.fit_samples_per_prompt),
            max_new_tokens=cfg.max_new_tokens,
            batch_size=cfg.sampling_batch_size,
            generator=seeded_generator(engine.device, config.train.seed, "fit"),
        )
    log_q = rollout.proposal_logps  # q = a: the samples come from the base
    try:
        fits = target.fit_moments(rollout.texts, rollout.contexts, log_q, proposal_logprobs=log_q)
    except ValueError as err:
        raise SetupError(
            f"online.target: cannot fit the moment constraints on {len(rollout)} base samples: {err}"
        ) from None
    for fit in fits:
        engine.print(f"moment fit: {fit.report()}")
    return [tilt.lambdas.tolist() for tilt in target.moment_tilts()]


def restore_moments(target: Target, lambdas: list[list[float]]) -> None:
    """Put checkpointed moment lambdas (:func:`fit_target_moments`) back into ``target``'s tilts."""
    for tilt, values in zip(target.moment_tilts(), lambdas):
        tilt.lambdas = torch.tensor(values, dtype=torch.float64)
