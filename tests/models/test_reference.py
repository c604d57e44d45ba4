"""Reference log-probs: the on-disk cache (hits, rebuilds, corruption) and the providers."""

from __future__ import annotations

import json

import pytest
import torch
from distalign_testing.naive_logprobs import naive_sequence_logprobs

from distalign.cache import COMPLETE_MARKER
from distalign.models.fingerprint import data_fingerprint, model_fingerprint
from distalign.models.loading import LoraSettings, apply_lora
from distalign.models.logprobs import SequenceLogprobModel
from distalign.models.reference import (
    ReferenceLogprobCache,
    adapters_disabled,
    compute_reference_logprobs,
    load_reference_model,
    reference_key_parts,
)
from distalign.models.tiny import build_tiny_model
from distalign.models.token_logprobs import sequence_logprobs

TOKENIZATION = {"chat_template": "chatml", "max_length": 64, "truncation_side": "left"}
LOGPROBS = {"provider": "separate_model", "dtype": "float32"}


class CountingCompute:
    """compute_fn that scores ``batches`` with ``model`` and counts its calls."""

    def __init__(self, model, batches):
        self.model, self.batches, self.calls = model, batches, 0

    def __call__(self) -> dict[str, torch.Tensor]:
        self.calls += 1
        return {"summed": compute_reference_logprobs(self.model, self.batches, adapters_off=False)}


def key_for(model, batches, tokenization=TOKENIZATION) -> dict:
    rows = [
        {"input_ids": ids[mask.bool()], "completion_mask": comp[mask.bool()]}
        for batch in batches
        for ids, mask, comp in zip(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    ]
    return reference_key_parts(
        reference_model_fingerprint=model_fingerprint(model),
        data_fingerprint=data_fingerprint(rows),
        tokenization=tokenization,
        logprob_settings=LOGPROBS,
    )


@pytest.fixture
def setup(tmp_path, tiny_model_factory, batch_factory):
    model, _ = tiny_model_factory()
    batches = [batch_factory([3, 4], [5, 2], seed=0), batch_factory([2], [6], seed=1)]
    return ReferenceLogprobCache(tmp_path / "ref"), model, batches


def test_hit_returns_identical_tensors_without_recomputing(setup):
    cache, model, batches = setup
    compute = CountingCompute(model, batches)
    first = cache.get_or_compute(key_for(model, batches), compute)
    assert cache.last_event == "computed" and compute.calls == 1
    second = cache.get_or_compute(key_for(model, batches), compute)
    assert cache.last_event == "hit" and compute.calls == 1
    assert torch.equal(first["summed"], second["summed"]) and first["summed"].shape == (3,)
    expected = torch.cat([sequence_logprobs(model, **b).summed.detach() for b in batches])
    torch.testing.assert_close(second["summed"], expected)


def test_a_fresh_cache_object_reuses_entries_on_disk(setup):
    cache, model, batches = setup
    cache.get_or_compute(key_for(model, batches), CountingCompute(model, batches))
    another_run = ReferenceLogprobCache(cache.root)
    compute = CountingCompute(model, batches)
    another_run.get_or_compute(key_for(model, batches), compute)
    assert compute.calls == 0 and another_run.last_event == "hit"


def test_weight_change_forces_recompute(setup):
    cache, model, batches = setup
    compute = CountingCompute(model, batches)
    before = cache.get_or_compute(key_for(model, batches), compute)
    with torch.no_grad():
        model.model.norm.weight.mul_(1.5)
    after = cache.get_or_compute(key_for(model, batches), compute)
    assert compute.calls == 2 and not torch.equal(before["summed"], after["summed"])


def test_data_change_forces_recompute(setup, batch_factory):
    cache, model, batches = setup
    cache.get_or_compute(key_for(model, batches), CountingCompute(model, batches))
    other_batches = [batches[0], batch_factory([2], [6], seed=2)]
    compute = CountingCompute(model, other_batches)
    cache.get_or_compute(key_for(model, other_batches), compute)
    assert compute.calls == 1 and cache.last_event == "computed"


def test_tokenization_setting_change_forces_recompute(setup):
    cache, model, batches = setup
    compute = CountingCompute(model, batches)
    cache.get_or_compute(key_for(model, batches), compute)
    cache.get_or_compute(key_for(model, batches, {**TOKENIZATION, "max_length": 32}), compute)
    assert compute.calls == 2


def _entry_file(cache, key_parts, name):
    return cache.path_for(key_parts) / name


@pytest.mark.parametrize(
    "damage", ["flip_payload_byte", "truncate", "drop_marker", "tamper_meta", "delete_meta"]
)
def test_damaged_entry_is_detected_and_rebuilt(setup, damage):
    cache, model, batches = setup
    key_parts = key_for(model, batches)
    compute = CountingCompute(model, batches)
    good = cache.get_or_compute(key_parts, compute)
    tensors_file = _entry_file(cache, key_parts, "logprobs.safetensors")
    meta_file = _entry_file(cache, key_parts, "meta.json")
    if damage == "flip_payload_byte":
        data = bytearray(tensors_file.read_bytes())
        data[-2] ^= 0x40  # inside the float payload: still a readable safetensors file
        tensors_file.write_bytes(bytes(data))
    elif damage == "truncate":
        tensors_file.write_bytes(tensors_file.read_bytes()[:-5])
    elif damage == "drop_marker":
        _entry_file(cache, key_parts, COMPLETE_MARKER).unlink()
    elif damage == "tamper_meta":
        meta = json.loads(meta_file.read_text())
        meta["key_parts"]["tokenization"]["max_length"] = 999
        meta_file.write_text(json.dumps(meta))
    else:
        meta_file.unlink()
    assert cache.load(key_parts) is None
    rebuilt = cache.get_or_compute(key_parts, compute)
    assert compute.calls == 2 and cache.last_event == "rebuilt"
    assert torch.equal(rebuilt["summed"], good["summed"])
    assert cache.get_or_compute(key_parts, compute) is not None and compute.calls == 2  # healthy again


def test_key_parts_must_be_json(tmp_path):
    with pytest.raises(TypeError, match="JSON"):
        ReferenceLogprobCache(tmp_path).key({"model": object()})
    with pytest.raises(TypeError, match="dict of str"):
        ReferenceLogprobCache(tmp_path).get_or_compute({"a": 1}, lambda: {"x": [1.0]})


def _lora_with_trained_adapters(model):
    peft_model = apply_lora(model, LoraSettings(r=4, alpha=8))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return peft_model


def test_adapters_off_equals_base_model(tiny_model_factory, batch_factory):
    base, _ = tiny_model_factory()
    peft_model = _lora_with_trained_adapters(tiny_model_factory()[0])
    batches = [batch_factory([3, 4], [5, 2])]
    reference = compute_reference_logprobs(peft_model, batches, adapters_off=True)
    base_logps, _ = naive_sequence_logprobs(base, **batches[0])
    torch.testing.assert_close(reference.double(), base_logps.detach(), atol=1e-5, rtol=1e-7)
    with_adapters = compute_reference_logprobs(peft_model, batches, adapters_off=False)
    assert (with_adapters - reference).abs().min() > 1e-3  # adapters matter, and are back on afterwards
    with adapters_disabled(SequenceLogprobModel(peft_model)):  # wrapped models work too
        torch.testing.assert_close(sequence_logprobs(peft_model, **batches[0]).summed, reference)


def test_adapters_off_refuses_model_without_adapters(tiny_model_factory, batch_factory):
    model, _ = tiny_model_factory()
    with pytest.raises(ValueError, match="adapters"):
        compute_reference_logprobs(model, [batch_factory([2], [2])], adapters_off=True)


def test_reference_computation_is_gradient_free_and_restores_modes(tiny_model_factory, batch_factory):
    model, _ = tiny_model_factory()
    model.train()
    model.model.layers[0].eval()  # a mixed state must come back exactly
    result = compute_reference_logprobs(
        SequenceLogprobModel(model), [batch_factory([2, 3], [4, 1])], adapters_off=False
    )
    assert not result.requires_grad and result.dtype == torch.float32 and result.device.type == "cpu"
    assert model.training and not model.model.layers[0].training and model.model.layers[1].training
    assert compute_reference_logprobs(model, [], adapters_off=False).shape == (0,)


def test_separate_reference_model_is_frozen():
    reference = load_reference_model("tiny")
    assert not reference.training and not any(p.requires_grad for p in reference.parameters())
    assert model_fingerprint(reference) == model_fingerprint(build_tiny_model()[0])
