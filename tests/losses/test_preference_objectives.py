"""The registered DPO-family objectives: registry flags, hand-derived batch values, metrics, training toys."""

from __future__ import annotations

import math

import pytest
import torch

from distalign.losses import LOSSES, PairedStats, UnpairedStats, get_loss
from distalign.losses.preference import preference_metrics

PAIRED_NAMES = ["dpo", "robust_dpo", "ipo", "hinge", "simpo", "sft"]
EXPECTED_FLAGS = {  # name: (data_kind, needs_reference, batch_coupled)
    "dpo": ("paired", True, False),
    "robust_dpo": ("paired", True, False),
    "ipo": ("paired", True, False),
    "hinge": ("paired", True, False),
    "simpo": ("paired", False, False),
    "kto": ("unpaired", True, True),
    "sft": ("paired", False, False),
}


def t64(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def paired_stats(weights: torch.Tensor | None = None) -> PairedStats:
    # rho_w = (-4) - (-5) = 1, 0 ; rho_l = (-6) - (-6) = 0, (-3) - (-4) = 1  ->  margins 1, -1.
    return PairedStats(
        policy_chosen_logps=t64(-4.0, -2.0).requires_grad_(),
        policy_rejected_logps=t64(-6.0, -3.0).requires_grad_(),
        chosen_lengths=t64(2.0, 4.0),
        rejected_lengths=t64(3.0, 1.0),
        ref_chosen_logps=t64(-5.0, -2.0),
        ref_rejected_logps=t64(-6.0, -4.0),
        weights=weights,
    )


def unpaired_stats(labels: torch.Tensor | None = None) -> UnpairedStats:
    # z = mean([-1 - (-2), -2 - (-2)]) = 0.5; rho = 0.5 + ln 3, 0.5.
    return UnpairedStats(
        policy_logps=t64(-3.0 + math.log(3), -1.5).requires_grad_(),
        lengths=t64(2.0, 3.0),
        labels=t64(1.0, 0.0) if labels is None else labels,
        ref_logps=t64(-3.5, -2.0),
        kl_policy_logps=t64(-1.0, -2.0),
        kl_ref_logps=t64(-2.0, -2.0),
    )


# ----------------------------------------------------------------------------------------- registry


def test_registry_lists_all_seven_with_correct_flags() -> None:
    assert set(EXPECTED_FLAGS) <= set(LOSSES.names())
    for name, (data_kind, needs_reference, batch_coupled) in EXPECTED_FLAGS.items():
        spec = get_loss(name)
        assert (spec.data_kind, spec.needs_reference, spec.batch_coupled) == (
            data_kind,
            needs_reference,
            batch_coupled,
        ), name
        assert spec.paper, f"{name} has no paper reference"


def test_options_are_the_keyword_defaults() -> None:
    assert get_loss("dpo").options == {"beta": 0.1, "label_smoothing": 0.0}
    assert get_loss("robust_dpo").options == {"beta": 0.1, "eps": 0.1}
    assert get_loss("simpo").options == {"beta": 2.0, "gamma": 0.5}
    assert get_loss("kto").options == {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0}
    assert get_loss("sft").options == {}


@pytest.mark.parametrize("name", sorted(EXPECTED_FLAGS))
def test_objective_returns_scalar_loss_and_detached_scalar_metrics(name: str) -> None:
    stats = unpaired_stats() if name == "kto" else paired_stats()
    result = get_loss(name)(stats)
    assert result.loss.shape == () and result.loss.requires_grad and torch.isfinite(result.loss)
    assert result.metrics
    for key, value in result.metrics.items():
        assert isinstance(value, torch.Tensor) and value.shape == (), key
        assert not value.requires_grad and torch.isfinite(value), key
    result.loss.backward()


@pytest.mark.parametrize("name", ["dpo", "robust_dpo", "ipo", "hinge"])
def test_reference_losses_require_reference(name: str) -> None:
    stats = paired_stats()
    stats.ref_rejected_logps = None
    with pytest.raises(ValueError, match="reference"):
        get_loss(name)(stats)


# ------------------------------------------------------------------------------------- batch values


def test_dpo_objective_hand_value_with_and_without_weights() -> None:
    # margins 1 and -1 at beta = ln 3: losses -log(3/4) and -log(1/4).
    per_pair = [-math.log(0.75), -math.log(0.25)]
    plain = get_loss("dpo")(paired_stats(), beta=math.log(3))
    assert plain.loss.item() == pytest.approx(sum(per_pair) / 2, rel=1e-12)
    weighted = get_loss("dpo")(paired_stats(weights=t64(3.0, 1.0)), beta=math.log(3))
    assert weighted.loss.item() == pytest.approx((3 * per_pair[0] + per_pair[1]) / 4, rel=1e-12)


def test_preference_metrics_hand_values() -> None:
    # beta = 0.5; rho_w = [2, -1], rho_l = [0, 1] -> rewards chosen [1, -0.5], rejected [0, 0.5].
    metrics = preference_metrics(t64(2.0, -1.0), t64(0.0, 1.0), 0.5, t64(-10.0, -20.0), t64(-30.0, -40.0))
    expected = {
        "rewards/chosen": 0.25,
        "rewards/rejected": 0.25,
        "rewards/margins": 0.0,
        "rewards/accuracies": 0.5,
        "logps/chosen": -15.0,
        "logps/rejected": -35.0,
    }
    assert {k: pytest.approx(v.item()) for k, v in metrics.items()} == expected


def test_ipo_objective_uses_length_normalised_logratios() -> None:
    # Per-token rho_w = [1/2, 0/4], rho_l = [0/3, 1/1] -> m = [0.5, -1]; beta = 1 -> target 0.5.
    # Losses (0.5 - 0.5)^2 = 0 and (-1 - 0.5)^2 = 2.25 -> mean 1.125.
    result = get_loss("ipo")(paired_stats(), beta=1.0)
    assert result.loss.item() == pytest.approx(1.125)
    assert result.metrics["rewards/chosen"].item() == pytest.approx(0.25)


def test_simpo_objective_hand_value_and_ignores_reference() -> None:
    # avg_w = [-4/2, -2/4] = [-2, -0.5], avg_l = [-6/3, -3/1] = [-2, -3]; beta = 2, gamma = 1:
    # arguments 2 * 0 - 1 = -1 and 2 * 2.5 - 1 = 4 -> mean of log(1 + e) and log(1 + e^-4).
    expected = (math.log1p(math.e) + math.log1p(math.exp(-4))) / 2
    stats = paired_stats()
    result = get_loss("simpo")(stats, beta=2.0, gamma=1.0)
    assert result.loss.item() == pytest.approx(expected, rel=1e-12)
    stats.ref_chosen_logps, stats.ref_rejected_logps = t64(100.0, -7.0), None
    assert get_loss("simpo")(stats, beta=2.0, gamma=1.0).loss.item() == pytest.approx(expected, rel=1e-12)


def test_sft_objective_is_token_mean_nll_of_chosen() -> None:
    # 4 / 2 = 2 and 2 / 4 = 0.5 -> 1.25; the rejected completion gets no gradient.
    stats = paired_stats()
    result = get_loss("sft")(stats)
    assert result.loss.item() == pytest.approx(1.25)
    result.loss.backward()
    torch.testing.assert_close(stats.policy_chosen_logps.grad, t64(-0.25, -0.125))
    assert stats.policy_rejected_logps.grad is None


def test_kto_objective_hand_value_and_metrics() -> None:
    # beta = 1, z = 0.5: desirable 1 - sigmoid(ln 3) = 1/4; undesirable 1 - sigmoid(0) = 1/2, w_U = 2 -> 1.
    result = get_loss("kto")(unpaired_stats(), beta=1.0, undesirable_weight=2.0)
    assert result.loss.item() == pytest.approx((0.25 + 1.0) / 2, rel=1e-12)
    metrics = {k: v.item() for k, v in result.metrics.items()}
    assert metrics["kl"] == pytest.approx(0.5)
    assert metrics["rewards/chosen"] == pytest.approx(0.5 + math.log(3))
    assert metrics["rewards/rejected"] == pytest.approx(0.5)
    assert metrics["count/desirable"] == 1 and metrics["count/undesirable"] == 1


def test_kto_objective_clamps_negative_kl_and_handles_one_sided_batch() -> None:
    stats = unpaired_stats(labels=t64(1.0, 1.0))
    stats.kl_policy_logps = t64(-9.0, -9.0)  # mean log-ratio -7 < 0 -> z = 0
    result = get_loss("kto")(stats, beta=1.0)
    # rho = [0.5 + ln 3, 0.5], z = 0: mean of sigmoid(-0.5 - ln 3) and sigmoid(-0.5).
    expected = (1 / (1 + 3 * math.exp(0.5)) + 1 / (1 + math.exp(0.5))) / 2
    assert result.loss.item() == pytest.approx(expected, rel=1e-12)
    assert result.metrics["kl"].item() == 0.0
    assert (
        result.metrics["rewards/rejected"].item() == 0.0 and result.metrics["count/undesirable"].item() == 0
    )


def test_kto_objective_without_kl_rows_raises() -> None:
    stats = unpaired_stats()
    stats.kl_policy_logps = None
    with pytest.raises(ValueError, match="kl_policy_logps"):
        get_loss("kto")(stats)


# ----------------------------------------------------------------------------------- training toys


def categorical_policy_stats(theta: torch.Tensor) -> PairedStats:
    """One prompt, four one-token completions; pairs (0 over 1) and (2 over 3); uniform reference."""
    logps = torch.log_softmax(theta, dim=0)
    ref = torch.full((2,), -math.log(4), dtype=theta.dtype)
    return PairedStats(
        policy_chosen_logps=logps[[0, 2]],
        policy_rejected_logps=logps[[1, 3]],
        chosen_lengths=torch.ones(2, dtype=theta.dtype),
        rejected_lengths=torch.ones(2, dtype=theta.dtype),
        ref_chosen_logps=ref,
        ref_rejected_logps=ref,
    )


def train_categorical(name: str, steps: int, **options: float) -> tuple[torch.Tensor, dict[str, float]]:
    theta = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([theta], lr=0.05)
    start = get_loss(name)(categorical_policy_stats(theta), **options).metrics
    for _ in range(steps):
        optimizer.zero_grad()
        get_loss(name)(categorical_policy_stats(theta), **options).loss.backward()
        optimizer.step()
    return theta.detach(), {k: v.item() for k, v in start.items()}


@pytest.mark.parametrize("name", ["dpo", "robust_dpo", "ipo", "hinge", "simpo"])
def test_training_increases_the_chosen_margin(name: str) -> None:
    theta, start = train_categorical(name, steps=60)
    assert start["rewards/margins"] == 0.0
    final = get_loss(name)(categorical_policy_stats(theta)).metrics
    assert final["rewards/margins"].item() > 0.05
    assert final["rewards/accuracies"].item() == 1.0


@pytest.mark.parametrize(
    ("name", "options", "optimum"),
    [("ipo", {"beta": 0.5}, 1.0), ("dpo", {"beta": 1.0, "label_smoothing": 0.2}, math.log(4))],
)
def test_training_converges_to_the_analytic_optimum_margin(name: str, options: dict, optimum: float) -> None:
    # IPO: m* = 1 / (2 beta) = 1. cDPO: sigmoid(beta m*) = 1 - eps -> m* = logit(0.8) = ln 4.
    theta, _ = train_categorical(name, steps=400, **options)
    margins = (theta[[0, 2]] - theta[[1, 3]]).tolist()
    assert margins == pytest.approx([optimum, optimum], abs=1e-3)


def test_kto_training_separates_desirable_from_undesirable() -> None:
    theta = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([theta], lr=0.05)
    labels = t64(1.0, 0.0, 1.0, 0.0)
    for _ in range(60):
        logps = torch.log_softmax(theta, dim=0)
        stats = UnpairedStats(
            policy_logps=logps,
            lengths=torch.ones(4, dtype=torch.float64),
            labels=labels,
            ref_logps=torch.full((4,), -math.log(4), dtype=torch.float64),
            kl_policy_logps=logps.detach().roll(1),
            kl_ref_logps=torch.full((4,), -math.log(4), dtype=torch.float64),
        )
        optimizer.zero_grad()
        get_loss("kto")(stats, beta=1.0).loss.backward()
        optimizer.step()
    probabilities = torch.softmax(theta.detach(), dim=0)
    assert probabilities[labels == 1].min() > 0.25 > probabilities[labels == 0].max()
