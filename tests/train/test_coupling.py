"""The linear surrogate reproduces the gradient of a batch-coupled objective over the global batch."""

import torch

from distalign.losses.base import LossResult, PairedStats, UnpairedStats
from distalign.train.coupling import concat_stats, coupling_coefficients, linear_surrogate, slice_stats


def _coupled_paired(stats: PairedStats) -> LossResult:
    # A deliberately non-decomposable objective: a soft-max over the batch of per-pair margins, plus a
    # sort (the AOT-like part) so both smooth and piecewise-linear coupling are exercised.
    margins = stats.policy_chosen_logps - stats.policy_rejected_logps
    lse = torch.logsumexp(-margins, dim=0)
    sorted_chosen = torch.sort(stats.policy_chosen_logps).values
    sorted_rejected = torch.sort(stats.policy_rejected_logps).values
    loss = lse + torch.nn.functional.softplus(sorted_rejected - sorted_chosen).mean()
    return LossResult(loss, {})


def _stats_from(theta: torch.Tensor, features: torch.Tensor) -> PairedStats:
    chosen = features[:, 0] @ theta
    rejected = features[:, 1] @ theta
    ones = torch.ones(features.shape[0], dtype=theta.dtype)
    return PairedStats(chosen, rejected, ones, ones)


def test_surrogate_gradient_equals_global_gradient_for_any_split():
    torch.manual_seed(0)
    theta = torch.randn(5, dtype=torch.float64, requires_grad=True)
    features = torch.randn(12, 2, 5, dtype=torch.float64)

    full = _coupled_paired(_stats_from(theta, features)).loss
    (expected,) = torch.autograd.grad(full, theta)

    for split in ([12], [3, 3, 3, 3], [5, 7], [1] * 12):
        with torch.no_grad():
            detached = concat_stats([_stats_from(theta, part) for part in torch.split(features, split)])
        coefficients, result = coupling_coefficients(_coupled_paired, detached)
        assert torch.allclose(result.loss, full.detach())
        total = torch.zeros_like(theta)
        offset = 0
        for part in torch.split(features, split):
            surrogate = linear_surrogate(_stats_from(theta, part), coefficients, offset)
            (grad,) = torch.autograd.grad(surrogate, theta)
            total += grad
            offset += part.shape[0]
        assert torch.allclose(total, expected, atol=1e-12), split


def test_detached_fields_get_no_coefficient():
    labels = torch.tensor([1.0, 0.0, 1.0])
    stats = UnpairedStats(
        policy_logps=torch.tensor([-1.0, -2.0, -3.0]),
        lengths=torch.ones(3),
        labels=labels,
        ref_logps=torch.zeros(3),
    )

    def objective(s: UnpairedStats) -> LossResult:
        return LossResult(((s.policy_logps - s.ref_logps) * s.labels).sum(), {})

    coefficients, _ = coupling_coefficients(objective, stats)
    assert set(coefficients) == {"policy_logps"}
    assert torch.equal(coefficients["policy_logps"], labels)


def test_slice_keeps_batch_level_kl_fields_whole():
    stats = UnpairedStats(
        policy_logps=torch.arange(4.0),
        lengths=torch.ones(4),
        labels=torch.ones(4),
        kl_policy_logps=torch.arange(3.0),
    )
    part = slice_stats(stats, 1, 3)
    assert torch.equal(part.policy_logps, torch.tensor([1.0, 2.0]))
    assert torch.equal(part.kl_policy_logps, torch.arange(3.0))
