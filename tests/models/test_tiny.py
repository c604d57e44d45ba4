"""The locally built tiny model and tokenizer: determinism, tokens, chat template, cached copy."""

from __future__ import annotations

import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, AutoTokenizer

import distalign.models.tiny as tiny_module
from distalign.models.tiny import build_tiny_model, build_tiny_tokenizer, tiny_corpus, tiny_model_path

TOKENIZER = build_tiny_tokenizer()


def test_build_is_fast_and_deterministic():
    start = time.perf_counter()
    first_model, first_tokenizer = build_tiny_model()
    elapsed = time.perf_counter() - start
    second_model, second_tokenizer = build_tiny_model()
    assert elapsed < 2.0  # typically ~0.1 s; generous for a loaded 2-core machine
    text = "The soup was cold, but the waiter was kind."
    assert first_tokenizer(text).input_ids == second_tokenizer(text).input_ids
    assert first_tokenizer.get_vocab() == second_tokenizer.get_vocab()
    for (name, a), (_, b) in zip(first_model.state_dict().items(), second_model.state_dict().items()):
        assert torch.equal(a, b), name


def test_seed_changes_weights_not_tokenizer_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    model_a, tokenizer_a = build_tiny_model(seed=0)
    assert torch.equal(torch.rand(3), expected_next)
    model_b, tokenizer_b = build_tiny_model(seed=1)
    assert tokenizer_a.get_vocab() == tokenizer_b.get_vocab()
    assert not torch.equal(model_a.model.embed_tokens.weight, model_b.model.embed_tokens.weight)


def test_special_tokens_and_config():
    model, tokenizer = build_tiny_model()
    assert len(tokenizer) == 512 == model.config.vocab_size
    ids = tokenizer.convert_tokens_to_ids(["<|pad|>", "<|eos|>", "<|bos|>", "<|im_start|>", "<|im_end|>"])
    assert ids == [0, 1, 2, 3, 4]
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id) == (0, 1, 2)
    assert model.config.pad_token_id == 0 and model.config.eos_token_id == 1
    assert model.generation_config.pad_token_id == 0 and model.generation_config.eos_token_id == 1
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert model.config.attention_dropout == 0.0
    # each special token is one token, never split into bytes
    assert tokenizer("<|im_start|>user<|im_end|>").input_ids[0] == 3


def test_corpus_sentences_compress():
    """BPE merges learned from the corpus make its sentences shorter than their byte count."""
    sentence = tiny_corpus()[0]
    assert len(TOKENIZER(sentence).input_ids) < len(sentence.encode()) / 2


@settings(max_examples=40, deadline=None)
@given(st.text(max_size=40))
def test_byte_level_round_trip(text):
    ids = TOKENIZER(text, add_special_tokens=False).input_ids
    assert all(0 <= i < 512 for i in ids)
    if "<|" not in text:  # text that spells a special token is tokenised as that token
        assert TOKENIZER.decode(ids) == text


def test_chat_template_is_chatml():
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello"}]
    rendered = TOKENIZER.apply_chat_template(messages, tokenize=False)
    assert rendered == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
    prompt = TOKENIZER.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"


def test_too_small_vocab_is_rejected():
    with pytest.raises(ValueError, match="at least"):
        build_tiny_tokenizer(vocab_size=100)


def test_cached_copy_is_built_once_and_loads_with_plain_transformers(tmp_path, monkeypatch):
    path = tiny_model_path(tmp_path)
    assert path.parent == tmp_path / "tiny"

    def must_not_rebuild(*args, **kwargs):
        raise AssertionError("the cached tiny model was rebuilt")

    monkeypatch.setattr(tiny_module, "build_tiny_model", must_not_rebuild)
    assert tiny_model_path(tmp_path) == path
    monkeypatch.undo()

    loaded = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    fresh, fresh_tokenizer = build_tiny_model()
    text = "Our dog waits by the door."
    assert tokenizer(text).input_ids == fresh_tokenizer(text).input_ids
    assert tokenizer.chat_template == fresh_tokenizer.chat_template
    ids = torch.tensor([tokenizer(text).input_ids])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, fresh(ids).logits, atol=0, rtol=0)


def test_settings_select_distinct_cache_entries(tmp_path):
    default = tiny_model_path(tmp_path)
    other_seed = tiny_model_path(tmp_path, seed=3)
    assert default != other_seed
    assert AutoModelForCausalLM.from_pretrained(other_seed).config.hidden_size == 64
