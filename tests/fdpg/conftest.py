"""Shared settings for the f-DPG tests."""

from __future__ import annotations

import pytest
from distalign_testing.tiny_lm import build_word_llama, build_word_tokenizer

#: The vocabulary of the word-level tiny Llama the sampling tests run on (plus BOS / EOS).
WORDS = ["x", "y", "z", "w", "v"]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread(single_thread_torch):
    """Every module here runs on tiny tensors or the tiny model (see the root conftest)."""


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer(WORDS)


@pytest.fixture(scope="module")
def model(tokenizer):
    """A tiny random Llama with peaked next-token distributions, in eval mode."""
    return build_word_llama(tokenizer, seed=0)
