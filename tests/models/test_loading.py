"""Loading by name / path / hub id, LoRA, checkpointing, and saving the final model."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

import distalign.models.loading as loading_module
from distalign.models.loading import (
    LoraSettings,
    ModelLoadError,
    load_model_and_tokenizer,
    resolve_model_source,
)
from distalign.models.logprobs import SequenceLogprobModel
from distalign.models.saved import plain_state_key, save_final_model
from distalign.models.tiny import build_tiny_model

IDS = torch.tensor([[5, 17, 300, 42, 99, 7]])


def logits_of(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def train_adapters(peft_model, seed: int = 1) -> None:
    """Give the LoRA B matrices non-zero values, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)


def test_tiny_by_name(isolated_cache):
    model, tokenizer = load_model_and_tokenizer("tiny")
    fresh, _ = build_tiny_model()
    assert model.dtype == torch.float32 and tokenizer.pad_token == "<|pad|>"
    torch.testing.assert_close(logits_of(model), logits_of(fresh), atol=0, rtol=0)
    assert (isolated_cache / "tiny").is_dir()


def test_dtype_choice():
    model, _ = load_model_and_tokenizer("tiny", dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="dtype"):
        load_model_and_tokenizer("tiny", dtype="float8")


def test_local_directory_and_missing_paths(tmp_path):
    build_tiny_model(tmp_path / "saved")
    model, _ = load_model_and_tokenizer(str(tmp_path / "saved"))
    torch.testing.assert_close(logits_of(model), logits_of(build_tiny_model()[0]), atol=0, rtol=0)
    for missing in [str(tmp_path / "nowhere"), "./relative/missing", "weights.gguf", "a/b/c"]:
        with pytest.raises(ModelLoadError, match="does not exist"):
            load_model_and_tokenizer(missing)
    (tmp_path / "file.bin").write_bytes(b"\0")
    with pytest.raises(ModelLoadError, match="not a .gguf"):
        load_model_and_tokenizer(str(tmp_path / "file.bin"))


def test_hub_id_offline_gives_clear_error():
    assert resolve_model_source("someorg/some-model") == ("someorg/some-model", False)
    with pytest.raises(ModelLoadError, match="hub id"):
        load_model_and_tokenizer("distalign-test/surely-not-a-real-model")


def test_remote_code_is_off_unless_asked(monkeypatch):
    seen = []
    original = AutoModelForCausalLM.from_pretrained

    def recording_from_pretrained(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return original(*args, **kwargs)

    monkeypatch.setattr(loading_module.AutoModelForCausalLM, "from_pretrained", recording_from_pretrained)
    load_model_and_tokenizer("tiny")
    load_model_and_tokenizer("tiny", trust_remote_code=True)
    assert seen == [False, True]


def test_missing_pad_token_falls_back_to_eos():
    model, tokenizer = build_tiny_model()
    tokenizer.pad_token = None
    model.config.pad_token_id = None
    loading_module._ensure_pad_token(model, tokenizer)
    assert tokenizer.pad_token == "<|eos|>" and model.config.pad_token_id == tokenizer.eos_token_id


def test_lora_wraps_and_starts_as_identity():
    base, _ = load_model_and_tokenizer("tiny")
    model, _ = load_model_and_tokenizer("tiny", lora=LoraSettings(r=4, alpha=8))
    assert isinstance(model, PeftModel)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert any("q_proj" in name for name in trainable) and any("v_proj" in name for name in trainable)
    assert not any("k_proj" in name for name in trainable)
    torch.testing.assert_close(logits_of(model), logits_of(base), atol=0, rtol=0)
    all_linear, _ = load_model_and_tokenizer("tiny", lora=LoraSettings(target_modules="all-linear"))
    adapted = {
        name.split(".lora_")[0].rsplit(".", 1)[-1]
        for name, _ in all_linear.named_parameters()
        if "lora_A" in name
    }
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.mark.parametrize(
    "bad", [{"r": 0}, {"alpha": -1}, {"dropout": 1.0}, {"target_modules": []}, {"target_modules": "q_proj"}]
)
def test_lora_settings_validation(bad):
    with pytest.raises(ValueError, match="lora"):
        LoraSettings(**bad)


def test_gradient_checkpointing_gives_same_gradients():
    plain, _ = load_model_and_tokenizer("tiny")
    checkpointed, _ = load_model_and_tokenizer("tiny", gradient_checkpointing=True)
    assert checkpointed.is_gradient_checkpointing and checkpointed.config.use_cache is False
    grads = []
    for model in (plain, checkpointed):
        model.train()
        model(input_ids=IDS, labels=IDS).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_save_full_model_round_trip(tmp_path):
    model, tokenizer = load_model_and_tokenizer("tiny")
    with torch.no_grad():
        model.model.norm.weight.add_(0.5)  # "trained"
    output = save_final_model(SequenceLogprobModel(model), tokenizer, tmp_path / "final")
    reloaded = AutoModelForCausalLM.from_pretrained(output)
    torch.testing.assert_close(logits_of(reloaded), logits_of(model), atol=0, rtol=0)
    assert AutoTokenizer.from_pretrained(output).pad_token == "<|pad|>"


def test_save_lora_model_merged_and_adapter(tmp_path):
    model, tokenizer = load_model_and_tokenizer("tiny", lora=LoraSettings(r=4, alpha=8))
    train_adapters(model)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    live_logits = logits_of(model)
    assert not torch.allclose(live_logits, logits_of(build_tiny_model()[0]))  # the adapters matter

    output = save_final_model(model, tokenizer, tmp_path / "final")

    merged = AutoModelForCausalLM.from_pretrained(output)
    assert not isinstance(merged, PeftModel)
    torch.testing.assert_close(logits_of(merged), live_logits, atol=1e-5, rtol=1e-5)
    adapter_model = PeftModel.from_pretrained(build_tiny_model()[0], output / "adapter")
    torch.testing.assert_close(logits_of(adapter_model), live_logits, atol=1e-6, rtol=1e-6)
    # the live model is bit-for-bit what it was (no W + BA - BA drift)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)
    torch.testing.assert_close(logits_of(model), live_logits, atol=0, rtol=0)


def test_save_without_merge_and_atomic_replace(tmp_path):
    model, tokenizer = load_model_and_tokenizer("tiny", lora=LoraSettings(r=4, alpha=8))
    target = tmp_path / "final"
    target.mkdir()
    (target / "old-run.txt").write_text("previous contents")
    save_final_model(model, tokenizer, target, merge_lora=False)
    assert not (target / "old-run.txt").exists()
    assert (target / "adapter" / "adapter_model.safetensors").is_file()
    assert not (target / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # no staging leftovers


def test_plain_state_key_mapping():
    assert plain_state_key("model.layers.0.self_attn.q_proj.base_layer.weight") == (
        "model.layers.0.self_attn.q_proj.weight"
    )
    assert plain_state_key("model.layers.0.self_attn.q_proj.lora_A.default.weight") is None
    assert plain_state_key("model.layers.0.mlp.lora_magnitude_vector.default.weight") is None
    assert plain_state_key("lm_head.original_module.weight") is None
    assert plain_state_key("lm_head.modules_to_save.default.weight") == "lm_head.weight"
    assert plain_state_key("model.norm.weight") == "model.norm.weight"
