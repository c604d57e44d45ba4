"""A word-level tokenizer and a randomly initialised tiny Llama, built locally (no hub access).

Small enough that the whole completion space of a couple of tokens can be enumerated, which lets tests
compare sampler frequencies with exact probabilities.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

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


def build_tiny_llama(
    vocab_size: int, seed: int = 0, hidden_size: int = 32, num_layers: int = 2
) -> LlamaForCausalLM:
    """A random float32 Llama (4 heads, eval mode) whose special ids match :func:`build_word_tokenizer`."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # Random init gives near-uniform next-token distributions; a larger output scale makes the
    # distributions peaked enough that sampling tests can tell a wrong distribution from the right one.
    with torch.no_grad():
        model.lm_head.weight.mul_(25.0)
    return model.eval()
