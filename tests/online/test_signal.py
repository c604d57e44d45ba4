"""The step's signal from the global batch: log Z, pseudo-rewards, baselines and weights, by hand.

``compute_signal`` is pure (log Z and the window mean come in as arguments); ``LoopState.step_signal``
advances the running estimates around it, as the loop does."""

from __future__ import annotations

import math

import pytest
import torch

from distalign.config.online import OnlineConfig
from distalign.errors import SetupError
from distalign.train.online.setup import FrozenProposal, LoopState
from distalign.train.online.signal import GlobalBatch, compute_signal

TARGET = {"scorers": [{"kind": "constraint", "feature": {"name": "regex", "pattern": "s"}}]}
INF = math.inf


def _batch(
    policy, target=None, *, proposal=None, base=None, rewards=None, groups=None, keys=None
) -> GlobalBatch:
    policy = torch.tensor(policy, dtype=torch.float64)
    n = policy.shape[0]
    return GlobalBatch(
        policy_logps=policy,
        proposal_logps=policy if proposal is None else torch.tensor(proposal, dtype=torch.float64),
        base_logps=torch.zeros(n, dtype=torch.float64)
        if base is None
        else torch.tensor(base, dtype=torch.float64),
        target_logps=None if target is None else torch.tensor(target, dtype=torch.float64),
        rewards=None if rewards is None else torch.tensor(rewards, dtype=torch.float64),
        groups=torch.zeros(n, dtype=torch.long) if groups is None else torch.tensor(groups),
        keys=[None] * n if keys is None else keys,
        monitors={},
        texts=[""] * n,
        completion_tokens=torch.ones(n),
        ended_with_eos=torch.ones(n),
    )


def _state(cfg: OnlineConfig) -> LoopState:
    return LoopState(cfg.baseline_window, None)


def _step(cfg: OnlineConfig, batch: GlobalBatch, state: LoopState):
    """The signal as the loop computes it: advancing ``state``."""
    return state.step_signal(cfg, batch)


def test_compute_signal_is_a_function_of_its_arguments():
    # The jensen_shannon case below, with log Z = log 1/2 given instead of estimated: same values, every call.
    cfg = OnlineConfig(method="fdpg", divergence="jensen_shannon", target=TARGET)
    batch = _batch([-1.0, -2.0, -3.0, -4.0], [-1.0, -INF, -3.0, -INF])
    log_z = torch.full((4,), math.log(0.5), dtype=torch.float64)
    first, second = compute_signal(cfg, batch, log_z), compute_signal(cfg, batch, log_z)
    assert torch.equal(first.rewards, second.rewards) and first.metrics == second.metrics
    assert torch.allclose(first.rewards[:2], torch.tensor([math.log(1.5), -math.log(2)], dtype=torch.float64))
    with pytest.raises(ValueError, match="log Z"):
        compute_signal(cfg, batch)
    window = OnlineConfig(method="reinforce", reward="length", kl_coef=0.0, baseline="window")
    signal = compute_signal(window, _batch([0.0, 0.0], rewards=[1.0, 3.0]), window_mean=2.0)
    assert signal.advantages.tolist() == [-1.0, 1.0]


def test_jensen_shannon_with_leave_one_out_matches_hand_values():
    # q = pi; two of four samples satisfy the constraint with P = pi, so Z_hat = 1/2 and, where P > 0,
    # l = log pi - log P + log Z = log 1/2: R = softplus(log 2) - log 2 = log 1.5; elsewhere R = -log 2.
    # Leave-one-out over the four: A = (4 R_j - sum R) / 3 = +-(2/3) log 3.
    cfg = OnlineConfig(method="fdpg", divergence="jensen_shannon", target=TARGET)
    state = _state(cfg)
    signal = _step(cfg, _batch([-1.0, -2.0, -3.0, -4.0], [-1.0, -INF, -3.0, -INF]), state)
    assert state.log_z.log_z() == pytest.approx(math.log(0.5))
    expected_rewards = torch.tensor(
        [math.log(1.5), -math.log(2), math.log(1.5), -math.log(2)], dtype=torch.float64
    )
    assert torch.allclose(signal.rewards, expected_rewards)
    third = 2 / 3 * math.log(3)
    assert torch.allclose(
        signal.advantages, torch.tensor([third, -third, third, -third], dtype=torch.float64)
    )
    assert signal.weights is None
    assert signal.metrics["log_z"] == pytest.approx(math.log(0.5))


def test_forward_kl_pseudo_reward_is_p_over_pi():
    # R = e^{-l} = P / (Z pi): with log P = -1, log pi = -3 and Z_hat = mean(P/pi) = (e^2 + 0) / 2.
    cfg = OnlineConfig(method="fdpg", divergence="forward_kl", target=TARGET, baseline="none")
    signal = _step(cfg, _batch([-3.0, -1.0], [-1.0, -INF]), _state(cfg))
    z = math.exp(2.0) / 2
    assert signal.rewards[0].item() == pytest.approx(math.exp(2.0) / z)
    assert signal.rewards[1].item() == 0.0
    assert torch.equal(signal.advantages, signal.rewards)


def test_conditional_target_keeps_one_log_z_per_context_and_survives_a_context_without_mass():
    cfg = OnlineConfig(method="fdpg", divergence="jensen_shannon", target={**TARGET, "conditional": True})
    state = _state(cfg)
    batch = _batch(
        [-1.0, -1.0, -2.0, -2.0],
        [-1.0, -INF, -INF, -INF],  # context "b" has no sample with P > 0: log Z_b = -inf
        groups=[0, 0, 1, 1],
        keys=["a", "a", "b", "b"],
    )
    signal = _step(cfg, batch, state)
    assert state.log_z.log_z("a") == pytest.approx(math.log(0.5))
    assert state.log_z.log_z("b") == -INF
    assert torch.isfinite(signal.rewards).all()  # l = +inf for P = 0, not inf - inf = NaN
    assert signal.rewards[2:].tolist() == [-math.log(2), -math.log(2)]
    assert signal.advantages[2:].tolist() == [0.0, 0.0]


def test_reverse_kl_to_a_reward_tilt_is_rloo_divided_by_beta():
    # P = a exp(r / beta): -l - 1 = r/beta - (log pi - log a) - log Z - 1, so after the per-prompt
    # leave-one-out baseline (which removes the constants) A_fdpg = A_rloo / beta with kl_coef = beta.
    generator = torch.Generator().manual_seed(0)
    policy = (-5 * torch.rand(6, generator=generator, dtype=torch.float64)).tolist()
    base = (-5 * torch.rand(6, generator=generator, dtype=torch.float64)).tolist()
    reward = torch.rand(6, generator=generator, dtype=torch.float64).tolist()
    beta = 0.3
    target = [b + r / beta for b, r in zip(base, reward)]
    groups = [0, 0, 0, 1, 1, 1]
    fdpg = OnlineConfig(
        method="fdpg",
        divergence="reverse_kl",
        target={
            "scorers": [
                {"kind": "reward_tilt", "reward": {"name": "reward", "reward": "length"}, "beta": beta}
            ]
        },
    )
    rloo = OnlineConfig(method="rloo", reward="length", kl_coef=beta)
    a_fdpg = _step(fdpg, _batch(policy, target, base=base, groups=groups), _state(fdpg)).advantages
    a_rloo = _step(rloo, _batch(policy, base=base, rewards=reward, groups=groups), _state(rloo)).advantages
    assert torch.allclose(a_fdpg * beta, a_rloo, atol=1e-12)
    assert not torch.allclose(a_rloo, torch.zeros(6, dtype=torch.float64))


def test_windowed_baseline_uses_only_earlier_rewards():
    cfg = OnlineConfig(method="reinforce", reward="length", kl_coef=0.0, baseline="window", baseline_window=3)
    state = _state(cfg)
    first = _step(cfg, _batch([0.0, 0.0], rewards=[1.0, 3.0]), state)
    assert first.advantages.tolist() == [1.0, 3.0]  # empty window: baseline 0
    second = _step(cfg, _batch([0.0, 0.0], rewards=[5.0, 7.0]), state)
    assert second.advantages.tolist() == [3.0, 5.0]  # baseline = mean(1, 3) = 2
    third = _step(cfg, _batch([0.0], rewards=[0.0]), state)
    assert third.advantages.tolist() == [-5.0]  # the window keeps the last 3: mean(3, 5, 7)


def test_kl_regularised_reward_subtracts_beta_times_the_log_ratio():
    cfg = OnlineConfig(method="reinforce", reward="length", kl_coef=0.5, baseline="none")
    signal = _step(cfg, _batch([-1.0, -4.0], base=[-2.0, -2.0], rewards=[1.0, 1.0]), _state(cfg))
    assert signal.rewards.tolist() == [1.0 - 0.5 * 1.0, 1.0 - 0.5 * -2.0]


def test_off_policy_weights_are_clipped_ratios():
    cfg = OnlineConfig(
        method="fdpg",
        divergence="total_variation",
        target=TARGET,
        proposal="offline",
        max_importance_weight=2.0,
    )
    state = LoopState(cfg.baseline_window, FrozenProposal(torch.nn.Linear(1, 1)))
    batch = _batch([math.log(4.0), 0.0, math.log(0.5)], [0.0, 0.0, -INF], proposal=[0.0, 0.0, 0.0])
    signal = _step(cfg, batch, state)
    assert torch.allclose(signal.weights, torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64))
    assert signal.metrics["is/clipped_fraction"] == pytest.approx(1 / 3)
    # log Z is estimated from P / q (the proposal drew the samples), not P / pi.
    assert state.log_z.log_z() == pytest.approx(math.log(2 / 3))


def test_infinite_pseudo_reward_is_a_clear_error():
    # The config refuses reverse KL with a hard constraint; the loop still guards the signal itself.
    soft = {"scorers": [{**TARGET["scorers"][0], "epsilon": 1e-3}]}
    cfg = OnlineConfig(method="fdpg", divergence="reverse_kl", target=soft)
    with pytest.raises(SetupError, match="epsilon"):
        _step(cfg, _batch([-1.0, -1.0], [-1.0, -INF]), _state(cfg))
