"""Run directories with tiny models, made without training: a perturbed copy of the tiny model as final/."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from distalign_testing.runs import TINY_BASE

#: Small, fast evaluation settings for the tiny model.
EVAL_FAST = [
    "eval.num_prompts=6",
    "eval.samples_per_prompt=2",
    "eval.max_new_tokens=6",
    "eval.batch_size=16",
    "eval.n_boot=100",
]


def make_run(run_dir: Path, *, scale: float, loss: str = "dpo") -> Path:
    """A run directory whose final/ is the tiny model with every weight multiplied by ``scale``
    (scale 1 = the reference itself), with config.yaml and a short metrics.jsonl."""
    from distalign.config import dump_config, load_config
    from distalign.models.loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer("tiny")
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(scale)
    run_dir.mkdir(parents=True)
    model.save_pretrained(run_dir / "final")
    tokenizer.save_pretrained(run_dir / "final")
    config = load_config(None, [*TINY_BASE, f"output_dir={run_dir}", f"loss.name={loss}", *EVAL_FAST])
    (run_dir / "config.yaml").write_text(dump_config(config))
    rows = [{"step": s, "loss": 0.7 - 0.02 * s * scale} for s in range(1, 11)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir


@pytest.fixture(scope="module")
def evaluated_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two perturbed tiny runs ("near": scale 1.5, "far": scale 3), both evaluated with `distalign eval`."""
    from distalign.eval.run import evaluate_run

    cache = tmp_path_factory.getbasetemp() / "distalign-cache"
    root = tmp_path_factory.mktemp("evaluated_runs")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DISTALIGN_CACHE", str(cache))
        patch.setenv("HF_HUB_OFFLINE", "1")
        runs = {
            "near": make_run(root / "near", scale=1.5, loss="dpo"),
            "far": make_run(root / "far", scale=3.0, loss="aot_paired"),
        }
        for run_dir in runs.values():
            evaluate_run(run_dir)
    return runs
