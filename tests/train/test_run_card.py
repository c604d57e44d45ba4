"""The model card of a trained tiny run, its refresh by ``distalign eval``, and the base a LoRA adapter
names."""

from __future__ import annotations

import json

from huggingface_hub import ModelCard

from distalign.data.loading import load_rows
from distalign.eval.run import evaluate_run
from distalign.models import loading, saved
from distalign.stats.metrics import EvalResult
from distalign.train import setup
from distalign.train.record import TRAINING_RECORD

TINY_EVAL = ["eval.num_prompts=4", "eval.samples_per_prompt=1", "eval.max_new_tokens=8"]


def test_a_tiny_run_has_a_model_card_and_distalign_eval_adds_its_evaluation(run_tiny):
    run = run_tiny("train.max_steps=2", "train.batch_size=4", "train.micro_batch_size=4", "loss.beta=0.2")
    card_path = run / "final" / "README.md"
    text = card_path.read_text()
    front = ModelCard(text).data.to_dict()
    assert front["library_name"] == "transformers" and front["tags"] == ["distalign", "dpo"]
    assert "base_model" not in front  # the tiny model has no public id
    assert "a random tiny test model built from a config" in text
    record = json.loads((run / "final" / TRAINING_RECORD).read_text())
    assert record["steps"] == 2 and record["data_kind"] == "paired"
    assert record["rows"] == len(load_rows("builtin:quickstart_pairs.jsonl").rows)
    assert (
        f"`{record['data_fingerprint']}`" in text
        and f"rows trained on (after tokenisation and filtering): {record['rows']}" in text
    )
    assert "`beta=0.2`" in text and "arxiv.org/abs/2305.18290" in text and "`mean`" in text
    assert (
        "| optimizer steps | 2 |" in text and "| batch | 4 rows per step" in text and "full fine-tune" in text
    )
    assert "Not evaluated yet" in text
    assert f"distalign train {run}/config.yaml output_dir={run}-again" in text

    evaluate_run(run, TINY_EVAL)
    refreshed = card_path.read_text()
    result = EvalResult.load(run / "eval" / "eval.json")
    policy = result.gold_reward["policy"]
    assert "Not evaluated yet" not in refreshed
    assert (
        f"| gold reward (`{result.reward}`), mean | {policy.value:.4g} [{policy.low:.4g}, {policy.high:.4g}]"
        in refreshed
    )
    assert "| win rate against the reference" in refreshed and "KL(policy ‖ reference)" in refreshed
    assert f"distalign eval {run} {' '.join(TINY_EVAL)}" in refreshed
    assert refreshed.split("## Evaluation")[0] == text.split("## Evaluation")[0]  # the rest is unchanged


def test_a_lora_run_writes_its_adapter_config_through_the_public_base_id(run_tiny, monkeypatch):
    """An embedded default's public id replaces the local path in adapter_config.json (the tiny model
    stands in for SmolLM2 through a patched public id); without one the path peft recorded stays."""
    lora = ("model.lora.enabled=true", "model.lora.r=2", "train.max_steps=1", "train.batch_size=4")
    plain = run_tiny(*lora, "train.micro_batch_size=4", name="plain")
    assert json.loads((plain / "final" / "adapter" / "adapter_config.json").read_text())[
        "base_model_name_or_path"
    ] == str(loading.resolve_model_source("tiny")[0])

    calls = []
    original = saved.set_adapter_base_model

    def spy(adapter_dir, base_model):
        calls.append(base_model)
        return original(adapter_dir, base_model)

    monkeypatch.setattr(saved, "set_adapter_base_model", spy)
    monkeypatch.setattr(setup, "public_model_id", lambda name: "HuggingFaceTB/SmolLM2-135M-Instruct")
    run = run_tiny(*lora, "train.micro_batch_size=4", name="public")
    adapter_config = json.loads((run / "final" / "adapter" / "adapter_config.json").read_text())
    assert calls == ["HuggingFaceTB/SmolLM2-135M-Instruct"]
    assert adapter_config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert adapter_config["r"] == 2
    adapter_card = (run / "final" / "adapter" / "README.md").read_text()
    assert (
        ModelCard(adapter_card).data.library_name == "peft"
    )  # ours, not peft's template with the local path
    assert "LoRA r=2" in adapter_card


def test_a_lora_run_saved_without_merged_weights_evaluates_as_the_merged_copy_would(run_tiny):
    """``model.lora.save_merged=false``: final/ holds the adapter and no weights, its card says how to load
    it, and ``distalign eval`` (adapter merged into the base in memory) measures what it measures on the
    merged copy of the same training."""
    from distalign.models.saved import saved_model_layout
    from distalign.sweep_run import is_trained

    lora = ("model.lora.enabled=true", "model.lora.r=2", "train.max_steps=2", "train.batch_size=4")
    merged = run_tiny(*lora, "train.micro_batch_size=4", name="merged")
    adapter_only = run_tiny(*lora, "train.micro_batch_size=4", "model.lora.save_merged=false", name="adapter")

    final = adapter_only / "final"
    assert saved_model_layout(final) == "adapter" and saved_model_layout(merged / "final") == "model"
    assert not (final / "config.json").exists() and not (final / "model.safetensors").exists()
    assert (final / "adapter" / "adapter_model.safetensors").is_file() and is_trained(adapter_only)
    card = (final / "README.md").read_text()
    assert ModelCard(card).data.library_name == "peft" and "no merged copy was saved" in card
    assert "the folder above holds the merged weights" not in (final / "adapter" / "README.md").read_text()

    results = {}
    for run in (merged, adapter_only):
        evaluate_run(run, TINY_EVAL)
        results[run.name] = EvalResult.load(run / "eval" / "eval.json")
    assert results["adapter"].gold_reward == results["merged"].gold_reward
    assert results["adapter"].kl.k1.value == results["merged"].kl.k1.value
