"""`distalign eval` on tiny runs: eval.json, samples, PNGs, and a KL estimate that matches the exact KL."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from distalign.cli import main
from distalign.stats.metrics import EvalResult

from .conftest import EVAL_FAST, make_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_valid_png(path):
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    image = imread(path)
    assert image.ndim == 3 and min(image.shape[:2]) > 50


def test_eval_of_a_run_writes_schema_samples_and_plots(evaluated_runs):
    out = evaluated_runs["far"] / "eval"
    result = EvalResult.load(out / "eval.json")
    assert result.task == "sentiment" and result.reward == "vader_compound" and result.num_prompts == 6
    assert set(result.gold_reward) == {"policy", "reference"}
    assert result.win_rate is not None and 0.0 <= result.win_rate.low <= result.win_rate.high <= 1.0
    # A policy with every weight tripled is far from the reference: clearly positive KL.
    assert result.kl is not None and result.kl.k1.value > 1.0 and result.kl.k1.low > 0.0
    assert set(result.dominance) >= {"violation_rate", "w1", "signed_mean_gap"}
    assert result.settings["samples_per_prompt"] == 2 and "ancestral" in result.settings["sampling"]
    rows = [json.loads(line) for line in (out / result.samples_file).read_text().splitlines()]
    policy = [r for r in rows if r["model"] == "policy"]
    assert len(policy) == len(rows) - len(policy) == 12
    log_ratio = np.array([r["logprob"] - r["reference_logprob"] for r in policy])
    assert log_ratio.mean() == pytest.approx(result.kl.k1.value, rel=1e-5)
    assert np.mean([r["gold_reward"] for r in policy]) == pytest.approx(result.gold_reward["policy"].value)
    for name in ("gold_reward_quantiles.png", "gold_reward_histogram.png"):
        assert_valid_png(out / name)


def test_reference_samples_do_not_depend_on_the_policy(evaluated_runs):
    # Same reference, prompts and seed: the two runs report the same reference numbers (the report's
    # comparison relies on it to draw one shared reference).
    near, far = (EvalResult.load(evaluated_runs[k] / "eval" / "eval.json") for k in ("near", "far"))
    assert near.gold_reward["reference"] == far.gold_reward["reference"]
    assert near.diversity["reference"] == far.diversity["reference"]
    assert 0.0 < near.kl.k1.value < far.kl.k1.value


def test_kl_estimate_matches_the_exact_first_token_kl(tmp_path):
    """With one generated token the exact KL(pi || ref) is a finite sum over the vocabulary."""
    from distalign.config import load_config
    from distalign.eval.run import evaluate_run, load_eval_model
    from distalign.tasks import get_task, select_prompts
    from distalign.tasks.sampler import render_task_prompts

    run = make_run(tmp_path / "run", scale=1.6)
    settings = ["eval.num_prompts=8", "eval.samples_per_prompt=60", "eval.max_new_tokens=1"]
    settings += ["eval.batch_size=120", "eval.n_boot=200"]
    result = EvalResult.load(evaluate_run(run, settings))
    config = load_config(run / "config.yaml")
    policy, tokenizer = load_eval_model(str(run / "final"), config)
    reference, _ = load_eval_model("tiny", config)
    task = get_task("sentiment")
    prompts = render_task_prompts(task, tokenizer, select_prompts(task, split="heldout", num_prompts=8), True)
    exact = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
            log_p = torch.log_softmax(policy(ids).logits[0, -1].double(), -1)
            log_q = torch.log_softmax(reference(ids).logits[0, -1].double(), -1)
            exact.append(float((log_p.exp() * (log_p - log_q)).sum()))
    rows = [json.loads(line) for line in (run / "eval" / "samples.jsonl").read_text().splitlines()]
    ratios = np.array([r["logprob"] - r["reference_logprob"] for r in rows if r["model"] == "policy"])
    standard_error = ratios.std(ddof=1) / np.sqrt(ratios.size)
    assert np.mean(exact) > 0.05
    assert abs(result.kl.k1.value - np.mean(exact)) < 4 * standard_error


def test_eval_of_a_config_is_a_baseline_with_zero_kl(tmp_path, capsys):
    config = tmp_path / "base.yaml"
    config.write_text(f"model: {{name: tiny}}\noutput_dir: {tmp_path / 'runs' / 'x'}\n")
    assert main(["eval", str(config), *EVAL_FAST]) == 0
    out = tmp_path / "runs" / "x" / "baseline"
    result = EvalResult.load(out / "eval" / "eval.json")
    assert result.kl.k1.value == 0.0 and result.kl.k3.value == 0.0
    # Two independent draws from one model: no systematic winner.
    assert result.win_rate.low <= 0.5 <= result.win_rate.high
    assert (out / "config.yaml").is_file()
    assert "win rate vs reference" in capsys.readouterr().out


def test_eval_is_deterministic_under_its_seed(tmp_path):
    from distalign.eval.run import evaluate_run

    run = make_run(tmp_path / "run", scale=1.3)
    first = EvalResult.load(evaluate_run(run, output=tmp_path / "a")).to_dict()
    second = EvalResult.load(evaluate_run(run, output=tmp_path / "b")).to_dict()
    other = EvalResult.load(evaluate_run(run, ["eval.seed=1"], output=tmp_path / "c")).to_dict()
    assert first == second
    assert other["gold_reward"] != first["gold_reward"] or other["kl"] != first["kl"]
