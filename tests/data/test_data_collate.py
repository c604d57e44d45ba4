"""Padding, masks and their alignment with the next-token shift."""

from __future__ import annotations

import pytest
import torch

from distalign.data.collate import collate_pairs, collate_prompts, collate_sequences, collate_unpaired
from distalign.data.tokenize import tokenize_paired
from distalign.data.tokenized import TokenizedCompletion, TokenizedPair, TokenizedPrompt

PAD = 0


def test_collate_sequences_hand_built():
    batch = collate_sequences([[1, 2], [3]], [[4, 5, 6], [7]], PAD)
    assert batch["input_ids"].tolist() == [[1, 2, 4, 5, 6], [3, 7, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert batch["completion_mask"].tolist() == [[0, 0, 1, 1, 1], [0, 1, 0, 0, 0]]
    assert batch["prompt_lengths"].tolist() == [2, 1]
    assert all(t.dtype == torch.long for t in batch.values())


@pytest.mark.parametrize(("multiple", "width"), [(None, 5), (1, 5), (4, 8), (5, 5), (8, 8)])
def test_pad_to_multiple_of(multiple, width):
    batch = collate_sequences([[1, 2], [3]], [[4, 5, 6], [7]], PAD, pad_to_multiple_of=multiple)
    assert batch["input_ids"].shape == (2, width)
    assert batch["attention_mask"].sum().item() == 7 and batch["completion_mask"].sum().item() == 4


def test_shifted_mask_selects_exactly_the_completion_targets():
    prompts = [[11, 12, 13], [21], [31, 32]]
    completions = [[14], [22, 23, 24, 25], [33, 34]]
    batch = collate_sequences(prompts, completions, PAD, pad_to_multiple_of=8)
    targets = batch["input_ids"][:, 1:]
    target_mask = batch["completion_mask"][:, 1:].bool()
    for b, (prompt, completion) in enumerate(zip(prompts, completions)):
        assert targets[b][target_mask[b]].tolist() == completion
        # the logit positions that predict the completion start at the last prompt token
        predicting = torch.nonzero(target_mask[b]).flatten().tolist()
        assert predicting == list(range(len(prompt) - 1, len(prompt) - 1 + len(completion)))
    assert not (batch["completion_mask"].bool() & ~batch["attention_mask"].bool()).any()


def test_collate_pairs_chosen_first():
    pairs = [
        TokenizedPair(row_index=4, prompt_ids=[1, 2], chosen_ids=[3], rejected_ids=[4, 5, 6], weight=0.5),
        TokenizedPair(row_index=9, prompt_ids=[7], chosen_ids=[8, 9], rejected_ids=[10], weight=2.0),
    ]
    batch = collate_pairs(pairs, PAD)
    assert batch["input_ids"].tolist() == [
        [1, 2, 3, 0, 0],
        [7, 8, 9, 0, 0],
        [1, 2, 4, 5, 6],
        [7, 10, 0, 0, 0],
    ]
    assert batch["completion_mask"].tolist() == [
        [0, 0, 1, 0, 0],
        [0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1],
        [0, 1, 0, 0, 0],
    ]
    assert batch["weights"].tolist() == [0.5, 2.0] and batch["row_index"].tolist() == [4, 9]


def test_collate_unpaired():
    items = [
        TokenizedCompletion(row_index=0, prompt_ids=[1], completion_ids=[2, 3], label=1.0, weight=1.0),
        TokenizedCompletion(row_index=1, prompt_ids=[4, 5], completion_ids=[6], label=0.0, weight=0.25),
    ]
    batch = collate_unpaired(items, PAD)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 5, 6]]
    assert batch["completion_mask"].tolist() == [[0, 1, 1], [0, 0, 1]]
    assert batch["labels"].tolist() == [1.0, 0.0] and batch["weights"].tolist() == [1.0, 0.25]
    assert batch["labels"].dtype == torch.float32


def test_collate_prompts_left_and_right():
    prompts = [TokenizedPrompt(0, [1, 2, 3], "a"), TokenizedPrompt(1, [4], "b")]
    left = collate_prompts(prompts, PAD)
    assert left["input_ids"].tolist() == [[1, 2, 3], [0, 0, 4]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    right = collate_prompts(prompts, PAD, padding_side="right")
    assert right["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    with pytest.raises(ValueError):
        collate_prompts(prompts, PAD, padding_side="middle")


def test_collate_errors():
    with pytest.raises(ValueError, match="empty prompt"):
        collate_sequences([[]], [[1]], PAD)
    with pytest.raises(ValueError, match="2 prompts but 1"):
        collate_sequences([[1], [2]], [[3]], PAD)
    with pytest.raises(ValueError, match="pad_token_id"):
        collate_sequences([[1]], [[2]], None)


def test_end_to_end_masked_tokens_decode_to_completions(bpe_tokenizer):
    tok = bpe_tokenizer
    rows = [
        {"prompt": "Hel", "chosen": "lo world", "rejected": "lo there", "weight": 1.0},
        {
            "prompt": "Review: the pasta.",
            "chosen": " It was wonderful.",
            "rejected": " Simply awful.",
            "weight": 1.0,
        },
    ]
    pairs, _ = tokenize_paired(rows, tok)
    batch = collate_pairs(pairs, tok.pad_token_id, pad_to_multiple_of=8)
    expected = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    for b, text in enumerate(expected):
        mask = batch["completion_mask"][b].bool()
        assert tok.decode(batch["input_ids"][b][mask].tolist()) == text + "<|endoftext|>"
        prompt_mask = batch["attention_mask"][b].bool() & ~mask
        assert tok.decode(batch["input_ids"][b][prompt_mask].tolist()) == rows[b % 2]["prompt"]
