"""Calibration of a binary classifier's probabilities: ECE, reliability bins, temperature and isotonic
scaling, and the reliability plot.

Conventions (used throughout ``distalign.shift``):

* The probability is that of the *positive* class (the golden source), ``c`` in [0, 1]; labels are 1
  for golden, 0 otherwise.
* ECE uses ``bins`` equal-width bins on [0, 1] (bin ``b`` holds ``b/B <= c < (b+1)/B``, the last bin
  also holds ``c = 1``): ``ECE = sum_b (n_b / N) |mean label_b - mean c_b|`` over non-empty bins. It
  measures the calibration of ``c`` itself (what the density ratio uses), not of the top-label
  confidence ``max(c, 1 - c)``.
* Temperature scaling replaces the logit ``z`` by ``z / T``, with ``T`` minimising the negative
  log-likelihood of the labels (the NLL is convex in ``1 / T``; solved by bisection on its derivative,
  ``1 / T`` in ``[0, MAX_INVERSE_TEMPERATURE]``; a classifier no better than chance gets ``1 / T = 0``,
  i.e. every probability 1/2).
* Isotonic scaling is scikit-learn's ``IsotonicRegression`` (``out_of_bounds="clip"``) fitted on the
  probabilities; it predicts by linear interpolation between its thresholds, so the fitted map is
  stored as two arrays and applied with ``numpy.interp`` (no pickles).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

CalibrationMethod = Literal["none", "temperature", "isotonic"]
CALIBRATION_METHODS: tuple[str, ...] = ("none", "temperature", "isotonic")
DEFAULT_BINS = 10
MAX_INVERSE_TEMPERATURE = 1e3
_EPS = 1e-12


def sigmoid(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -z))


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def _check(probabilities: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    if p.shape != y.shape or p.size == 0:
        raise ValueError(f"{p.size} probabilities for {y.size} labels; expected the same non-zero number")
    return p, y


@dataclass
class ReliabilityBins:
    """Per equal-width bin: ``count``, mean predicted probability ``confidence`` and observed fraction of
    positives ``accuracy`` (NaN in empty bins); ``edges`` has ``bins + 1`` entries."""

    edges: np.ndarray
    count: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray

    @classmethod
    def from_json(cls, record: dict[str, list]) -> ReliabilityBins:
        def array(values: list) -> np.ndarray:
            return np.array([np.nan if v is None else v for v in values], dtype=np.float64)

        return cls(
            np.asarray(record["edges"], dtype=np.float64),
            np.asarray(record["count"], dtype=np.int64),
            array(record["confidence"]),
            array(record["accuracy"]),
        )

    def to_json(self) -> dict[str, list]:
        def clean(values: np.ndarray) -> list:
            return [None if np.isnan(v) else float(v) for v in values]

        return {
            "edges": [float(e) for e in self.edges],
            "count": [int(c) for c in self.count],
            "confidence": clean(self.confidence),
            "accuracy": clean(self.accuracy),
        }


def reliability_bins(
    probabilities: np.ndarray, labels: np.ndarray, bins: int = DEFAULT_BINS
) -> ReliabilityBins:
    p, y = _check(probabilities, labels)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip((p * bins).astype(np.int64), 0, bins - 1)
    count = np.bincount(index, minlength=bins).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.bincount(index, weights=p, minlength=bins) / count
        accuracy = np.bincount(index, weights=y, minlength=bins) / count
    return ReliabilityBins(edges, count, confidence, accuracy)


def expected_calibration_error(
    probabilities: np.ndarray, labels: np.ndarray, bins: int = DEFAULT_BINS
) -> float:
    """Equal-width-bin ECE of the positive-class probability (module docstring)."""
    table = reliability_bins(probabilities, labels, bins)
    filled = table.count > 0
    gaps = np.abs(table.accuracy[filled] - table.confidence[filled])
    return float((table.count[filled] * gaps).sum() / table.count.sum())


def binary_metrics(
    probabilities: np.ndarray, labels: np.ndarray, bins: int = DEFAULT_BINS
) -> dict[str, float]:
    """``accuracy`` (threshold 1/2), ``ece``, ``nll`` (mean) and ``brier`` of positive-class probabilities."""
    p, y = _check(probabilities, labels)
    clipped = np.clip(p, _EPS, 1 - _EPS)
    nll = -(y * np.log(clipped) + (1 - y) * np.log1p(-clipped)).mean()
    return {
        "accuracy": float(((p >= 0.5) == (y > 0.5)).mean()),
        "ece": expected_calibration_error(p, y, bins),
        "nll": float(nll),
        "brier": float(((p - y) ** 2).mean()),
    }


def fit_inverse_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """``1 / T`` minimising ``NLL(sigmoid(z / T), y)``: the root of the (increasing) derivative
    ``sum (sigmoid(s z) - y) z`` in ``s``, by bisection on ``[0, MAX_INVERSE_TEMPERATURE]``."""
    z, y = _check(logits, labels)

    def derivative(s: float) -> float:
        return float(((sigmoid(s * z) - y) * z).sum())

    if derivative(0.0) >= 0:  # no better than chance: every probability 1/2
        return 0.0
    low, high = 0.0, 1.0
    while derivative(high) < 0 and high < MAX_INVERSE_TEMPERATURE:
        low, high = high, min(2 * high, MAX_INVERSE_TEMPERATURE)
    if derivative(high) < 0:  # separable: the NLL keeps falling as T -> 0; stop at the bound
        return MAX_INVERSE_TEMPERATURE
    for _ in range(200):
        mid = 0.5 * (low + high)
        if derivative(mid) < 0:
            low = mid
        else:
            high = mid
        if high - low <= 1e-12 * max(1.0, high):
            break
    return 0.5 * (low + high)


@dataclass
class Calibrator:
    """A fitted map from raw logits to calibrated probabilities (``method`` "none" is the identity)."""

    method: CalibrationMethod = "none"
    inverse_temperature: float = 1.0
    thresholds_x: np.ndarray = field(default_factory=lambda: np.zeros(0))
    thresholds_y: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @classmethod
    def fit(cls, method: str, logits: np.ndarray, labels: np.ndarray) -> Calibrator:
        if method not in CALIBRATION_METHODS:
            raise ValueError(f"unknown calibration {method!r}; valid: {', '.join(CALIBRATION_METHODS)}")
        if method == "none":
            return cls()
        if method == "temperature":
            return cls("temperature", inverse_temperature=fit_inverse_temperature(logits, labels))
        from sklearn.isotonic import IsotonicRegression

        z, y = _check(logits, labels)
        iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(sigmoid(z), y)
        return cls(
            "isotonic",
            thresholds_x=np.asarray(iso.X_thresholds_, dtype=np.float64),
            thresholds_y=np.asarray(iso.y_thresholds_, dtype=np.float64),
        )

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        z = np.asarray(logits, dtype=np.float64)
        if self.method == "none":
            return sigmoid(z)
        if self.method == "temperature":
            return sigmoid(self.inverse_temperature * z)
        return np.interp(sigmoid(z), self.thresholds_x, self.thresholds_y)

    def describe(self) -> dict:
        if self.method == "temperature":
            inverse = self.inverse_temperature
            return {"method": "temperature", "temperature": None if inverse == 0 else 1.0 / inverse}
        if self.method == "isotonic":
            return {"method": "isotonic", "thresholds": len(self.thresholds_x)}
        return {"method": "none"}


def cross_fitted_probabilities(
    method: str, logits: np.ndarray, labels: np.ndarray, *, folds: int = 2, seed: int = 0
) -> np.ndarray:
    """Calibrated probabilities where each example's calibrator was fitted on the other folds, so
    metrics computed from them are not flattered by fitting and evaluating on the same examples."""
    z, y = _check(logits, labels)
    if method == "none":
        return sigmoid(z)
    rng = np.random.default_rng(seed)
    fold_of = np.empty(len(z), dtype=np.int64)
    for value in (0.0, 1.0):  # stratified: each fold gets its share of both classes
        members = rng.permutation(np.flatnonzero(y == value))
        fold_of[members] = np.arange(len(members)) % folds
    out = np.empty(len(z))
    for fold in range(folds):
        held = fold_of == fold
        train = ~held
        if not held.any():
            continue
        if len(np.unique(y[train])) < 2:  # too few examples to fit on the rest: leave it uncalibrated
            out[held] = sigmoid(z[held])
            continue
        out[held] = Calibrator.fit(method, z[train], y[train])(z[held])
    return out


def plot_reliability(curves: dict[str, dict[str, ReliabilityBins]], path: str | Path, *, title: str) -> Path:
    """One panel per classifier (``curves[name][label]`` = bins of one variant, e.g. "raw",
    "temperature"): observed fraction golden against mean predicted probability, with the diagonal and
    bin counts as bars. Written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(curves)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 4.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="perfect")
        first = next(iter(curves[name].values()))
        centres = 0.5 * (first.edges[:-1] + first.edges[1:])
        width = first.edges[1] - first.edges[0]
        counts = ax.twinx()
        counts.bar(centres, first.count, width=width * 0.9, color="0.85", zorder=0)
        counts.set_ylabel("held-out rows per bin (raw)", color="0.5")
        ax.set_zorder(counts.get_zorder() + 1)
        ax.patch.set_visible(False)
        for label, table in curves[name].items():
            filled = table.count > 0
            ax.plot(table.confidence[filled], table.accuracy[filled], marker="o", label=label)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="predicted P(golden)", ylabel="observed fraction golden")
        ax.set_title(name)
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # renamed into place when complete
    try:
        fig.savefig(partial, format="png", dpi=110)
        os.replace(partial, path)
    finally:
        plt.close(fig)
        partial.unlink(missing_ok=True)
    return path
