"""Pad tokenised rows into batches with an exact completion mask.

Mask convention. ``completion_mask[b, t] == 1`` iff ``input_ids[b, t]`` is a completion token (EOS
included). A causal LM's logit at position ``t - 1`` predicts token ``t``, so a log-prob consumer
shifts: it scores ``logits[:, :-1]`` against ``input_ids[:, 1:]`` and masks with
``completion_mask[:, 1:]``. Every prompt must hold at least one token, so the first completion token
always has a position to be predicted from (the tokeniser turns an empty prompt into one BOS/EOS).
Sequences are right-padded (``attention_mask`` 0 on padding, ``completion_mask`` 0 there too), except
``collate_prompts``, which left-pads for generation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from distalign.data.tokenize import TokenizedCompletion, TokenizedPair, TokenizedPrompt


def _padded_length(longest: int, pad_to_multiple_of: int | None) -> int:
    if pad_to_multiple_of is None or pad_to_multiple_of <= 1:
        return longest
    return -(-longest // pad_to_multiple_of) * pad_to_multiple_of


def collate_sequences(
    prompts_ids: Sequence[Sequence[int]],
    completions_ids: Sequence[Sequence[int]],
    pad_token_id: int,
    *,
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Concatenate each prompt with its completion and right-pad to one length.

    Returns (all ``torch.long``): ``input_ids`` [B, T], ``attention_mask`` [B, T],
    ``completion_mask`` [B, T] (see the module docstring for the shift) and ``prompt_lengths`` [B].
    T is the longest prompt + completion, rounded up to ``pad_to_multiple_of`` when given.
    """
    if len(prompts_ids) != len(completions_ids):
        raise ValueError(f"{len(prompts_ids)} prompts but {len(completions_ids)} completions")
    if pad_token_id is None:
        raise ValueError("pad_token_id is None; set tokenizer.pad_token (e.g. to the EOS token)")
    lengths = [len(p) + len(c) for p, c in zip(prompts_ids, completions_ids)]
    if any(len(p) == 0 for p in prompts_ids):
        raise ValueError("empty prompt: the first completion token would have no position predicting it")
    batch_size = len(lengths)
    width = _padded_length(max(lengths, default=0), pad_to_multiple_of)
    input_ids = torch.full((batch_size, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch_size, width), dtype=torch.long)
    completion_mask = torch.zeros((batch_size, width), dtype=torch.long)
    for b, (prompt, completion) in enumerate(zip(prompts_ids, completions_ids)):
        sequence = list(prompt) + list(completion)
        input_ids[b, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        attention_mask[b, : len(sequence)] = 1
        completion_mask[b, len(prompt) : len(sequence)] = 1
    prompt_lengths = torch.tensor([len(p) for p in prompts_ids], dtype=torch.long)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        "prompt_lengths": prompt_lengths,
    }


def collate_pairs(
    pairs: Sequence[TokenizedPair], pad_token_id: int, *, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """Batch pairs for one concatenated forward: rows ``0..B-1`` are chosen, ``B..2B-1`` rejected.

    Returns the tensors of ``collate_sequences`` with leading dimension 2B, plus ``weights`` [B]
    (float32) and ``row_index`` [B] (long), both per pair.
    """
    prompts = [pair.prompt_ids for pair in pairs]
    completions = [pair.chosen_ids for pair in pairs] + [pair.rejected_ids for pair in pairs]
    batch = collate_sequences(
        prompts + prompts, completions, pad_token_id, pad_to_multiple_of=pad_to_multiple_of
    )
    batch["weights"] = torch.tensor([pair.weight for pair in pairs], dtype=torch.float32)
    batch["row_index"] = torch.tensor([pair.row_index for pair in pairs], dtype=torch.long)
    return batch


def collate_unpaired(
    completions: Sequence[TokenizedCompletion], pad_token_id: int, *, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """Batch labelled completions: ``collate_sequences`` tensors plus ``labels``, ``weights`` [B]
    (float32) and ``row_index`` [B] (long)."""
    batch = collate_sequences(
        [c.prompt_ids for c in completions],
        [c.completion_ids for c in completions],
        pad_token_id,
        pad_to_multiple_of=pad_to_multiple_of,
    )
    batch["labels"] = torch.tensor([c.label for c in completions], dtype=torch.float32)
    batch["weights"] = torch.tensor([c.weight for c in completions], dtype=torch.float32)
    batch["row_index"] = torch.tensor([c.row_index for c in completions], dtype=torch.long)
    return batch


def collate_prompts(
    prompts: Sequence[TokenizedPrompt], pad_token_id: int, *, padding_side: str = "left"
) -> dict[str, torch.Tensor]:
    """Batch prompts for generation: ``input_ids`` and ``attention_mask`` [B, T], left-padded by
    default (so every row's next token is generated at position T), and ``row_index`` [B]."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    width = max((len(p.prompt_ids) for p in prompts), default=0)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, prompt in enumerate(prompts):
        n = len(prompt.prompt_ids)
        span = slice(width - n, width) if padding_side == "left" else slice(0, n)
        input_ids[b, span] = torch.tensor(prompt.prompt_ids, dtype=torch.long)
        attention_mask[b, span] = 1
    row_index = torch.tensor([p.row_index for p in prompts], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "row_index": row_index}
