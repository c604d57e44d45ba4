"""Tiny-model runs of the online loop: the metric moves the right way, the loop state resumes exactly,
the evaluation is exact where the answer is known, and setup mistakes are clear errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from distalign_testing.runs import (
    final_weights,
    max_weight_difference,
    optimizer_steps_taken,
    read_metrics,
    torchrun,
)

from distalign.config import ConfigError, load_config
from distalign.models.loading import load_model_and_tokenizer
from distalign.train.online import train_online
from distalign.train.setup import SetupError

CONFIGS = Path(__file__).parents[2] / "configs"
EVAL = {"eval_every": 30, "eval_prompts": 1, "eval_samples_per_prompt": 128}


def _timing(key: str) -> bool:
    return "per_s" in key or key.startswith("time/")


def _evals(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "evals.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("divergence", ["forward_kl", "jensen_shannon"])
def test_fdpg_raises_alignment_with_the_constraint(tmp_path, online_config, divergence):
    config = online_config(
        tmp_path / divergence, train={"max_steps": 30}, online={"divergence": divergence, **EVAL}
    )
    first, last = _evals(train_online(config))
    assert (first["step"], last["step"]) == (0, 30)
    assert last["eval/alignment"] > first["eval/alignment"] + 0.1
    assert last["eval/kl_pi_a"] > 0.1  # it moved away from the base to get there


def test_rloo_raises_the_mean_reward(tmp_path, online_config):
    online = {"method": "rloo", "target": None, "reward": {"name": "regex", "pattern": "s"}, "kl_coef": 0.05}
    config = online_config(tmp_path, train={"max_steps": 30}, online={**online, **EVAL})
    first, last = _evals(train_online(config))
    assert last["eval/reward"] > first["eval/reward"] + 0.2
    assert "eval/kl_p_pi" not in last  # no target, no divergence monitors


def test_step_zero_evaluation_is_exact_for_a_pointwise_constraint(tmp_path, online_config):
    # Before training pi = a, so p = a(.|b) gives KL(p || pi) = -log Z and TV = 1 - Z, and the
    # self-normalised estimate from samples of a is exactly -log(alignment) and 1 - alignment.
    config = online_config(tmp_path, train={"max_steps": 1}, online={**EVAL, "qrs_acceptance_rates": [0.5]})
    (start, _) = _evals(train_online(config))
    alignment = start["eval/alignment"]
    assert 0.1 < alignment < 0.9
    assert start["eval/kl_p_pi"] == pytest.approx(-math.log(alignment), abs=1e-9)
    assert start["eval/tv"] == pytest.approx(1 - alignment, abs=1e-9)
    assert start["eval/kl_p_pi/ess"] == pytest.approx(alignment * 128, abs=1e-6)
    assert start["eval/kl_pi_p"] == math.inf  # pi samples violations, which p excludes
    assert abs(start["eval/kl_pi_a"]) < 1e-5
    assert start["eval/qrs/0.5/tv_to_target"] < 1e-5  # P/a is 0 or 1: beta = 1 accepts exactly p


@pytest.mark.parametrize("lora", [False, True])
def test_logged_step_metrics(tmp_path, online_config, lora):
    config = online_config(
        tmp_path,
        model={"name": "tiny", "lora": {"enabled": lora, "target_modules": "all-linear"}},
        train={"max_steps": 2},
    )
    records = read_metrics(train_online(config))
    assert [r["step"] for r in records] == [1, 2]
    for key in (
        "loss",
        "alignment",
        "log_z",
        "log_z/ess",
        "log_z/stderr",
        "pseudo_reward/mean",
        "kl_pi_a",
        "distinct_2",
    ):
        assert all(math.isfinite(r[key]) for r in records), key
    # At step 1 the policy is the base: log a (adapters off / frozen copy) equals the sampling log q.
    assert abs(records[0]["kl_pi_a"]) < 1e-5
    assert records[1]["log_z/ess"] > records[0]["log_z/ess"]  # the running estimate keeps every sample


@pytest.mark.parametrize(
    "online",
    [
        {},
        {"proposal": "offline", "baseline": "window", "baseline_window": 40, "refresh_min_ess_fraction": 0.9},
    ],
    ids=["on_policy_loo", "offline_window"],
)
def test_interrupted_and_resumed_run_equals_the_uninterrupted_run(tmp_path, online_config, online):
    train = {"max_steps": 6, "save_every": 3}
    with optimizer_steps_taken() as straight_steps:
        whole = train_online(online_config(tmp_path / "whole", train=train, online=online))
    resumed_config = online_config(tmp_path / "resumed", train=train, online=online)
    train_online(resumed_config, stop_after_step=3)
    with optimizer_steps_taken() as resumed_steps:
        resumed = train_online(resumed_config)
    assert resumed_steps[0] * 2 == straight_steps[0] > 0  # steps 4-6 only: resumed, not restarted
    assert max_weight_difference(final_weights(whole), final_weights(resumed)) == 0.0
    whole_records, resumed_records = read_metrics(whole), read_metrics(resumed)
    assert [r["step"] for r in resumed_records] == list(range(1, 7))
    for a, b in zip(whole_records, resumed_records):  # all but the wall-clock readings
        assert {k: v for k, v in a.items() if not _timing(k)} == {
            k: v for k, v in b.items() if not _timing(k)
        }
    if online:
        assert whole_records[-1]["proposal/refreshes"] >= 1  # the refreshed proposal was restored too


def test_setup_mistakes_are_clear_errors(tmp_path, online_config):
    with pytest.raises(SetupError, match="train.batch_size"):
        train_online(online_config(tmp_path / "a", train={"batch_size": 16, "micro_batch_size": 16}))
    with pytest.raises(SetupError, match="eval_every"):
        train_online(online_config(tmp_path / "b", train={"log_every": 4}, online={"eval_every": 2}))
    with pytest.raises(SetupError, match="online.reward"):
        bad_reward = {"method": "rloo", "target": None, "reward": {"name": "regex", "patern": "s"}}
        train_online(online_config(tmp_path / "c", online=bad_reward))
    with pytest.raises(ConfigError, match="epsilon"):  # refused with the config, before any sampling
        online_config(tmp_path / "d", online={"divergence": "reverse_kl"})


def _shipped_overrides(path: Path) -> list[str]:
    """Shrink a shipped (SmolLM2) config to a few seconds on the tiny model; the LoRA settings stay."""
    overrides = [
        "model.name=tiny",
        "train.max_steps=2",
        "train.batch_size=8",
        "train.micro_batch_size=4",
        "train.save_every=0",
        "train.log_every=1",
        "train.progress=false",
        "online.prompts_per_step=4",
        "online.samples_per_prompt=2",
        "online.max_new_tokens=6",
        "online.eval_every=2",
        "online.eval_prompts=2",
        "online.eval_samples_per_prompt=4",
    ]
    if "distributional" in path.name:  # the tiny model never writes weather words: fit a letter instead
        overrides += [
            "online.target.scorers=[{kind: moments, features: [{name: regex, pattern: s}], moments: [0.5]}]",
            "online.target.fit_prompts=4",
            "online.target.fit_samples_per_prompt=8",
        ]
    return overrides


@pytest.mark.parametrize(
    "path", sorted(CONFIGS.glob("fdpg_*.yaml")) + sorted(CONFIGS.glob("rloo_*.yaml")), ids=lambda p: p.stem
)
def test_shipped_configs_run(tmp_path, path):
    config = load_config(path, [*_shipped_overrides(path), f"output_dir={tmp_path}"])
    run_dir = train_online(config)
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2]
    assert "eval/distinct_2" in records[-1] and "eval/kl_pi_a" in records[-1]
    assert (run_dir / "final" / "config.json").exists()
    if "distributional" in path.name:
        state = [json.loads(line) for line in (run_dir / "evals.jsonl").read_text().splitlines()]
        assert "eval/moment/0" in state[-1]


@pytest.mark.slow
def test_two_processes_share_one_global_batch(tmp_path):
    """torchrun with 2 processes: each samples half the prompts; log Z and the metrics see all of them."""
    overrides = [
        "model.name=tiny",
        "train.batch_size=32",
        "train.micro_batch_size=8",
        "train.max_steps=2",
        "train.save_every=1",
        "train.log_every=1",
        "train.progress=false",
        "online.method=fdpg",
        "online.target={scorers: [{kind: constraint, feature: {name: regex, pattern: s}}]}",
        "online.prompts.task=keyword",
        "online.prompts_per_step=4",
        "online.samples_per_prompt=8",
        "online.max_new_tokens=8",
        "online.eval_every=2",
        "online.eval_prompts=1",  # 1 prompt x 8 samples, shared by the 2 processes
        "online.eval_samples_per_prompt=8",
        f"output_dir={tmp_path}",
    ]
    load_model_and_tokenizer("tiny")  # build the cached tiny model once, before two processes race for it
    torchrun(["-m", "distalign", "train", *overrides])
    state = json.loads((tmp_path / "checkpoints" / "step_1" / "loop_state.json").read_text())
    assert state["log_z"]["stats"][0][0] == 32  # both processes' samples entered the estimate
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in records)
    evaluations = _evals(tmp_path)
    assert [e["step"] for e in evaluations] == [0, 2]
    assert evaluations[0]["eval/alignment/ess"] == pytest.approx(8.0)  # both halves were gathered
