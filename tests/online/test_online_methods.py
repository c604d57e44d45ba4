"""The online-method registry: each method's per-sample reward by hand, and a method registered from
outside runs through the config and the step's signal with no other code knowing its name."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from distalign.config.online import OnlineConfig
from distalign.errors import SetupError
from distalign.online_methods import ONLINE_METHODS, OnlineMethodSpec, get_online_method
from distalign.train.online.signal import GlobalBatch, compute_signal

TARGET = {"scorers": [{"kind": "constraint", "feature": {"name": "regex", "pattern": "s"}}]}


def samples(policy, base=None, target=None, rewards=None) -> SimpleNamespace:
    as64 = lambda values: None if values is None else torch.tensor(values, dtype=torch.float64)  # noqa: E731
    return SimpleNamespace(
        policy_logps=as64(policy),
        base_logps=as64(base if base is not None else [0.0] * len(policy)),
        target_logps=as64(target),
        rewards=as64(rewards),
    )


def test_the_registered_methods_and_what_each_declares():
    assert ONLINE_METHODS.names() == ["fdpg", "reinforce", "rloo"]
    fdpg, rloo = get_online_method("fdpg"), get_online_method("rloo")
    assert (fdpg.scored_by, fdpg.options) == ("target", ("divergence", "divergence_params"))
    assert get_online_method("reinforce").baselines is None and rloo.baselines == ("loo",)
    assert fdpg.label({"divergence": "total_variation"}) == "fdpg:total_variation"
    assert rloo.label({"kl_coef": 0.1}) == "rloo"


def test_shaped_reward_by_hand():
    # R = r - kl_coef (log pi - log a): 1 - 0.5 (-1 - (-2)) = 0.5 and 3 - 0.5 (-3 - (-1)) = 4.
    spec = get_online_method("reinforce")
    got = spec.rewards(samples([-1.0, -3.0], base=[-2.0, -1.0], rewards=[1.0, 3.0]), None, kl_coef=0.5)
    assert got.tolist() == [0.5, 4.0]
    with pytest.raises(SetupError, match="reward function returned NaN"):
        spec.rewards(samples([0.0], rewards=[math.nan]), None, kl_coef=0.5)


def test_pseudo_reward_by_hand():
    # Jensen-Shannon, l = log pi - log P + log Z = log 1/2 where P > 0: R = log 1.5; P = 0: R = -log 2.
    spec = get_online_method("fdpg")
    log_z = torch.full((2,), math.log(0.5), dtype=torch.float64)
    got = spec.rewards(
        samples([-1.0, -2.0], target=[-1.0, -math.inf]),
        log_z,
        divergence="jensen_shannon",
        divergence_params={},
    )
    assert torch.allclose(got, torch.tensor([math.log(1.5), -math.log(2)], dtype=torch.float64))
    with pytest.raises(SetupError, match="epsilon > 0"):
        spec.rewards(
            samples([-1.0], target=[-math.inf]), log_z[:1], divergence="reverse_kl", divergence_params={}
        )


def test_the_config_asks_the_registry():
    with pytest.raises(ValueError, match="unknown online method 'ppo'; valid names: fdpg, reinforce, rloo"):
        OnlineConfig(method="ppo", reward="length")
    with pytest.raises(ValueError, match="method .rloo. allows online.baseline loo \\(leave-one-out"):
        OnlineConfig(method="rloo", reward="length", baseline="window")
    with pytest.raises(ValueError, match="method 'fdpg' needs online.target"):
        OnlineConfig(method="fdpg")
    with pytest.raises(ValueError, match="method 'reinforce' needs online.reward"):
        OnlineConfig(method="reinforce")


@pytest.fixture
def doubled_reward_method():
    """A method registered from outside: R = 2 r, scored by a reward, any baseline."""
    spec = OnlineMethodSpec(
        name="doubled",
        rewards=lambda samples, log_z: 2 * samples.rewards,
        scored_by="reward",
        options=(),
        reward_metric="doubled_reward",
        paper="a test",
    )
    ONLINE_METHODS.add("doubled", spec)
    yield spec
    ONLINE_METHODS.remove("doubled")


def test_a_registered_method_runs_through_the_config_and_the_signal(doubled_reward_method):
    cfg = OnlineConfig(method="doubled", reward="length", baseline="window")
    n = 2
    batch = GlobalBatch(
        policy_logps=torch.zeros(n, dtype=torch.float64),
        proposal_logps=torch.zeros(n, dtype=torch.float64),
        base_logps=torch.zeros(n, dtype=torch.float64),
        target_logps=None,
        rewards=torch.tensor([1.0, 3.0], dtype=torch.float64),
        groups=torch.zeros(n, dtype=torch.long),
        keys=[None] * n,
        monitors={},
        texts=[""] * n,
        completion_tokens=torch.ones(n),
        ended_with_eos=torch.ones(n),
    )
    signal = compute_signal(cfg, batch, window_mean=1.0)
    assert signal.rewards.tolist() == [2.0, 6.0]
    assert signal.advantages.tolist() == [1.0, 5.0]
    assert signal.metrics["doubled_reward/mean"] == 4.0
