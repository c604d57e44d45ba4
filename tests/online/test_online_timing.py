"""The online loop times the phases of every step (time/<phase> in metrics.jsonl), and the timer
synchronises a CUDA device before reading the clock, and no other device."""

from __future__ import annotations

import math
import time

import pytest
import torch
from distalign_testing.runs import read_metrics

from distalign.train.online.loop import STEP_PHASES, train_online
from distalign.train.timing import PhaseTimer

EVAL = {"eval_every": 2, "eval_prompts": 1, "eval_samples_per_prompt": 8}


def _phase_times(record: dict) -> dict[str, float]:
    return {k[len("time/") :]: v for k, v in record.items() if k.startswith("time/")}


@pytest.mark.parametrize(
    "online, extra",
    [({}, ()), ({"proposal": "offline", "refresh_min_ess_fraction": 0.9}, ("refresh",))],
    ids=["on_policy", "offline"],
)
def test_every_step_logs_its_phase_times(tmp_path, online_config, online, extra):
    config = online_config(tmp_path, train={"max_steps": 2}, online={**online, **EVAL})
    records = read_metrics(train_online(config))
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        times = _phase_times(record)
        expected = {"step", *STEP_PHASES, *extra} | ({"eval"} if record["step"] == 2 else set())
        assert set(times) == expected
        assert all(math.isfinite(v) and v >= 0.0 for v in times.values()), times
        assert times["sample"] > 0 and times["update"] > 0 and times["step"] > 0
        inside = sum(v for k, v in times.items() if k not in ("step", "eval"))
        assert inside <= times["step"] * (1 + 1e-6)  # the phases are parts of the step


def test_rloo_times_the_reward_and_reference(tmp_path, online_config):
    online = {"method": "rloo", "target": None, "reward": {"name": "regex", "pattern": "s"}, "kl_coef": 0.05}
    records = read_metrics(train_online(online_config(tmp_path, train={"max_steps": 1}, online=online)))
    times = _phase_times(records[0])
    assert times["reward"] > 0 and times["score_reference"] > 0
    assert times["score_policy"] == 0.0  # on-policy, log pi is the sampler's log q: no scoring pass


def test_phase_timer_sums_repeated_phases_and_resets():
    timer = PhaseTimer("cpu", ("a", "b"))
    for _ in range(2):
        with timer("a"):
            time.sleep(0.01)
    with timer("c"):
        pass
    assert timer.seconds["a"] >= 0.02 and timer.seconds["b"] == 0.0 and timer.seconds["c"] >= 0.0
    assert set(timer.metrics()) == {"time/a", "time/b", "time/c"}
    timer.reset()
    assert timer.seconds == {"a": 0.0, "b": 0.0}


@pytest.mark.parametrize("device, synchronises", [("cpu", False), ("cuda", True)])
def test_phase_timer_synchronises_only_a_cuda_device(monkeypatch, device, synchronises):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    timer = PhaseTimer(device)
    with timer("phase"):
        pass
    assert len(calls) == (2 if synchronises else 0)  # before starting and before stopping the clock
