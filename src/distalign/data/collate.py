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

Shared-prompt layout (``pack_sequences(rows="shared")``): sequences with the same prompt (a pair's
chosen and rejected, a list's responses) form one group, laid out as the prompt once followed by each
completion, every completion's positions continuing from the prompt's length; ``group_index`` names
each token's group, and a completion token attends to its group's prompt and to its own completion
only. A completion's first token is predicted from its group's last prompt token, the others from the
token before them (:func:`predictor_positions`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from distalign.data.tokenized import TokenizedCompletion, TokenizedPair, TokenizedPrompt


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
    ``completion_mask`` [B, T] (see the module docstring for the shift), ``prompt_lengths`` [B] and
    ``predictor_positions`` [N]: the flat index ``b * T + t`` of every position whose output predicts a
    completion token (t + 1), row-major, computed here on the host so that a forward on a device need
    not find them in the mask (a ``nonzero`` there waits for the device).
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
        "predictor_positions": padded_predictor_positions(completion_mask),
    }


def padded_predictor_positions(completion_mask: torch.Tensor) -> torch.Tensor:
    """[N] the flat index ``b * T + t`` of every position of a padded batch [B, T] whose output predicts
    a completion token (position t predicts token t + 1), row-major."""
    predicts = torch.zeros_like(completion_mask, dtype=torch.bool)
    predicts[:, :-1] = completion_mask[:, 1:].bool()
    return predicts.flatten().nonzero(as_tuple=True)[0]


PackedRows = Literal["longest", "one", "shared", "shared_one"]

PackedAttention = Literal["mask", "spans", "flex", "varlen"]


@dataclass(frozen=True)
class PackingLayout:
    """How a run packs its forward passes (``data.packing``), decided once at setup from the model
    (``distalign.train.setup.packing_layout``) and handed to every collate and to the log-prob module.

    ``rows``: how :func:`pack_sequences` lays the sequences into rows. ``attention``: how the forward
    keeps each sequence's attention inside it: "mask", a block-diagonal causal 4D mask; "spans", one
    SDPA call per span; "flex", one FlexAttention call over a block mask; "varlen", flash kernels'
    variable-length path (from the position ids; the batch must be one row)."""

    rows: PackedRows
    attention: PackedAttention


class PackedBatch(dict):
    """The tensors of a packed batch (:func:`pack_sequences`), by name: its type, not its keys, tells
    a consumer that it is packed. Move it with :func:`to_device`, which keeps the type."""


def to_device(batch: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    """``batch`` with every tensor on ``device``, of the same type (a padded dict or a
    :class:`PackedBatch`)."""
    return type(batch)({name: tensor.to(device) for name, tensor in batch.items()})


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


def _prompt_groups(prompts_ids: Sequence[Sequence[int]], share: bool) -> list[list[int]]:
    """Sequence indices per group: those with identical prompts together (first appearance order) when
    ``share``, else one group per sequence."""
    if not share:
        return [[m] for m in range(len(prompts_ids))]
    groups: dict[tuple[int, ...], list[int]] = {}
    for m, prompt in enumerate(prompts_ids):
        groups.setdefault(tuple(prompt), []).append(m)
    return list(groups.values())


def pack_sequences(
    prompts_ids: Sequence[Sequence[int]],
    completions_ids: Sequence[Sequence[int]],
    pad_token_id: int,
    *,
    rows: PackedRows = "longest",
) -> PackedBatch:
    """Lay the sequences (prompt + completion each) end to end, padding-free, for one packed forward.

    ``rows="longest"``: rows of at most the longest sequence's length, filled first-fit from the
    longest sequence down, so a packed batch never has more positions, nor (with a block-diagonal
    attention mask) more attention scores, than the padded one; only the last rows can end in padding.
    ``rows="one"``: every sequence in a single row (for variable-length attention kernels, which cost
    the sum of squared sequence lengths whatever the row, and for span attention, which costs the same).
    ``rows="shared"``: as "longest", over groups of sequences with identical prompts, each group's
    prompt laid out once (module docstring); ``rows="shared_one"``: those groups in a single row.

    Returns (``torch.long``), with M sequences in R rows of width W:
    ``input_ids``, ``attention_mask`` (1 on tokens, 0 on row-end padding), ``completion_mask``,
    ``position_ids`` (restarting at 0 for each sequence; the row-end padding counts on from 0 too),
    ``sequence_index`` (the sequence of each token, -1 on padding; a shared prompt's tokens carry the
    group's first sequence): all [R, W]; ``head_positions`` [M] (flat index ``r * W + t`` of each
    sequence's last prompt token) and ``prompt_lengths`` [M]; with shared prompts also
    ``group_index`` [R, W] (-1 on padding); ``target_positions`` and ``predictor_positions`` [N], the
    :func:`predictor_positions` of the batch, computed here on the host so that a forward on a device
    need not derive them from the masks (``nonzero`` and ``max`` there each wait for the device).
    Sequence m is the m-th input pair, wherever it lands.
    """
    if rows not in ("longest", "one", "shared", "shared_one"):
        raise ValueError(f"rows must be 'longest', 'one', 'shared' or 'shared_one', got {rows!r}")
    shared = rows in ("shared", "shared_one")
    lengths = _sequence_lengths(prompts_ids, completions_ids, pad_token_id)
    groups = _prompt_groups(prompts_ids, share=shared)
    group_lengths = [len(prompts_ids[g[0]]) + sum(len(completions_ids[m]) for m in g) for g in groups]
    capacity = sum(group_lengths) if rows in ("one", "shared_one") else max(group_lengths, default=0)
    layout = _first_fit_rows(group_lengths, capacity) if lengths else []
    width = max((sum(group_lengths[i] for i in row) for row in layout), default=0)
    shape = (len(layout), width)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    completion_mask = torch.zeros(shape, dtype=torch.long)
    sequence_index = torch.full(shape, -1, dtype=torch.long)
    group_index = torch.full(shape, -1, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    head_positions = torch.zeros(len(lengths), dtype=torch.long)
    for r, row in enumerate(layout):
        start = 0
        for g in row:
            members = groups[g]
            prompt = prompts_ids[members[0]]
            input_ids[r, start : start + len(prompt)] = torch.tensor(list(prompt), dtype=torch.long)
            sequence_index[r, start : start + len(prompt)] = members[0]
            group_index[r, start : start + len(prompt)] = g
            position_ids[r, start : start + len(prompt)] = torch.arange(len(prompt))
            last_prompt_token = r * width + start + len(prompt) - 1
            start += len(prompt)
            for m in members:
                completion = completions_ids[m]
                span = slice(start, start + len(completion))
                input_ids[r, span] = torch.tensor(list(completion), dtype=torch.long)
                completion_mask[r, span] = 1
                sequence_index[r, span] = m
                group_index[r, span] = g
                position_ids[r, span] = torch.arange(len(prompt), len(prompt) + len(completion))
                head_positions[m] = last_prompt_token
                start = span.stop
        position_ids[r, start:] = torch.arange(width - start)
    batch = {
        "input_ids": input_ids,
        "attention_mask": (sequence_index >= 0).long(),
        "completion_mask": completion_mask,
        "position_ids": position_ids,
        "sequence_index": sequence_index,
        "head_positions": head_positions,
        "prompt_lengths": torch.tensor([len(p) for p in prompts_ids], dtype=torch.long),
    }
    if shared:
        batch["group_index"] = group_index
    targets, predictors = predictor_positions(completion_mask, sequence_index, batch.get("group_index"))
    batch["target_positions"], batch["predictor_positions"] = targets, predictors
    return PackedBatch(batch)


def predictor_positions(
    completion_mask: torch.Tensor, sequence_index: torch.Tensor, group_index: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(completion [N], predictor [N]): the flat index ``r * W + t`` of every completion token of a
    packed batch [R, W] (row-major), and of the position whose output predicts it: the token before it
    in its own completion, or, for a completion's first token, its group's last prompt token (with no
    ``group_index``, every sequence is its own group: the token before it)."""
    width = completion_mask.shape[-1]
    completion = completion_mask.flatten().bool()
    sequences = sequence_index.flatten()
    groups = sequences if group_index is None else group_index.flatten()
    targets = completion.nonzero(as_tuple=True)[0]
    previous = (targets - 1).clamp_min(0)
    continues = completion[previous] & (sequences[previous] == sequences[targets]) & (targets % width != 0)
    prompt_tokens = (~completion & (groups >= 0)).nonzero(as_tuple=True)[0]
    last_prompt = torch.full((int(groups.max()) + 1 if groups.numel() else 0,), -1, dtype=torch.long,
                             device=groups.device)  # fmt: skip
    last_prompt = last_prompt.scatter_reduce(0, groups[prompt_tokens], prompt_tokens, reduce="amax")
    predictors = torch.where(continues, previous, last_prompt[groups[targets]])
    return targets, predictors


def packed_attention_mask(
    sequence_index: torch.Tensor,
    dtype: torch.dtype | None = None,
    *,
    group_index: torch.Tensor | None = None,
    completion_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """[R, 1, W, W] block-diagonal causal mask: query t sees key s iff s <= t in the same sequence (the
    padding ending a row is one block of its own, so no query row is empty). In the shared-prompt
    layout (``group_index`` and ``completion_mask`` given): iff s <= t in the same group and s is a
    prompt token or in the same completion. Boolean (True = attend) for SDPA-style attention; with
    ``dtype``, additive (0 or the dtype's minimum) for eager attention."""
    width = sequence_index.shape[-1]
    causal = torch.ones(width, width, dtype=torch.bool, device=sequence_index.device).tril()
    same_sequence = sequence_index[:, :, None] == sequence_index[:, None, :]
    if group_index is None:
        allowed = same_sequence & causal
    else:
        if completion_mask is None:
            raise ValueError("the shared-prompt mask needs the completion_mask")
        key_is_prompt = ~completion_mask.bool()[:, None, :]
        same_group = group_index[:, :, None] == group_index[:, None, :]
        allowed = same_group & causal & (key_is_prompt | same_sequence)
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


def token_counts(batch: dict[str, torch.Tensor]) -> tuple[int, int, int]:
    """(tokens, positions, forwarded) of a host batch from :func:`collate_sequences` or
    :func:`pack_sequences`: its sequences' tokens (prompt + completion each), the positions a forward
    pass processes (padding included) and the tokens it forwards (fewer than ``tokens`` when a shared
    prompt is forwarded once). Read on the host, before the batch is copied to the device, so that
    throughput accounting never waits on the device."""
    tokens = int(batch["prompt_lengths"].sum() + batch["completion_mask"].sum())
    return tokens, batch["attention_mask"].numel(), int(batch["attention_mask"].sum())
