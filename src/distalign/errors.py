"""Errors shared by several layers (so that, e.g., evaluation need not import the training loop)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the field path."""


class SetupError(ValueError):
    """A run that cannot start as configured (the message says which setting to change)."""


class TrainingStoppedError(SetupError):
    """A run stopped because, as configured, it cannot learn: no sample in the target's support, zero
    gradients for many steps in a row, a NaN or infinite loss. The message names the step and what to
    change. Nothing of the failing step is saved; the checkpoints written before it are intact."""


class NonFiniteLossError(TrainingStoppedError):
    """The loss (or the gradient) of a step was NaN or infinite."""

    @classmethod
    def at_step(
        cls, step: int, what: str, value: float, *, applied: bool, checkpoints: list | None = None
    ) -> NonFiniteLossError:
        """``what`` (e.g. "the loss") was ``value`` at ``step``; ``applied``: the step's update was
        already made (in memory) when it was detected; ``checkpoints``: the run's complete checkpoints."""
        update = (
            "its update was applied in memory but nothing of this step was saved"
            if applied
            else "its update was not applied"
        )
        saved = (
            f"the newest checkpoint, {checkpoints[-1]}, is from before it"
            if checkpoints
            else "no checkpoint had been saved (train.save_every)"
        )
        return cls(
            f"step {step}: {what} is {value} (not finite); training stopped ({update}; {saved}). "
            "Lower train.lr, keep gradient clipping on (train.max_grad_norm), train in float32 "
            "(model.dtype=float32, train.mixed_precision=no), or look for extreme values in the data or "
            "rewards"
        )
