"""Registered AOT objectives: contract, values, metrics by hand, errors, and a toy training run."""

from __future__ import annotations

import math

import pytest
import torch

from distalign.losses import LOSSES, PairedStats, UnpairedStats, get_loss
from distalign.losses.aot import aot_paired_loss, aot_unpaired_loss


def _paired_stats(**overrides) -> PairedStats:
    fields = dict(
        policy_chosen_logps=torch.tensor([-10.0, -12.0, -7.0], dtype=torch.float64),
        policy_rejected_logps=torch.tensor([-11.0, -9.0, -9.0], dtype=torch.float64),
        chosen_lengths=torch.tensor([2.0, 4.0, 1.0], dtype=torch.float64),
        rejected_lengths=torch.tensor([1.0, 3.0, 2.0], dtype=torch.float64),
        ref_chosen_logps=torch.tensor([-10.5, -11.0, -8.0], dtype=torch.float64),
        ref_rejected_logps=torch.tensor([-10.0, -10.0, -9.0], dtype=torch.float64),
    )
    fields.update(overrides)
    return PairedStats(**fields)


def _unpaired_stats(**overrides) -> UnpairedStats:
    fields = dict(
        policy_logps=torch.tensor([-5.0, -7.0, -4.0, -6.0, -8.0], dtype=torch.float64),
        ref_logps=torch.tensor([-6.0, -6.0, -5.0, -6.5, -7.0], dtype=torch.float64),
        lengths=torch.tensor([2.0, 1.0, 4.0, 5.0, 2.0], dtype=torch.float64),
        labels=torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0], dtype=torch.float64),
    )
    fields.update(overrides)
    return UnpairedStats(**fields)


@pytest.mark.parametrize(("name", "kind"), [("aot_paired", "paired"), ("aot_unpaired", "unpaired")])
def test_registration_declares_coupling_and_reference(name, kind):
    spec = get_loss(name)
    assert name in LOSSES
    assert spec.data_kind == kind and spec.batch_coupled and spec.needs_reference
    assert spec.options == {
        "cost": "logistic",
        "beta": 0.01,
        "label_smoothing": 0.0,
        "soft_sort": False,
        "soft_sort_strength": 1.0,
        "length_normalize": False,
    }
    assert "2406.05882" in spec.paper


def test_paired_value_and_metrics_by_hand():
    # Z_theta = (1, -3, 2), Z_ref = (-0.5, -1, 1); chosen rewards (0.5, -1, 1), rejected (-1, 1, 0).
    result = get_loss("aot_paired")(_paired_stats(), cost="least_squares", beta=0.0)
    # sorted: Z_theta (-3, 1, 2) vs Z_ref (-1, -0.5, 1): gaps (-2, 1.5, 1).
    assert result.loss.item() == pytest.approx((4 + 2.25 + 1) / 3)
    metrics = {key: value.item() for key, value in result.metrics.items()}
    assert metrics["aot/violation_rate"] == pytest.approx(1 / 3)
    assert metrics["aot/ot_cost"] == pytest.approx((4 + 2.25 + 1) / 3)
    assert metrics["aot/w1_gap"] == pytest.approx((2 + 1.5 + 1) / 3)
    assert metrics["aot/w1_violation"] == pytest.approx(2 / 3)
    assert metrics["aot/mean_gap"] == pytest.approx(0.5 / 3)
    assert metrics["rewards/chosen"] == pytest.approx(0.5 / 3)
    assert metrics["rewards/rejected"] == pytest.approx(0.0)
    assert metrics["rewards/margins"] == pytest.approx(0.5 / 3)
    assert metrics["rewards/accuracies"] == pytest.approx(2 / 3)
    assert all(not value.requires_grad for value in result.metrics.values())


def test_paired_length_normalisation_uses_per_token_means():
    stats = _paired_stats()
    result = get_loss("aot_paired")(stats, cost="logistic", beta=2.0, length_normalize=True)
    z = (
        stats.policy_chosen_logps / stats.chosen_lengths
        - stats.policy_rejected_logps / stats.rejected_lengths
    )
    z_ref = stats.ref_chosen_logps / stats.chosen_lengths - stats.ref_rejected_logps / stats.rejected_lengths
    torch.testing.assert_close(result.loss, aot_paired_loss(z, z_ref, beta=2.0))
    unnormalised = get_loss("aot_paired")(stats, cost="logistic", beta=2.0)
    assert not torch.isclose(result.loss, unnormalised.loss)


def test_paired_gradient_flows_only_into_policy_fields():
    stats = _paired_stats(
        policy_chosen_logps=torch.tensor([-10.0, -12.0, -7.0], dtype=torch.float64, requires_grad=True),
        ref_chosen_logps=torch.tensor([-10.5, -11.0, -8.0], dtype=torch.float64, requires_grad=True),
    )
    get_loss("aot_paired")(stats, beta=0.5).loss.backward()
    assert stats.policy_chosen_logps.grad is not None and stats.ref_chosen_logps.grad is None


def test_unpaired_value_and_metrics_by_hand():
    # rewards r = policy - ref = (1, -1, 1, 0.5, -1); positives (1, 1), negatives (-1, 0.5, -1).
    result = get_loss("aot_unpaired")(_unpaired_stats(), cost="squared_hinge", beta=1.0)
    # grid {1/2} U {1/3, 2/3}: sorted u (1, 1), v (-1, -1, 0.5); gaps 2, 2, 2, 0.5 with masses 1/3, 1/6, 1/6, 1/3;
    # squared hinge with margin 1 costs only the last: (1 - 0.5)^2 / 3.
    assert result.loss.item() == pytest.approx(0.25 / 3)
    metrics = {key: value.item() for key, value in result.metrics.items()}
    assert metrics["aot/violation_rate"] == 0.0
    assert metrics["aot/w1_gap"] == pytest.approx(2 * (2 / 3) + 0.5 / 3)
    assert metrics["rewards/positive"] == pytest.approx(1.0)
    assert metrics["rewards/negative"] == pytest.approx(-0.5)
    assert metrics["rewards/margins"] == pytest.approx(1.5)
    assert metrics["rewards/accuracies"] == pytest.approx(1.0)


def test_unpaired_pairwise_accuracy_counts_all_pairs():
    # positives (0.5, -2) against negatives (0, 1, -3): wins 0.5>0, 0.5>-3, -2>-3 -> 3 of 6.
    stats = UnpairedStats(
        policy_logps=torch.tensor([0.5, 0.0, -2.0, 1.0, -3.0]),
        ref_logps=torch.zeros(5),
        lengths=torch.ones(5),
        labels=torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0]),
    )
    assert get_loss("aot_unpaired")(stats).metrics["rewards/accuracies"].item() == pytest.approx(0.5)


def test_unpaired_matches_pure_function_with_length_normalisation():
    stats = _unpaired_stats()
    result = get_loss("aot_unpaired")(stats, beta=0.3, label_smoothing=0.1, length_normalize=True)
    rewards = (stats.policy_logps - stats.ref_logps) / stats.lengths
    expected = aot_unpaired_loss(rewards[[0, 2]], rewards[[1, 3, 4]], beta=0.3, label_smoothing=0.1)
    torch.testing.assert_close(result.loss, expected)


@pytest.mark.parametrize("name", ["aot_paired", "aot_unpaired"])
def test_integer_weights_equal_duplicated_rows(name):
    stats = _paired_stats() if name == "aot_paired" else _unpaired_stats()
    repeats = torch.tensor([2, 1, 3]) if name == "aot_paired" else torch.tensor([1, 2, 3, 1, 2])
    weighted = type(stats)(**{**stats.__dict__, "weights": repeats.double()})
    duplicated = type(stats)(
        **{
            key: value.repeat_interleave(repeats)
            for key, value in stats.__dict__.items()
            if isinstance(value, torch.Tensor)
        }
    )
    objective = get_loss(name)
    a, b = (
        objective(weighted, cost="squared_hinge", beta=0.5),
        objective(duplicated, cost="squared_hinge", beta=0.5),
    )
    torch.testing.assert_close(a.loss, b.loss)
    assert a.metrics.keys() == b.metrics.keys()
    for key in a.metrics:
        torch.testing.assert_close(a.metrics[key].double(), b.metrics[key].double(), msg=key)


def test_errors_are_clear():
    with pytest.raises(ValueError, match="reference log-probs"):
        get_loss("aot_paired")(_paired_stats(ref_chosen_logps=None))
    with pytest.raises(ValueError, match="reference log-probs"):
        get_loss("aot_unpaired")(_unpaired_stats(ref_logps=None))
    with pytest.raises(ValueError, match="at least one sample on each side"):
        get_loss("aot_unpaired")(_unpaired_stats(labels=torch.ones(5)))
    with pytest.raises(ValueError, match=r"1.0 \(positive\) or 0.0"):
        get_loss("aot_unpaired")(_unpaired_stats(labels=torch.full((5,), 0.5)))
    with pytest.raises(ValueError, match="non-negative"):
        get_loss("aot_paired")(_paired_stats(weights=torch.tensor([1.0, -1.0, 1.0])))


@pytest.mark.parametrize("cost", ["logistic", "squared_hinge", "least_squares"])
def test_training_on_free_rewards_reaches_dominance(cost):
    """Gradient descent on the objective, with per-row log-probs as parameters, removes the violation."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.tensor([1.0] * 12 + [0.0] * 20)
    # Positives start *below* the negatives: a clear dominance violation.
    start = torch.randn(32, generator=generator) - 2.0 * labels
    policy_logps = torch.nn.Parameter(start.clone())
    stats = UnpairedStats(
        policy_logps=policy_logps, ref_logps=torch.zeros(32), lengths=torch.ones(32), labels=labels
    )
    objective, options = get_loss("aot_unpaired"), dict(cost=cost, beta=1.0)
    optimizer = torch.optim.SGD([policy_logps], lr=2.0)
    first = objective(stats, **options).metrics
    for _ in range(150):
        optimizer.zero_grad()
        objective(stats, **options).loss.backward()
        optimizer.step()
    last = objective(stats, **options).metrics
    assert first["aot/violation_rate"] > 0.9 and last["aot/violation_rate"] == 0.0
    assert last["aot/ot_cost"] < first["aot/ot_cost"]
    assert last["rewards/accuracies"] > first["rewards/accuracies"]
    assert not math.isnan(last["aot/w1_gap"].item())
