"""The ``eval`` config section: how ``distalign eval`` generates and scores."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from distalign.config.base import ChatTemplateMode


class EvalConfig(BaseModel):
    """Settings of ``distalign eval`` for a run.

    Policy and reference each draw ``samples_per_prompt`` completions for ``num_prompts`` prompts of the
    task's held-out split by exact ancestral sampling (temperature 1, no top-k / top-p), so the
    KL(policy || reference) estimate from the policy's samples is valid. Rewards are the task's gold
    reward; confidence intervals come from a bootstrap over prompts.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)

    task: str = "sentiment"
    """Built-in task with a gold reward: sentiment, readability or keyword (see distalign.tasks)."""
    task_settings: dict[str, Any] = {}
    """Keyword settings of the task factory, e.g. {objective: grade} for readability."""
    split: Literal["heldout", "train"] = "heldout"
    """Prompt split to evaluate on; "heldout" prompts are never used to build training data."""
    num_prompts: int | None = Field(64, gt=0)
    """Prompts to evaluate (a seeded random subset of the split); null = every prompt of the split."""
    samples_per_prompt: int = Field(2, gt=0)
    """Completions per prompt and model; sample j of the policy is compared with sample j of the
    reference on the same prompt for the win rate."""
    max_new_tokens: int = Field(48, gt=0)
    """Tokens generated at most per completion."""
    batch_size: int = Field(16, gt=0)
    """Sequences per sampling / scoring forward pass."""
    seed: int = 0
    """Seeds the prompt subset, the samples and the bootstrap."""
    n_boot: int = Field(1000, gt=0)
    """Bootstrap resamples (of prompts) for every confidence interval."""
    alpha: float = Field(0.05, gt=0.0, lt=1.0)
    """Confidence intervals cover 1 - alpha."""
    chat_template: ChatTemplateMode = "auto"
    """Render prompts with the tokenizer's chat template: "auto" = iff the tokenizer has one."""
    save_samples: bool = True
    """Also write every completion with its reward and log-probs to eval/samples.jsonl."""

    @field_validator("task")
    @classmethod
    def _registered_task(cls, value: str) -> str:
        from distalign.tasks import TASKS

        if value not in TASKS:
            raise ValueError(f"unknown task {value!r}; valid names: {', '.join(TASKS.names())}")
        return value
