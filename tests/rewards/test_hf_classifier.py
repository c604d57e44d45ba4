"""The hf_classifier reward on a tiny sequence classifier built and saved locally (no download)."""

from __future__ import annotations

import pytest
import torch

from distalign.rewards import build_reward
from distalign.rewards.classifier import resolve_label

WORDS = ["good", "bad", "movie", "the", "was", "why"]


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("classifier")
    vocab = {tok: i for i, tok in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]"
    )
    tokenizer.save_pretrained(path)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        num_labels=3,
        id2label={0: "NEG", 1: "NEU", 2: "POS"},
        label2id={"NEG": 0, "NEU": 1, "POS": 2},
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).eval().save_pretrained(path)
    return path


TEXTS = ["the movie was good", "the movie was bad", "why"]


def test_probability_of_label_by_name_equals_label_by_index(classifier_dir):
    by_name = build_reward(
        {"name": "hf_classifier", "path": str(classifier_dir), "label": "POS", "cache": False}
    )
    by_index = build_reward(
        {"name": "hf_classifier", "path": str(classifier_dir), "label": 2, "cache": False}
    )
    probs = by_name(["p"] * 3, TEXTS)
    assert torch.equal(probs, by_index(["p"] * 3, TEXTS))
    assert ((probs > 0) & (probs < 1)).all()


def test_label_probabilities_sum_to_one_and_logits_match_the_model(classifier_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    total = sum(
        build_reward({"name": "hf_classifier", "path": str(classifier_dir), "label": i, "cache": False})(
            ["p"] * 3, TEXTS
        )
        for i in range(3)
    )
    assert torch.allclose(total, torch.ones(3), atol=1e-5)
    logit_reward = build_reward(
        {"name": "hf_classifier", "path": str(classifier_dir), "label": 0, "score": "logit", "batch_size": 2}
    )
    tokenizer = AutoTokenizer.from_pretrained(classifier_dir)
    model = AutoModelForSequenceClassification.from_pretrained(classifier_dir).eval()
    with torch.no_grad():
        expected = torch.stack([model(**tokenizer(t, return_tensors="pt")).logits[0, 0] for t in TEXTS])
    assert torch.allclose(logit_reward(["p"] * 3, TEXTS), expected, atol=1e-5)


def test_prompt_completion_input_sees_the_prompt(classifier_dir):
    spec = {
        "name": "hf_classifier",
        "path": str(classifier_dir),
        "label": "POS",
        "input": "prompt_completion",
    }
    reward = build_reward({**spec, "cache": False})
    a = reward(["good good good", "bad bad bad"], ["the movie", "the movie"])
    assert a[0] != a[1]


def test_missing_directory_and_bad_labels_fail_early(classifier_dir, tmp_path):
    with pytest.raises(ValueError, match="not a local directory"):
        build_reward({"name": "hf_classifier", "path": str(tmp_path / "nope"), "label": 0})
    with pytest.raises(ValueError, match=r"its labels: \['NEG', 'NEU', 'POS'\]"):
        build_reward({"name": "hf_classifier", "path": str(classifier_dir), "label": "HAPPY"})
    with pytest.raises(ValueError, match="set label"):
        build_reward({"name": "hf_classifier", "path": str(classifier_dir)})
    with pytest.raises(ValueError, match="out of range"):
        build_reward({"name": "hf_classifier", "path": str(classifier_dir), "label": 3})


def test_resolve_label_for_single_output_head():
    assert resolve_label(None, {0: "LABEL_0"}, 1) is None
    assert resolve_label("1", {0: "a", 1: "b"}, 2) == 1
