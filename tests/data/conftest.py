"""Test tokenizers built locally with the ``tokenizers`` library (no hub access, well under a second)."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>", "<s>"]
# "Hello" and " Hello" are frequent, so BPE learns them as single tokens: splitting "Hel" | "lo" at a
# prompt/completion boundary then differs from tokenising the joined text.
BPE_CORPUS = [
    "Hello world",
    "Hello there",
    " Hello friend",
    "Assistant: Hello",
    "user: Hi",
    "Review: the pasta at the corner cafe. It was wonderful.",
    "Simply awful, a waste of money.",
] * 40

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="session")
def bpe_backend() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(BPE_CORPUS, trainer)
    return tokenizer


def _wrap(
    backend: Tokenizer,
    *,
    chat_template: str | None = None,
    eos: str = "<|endoftext|>",
    bos: str | None = None,
):
    """A transformers tokenizer around a copy of ``backend``."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(backend.to_str()), eos_token=eos, pad_token="<pad>", bos_token=bos
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture
def bpe_tokenizer(bpe_backend):
    return _wrap(bpe_backend)


@pytest.fixture
def chatml_tokenizer(bpe_backend):
    return _wrap(bpe_backend, chat_template=CHATML_TEMPLATE, eos="<|im_end|>")


@pytest.fixture
def wrap_bpe(bpe_backend):
    """Factory: the trained BPE tokenizer with a chosen chat template / EOS / BOS."""

    def factory(**kwargs):
        return _wrap(bpe_backend, **kwargs)

    return factory


def _make_word_tokenizer(*, with_bos: bool = False, vocab_size: int = 50):
    """Whitespace word-level tokenizer: words ``w0 .. w{n-1}``, so token counts equal word counts."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + ["[UNK]"])}
    for i in range(vocab_size):
        vocab[f"w{i}"] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if with_bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|endoftext|>",
        pad_token="<pad>",
        bos_token="<s>" if with_bos else None,
        unk_token="[UNK]",
    )


@pytest.fixture
def word_tokenizer():
    """Whitespace word-level tokenizer without BOS; ``words(start, n)`` makes an n-token text."""
    return _make_word_tokenizer()


@pytest.fixture
def word_tokenizer_with_bos():
    return _make_word_tokenizer(with_bos=True)


@pytest.fixture
def words():
    def make(start: int, count: int) -> str:
        """``count`` distinct words ``w{start} ...`` joined by spaces (``count`` tokens)."""
        return " ".join(f"w{i}" for i in range(start, start + count))

    return make
