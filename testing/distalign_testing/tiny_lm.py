"""A word-level tokenizer and the tiny Llama for it, built locally (no hub access).

Small enough that the whole completion space of a couple of tokens can be enumerated, which lets tests
compare sampler frequencies with exact probabilities.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from distalign.models.tiny import build_tiny_llama

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")


def build_word_tokenizer(words: Sequence[str]) -> PreTrainedTokenizerFast:
    """Whitespace word-level tokenizer: ids 0, 1, 2 are <pad>, <bos>, <eos>, then ``words`` in order.

    Unknown words map to <pad>; decoding joins words with single spaces.
    """
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *dict.fromkeys(words)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins word pieces with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
    )


def build_word_llama(
    tokenizer: PreTrainedTokenizerFast, seed: int = 0, hidden_size: int = 32, num_layers: int = 2
) -> LlamaForCausalLM:
    """The tiny Llama (:func:`distalign.models.tiny.build_tiny_llama`: float32, eval mode) for a
    :func:`build_word_tokenizer` tokenizer, with an untied output layer scaled up."""
    model = build_tiny_llama(
        tokenizer,
        seed=seed,
        hidden_size=hidden_size,
        num_layers=num_layers,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    # Random init gives near-uniform next-token distributions; a larger output scale makes the
    # distributions peaked enough that sampling tests can tell a wrong distribution from the right one.
    with torch.no_grad():
        model.lm_head.weight.mul_(25.0)
    return model
