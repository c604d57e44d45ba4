"""Model heads: small modules on the policy's final hidden state, trained beside it.

A loss that needs more than sequence log-probs declares heads by name (``register_loss(...,
heads=("value",))``); the training loop attaches them to the policy's log-prob module, so they are
prepared, synchronised, checkpointed and resumed with the model, and get their own optimizer parameter
group (``train.head_lr``). A head reads the hidden state of each sequence's **last prompt token** (the
state from which the completion is generated), so its output is a function of the prompt alone, e.g.
UPO's value ``V(x)``.

A registered head is a factory ``(hidden_size, dtype) -> nn.Module`` mapping hidden states [B, H] to
outputs [B].
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from distalign.registry import Registry

HeadFactory = Callable[[int, torch.dtype], nn.Module]
HEADS: Registry[HeadFactory] = Registry("model head")


class ScalarHead(nn.Module):
    """``w . h / ||h|| + b``: hidden states [B, H] -> [B]. Zero-initialised, so it starts at 0 for every
    prompt (for a value head: no prompt is assumed better than another before training).

    The hidden state is scaled to unit length first: a model's final states can be large (SmolLM2-135M's
    have an L1 norm near 800), and Adam's first steps move every weight by about the learning rate in a
    coherent direction, so an unscaled head's output would jump by ``lr x ||h||_1`` per step (a value
    head at lr 1e-2 overshot a z-scored target by 4 after one step). Scaled, the jump is at most
    ``lr x sqrt(H)`` whatever the model, and one ``train.head_lr`` means the same across model sizes."""

    def __init__(self, hidden_size: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1, dtype=dtype)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        hidden = hidden.to(self.linear.weight.dtype)
        unit = hidden / hidden.norm(dim=-1, keepdim=True).clamp(min=1e-6)
        return self.linear(unit).squeeze(-1)


HEADS.add("value", ScalarHead)


def build_heads(names: tuple[str, ...] | list[str], hidden_size: int, dtype: torch.dtype) -> nn.ModuleDict:
    """One module per declared head name, in float32 at least (float64 stays float64)."""
    dtype = torch.promote_types(dtype, torch.float32)
    return nn.ModuleDict({name: HEADS.get(name)(hidden_size, dtype) for name in names})
