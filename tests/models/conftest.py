"""Shared fixtures: an isolated distalign cache, tiny models and hand-made batches."""

from __future__ import annotations

import pytest
import torch

from distalign.models.tiny import build_tiny_model


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Every test sees a private $DISTALIGN_CACHE (shared within the session, so the tiny model is
    built once), never the user's ~/.cache; the hub is forced offline so nothing waits on the network."""
    import huggingface_hub.constants

    cache = tmp_path_factory.getbasetemp() / "distalign-cache"
    monkeypatch.setenv("DISTALIGN_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def _sharpened_tiny_model(scale: float = 2.0, seed: int = 0, dtype: torch.dtype = torch.float32):
    """Tiny model with weights scaled up so its next-token distributions are far from uniform."""
    model, tokenizer = build_tiny_model(seed=seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(scale)
    return model.to(dtype), tokenizer


def _make_batch(
    prompt_lengths: list[int], completion_lengths: list[int], *, vocab_size: int = 512, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Right-padded batch with random token ids; masks follow the data layer's convention."""
    generator = torch.Generator().manual_seed(seed)
    width = max(p + c for p, c in zip(prompt_lengths, completion_lengths)) + 2  # + trailing padding
    rows = len(prompt_lengths)
    input_ids = torch.randint(5, vocab_size, (rows, width), generator=generator)
    attention_mask = torch.zeros(rows, width, dtype=torch.long)
    completion_mask = torch.zeros(rows, width, dtype=torch.long)
    for row, (prompt, completion) in enumerate(zip(prompt_lengths, completion_lengths)):
        attention_mask[row, : prompt + completion] = 1
        completion_mask[row, prompt : prompt + completion] = 1
        input_ids[row, prompt + completion :] = 0  # pad id
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


@pytest.fixture
def tiny_model_factory():
    """``factory(scale=2.0, seed=0, dtype=float32) -> (model, tokenizer)``, weights scaled by ``scale``."""
    return _sharpened_tiny_model


@pytest.fixture
def batch_factory():
    """``factory(prompt_lengths, completion_lengths, vocab_size=512, seed=0) -> batch dict``."""
    return _make_batch
