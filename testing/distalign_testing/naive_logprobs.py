"""The plain reference the memory-lean log-prob code is tested against."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from distalign.models.token_logprobs import model_inputs


def naive_sequence_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_mask: Tensor,
    position_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Full [B, T, V] logits, float64 log-softmax, gather: ``(summed [B], counts [B])``, float64.

    Memory-hungry by design: the straightforward computation, for tests of the lean one."""
    logits = model(**model_inputs(model, input_ids, attention_mask, position_ids)).logits
    token_logps = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    token_logps = token_logps.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    mask = completion_mask[:, 1:].double()
    return (token_logps * mask).sum(-1), mask.sum(-1)
