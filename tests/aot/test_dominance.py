"""Dominance metrics on hand-made samples, and the quantile-curve plot."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distalign.stats.dominance import (
    dominance_metrics,
    ot_cost,
    plot_quantile_curves,
    quantile_curves,
    quantile_violation_rate,
    w1_gap,
)


def test_shifted_copy_dominates_with_unit_distance():
    v = np.array([0.3, -1.0, 2.0, 5.5, 0.0])
    u = v + 1.0
    assert quantile_violation_rate(u, v) == 0.0
    gap = w1_gap(u, v)
    assert gap.w1 == pytest.approx(1.0) and gap.signed_mean_gap == pytest.approx(1.0) and gap.violation == 0.0
    # The reverse direction violates everywhere, at the same distance.
    assert quantile_violation_rate(v, u) == 1.0
    assert w1_gap(v, u).violation == pytest.approx(1.0)


def test_identical_samples_do_not_violate():
    sample = [1.0, 2.0, 2.0, 3.0]
    assert quantile_violation_rate(sample, sample) == 0.0
    assert w1_gap(sample, sample).w1 == 0.0


def test_crossing_curves_by_hand():
    # u sorted (0, 4), v sorted (1, 2): gaps -1 on (0, 1/2], +2 on (1/2, 1].
    u, v = [4.0, 0.0], [2.0, 1.0]
    assert quantile_violation_rate(u, v) == pytest.approx(0.5)
    gap = w1_gap(u, v)
    assert gap.w1 == pytest.approx(1.5)
    assert gap.signed_mean_gap == pytest.approx(0.5)  # mean(u) - mean(v) = 2 - 1.5
    assert gap.violation == pytest.approx(0.5)
    assert gap.w1 == pytest.approx(gap.signed_mean_gap + 2 * gap.violation)
    # least squares, margin 0: (1 + 4) / 2
    assert ot_cost(u, v, cost="least_squares", beta=0.0) == pytest.approx(2.5)


def test_unequal_sizes_use_the_merged_grid():
    # u = (0, 3) on halves, v = (1, 2, 4) on thirds: gaps -1 (1/3), -2 (1/6), 1 (1/6), -1 (1/3).
    u, v = torch.tensor([3.0, 0.0]), torch.tensor([4.0, 1.0, 2.0])
    t, q_u, q_v = quantile_curves(u, v)
    torch.testing.assert_close(t, torch.tensor([1 / 3, 1 / 2, 2 / 3, 1.0], dtype=torch.float64))
    torch.testing.assert_close(q_u, torch.tensor([0.0, 0.0, 3.0, 3.0], dtype=torch.float64))
    torch.testing.assert_close(q_v, torch.tensor([1.0, 2.0, 2.0, 4.0], dtype=torch.float64))
    assert quantile_violation_rate(u, v) == pytest.approx(1 / 3 + 1 / 6 + 1 / 3)
    assert w1_gap(u, v).w1 == pytest.approx(1 / 3 + 2 / 6 + 1 / 6 + 1 / 3)


def test_w1_matches_the_cdf_formula():
    """W1 = integral |F_u(x) - F_v(x)| dx, computed here on the real line instead of the quantile axis."""
    rng = np.random.default_rng(0)
    u, v = rng.normal(size=7), rng.normal(size=11) + 0.3
    points = np.sort(np.concatenate([u, v]))
    cdf_u = np.searchsorted(np.sort(u), points[:-1], side="right") / len(u)
    cdf_v = np.searchsorted(np.sort(v), points[:-1], side="right") / len(v)
    expected = float(np.sum(np.abs(cdf_u - cdf_v) * np.diff(points)))
    assert w1_gap(u, v).w1 == pytest.approx(expected, rel=1e-12)


def test_dominance_metrics_bundle():
    metrics = dominance_metrics([4.0, 0.0], [2.0, 1.0], cost="least_squares", beta=0.0)
    assert metrics == pytest.approx(
        {"violation_rate": 0.5, "ot_cost": 2.5, "w1": 1.5, "signed_mean_gap": 0.5, "w1_violation": 0.5}
    )


def test_plot_writes_a_png(tmp_path):
    matplotlib_image = pytest.importorskip("matplotlib.image")
    rng = np.random.default_rng(1)
    path = plot_quantile_curves(
        rng.normal(size=40) + 0.2,
        torch.randn(25),
        tmp_path / "sub" / "curves.png",
        labels=("chosen", "rejected"),
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib_image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert pixels.std() > 0.01  # not a blank canvas
