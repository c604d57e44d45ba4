"""UPO and the designer-aware DPO baselines: hand-derived values, the paper's limiting cases, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from distalign.losses import get_loss
from distalign.losses.base import PairedStats, UnpairedStats
from distalign.losses.kto import kto_loss
from distalign.losses.preference import dpo_loss
from distalign.losses.upo import advantage_weights, expectile_loss

N = 5


def _paired(designer_chosen, designer_rejected, values=None, seed: int = 0) -> PairedStats:
    generator = torch.Generator().manual_seed(seed)
    draw = lambda: (-torch.rand(N, generator=generator, dtype=torch.float64) * 10).requires_grad_()  # noqa: E731
    return PairedStats(
        policy_chosen_logps=draw(),
        policy_rejected_logps=draw(),
        chosen_lengths=torch.tensor([3.0, 5, 2, 8, 4], dtype=torch.float64),
        rejected_lengths=torch.tensor([6.0, 1, 4, 2, 7], dtype=torch.float64),
        ref_chosen_logps=-torch.rand(N, generator=generator, dtype=torch.float64) * 10,
        ref_rejected_logps=-torch.rand(N, generator=generator, dtype=torch.float64) * 10,
        signals={
            "chosen_reward/designer": torch.as_tensor(designer_chosen, dtype=torch.float64),
            "rejected_reward/designer": torch.as_tensor(designer_rejected, dtype=torch.float64),
        },
        heads={"value": (torch.zeros(N, dtype=torch.float64) if values is None else values).requires_grad_()},
    )


def _grads(loss: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, tensors, allow_unused=True, retain_graph=True))


def _token_mean_nll(stats: PairedStats) -> torch.Tensor:
    return -0.5 * (
        stats.policy_chosen_logps / stats.chosen_lengths
        + stats.policy_rejected_logps / stats.rejected_lengths
    )


def test_constant_designer_reward_makes_the_aux_term_a_scaled_sft_loss():
    """r_aux = c and V = 0: w = exp(c / beta_a) for every response, so L_aux = exp(c / beta_a) x NLL."""
    c, temperature, lam = 0.7, 0.5, 2.0
    stats = _paired([c] * N, [c] * N)
    options = dict(lambda_aux=lam, advantage_temperature=temperature, value_weight=0.0, weight_clip=None)
    upo = get_loss("upo").per_example(stats, **options).losses
    dpo = dpo_loss(
        stats.policy_chosen_logps - stats.ref_chosen_logps,
        stats.policy_rejected_logps - stats.ref_rejected_logps,
    )
    expected = dpo + lam * math.exp(c / temperature) * _token_mean_nll(stats)
    torch.testing.assert_close(upo, expected, rtol=1e-14, atol=0)
    inputs = (stats.policy_chosen_logps, stats.policy_rejected_logps)
    for got, want in zip(_grads(upo.sum(), *inputs), _grads(expected.sum(), *inputs)):
        torch.testing.assert_close(got, want, rtol=1e-14, atol=0)


def test_sequence_likelihood_uses_summed_log_probs():
    stats = _paired([0.0] * N, [0.0] * N)
    options = dict(lambda_aux=1.0, value_weight=0.0, aux_likelihood="sequence")
    upo = get_loss("upo").per_example(stats, **options).losses
    dpo = get_loss("dpo").per_example(stats).losses
    aux = -0.5 * (stats.policy_chosen_logps + stats.policy_rejected_logps)  # w = exp(0) = 1
    torch.testing.assert_close(upo, dpo + aux, rtol=1e-14, atol=0)


def test_lambda_zero_gives_the_preference_loss_exactly():
    stats = _paired(torch.randn(N, dtype=torch.float64), torch.randn(N, dtype=torch.float64))
    upo = get_loss("upo").per_example(stats, beta=0.3, lambda_aux=0.0, value_weight=0.0).losses
    dpo = get_loss("dpo").per_example(stats, beta=0.3).losses
    assert torch.equal(upo, dpo)
    inputs = (stats.policy_chosen_logps, stats.policy_rejected_logps)
    for got, want in zip(_grads(upo.sum(), *inputs), _grads(dpo.sum(), *inputs)):
        assert torch.equal(got, want)


def test_upo_kto_with_lambda_zero_is_kto():
    generator = torch.Generator().manual_seed(3)
    logps = (-torch.rand(6, generator=generator, dtype=torch.float64) * 5).requires_grad_()
    stats = UnpairedStats(
        policy_logps=logps,
        lengths=torch.full((6,), 3.0, dtype=torch.float64),
        labels=torch.tensor([1.0, 0, 1, 1, 0, 0], dtype=torch.float64),
        ref_logps=-torch.rand(6, generator=generator, dtype=torch.float64) * 5,
        kl_policy_logps=torch.full((6,), -2.0, dtype=torch.float64),
        kl_ref_logps=torch.full((6,), -2.5, dtype=torch.float64),
        signals={"reward/designer": torch.randn(6, dtype=torch.float64)},
        heads={"value": torch.zeros(6, dtype=torch.float64, requires_grad=True)},
    )
    got = get_loss("upo_kto").per_example(stats, lambda_aux=0.0, value_weight=0.0).losses
    want = kto_loss(
        stats.policy_logps - stats.ref_logps, stats.labels, torch.tensor(0.5, dtype=torch.float64)
    )
    torch.testing.assert_close(got, want, rtol=1e-15, atol=0)
    with_aux = get_loss("upo_kto").per_example(stats, lambda_aux=1.0, value_weight=0.0, weight_clip=None)
    weights = torch.exp(stats.signals["reward/designer"])
    torch.testing.assert_close(with_aux.losses, want - weights * logps / 3.0, rtol=1e-14, atol=0)


@pytest.mark.parametrize("tau", [0.5, 0.1, 0.9])
def test_expectile_regression_recovers_the_expectile(tau):
    """Minimising the loss over a constant gives the value e with tau E[(r - e)+] = (1 - tau) E[(e - r)+]
    (the mean at tau = 0.5); e is found by bisection on that condition, the minimiser by Newton's method
    on the loss's own autograd derivatives."""
    torch.manual_seed(0)
    rewards = torch.distributions.Gamma(2.0, 1.0).sample((400,)).double()

    def condition(e: float) -> float:
        return float(tau * (rewards - e).clamp(min=0).mean() - (1 - tau) * (e - rewards).clamp(min=0).mean())

    low, high = float(rewards.min()), float(rewards.max())
    for _ in range(200):
        middle = 0.5 * (low + high)
        low, high = (middle, high) if condition(middle) > 0 else (low, middle)
    value = torch.zeros((), dtype=torch.float64, requires_grad=True)
    for _ in range(50):
        loss = expectile_loss(rewards - value, tau).mean()
        (gradient,) = torch.autograd.grad(loss, value, create_graph=True)
        (curvature,) = torch.autograd.grad(gradient, value)
        with torch.no_grad():
            value -= gradient / curvature
    fitted = float(value.detach())
    assert fitted == pytest.approx(0.5 * (low + high), abs=1e-12)
    if tau == 0.5:
        assert fitted == pytest.approx(float(rewards.mean()), abs=1e-12)
    else:  # upper expectiles lie above the mean, lower ones below
        assert (fitted > float(rewards.mean())) == (tau > 0.5)


def test_advantage_weights_carry_no_gradient_and_the_value_head_gets_the_exact_one():
    """With value_weight = 0 nothing reaches V (the weights are constants); with it, V's gradient is
    value_weight x d/dV of the expectile loss, averaged over the pair's two responses."""
    chosen, rejected = torch.randn(N, dtype=torch.float64), torch.randn(N, dtype=torch.float64)
    values = torch.randn(N, dtype=torch.float64)
    stats = _paired(chosen, rejected, values.clone())
    no_value = get_loss("upo").per_example(stats, lambda_aux=1.0, value_weight=0.0).losses.sum()
    (value_grad,) = _grads(no_value, stats.heads["value"])
    assert value_grad is None or torch.equal(value_grad, torch.zeros(N, dtype=torch.float64))

    tau, weight = 0.8, 1.5
    loss = get_loss("upo").per_example(stats, lambda_aux=1.0, value_weight=weight, expectile=tau).losses.sum()
    (value_grad,) = _grads(loss, stats.heads["value"])

    def d_dv(reward):  # d/dV |tau - 1(u<0)| u^2 with u = r - V
        u = reward - values
        return -2 * torch.where(u < 0, u.new_tensor(1 - tau), u.new_tensor(tau)) * u

    torch.testing.assert_close(value_grad, weight * 0.5 * (d_dv(chosen) + d_dv(rejected)), rtol=1e-14, atol=0)


def test_advantage_weights_clip_normalise_and_effective_sample_size():
    advantages = torch.log(torch.tensor([1.0, 2.0, 4.0, 100.0], dtype=torch.float64))
    clipped = advantage_weights(advantages, temperature=1.0, clip=10.0, normalize=False)
    torch.testing.assert_close(clipped.weights, torch.tensor([1.0, 2.0, 4.0, 10.0], dtype=torch.float64))
    assert float(clipped.clipped_fraction) == 0.25
    assert float(clipped.effective_sample_size) == pytest.approx(17.0**2 / (4 * 121.0))
    normalised = advantage_weights(advantages, temperature=1.0, clip=None, normalize=True)
    torch.testing.assert_close(
        normalised.weights, torch.tensor([1.0, 2, 4, 100], dtype=torch.float64) / 26.75
    )
    hot = advantage_weights(torch.tensor([1e4, 0.0]), temperature=1.0, clip=20.0, normalize=False)
    assert torch.isfinite(hot.weights).all() and float(hot.weights[0]) == pytest.approx(20.0)
    equal = advantage_weights(torch.zeros(3), temperature=2.0, clip=5.0, normalize=True)
    assert float(equal.effective_sample_size) == pytest.approx(1.0)


def test_bad_options_fail_with_the_option_named():
    stats = _paired([0.0] * N, [0.0] * N)
    for options, name in (
        ({"expectile": 1.0}, "tau"),
        ({"advantage_temperature": 0.0}, "advantage_temperature"),
        ({"weight_clip": -1.0}, "weight_clip"),
        ({"aux_likelihood": "mean"}, "aux_likelihood"),
        ({"lambda_aux": -1.0}, "lambda_aux"),
    ):
        with pytest.raises(ValueError, match=name):
            get_loss("upo").per_example(stats, **options)


def test_missing_designer_signal_names_the_config_section():
    stats = _paired([0.0] * N, [0.0] * N)
    stats.signals = {}
    with pytest.raises(ValueError, match="designer: section"):
        get_loss("upo").per_example(stats)


def test_modpo_folds_the_designer_margin_into_the_dpo_margin():
    chosen, rejected = (
        torch.tensor([1.0, -1, 0, 2, 0], dtype=torch.float64),
        torch.zeros(N, dtype=torch.float64),
    )
    stats = _paired(chosen, rejected)
    margin = (stats.policy_chosen_logps - stats.ref_chosen_logps) - (
        stats.policy_rejected_logps - stats.ref_rejected_logps
    )
    got = get_loss("modpo").per_example(stats, beta=0.2, lambda_aux=0.5).losses
    want = torch.log1p(torch.exp(-(0.2 * margin - 0.5 * chosen)))
    torch.testing.assert_close(got, want, rtol=1e-13, atol=0)
    no_designer = get_loss("modpo").per_example(stats, beta=0.2, lambda_aux=0.0).losses
    torch.testing.assert_close(
        no_designer, get_loss("dpo").per_example(stats, beta=0.2).losses, rtol=1e-15, atol=0
    )


def test_relabelling_swaps_pairs_the_designer_prefers_the_other_way_by_more_than_one_over_lambda():
    # designer margins (chosen - rejected): 0.5, -0.5, -1.5, -3, 2; with lambda 0.5 only -3 x 0.5 < -1.
    stats = _paired([0.5, 0.0, 0.0, 0.0, 2.0], [0.0, 0.5, 1.5, 3.0, 0.0])
    result = get_loss("dpo_relabel").per_example(stats, beta=0.1, lambda_aux=0.5)
    chosen = stats.policy_chosen_logps - stats.ref_chosen_logps
    rejected = stats.policy_rejected_logps - stats.ref_rejected_logps
    straight, swapped = dpo_loss(chosen, rejected), dpo_loss(rejected, chosen)
    want = torch.where(torch.tensor([False, False, False, True, False]), swapped, straight)
    torch.testing.assert_close(result.losses, want, rtol=1e-15, atol=0)
    assert float(result.metrics["relabel/swapped_fraction"]) == pytest.approx(0.2)


def test_out_of_range_options_fail_at_config_time_naming_the_field():
    from distalign.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"loss\.expectile"):
        load_config(None, ["loss.name=upo", "loss.expectile=1.5"])
    with pytest.raises(ConfigError, match=r"loss\.lambda_aux.*'dpo' takes"):
        load_config(None, ["loss.name=dpo", "loss.lambda_aux=1.0"])  # not an option of dpo


def test_the_advantage_subtracts_the_value_head_by_hand():
    """V != 0: per pair, DPO + lambda x 1/2 sum over the two responses of -exp((r_aux - V) / T) x token-mean
    log pi, + value_weight x 1/2 sum of the expectile loss of r_aux - V, written out for each row. The
    same formula with A = r_aux (the value ignored in the advantage) differs by more than 0.5 on a row,
    so the check can tell them apart."""
    chosen_r, rejected_r = [1.0, -0.5, 2.0, 0.3, -1.2], [0.4, 0.9, -1.0, 0.3, 0.8]
    values = torch.tensor([0.7, -0.3, 1.1, -0.9, 0.2], dtype=torch.float64)
    stats = _paired(chosen_r, rejected_r, values.clone())
    lam, temperature, tau, weight, beta = 0.6, 0.8, 0.7, 0.5, 0.2
    got = get_loss("upo").per_example(
        stats, beta=beta, lambda_aux=lam, advantage_temperature=temperature, expectile=tau,
        value_weight=weight, weight_clip=None,
    ).losses.detach()  # fmt: skip

    def by_hand(advantage_uses_value: bool) -> torch.Tensor:
        rows = []
        for i in range(N):
            chosen = float(stats.policy_chosen_logps[i].detach() - stats.ref_chosen_logps[i])
            rejected = float(stats.policy_rejected_logps[i].detach() - stats.ref_rejected_logps[i])
            total = math.log1p(math.exp(-beta * (chosen - rejected)))  # -log sigmoid(beta margin)
            for reward, logp, length in (
                (chosen_r[i], stats.policy_chosen_logps[i], stats.chosen_lengths[i]),
                (rejected_r[i], stats.policy_rejected_logps[i], stats.rejected_lengths[i]),
            ):
                residual = reward - float(values[i].detach())
                advantage = residual if advantage_uses_value else reward
                aux = -math.exp(advantage / temperature) * float(logp.detach() / length)
                expectile = (tau if residual >= 0 else 1 - tau) * residual**2
                total += 0.5 * (lam * aux + weight * expectile)
            rows.append(total)
        return torch.tensor(rows, dtype=torch.float64)

    torch.testing.assert_close(got, by_hand(True), rtol=1e-12, atol=1e-12)
    assert (got - by_hand(False)).abs().max() > 0.5


def test_upo_returns_its_three_weighted_terms_summing_to_the_loss():
    """The terms train.grad_shares splits the gradient by: L_pref (DPO), lambda_aux L_aux (a pair's two
    responses 1/2 each) and value_weight L_V, declared by the loss and adding up to its value."""
    stats = _paired(torch.randn(N, dtype=torch.float64), torch.randn(N, dtype=torch.float64))
    spec = get_loss("upo")
    assert spec.terms == ("upo/preference", "upo/aux", "upo/value")
    result = spec.per_example(stats, lambda_aux=0.4, value_weight=0.7)
    torch.testing.assert_close(sum(result.terms.values()), result.losses, rtol=1e-14, atol=0)
    dpo = get_loss("dpo").per_example(stats).losses
    assert torch.equal(result.terms["upo/preference"], dpo)
    aux_only = spec.per_example(stats, lambda_aux=1.0, value_weight=0.0).losses - dpo
    torch.testing.assert_close(result.terms["upo/aux"], 0.4 * aux_only, rtol=1e-12, atol=0)
    off = spec.per_example(stats, lambda_aux=0.0, value_weight=0.7).terms["upo/aux"]
    assert not off.any()
