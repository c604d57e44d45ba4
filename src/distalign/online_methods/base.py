"""The online-method spec and its registry."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

from distalign.registry import Registry


class StepSamples(Protocol):
    """What a method reads of one step's global batch: per-sample tensors [N], float64.

    ``policy_logps``: log pi under the policy being trained; ``base_logps``: log a under the initial
    policy; ``target_logps``: log P under the target (methods scored by a target), else None;
    ``rewards``: r from the reward (methods scored by a reward), else None."""

    policy_logps: torch.Tensor
    base_logps: torch.Tensor
    target_logps: torch.Tensor | None
    rewards: torch.Tensor | None


@dataclass(frozen=True)
class OnlineMethodSpec:
    """One online method.

    ``rewards(samples, log_z, **options) -> R [N]`` computes the per-sample reward the surrogate
    ascends (before the baseline); ``log_z`` [N] is each sample's running log Z for methods scored by a
    target, None otherwise. ``scored_by``: "target" (the run builds the f-DPG target P from
    ``online.target``, and the loop keeps the running log Z) or "reward" (it builds ``online.reward``).
    ``options``: the ``online`` fields passed to ``rewards`` as keywords. ``reward_metric``: the prefix
    R's summary is logged under. ``baselines``: the ``online.baseline`` values the method allows (None:
    any). ``label_option``: an option shown with the name on the progress bar. ``paper``: the citation
    the model card gives."""

    name: str
    rewards: Callable[..., torch.Tensor]
    scored_by: Literal["target", "reward"]
    options: tuple[str, ...]
    reward_metric: str
    paper: str
    baselines: tuple[str, ...] | None = None
    label_option: str | None = None

    def options_of(self, config: Any) -> dict[str, Any]:
        """This method's options read off an ``online`` config section."""
        return {name: getattr(config, name) for name in self.options}

    def label(self, options: Mapping[str, Any]) -> str:
        """The progress bar's name for a run: the method, with its ``label_option`` if it has one."""
        return self.name if self.label_option is None else f"{self.name}:{options[self.label_option]}"


ONLINE_METHODS: Registry[OnlineMethodSpec] = Registry("online method")


def get_online_method(name: str) -> OnlineMethodSpec:
    """The registered method ``name``; an unknown name raises, listing the registered ones."""
    return ONLINE_METHODS.get(name)
