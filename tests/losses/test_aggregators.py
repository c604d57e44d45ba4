"""Aggregators (per-example losses -> batch objective) and the per-example contract of the losses."""

from __future__ import annotations

import pytest
import torch

from distalign.losses import AGGREGATORS, LOSSES, get_aggregator, get_loss
from distalign.losses.aggregators import cvar_weights
from distalign.losses.aot import aot_paired_loss, aot_unpaired_loss
from distalign.losses.base import ListwiseStats, PairedStats, UnpairedStats
from distalign.losses.listwise import plackett_luce_loss
from distalign.losses.preference import dpo_loss


def t64(*values):
    return torch.tensor(values, dtype=torch.float64)


def cvar(losses, weights=None, alpha=0.1):
    return get_aggregator("cvar")(losses, weights=weights, alpha=alpha).loss


def test_cvar_hand_values():
    losses = t64(1.0, 2.0, 3.0, 4.0)
    assert cvar(losses, alpha=0.5).item() == pytest.approx(3.5)
    # Worst 30% of four equal masses: all of the 4 (0.25) and 0.05 of the 3.
    assert cvar(losses, alpha=0.3).item() == pytest.approx((0.25 * 4 + 0.05 * 3) / 0.3)
    assert cvar(losses, alpha=1.0).item() == pytest.approx(2.5)
    # Weights are probability masses: 3/4 on loss 1, 1/4 on loss 3; the worst half is 1/4 of each.
    assert cvar(t64(1.0, 3.0), t64(3.0, 1.0), alpha=0.5).item() == pytest.approx(2.0)


def test_cvar_equals_rockafellar_uryasev_minimum():
    torch.manual_seed(0)
    losses, weights = torch.rand(9, dtype=torch.float64), torch.rand(9, dtype=torch.float64)
    p = weights / weights.sum()
    for alpha in (0.05, 0.2, 0.5, 0.9):
        # min_eta eta + E[(l - eta)_+] / alpha is attained at one of the losses (piecewise linear in eta).
        brute = min(float(eta + (p * (losses - eta).clamp(min=0)).sum() / alpha) for eta in losses)
        assert cvar(losses, weights, alpha).item() == pytest.approx(brute, rel=1e-12)


def test_cvar_gradient_is_the_tail_weights():
    losses = t64(0.5, 3.0, 1.0, 2.0).requires_grad_(True)
    cvar(losses, alpha=0.5).backward()
    torch.testing.assert_close(losses.grad, t64(0.0, 0.5, 0.0, 0.5))
    torch.testing.assert_close(
        cvar_weights(losses.detach(), torch.ones(4, dtype=torch.float64), 0.5), losses.grad
    )


@pytest.mark.parametrize("alpha", [0.0, -0.1, 1.5])
def test_cvar_refuses_alpha_outside_unit_interval(alpha):
    with pytest.raises(ValueError, match="alpha"):
        cvar(t64(1.0, 2.0), alpha=alpha)


def test_mean_aggregator_is_the_weighted_mean_and_not_coupled():
    spec = get_aggregator("mean")
    assert not spec.batch_coupled and spec.options == {}
    assert spec(t64(1.0, 3.0), weights=t64(3.0, 1.0)).loss.item() == pytest.approx(1.5)
    assert spec(t64(1.0, 3.0), weights=t64(0.0, 0.0)).loss.item() == 0.0
    assert get_aggregator("cvar").batch_coupled


def _paired(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    r = lambda: torch.randn(n, generator=g, dtype=torch.float64)  # noqa: E731
    lengths = torch.randint(1, 9, (n,), generator=g).double()
    return PairedStats(r(), r(), lengths, lengths + 1, r(), r())


def _unpaired(seed=0, labels=(1, 0, 1, 1, 0, 0, 1)):
    g = torch.Generator().manual_seed(seed)
    n = len(labels)
    return UnpairedStats(
        torch.randn(n, generator=g, dtype=torch.float64),
        torch.ones(n, dtype=torch.float64),
        torch.tensor(labels, dtype=torch.float64),
        torch.randn(n, generator=g, dtype=torch.float64),
    )


@pytest.mark.parametrize("weights", [None, t64(2.0, 1.0, 0.0, 3.0, 1.0, 0.5)])
def test_aot_paired_per_example_values_average_to_the_aot_loss(weights):
    stats = _paired()
    stats.weights = weights
    stats.policy_chosen_logps.requires_grad_(True)
    per_example = get_loss("aot_paired").per_example(stats, beta=0.7).losses
    assert per_example.shape == (6,)
    w = torch.ones(6, dtype=torch.float64) if weights is None else weights
    aggregated = (w * per_example).sum() / w.sum()
    margins = stats.policy_chosen_logps - stats.policy_rejected_logps
    direct = aot_paired_loss(
        margins, stats.ref_chosen_logps - stats.ref_rejected_logps, beta=0.7, weights=weights
    )
    torch.testing.assert_close(aggregated, direct)
    (grad_aggregated,) = torch.autograd.grad(aggregated, stats.policy_chosen_logps)
    (grad_direct,) = torch.autograd.grad(direct, stats.policy_chosen_logps)
    torch.testing.assert_close(grad_aggregated, grad_direct)
    if weights is not None:
        assert per_example[2].item() == 0.0  # a row of zero weight owns no slab of the coupling


def test_aot_unpaired_per_example_values_average_to_the_aot_loss():
    stats = _unpaired()
    result = get_loss("aot_unpaired")(stats, beta=0.5, cost="squared_hinge")
    rewards = stats.policy_logps - stats.ref_logps
    positive = stats.labels == 1
    direct = aot_unpaired_loss(rewards[positive], rewards[~positive], beta=0.5, cost="squared_hinge")
    torch.testing.assert_close(result.loss, direct)


def test_every_loss_returns_one_loss_per_row():
    assert get_loss("dpo").per_example(_paired(), beta=0.5).losses.shape == (6,)
    stats = _unpaired()
    stats.kl_policy_logps, stats.kl_ref_logps = stats.policy_logps.flip(0), stats.ref_logps.flip(0)
    assert get_loss("kto").per_example(stats).losses.shape == (7,)


def test_coupled_losses_declare_the_aggregators_they_accept():
    assert LOSSES.get("aot_paired").aggregators == ("mean",)
    assert "transport" in LOSSES.get("aot_paired").aggregator_note
    assert LOSSES.get("kto").accepts_aggregator("cvar")  # z is a detached anchor: per-row losses are sound
    assert all(LOSSES.get(name).accepts_aggregator("mean") for name in LOSSES)
    assert {"mean", "cvar"} <= set(AGGREGATORS)


def test_plackett_luce_with_two_responses_is_dpo():
    chosen, rejected = t64(0.3, -1.0, 2.0), t64(-0.2, 0.5, 2.5)
    logratios = torch.stack([rejected, chosen], dim=1)  # the better response second: order comes from scores
    scores = t64(0.0, 1.0).expand(3, 2)
    loss = plackett_luce_loss(logratios, scores, torch.ones(3, 2), beta=0.4)
    torch.testing.assert_close(loss, dpo_loss(chosen, rejected, beta=0.4))


def test_plackett_luce_hand_value_and_padding():
    # Ranking a > b > c with rewards 2, 1, 0 (beta = 1): -[(2 - log(e^2 + e + 1)) + (1 - log(e + 1))].
    e = torch.e
    expected = -((2 - torch.log(t64(e**2 + e + 1))) + (1 - torch.log(t64(e + 1))))
    logratios = t64(0.0, 2.0, 1.0, 9.0)[None]
    scores = t64(1.0, 5.0, 3.0, 0.0)[None]
    present = t64(1.0, 1.0, 1.0, 0.0)[None]  # the fourth response is padding and must not count
    torch.testing.assert_close(plackett_luce_loss(logratios, scores, present, beta=1.0), expected)
    # One response: nothing to rank.
    assert plackett_luce_loss(t64(3.0)[None], t64(1.0)[None], t64(1.0)[None]).item() == 0.0


def test_plackett_luce_objective_metrics():
    stats = ListwiseStats(
        policy_logps=t64(1.0, 0.0, -1.0)[None],
        lengths=torch.ones(1, 3, dtype=torch.float64),
        scores=t64(3.0, 2.0, 1.0)[None],
        present=torch.ones(1, 3, dtype=torch.float64),
        ref_logps=torch.zeros(1, 3, dtype=torch.float64),
    )
    result = get_loss("plackett_luce").per_example(stats, beta=1.0)
    assert result.metrics["rewards/accuracies"].item() == 1.0
    assert result.metrics["rewards/margins"].item() == pytest.approx(2.0)
