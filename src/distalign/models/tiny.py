"""A tiny Llama and a byte-level BPE tokenizer built locally, for tests and the offline quickstart.

Nothing is downloaded: the tokenizer is trained with the ``tokenizers`` library on a small English
corpus shipped in ``distalign/resources/tiny_corpus.txt`` (milliseconds), and the model is a randomly
initialised ``LlamaForCausalLM``. Both are deterministic for given settings, so the cached copy made by
:func:`tiny_model_path` is keyed by those settings alone.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from distalign.cache import build_once, cache_root, require_saved_model, settings_key

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|eos|>"
BOS_TOKEN = "<|bos|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, EOS_TOKEN, BOS_TOKEN, IM_START_TOKEN, IM_END_TOKEN]

# ChatML, the format SmolLM2-Instruct uses too, so prompts look alike on both embedded models.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Bump when the saved layout or the build recipe changes, so stale cached copies are not reused.
_TINY_FORMAT_VERSION = 1


@dataclass(frozen=True)
class TinyModelSettings:
    """Architecture of the tiny model; ``vocab_size`` is also the tokenizer's size."""

    seed: int = 0
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    vocab_size: int = 512
    max_position_embeddings: int = 512


def tiny_corpus() -> list[str]:
    """The built-in training corpus of the tiny tokenizer, one English sentence per item."""
    text = resources.files("distalign").joinpath("resources/tiny_corpus.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def build_tiny_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with exactly ``vocab_size`` entries on the built-in corpus.

    Special tokens take ids 0-4 in the order pad, eos, bos, im_start, im_end; a ChatML chat template
    is set. No BOS is prepended automatically (the chat template and the data layer decide).
    """
    minimum = 256 + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(
            f"vocab_size must be at least {minimum} (256 bytes + special tokens), got {vocab_size}"
        )
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(tiny_corpus(), trainer=trainer)
    if backend.get_vocab_size() != vocab_size:
        raise ValueError(
            f"the built-in corpus yields only {backend.get_vocab_size()} tokens; ask for vocab_size <= that"
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        bos_token=BOS_TOKEN,
        additional_special_tokens=[IM_START_TOKEN, IM_END_TOKEN],
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.model_max_length = 1_000_000  # the model's limit is in its config; avoid spurious warnings
    return tokenizer


def build_tiny_llama(
    tokenizer: PreTrainedTokenizerFast,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 512,
    tie_word_embeddings: bool = True,
) -> LlamaForCausalLM:
    """A randomly initialised tiny Llama (float32, dropout 0, eval mode) for ``tokenizer``: one embedding
    per token and the tokenizer's pad / eos / bos ids. ``intermediate_size`` defaults to 4 x hidden_size.

    The same arguments always give the same weights; the global torch RNG is left untouched.
    """
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
    special_ids = {
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
    }
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size if intermediate_size is None else intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        attention_dropout=0.0,
        tie_word_embeddings=tie_word_embeddings,
        **special_ids,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(**special_ids)
    return model.eval()


def build_tiny_model(
    output_dir: str | os.PathLike[str] | None = None,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    vocab_size: int = 512,
    max_position_embeddings: int = 512,
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """Build the tiny Llama (:func:`build_tiny_llama`, tied embeddings) and its byte-level BPE tokenizer.

    The same settings always give the same weights and token ids; the global torch RNG is left
    untouched. With ``output_dir`` both are also saved there with ``save_pretrained``.
    """
    tokenizer = build_tiny_tokenizer(vocab_size)
    model = build_tiny_llama(
        tokenizer,
        seed=seed,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
    )
    if output_dir is not None:
        model.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)
    return model, tokenizer


def tiny_model_path(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    vocab_size: int = 512,
    max_position_embeddings: int = 512,
) -> Path:
    """Directory holding the saved tiny model + tokenizer for these settings, built on first use.

    Lives under ``<cache>/tiny/<key>`` where the key hashes the settings, the corpus and the build
    recipe version; ``cache_dir`` defaults to ``$DISTALIGN_CACHE`` or ``~/.cache/distalign``.
    Concurrent callers (e.g. two ranks) are safe: the directory appears atomically and complete.
    """
    settings = TinyModelSettings(
        seed=seed,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
    )
    corpus_digest = hashlib.sha256("\n".join(tiny_corpus()).encode()).hexdigest()
    key = settings_key({**asdict(settings), "corpus": corpus_digest, "format": _TINY_FORMAT_VERSION})
    final_dir = cache_root(cache_dir) / "tiny" / key

    def build(staging: Path) -> None:
        build_tiny_model(staging, **asdict(settings))
        require_saved_model(staging)

    return build_once(final_dir, build)
