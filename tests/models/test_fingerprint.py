"""Model and data fingerprints: change exactly when the log-probs could change."""

from __future__ import annotations

import torch

from distalign.models.fingerprint import data_fingerprint, model_fingerprint
from distalign.models.loading import LoraSettings, apply_lora, load_model_and_tokenizer
from distalign.models.logprobs import SequenceLogprobModel
from distalign.models.tiny import build_tiny_model


def test_same_weights_same_fingerprint_including_after_reload():
    fresh, _ = build_tiny_model()
    reloaded, _ = load_model_and_tokenizer("tiny", gradient_checkpointing=True)  # different bookkeeping
    assert model_fingerprint(fresh) == model_fingerprint(build_tiny_model()[0]) == model_fingerprint(reloaded)
    assert model_fingerprint(SequenceLogprobModel(fresh)) == model_fingerprint(fresh)


def test_any_weight_change_changes_fingerprint():
    model, _ = build_tiny_model()
    original = model_fingerprint(model)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 7] += 1e-6
    assert model_fingerprint(model) != original
    assert model_fingerprint(build_tiny_model(seed=1)[0]) != original


def test_dtype_and_architecture_are_part_of_the_fingerprint():
    model, _ = build_tiny_model()
    assert model_fingerprint(model.to(torch.bfloat16)) != model_fingerprint(build_tiny_model()[0])
    model, _ = build_tiny_model()
    original = model_fingerprint(model)
    model.config.rope_parameters = {**model.config.rope_parameters, "rope_theta": 1234.0}
    assert model_fingerprint(model) != original  # same weights, different computation


def test_lora_base_fingerprint_matches_plain_base():
    plain_fingerprint = model_fingerprint(build_tiny_model()[0])
    peft_model = apply_lora(build_tiny_model()[0], LoraSettings(r=4, alpha=8))
    assert model_fingerprint(peft_model) == plain_fingerprint
    with_adapters = model_fingerprint(peft_model, exclude_adapters=False)
    assert with_adapters != plain_fingerprint
    with torch.no_grad():
        next(p for n, p in peft_model.named_parameters() if "lora_B" in n).add_(1.0)
    assert model_fingerprint(peft_model) == plain_fingerprint  # training adapters leaves the base alone
    assert model_fingerprint(peft_model, exclude_adapters=False) != with_adapters


def test_data_fingerprint_properties():
    rows = [[1, 2, 3], [4, 5]]
    assert data_fingerprint(rows) == data_fingerprint([torch.tensor(r) for r in rows])
    assert data_fingerprint(rows) != data_fingerprint(rows[::-1])  # order matters
    assert data_fingerprint([[1, 2], [3]]) != data_fingerprint([[1], [2, 3]])  # boundaries matter
    assert data_fingerprint([[1, 2, 3]]) != data_fingerprint([[1, 2, 3], []])
    assert data_fingerprint([]) != data_fingerprint([[]])


def test_data_fingerprint_of_named_rows():
    row = {"input_ids": [7, 8, 9, 10], "completion_mask": [0, 0, 1, 1]}
    shifted_split = {"input_ids": [7, 8, 9, 10], "completion_mask": [0, 1, 1, 1]}
    reordered_keys = {"completion_mask": [0, 0, 1, 1], "input_ids": [7, 8, 9, 10]}
    assert data_fingerprint([row]) == data_fingerprint([reordered_keys])
    assert data_fingerprint([row]) != data_fingerprint([shifted_split])
    assert data_fingerprint([row]) != data_fingerprint([[7, 8, 9, 10]])
