"""The ``Task`` contract (prompts + a gold reward) and the task registry.

A task is everything needed to check, without a network, that alignment moved a model the right way:
train and held-out prompts generated deterministically from templates, and a gold reward that needs
no model. The split is decided per prompt by a hash of its text, so it never depends on a seed, on the
order of the templates, or on how many prompts a caller asks for.
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from distalign.registry import Registry
from distalign.rewards import RewardFn

Split = Literal["train", "heldout"]


@dataclass
class Task:
    """A named alignment task: prompts and the gold reward that judges completions of them.

    ``settings`` are the resolved factory settings (recorded in dataset provenance);
    ``system_prompt`` is prepended as a system message by :meth:`messages` when set.
    """

    name: str
    description: str
    train_prompts: list[str]
    heldout_prompts: list[str]
    gold_reward: RewardFn
    system_prompt: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    def prompts(self, split: Split = "train") -> list[str]:
        """The prompts of ``split`` ("train" or "heldout")."""
        if split == "train":
            return list(self.train_prompts)
        if split == "heldout":
            return list(self.heldout_prompts)
        raise ValueError(f"split={split!r} is not valid; choose 'train' or 'heldout'")

    def messages(self, prompt: str) -> list[dict[str, str]]:
        """``prompt`` as chat messages (TRL conversational format), with the system prompt if any."""
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [*system, {"role": "user", "content": prompt}]


#: Task factories by name: keyword-only settings in, a :class:`Task` out.
TASKS: Registry[Callable[..., Task]] = Registry("task")


def get_task(name: str, **settings: Any) -> Task:
    """Build the registered task ``name``; an unknown setting raises ``ValueError`` listing the valid ones."""
    factory = TASKS.get(name)
    params = inspect.signature(factory).parameters
    unknown = sorted(set(settings) - set(params))
    if unknown:
        raise ValueError(
            f"task {name!r} has no setting(s) {unknown}; its settings: {', '.join(sorted(params))}"
        )
    return factory(**settings)


def expand_templates(templates: Sequence[str], slots: dict[str, Sequence[str]]) -> list[str]:
    """Every template filled with every combination of the slot values it uses, in a fixed order.

    ``expand_templates(["Review {item}."], {"item": ["a", "b"]}) == ["Review a.", "Review b."]``.
    Duplicates are dropped (first occurrence kept).
    """
    prompts: list[str] = []
    for template in templates:
        used = [name for name in slots if "{" + name + "}" in template]
        for values in itertools.product(*(slots[name] for name in used)):
            prompts.append(template.format(**dict(zip(used, values))))
    return list(dict.fromkeys(prompts))


def is_heldout(prompt: str, heldout_fraction: float) -> bool:
    """Whether ``prompt`` belongs to the held-out split: its hash, mapped to [0, 1), is below the fraction."""
    digest = hashlib.blake2b(prompt.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < heldout_fraction


def split_prompts(prompts: Sequence[str], heldout_fraction: float = 0.2) -> tuple[list[str], list[str]]:
    """``(train, heldout)`` by :func:`is_heldout`; each keeps the input order."""
    if not 0.0 <= heldout_fraction <= 1.0:
        raise ValueError(f"heldout_fraction={heldout_fraction} must lie in [0, 1]")
    train = [p for p in prompts if not is_heldout(p, heldout_fraction)]
    heldout = [p for p in prompts if is_heldout(p, heldout_fraction)]
    return train, heldout
