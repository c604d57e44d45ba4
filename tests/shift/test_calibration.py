"""Classifier probabilities and calibration on synthetic features with a KNOWN posterior: 2-D Gaussians
with identity covariance, whose log-odds are linear in x."""

from __future__ import annotations

import numpy as np
import pytest

from distalign.shift.calibration import (
    Calibrator,
    binary_metrics,
    expected_calibration_error,
    fit_inverse_temperature,
    plot_reliability,
    reliability_bins,
    sigmoid,
)
from distalign.shift.classifier import LogisticProbe, stratified_split
from distalign.shift.fit import FitSettings, ShiftModel, fit_density_ratio

MEANS = {"golden": np.array([0.0, 0.0]), "gpt": np.array([1.5, 0.5]), "rambling": np.array([-0.5, -1.5])}


def _gaussian_log_density(x: np.ndarray, mean: np.ndarray) -> np.ndarray:
    return -0.5 * ((x - mean) ** 2).sum(-1)  # the shared normaliser cancels in every ratio


def _sample(counts: dict[str, int], seed: int) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(MEANS[name], 1.0, size=(n, 2)) for name, n in counts.items()])
    return x, [name for name, n in counts.items() for _ in range(n)]


def _true_logit(x: np.ndarray, n_golden: int, n_other: int, other: str = "gpt") -> np.ndarray:
    return (
        np.log(n_golden / n_other)
        + _gaussian_log_density(x, MEANS["golden"])
        - _gaussian_log_density(x, MEANS[other])
    )


def _labelled(n_golden: int, n_other: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    x, names = _sample({"golden": n_golden, "gpt": n_other}, seed)
    return x, (np.asarray(names) == "golden").astype(float)


def test_ece_hand_values_and_bins():
    p = np.array([0.05, 0.15, 0.15, 0.95, 1.0])
    y = np.array([0, 1, 0, 1, 1])
    table = reliability_bins(p, y, bins=10)
    assert table.count.tolist() == [1, 2, 0, 0, 0, 0, 0, 0, 0, 2]  # 1.0 falls in the last bin
    # |0 - 0.05| * 1 + |0.5 - 0.15| * 2 + |1 - 0.975| * 2, over 5 rows
    assert expected_calibration_error(p, y, bins=10) == pytest.approx((0.05 + 0.7 + 0.05) / 5)
    assert expected_calibration_error(np.full(4, 0.5), np.array([0, 1, 0, 1])) == 0.0


def test_fitted_probabilities_match_the_true_posterior_and_are_calibrated():
    x, y = _labelled(1500, 3000, seed=0)
    probe = LogisticProbe.fit(x, y, seed=0)
    x_test, y_test = _labelled(3000, 6000, seed=1)  # same class ratio as training
    fitted = sigmoid(probe.logits(x_test))
    true = sigmoid(_true_logit(x_test, 1500, 3000))
    assert np.abs(fitted - true).mean() < 0.02
    assert np.quantile(np.abs(fitted - true), 0.99) < 0.05
    assert expected_calibration_error(fitted, y_test) < 0.02
    assert binary_metrics(fitted, y_test)["accuracy"] == pytest.approx(
        binary_metrics(true, y_test)["accuracy"], abs=0.01
    )


@pytest.mark.parametrize("scale", [3.0, 0.3])
def test_temperature_scaling_fixes_a_mis_scaled_model(scale):
    x_cal, y_cal = _labelled(2000, 2000, seed=2)
    x_test, y_test = _labelled(4000, 4000, seed=3)
    wrong_cal = scale * _true_logit(x_cal, 1, 1)  # over- (3x) or under-confident (0.3x) logits
    wrong_test = scale * _true_logit(x_test, 1, 1)
    before = expected_calibration_error(sigmoid(wrong_test), y_test)
    calibrator = Calibrator.fit("temperature", wrong_cal, y_cal)
    after = expected_calibration_error(calibrator(wrong_test), y_test)
    assert before > 0.08
    assert after < 0.025
    assert 1 / calibrator.inverse_temperature == pytest.approx(scale, rel=0.1)
    isotonic = Calibrator.fit("isotonic", wrong_cal, y_cal)
    assert expected_calibration_error(isotonic(wrong_test), y_test) < before / 2


def test_temperature_edge_cases():
    z = np.array([-2.0, -1.0, 1.0, 2.0])
    assert fit_inverse_temperature(z, np.array([1, 1, 0, 0])) == 0.0  # anti-correlated: every p = 1/2
    separable = Calibrator("temperature", fit_inverse_temperature(z, np.array([0, 0, 1, 1])))
    assert separable.inverse_temperature > 100  # T -> 0 until the probabilities saturate
    np.testing.assert_allclose(separable(z), [0, 0, 1, 1], atol=1e-12)


def test_stratified_split_is_seeded_and_keeps_every_source_on_both_sides():
    groups = np.array(["a"] * 10 + ["b"] * 3 + ["c"] * 40)
    mask = stratified_split(groups, 0.2, seed=5)
    assert [int(mask[groups == g].sum()) for g in "abc"] == [2, 1, 8]
    assert (mask == stratified_split(groups, 0.2, seed=5)).all()
    assert (mask != stratified_split(groups, 0.2, seed=6)).any()


@pytest.mark.parametrize("calibration", ["none", "temperature", "isotonic"])
def test_fitted_density_ratio_matches_the_known_ratio(calibration, tmp_path):
    counts = {"golden": 800, "gpt": 800, "rambling": 1600}
    x, names = _sample(counts, seed=4)
    settings = FitSettings(target="golden", calibration=calibration, C=1.0)  # "auto": the test above
    model, heldout = fit_density_ratio(x, names, settings)
    assert model.proportions == {"golden": 0.25, "gpt": 0.25, "rambling": 0.5}
    assert model.fits["rambling"].gamma == pytest.approx(2.0)
    x_test, names_test = _sample(counts, seed=5)
    log_q = {name: _gaussian_log_density(x_test, mean) for name, mean in MEANS.items()}
    mixture = sum(model.proportions[name] * np.exp(log_q[name]) for name in counts)
    true_h = np.exp(log_q["golden"]) / mixture
    h = model.density_ratio(x_test)
    assert (h <= 4.0).all()
    assert np.corrcoef(h, true_h)[0, 1] > 0.95
    # isotonic is a step function fitted on 320 held-out rows: coarser than a scaled logistic
    assert np.median(np.abs(h - true_h)) < (0.15 if calibration == "isotonic" else 0.1)
    assert h.mean() == pytest.approx(1.0, abs=0.08)  # E_P[h] = 1; the test rows are drawn from P
    for name in ("gpt", "rambling"):
        report = model.fits[name].report
        assert report["heldout_rows"]["target"] == 160
        final = report.get("heldout_calibrated", report["heldout"])
        assert final["ece"] < 0.08
        assert set(report["reliability"]) == {"raw"} | ({calibration} - {"none"})
    model.save(tmp_path)
    np.testing.assert_array_equal(ShiftModel.load(tmp_path).density_ratio(x_test), h)
    assert not list(tmp_path.glob("*.pkl"))
    png = plot_reliability(ShiftModel.load(tmp_path).reliability(), tmp_path / "plot.png", title="t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
