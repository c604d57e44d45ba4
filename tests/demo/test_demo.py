"""`distalign demo --tiny`: the main job's whole pipeline on the tiny model (what CI runs)."""

from __future__ import annotations

import gc
import json
import weakref

import pytest

from distalign.cli import main
from distalign.demo import MARKER, SMOLLM2, TINY, prepare_output_dir, run_config
from distalign.stats.metrics import EvalResult


@pytest.mark.slow
def test_tiny_demo_end_to_end(tmp_path, capsys, monkeypatch):
    models = _track_demo_models(monkeypatch)
    out = tmp_path / "demo"
    assert main(["demo", "--tiny", "--output-dir", str(out)]) == 0
    assert models.phases == ["load", "train", "train", "load", "policy", "policy"]
    assert all(model() is None for model in models.loaded)  # nothing outlives the demo
    printed = capsys.readouterr().out
    for phase in ("[1/6]", "[2/6]", "[3/6]", "[4/6]", "[5/6]", "[6/6]"):
        assert phase in printed
    table = printed[printed.index("gold reward (VADER)") :]
    assert all(f"\n{name} " in table for name in ("reference", "dpo", "aot"))
    assert f"report: {out / 'report.html'}" in printed

    summary = json.loads((out / "demo_summary.json").read_text())
    assert [row["model"] for row in summary["table"]] == ["reference", "dpo", "aot"]
    assert summary["timings"]["total"] > 0 and summary["settings"]["model"] == "tiny"
    provenance = json.loads((out / "data" / "sentiment_pairs.provenance.json").read_text())
    assert provenance["counts"]["pairs"] >= 8 and provenance["model"] == "tiny"

    results = {name: EvalResult.load(out / name / "eval" / "eval.json") for name in ("dpo", "aot")}
    # One reference draw is shared by both evaluations.
    assert results["dpo"].gold_reward["reference"] == results["aot"].gold_reward["reference"]
    for name, result in results.items():
        metrics = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        assert len(metrics) == TINY.steps
        assert metrics[-1]["loss"] < metrics[0]["loss"] - 0.1  # the preference loss went down
        assert result.kl.k1.value > 0.0  # and the policy moved away from the reference
        assert (out / name / "config.yaml").is_file() and (out / name / "final" / "config.json").is_file()
    text = (out / "report.html").read_text()
    assert "Comparison" in text and "frontier" in text and "Run: dpo" in text and "Run: aot" in text
    assert (out / "report_files" / "quantiles.png").is_file()


class _DemoModels:
    """The models the demo loads (weak references) and the phases that loaded or needed them."""

    def __init__(self) -> None:
        self.loaded: list = []
        self.phases: list[str] = []

    def keep(self, phase: str, model) -> None:
        self.phases.append(phase)
        self.loaded.append(weakref.ref(model))

    def alive(self) -> int:
        return sum(model() is not None for model in self.loaded)


def _track_demo_models(monkeypatch) -> _DemoModels:
    """Check that each demo phase holds only its own models: no base model is alive while a run trains
    (training loads its own), and the evaluation holds one policy at a time beside the reference."""
    from distalign import demo
    from distalign.eval import run as eval_run

    models = _DemoModels()
    load_base, train, load_policy = demo._load_base, demo._train, eval_run.load_trained_model

    def tracked_load_base(name):
        model, tokenizer = load_base(name)
        models.keep("load", model)
        return model, tokenizer

    def tracked_train(config):
        gc.collect()
        assert models.alive() == 0, "a model of an earlier phase is still alive during training"
        models.phases.append("train")
        return train(config)

    def tracked_load_policy(final, config):
        gc.collect()
        assert models.alive() == 1, "the evaluation holds a policy of an earlier run"  # the reference
        model, tokenizer = load_policy(final, config)
        models.keep("policy", model)
        return model, tokenizer

    monkeypatch.setattr(demo, "_load_base", tracked_load_base)
    monkeypatch.setattr(demo, "_train", tracked_train)
    monkeypatch.setattr(eval_run, "load_trained_model", tracked_load_policy)
    return models


def test_output_dir_of_another_tool_is_refused_and_a_previous_demo_is_replaced(tmp_path):
    from distalign.train.setup import SetupError

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(SetupError, match="was not written by `distalign demo`"):
        prepare_output_dir(foreign)
    assert (foreign / "notes.txt").read_text() == "mine"

    previous = tmp_path / "previous"
    (previous / "dpo").mkdir(parents=True)
    (previous / "dpo" / "metrics.jsonl").write_text("{}\n")
    (previous / "report.html").write_text("old")
    (previous / "keep.txt").write_text("not a demo output")
    (previous / MARKER).write_text("")
    prepare_output_dir(previous)
    assert not (previous / "dpo").exists() and not (previous / "report.html").exists()
    assert (previous / "keep.txt").exists() and (previous / MARKER).exists()


def test_dpo_and_aot_arms_differ_only_in_the_loss(tmp_path):
    eval_section = {"task": "sentiment", "num_prompts": 8}
    dpo = run_config(SMOLLM2, "dpo", tmp_path / "d.jsonl", tmp_path / "dpo", eval_section).model_dump()
    aot = run_config(SMOLLM2, "aot_paired", tmp_path / "d.jsonl", tmp_path / "aot", eval_section).model_dump()
    assert aot["loss"]["name"] == "aot_paired" and aot["loss"]["cost"] == "logistic"
    assert aot["loss"]["beta"] == dpo["loss"]["beta"] == SMOLLM2.beta
    for section in ("model", "data", "train", "reference", "eval"):
        assert aot[section] == dpo[section], section
    # Micro-batches bound the memory; AOT still sorts the whole batch (a no-grad pass fixes the coupling).
    assert dpo["train"]["micro_batch_size"] < dpo["train"]["batch_size"]
    assert aot["train"]["coupling_scope"] == "global" and aot["train"]["global_strategy"] == "recompute"
    # LoRA, and no merged copy of the model per arm: the adapter is what eval and report need.
    assert dpo["model"]["lora"]["enabled"] is True and dpo["model"]["lora"]["save_merged"] is False


@pytest.mark.parametrize(("label", "loss"), [("dpo", "dpo"), ("aot", "aot_paired")])
def test_shipped_demo_configs_match_the_preset(label, loss):
    from pathlib import Path

    from distalign.config import load_config
    from distalign.demo import eval_section

    root = Path(__file__).resolve().parents[2]
    shipped = load_config(root / "configs" / f"demo_{label}.yaml").model_dump()
    data = Path("runs/demo/data/sentiment_pairs.jsonl")
    preset = run_config(SMOLLM2, loss, data, Path(f"runs/demo/{label}"), eval_section(SMOLLM2)).model_dump()
    assert shipped == preset
