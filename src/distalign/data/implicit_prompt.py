"""TRL's implicit-prompt preference format: ``chosen`` and ``rejected`` hold whole conversations.

Many preference datasets (Anthropic HH-RLHF, ultrafeedback_binarized, ...) have no ``prompt`` column:
each of ``chosen`` and ``rejected`` is the full conversation, prompt included, and the two start the
same way. The prompt is their shared start, split off as TRL's ``extract_prompt`` does:

- message lists: the longest common prefix of messages (whole messages compared); the prompt is the
  shared messages and ``chosen`` / ``rejected`` keep the messages after it;
- plain text: the longest common *character* prefix; when the character just before the first
  difference is a space, the split moves one character left so that the space starts both
  completions (``"...Assistant: Sure"`` / ``"...Assistant: No"`` give the prompt ``"...Assistant:"``
  and the completions ``" Sure"`` / ``" No"``).

Where TRL would silently produce an odd row, this is an error naming the row: the two sides share
nothing, are identical, or one is the other plus more (nothing would be left of one completion).
Like TRL, a plain-text ``prompt`` column beside message-list ``chosen`` / ``rejected`` (e.g.
ultrafeedback_binarized) is taken as implicit too: the prompt messages come from the conversations.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_HINT = "give the prompt in a 'prompt' column instead"


class ImplicitPromptError(ValueError):
    """Why no prompt can be split off one row (the loader adds file and row)."""


def extract_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """``(prompt, chosen_rest, rejected_rest)``: the shared start of ``chosen`` and ``rejected`` and
    what follows it in each. Both are strings, or both lists of messages. Raises
    ``ImplicitPromptError`` when no non-empty prompt and two non-empty completions result."""
    if isinstance(chosen, str) != isinstance(rejected, str) or not isinstance(chosen, (str, list)):
        kinds = f"chosen is {_kind(chosen)}, rejected is {_kind(rejected)}"
        raise ImplicitPromptError(
            f"implicit prompt: chosen and rejected must both be text or both lists of messages ({kinds})"
        )
    if not isinstance(rejected, (str, list)):
        raise ImplicitPromptError(f"implicit prompt: rejected is {_kind(rejected)}")
    shared = 0
    limit = min(len(chosen), len(rejected))
    while shared < limit and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == limit:
        if len(chosen) == len(rejected):
            raise ImplicitPromptError(
                "implicit prompt: chosen and rejected are identical, so there is no preference to learn"
            )
        shorter = "chosen" if len(chosen) < len(rejected) else "rejected"
        raise ImplicitPromptError(
            f"implicit prompt: {shorter} is the start of the other side, so nothing would be left of it "
            f"after the shared prompt: {_HINT}"
        )
    if isinstance(chosen, str) and shared > 0 and chosen[shared - 1] == " ":
        shared -= 1  # the space starts the completions (TRL's rule)
    if shared == 0:
        unit = "character" if isinstance(chosen, str) else "message"
        raise ImplicitPromptError(
            f"implicit prompt: chosen and rejected share no prefix (they differ from the first {unit}), "
            f"so no prompt can be split off: {_HINT}"
        )
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _kind(value: Any) -> str:
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def has_implicit_prompt(row: Mapping[str, Any]) -> bool:
    """Whether a raw paired row takes its prompt from ``chosen`` / ``rejected``: it has no prompt, or
    (as TRL decides) a plain-text prompt beside message-list completions."""
    if row.get("chosen") is None or row.get("rejected") is None:
        return False
    prompt, chosen = row.get("prompt"), row["chosen"]
    if prompt is None:
        return True
    # a conversation that starts with the prompt turns (not a completion that is one assistant turn)
    return (
        isinstance(prompt, str)
        and isinstance(chosen, list)
        and isinstance(row["rejected"], list)
        and bool(chosen)
        and isinstance(chosen[0], Mapping)
        and chosen[0].get("role") != "assistant"
    )


def split_implicit_prompt(row: Mapping[str, Any]) -> dict[str, Any]:
    """The raw row with ``prompt``, ``chosen`` and ``rejected`` replaced by the extracted parts."""
    prompt, chosen, rejected = extract_prompt(row["chosen"], row["rejected"])
    return {**row, "prompt": prompt, "chosen": chosen, "rejected": rejected}
