"""Pad tokenised rows into batches with an exact completion mask.

Mask convention. ``completion_mask[b, t] == 1`` iff ``input_ids[b, t]`` is a completion token (EOS
included). A causal LM's logit at position ``t - 1`` predicts token ``t``, so a log-prob consumer
shifts: it scores ``logits[:, :-1]`` against ``input_ids[:, 1:]`` and masks with
``completion_mask[:, 1:]``. Every prompt must hold at least one token, so the first completion token
always has a position to be predicted from (the tokeniser turns an empty prompt into one BOS/EOS).
Sequences are right-padded (``attention_mask`` 0 on padding, ``completion_mask`` 0 there too), except
``collate_prompts``, which left-pads for generation.

Packed layout (``pack_sequences``): the sequences laid end to end in a few rows, each with position ids
restarting at 0 and a ``sequence_index`` naming the sequence every token belongs to (-1 on the padding
that ends a row shorter than the longest one). Consumers score the same shifted positions; position
``t - 1`` predicts token ``t`` only inside one sequence, which holds because every sequence starts with
a prompt token (``completion_mask`` 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from distalign.data.tokenize import TokenizedCompletion, TokenizedPair, TokenizedPrompt


def _padded_length(longest: int, pad_to_multiple_of: int | None) -> int:
    if pad_to_multiple_of is None or pad_to_multiple_of <= 1:
        return longest
    return -(-longest // pad_to_multiple_of) * pad_to_multiple_of


def _sequence_lengths(
    prompts_ids: Sequence[Sequence[int]], completions_ids: Sequence[Sequence[int]], pad_token_id: int
) -> list[int]:
    """Prompt + completion length of each sequence, after checking the inputs can be batched."""
    if len(prompts_ids) != len(completions_ids):
        raise ValueError(f"{len(prompts_ids)} prompts but {len(completions_ids)} completions")
    if pad_token_id is None:
        raise ValueError("pad_token_id is None; set tokenizer.pad_token (e.g. to the EOS token)")
    if any(len(p) == 0 for p in prompts_ids):
        raise ValueError("empty prompt: the first completion token would have no position predicting it")
    return [len(p) + len(c) for p, c in zip(prompts_ids, completions_ids)]


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
    lengths = _sequence_lengths(prompts_ids, completions_ids, pad_token_id)
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


PackedRows = Literal["longest", "one"]


def _first_fit_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Sequence indices per row: first fit, longest sequences first (ties in input order)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        slot = next((r for r, free in enumerate(room) if free >= lengths[index]), None)
        if slot is None:
            rows.append([])
            room.append(capacity)
            slot = len(rows) - 1
        rows[slot].append(index)
        room[slot] -= lengths[index]
    return rows


def pack_sequences(
    prompts_ids: Sequence[Sequence[int]],
    completions_ids: Sequence[Sequence[int]],
    pad_token_id: int,
    *,
    rows: PackedRows = "longest",
) -> dict[str, torch.Tensor]:
    """Lay the sequences (prompt + completion each) end to end, padding-free, for one packed forward.

    ``rows="longest"``: rows of at most the longest sequence's length, filled first-fit from the
    longest sequence down, so a packed batch never has more positions, nor (with a block-diagonal
    attention mask) more attention scores, than the padded one; only the last rows can end in padding.
    ``rows="one"``: every sequence in a single row (for variable-length attention kernels, which cost
    the sum of squared sequence lengths whatever the row).

    Returns (``torch.long``), with M sequences in R rows of width W:
    ``input_ids``, ``attention_mask`` (1 on tokens, 0 on row-end padding), ``completion_mask``,
    ``position_ids`` (restarting at 0 for each sequence; the row-end padding counts on from 0 too),
    ``sequence_index`` (the sequence of each token, -1 on padding): all [R, W];
    ``head_positions`` [M] (flat index ``r * W + t`` of each sequence's last prompt token) and
    ``prompt_lengths`` [M]. Sequence m is the m-th input pair, wherever it lands.
    """
    if rows not in ("longest", "one"):
        raise ValueError(f"rows must be 'longest' or 'one', got {rows!r}")
    lengths = _sequence_lengths(prompts_ids, completions_ids, pad_token_id)
    capacity = sum(lengths) if rows == "one" else max(lengths, default=0)
    layout = _first_fit_rows(lengths, capacity) if lengths else []
    width = max((sum(lengths[i] for i in row) for row in layout), default=0)
    shape = (len(layout), width)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    completion_mask = torch.zeros(shape, dtype=torch.long)
    sequence_index = torch.full(shape, -1, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    head_positions = torch.zeros(len(lengths), dtype=torch.long)
    for r, row in enumerate(layout):
        start = 0
        for m in row:
            prompt, completion = prompts_ids[m], completions_ids[m]
            span = slice(start, start + lengths[m])
            input_ids[r, span] = torch.tensor(list(prompt) + list(completion), dtype=torch.long)
            completion_mask[r, start + len(prompt) : span.stop] = 1
            sequence_index[r, span] = m
            position_ids[r, span] = torch.arange(lengths[m])
            head_positions[m] = r * width + start + len(prompt) - 1
            start = span.stop
        position_ids[r, start:] = torch.arange(width - start)
    return {
        "input_ids": input_ids,
        "attention_mask": (sequence_index >= 0).long(),
        "completion_mask": completion_mask,
        "position_ids": position_ids,
        "sequence_index": sequence_index,
        "head_positions": head_positions,
        "prompt_lengths": torch.tensor([len(p) for p in prompts_ids], dtype=torch.long),
    }


def packed_attention_mask(sequence_index: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """[R, 1, W, W] block-diagonal causal mask: query t sees key s iff s <= t in the same sequence (the
    padding ending a row is one block of its own, so no query row is empty). Boolean (True = attend)
    for SDPA-style attention; with ``dtype``, additive (0 or the dtype's minimum) for eager attention."""
    width = sequence_index.shape[-1]
    causal = torch.ones(width, width, dtype=torch.bool, device=sequence_index.device).tril()
    allowed = (sequence_index[:, :, None] == sequence_index[:, None, :]) & causal
    allowed = allowed[:, None]
    if dtype is None:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


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
