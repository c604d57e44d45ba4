"""Fit the DoRA density ratio on feature vectors: one golden-vs-source probe per synthetic source,
held-out metrics, calibration, and the fitted model as arrays + JSON.

:func:`fit_density_ratio` works on any features (the command embeds texts first; the tests use
Gaussian points with a known ratio). Per synthetic source ``i``:

1. the rows of the target and of source ``i`` are split (seeded, stratified by source, the same split
   for every probe) into a training and a held-out part;
2. a :class:`~distalign.shift.classifier.LogisticProbe` is fitted on the training part;
3. its held-out logits give the raw metrics (accuracy, ECE, NLL, Brier, reliability bins); the
   calibrator (none | temperature | isotonic) is fitted on all held-out logits, and the calibrated
   metrics are *cross-fitted* (each held-out row calibrated by a calibrator fitted on the other half),
   so they are not flattered by evaluating where the calibrator was fitted;
4. ``gamma_i = n_i / n_0`` counts the rows of the set the final probabilities were fitted on: the
   training part without calibration, the held-out part with it (its class sizes are the posterior's
   prior after calibration).

``h`` then follows :func:`distalign.shift.ratio.density_ratio` with the mixture proportions.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from distalign.errors import SetupError
from distalign.shift.calibration import (
    Calibrator,
    ReliabilityBins,
    binary_metrics,
    cross_fitted_probabilities,
    reliability_bins,
)
from distalign.shift.classifier import LogisticProbe, stratified_split
from distalign.shift.ratio import density_ratio, resolve_proportions

MODEL_FILE = "model.json"
ARRAYS_FILE = "classifiers.safetensors"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class FitSettings:
    """How the probes are fitted and calibrated (every field enters the cache key)."""

    target: str
    proportions: dict[str, float] | None = None  # None: the fraction of rows per source
    calibration: str = "none"
    heldout_fraction: float = 0.2
    seed: int = 0
    C: float | str = "auto"
    bins: int = 10
    min_rows: int = 8

    def __post_init__(self) -> None:
        if not 0 < self.heldout_fraction < 1:
            raise SetupError(f"--heldout-fraction must be in (0, 1), got {self.heldout_fraction}")
        if self.bins < 1:
            raise SetupError(f"--bins must be >= 1, got {self.bins}")
        if self.min_rows < 2:
            raise SetupError(f"--min-rows must be >= 2 (a training and a held-out row), got {self.min_rows}")
        if self.C != "auto" and not float(self.C) > 0:
            raise SetupError(f"--C must be > 0 or 'auto', got {self.C}")

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "proportions": self.proportions,
            "calibration": self.calibration,
            "heldout_fraction": self.heldout_fraction,
            "seed": self.seed,
            "C": self.C,
            "bins": self.bins,
            "min_rows": self.min_rows,
        }


def check_sources(sources: Sequence[str], settings: FitSettings) -> dict[str, float]:
    """Validate the per-row sources against the settings; return the mixture proportions.

    SetupError when the target is not a source, there is no other source, or a source has fewer than
    ``min_rows`` rows; proportions as in :func:`~distalign.shift.ratio.resolve_proportions`.
    """
    counts = Counter(sources)
    names = ", ".join(f"{name} ({count})" for name, count in sorted(counts.items()))
    if settings.target not in counts:
        raise SetupError(f"--target {settings.target!r} is not a source of the data; sources (rows): {names}")
    if len(counts) < 2:
        raise SetupError(
            f"only the target source {settings.target!r} is in the data: a density ratio needs at least "
            "one other source"
        )
    small = {name: count for name, count in counts.items() if count < settings.min_rows}
    if small:
        listed = ", ".join(f"{name} ({count})" for name, count in sorted(small.items()))
        raise SetupError(
            f"too few rows to fit and evaluate a classifier (at least {settings.min_rows} per source, "
            f"--min-rows): {listed}"
        )
    return resolve_proportions(counts, settings.proportions)


@dataclass
class SourceFit:
    """One synthetic source's probe, calibrator, class-size ratio and held-out report."""

    probe: LogisticProbe
    calibrator: Calibrator
    gamma: float
    report: dict[str, Any] = field(default_factory=dict)


@dataclass
class ShiftModel:
    """Fitted probes for every synthetic source and the mixture: maps features to ``c_i`` and ``h``."""

    target: str
    proportions: dict[str, float]
    fits: dict[str, SourceFit]
    settings: FitSettings

    @property
    def synthetic(self) -> list[str]:
        return sorted(self.fits)

    @property
    def bound(self) -> float:
        return 1.0 / self.proportions[self.target]

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """Calibrated ``c_i`` [N, k], columns in :attr:`synthetic` order."""
        return np.stack(
            [self.fits[name].calibrator(self.fits[name].probe.logits(features)) for name in self.synthetic],
            axis=1,
        )

    def ratio_from_probabilities(self, probabilities: np.ndarray) -> np.ndarray:
        return density_ratio(
            probabilities,
            alpha=self.proportions[self.target],
            betas=[self.proportions[name] for name in self.synthetic],
            gammas=[self.fits[name].gamma for name in self.synthetic],
        )

    def density_ratio(self, features: np.ndarray) -> np.ndarray:
        return self.ratio_from_probabilities(self.probabilities(features))

    def reliability(self) -> dict[str, dict[str, ReliabilityBins]]:
        """Held-out reliability bins per source: ``raw`` and, when calibrated, the calibration method."""
        curves = {}
        for name in self.synthetic:
            report = self.fits[name].report
            curves[name] = {
                label: ReliabilityBins.from_json(bins) for label, bins in report["reliability"].items()
            }
        return curves

    def save(self, directory: Path) -> None:
        from safetensors.numpy import save_file

        arrays: dict[str, np.ndarray] = {}
        sources = []
        for index, name in enumerate(self.synthetic):
            fit = self.fits[name]
            prefix = f"source{index}"
            arrays |= fit.probe.arrays(prefix)
            arrays[f"{prefix}.isotonic_x"] = fit.calibrator.thresholds_x
            arrays[f"{prefix}.isotonic_y"] = fit.calibrator.thresholds_y
            sources.append(
                {
                    "name": name,
                    "arrays": prefix,
                    "gamma": fit.gamma,
                    "calibration": fit.calibrator.method,
                    "inverse_temperature": fit.calibrator.inverse_temperature,
                    "report": fit.report,
                }
            )
        save_file(
            {k: np.ascontiguousarray(v, dtype=np.float64) for k, v in arrays.items()}, directory / ARRAYS_FILE
        )
        record = {
            "format_version": FORMAT_VERSION,
            "target": self.target,
            "proportions": self.proportions,
            "settings": self.settings.to_json(),
            "sources": sources,
        }
        (directory / MODEL_FILE).write_text(json.dumps(record, indent=2, allow_nan=False) + "\n")

    @classmethod
    def load(cls, directory: Path) -> ShiftModel:
        from safetensors.numpy import load_file

        record = json.loads((directory / MODEL_FILE).read_text())
        if record.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{directory}: unsupported shift model format {record.get('format_version')}")
        arrays = load_file(directory / ARRAYS_FILE)
        fits = {}
        for source in record["sources"]:
            prefix = source["arrays"]
            calibrator = Calibrator(
                source["calibration"],
                inverse_temperature=source["inverse_temperature"],
                thresholds_x=arrays[f"{prefix}.isotonic_x"],
                thresholds_y=arrays[f"{prefix}.isotonic_y"],
            )
            fits[source["name"]] = SourceFit(
                LogisticProbe.from_arrays(arrays, prefix), calibrator, source["gamma"], source["report"]
            )
        return cls(record["target"], record["proportions"], fits, FitSettings(**record["settings"]))


def _fit_source(
    features: np.ndarray, labels: np.ndarray, train: np.ndarray, settings: FitSettings
) -> SourceFit:
    """Fit one probe on ``train`` rows and evaluate / calibrate it on the others (labels: 1 = golden)."""
    heldout = ~train
    probe = LogisticProbe.fit(features[train], labels[train], C=settings.C, seed=settings.seed)
    z_held, y_held = probe.logits(features[heldout]), labels[heldout]
    raw = binary_metrics(Calibrator()(z_held), y_held, settings.bins)
    report: dict[str, Any] = {
        "train_rows": {"target": int(labels[train].sum()), "source": int((1 - labels[train]).sum())},
        "heldout_rows": {"target": int(y_held.sum()), "source": int((1 - y_held).sum())},
        "C": probe.C,
        "heldout": raw,
        "reliability": {"raw": reliability_bins(Calibrator()(z_held), y_held, settings.bins).to_json()},
    }
    method = settings.calibration
    if method == "none":
        calibrator = Calibrator()
        counts = report["train_rows"]
    else:
        if len(np.unique(y_held)) < 2:
            raise SetupError("calibration needs held-out rows of both sources; raise --heldout-fraction")
        calibrator = Calibrator.fit(method, z_held, y_held)
        crossed = cross_fitted_probabilities(method, z_held, y_held, seed=settings.seed)
        report["heldout_calibrated"] = binary_metrics(crossed, y_held, settings.bins)
        report["reliability"][method] = reliability_bins(crossed, y_held, settings.bins).to_json()
        report["calibrator"] = calibrator.describe()
        counts = report["heldout_rows"]
    gamma = counts["source"] / counts["target"]
    return SourceFit(probe, calibrator, gamma, report)


def fit_density_ratio(
    features: np.ndarray, sources: Sequence[str], settings: FitSettings
) -> tuple[ShiftModel, np.ndarray]:
    """Fit a :class:`ShiftModel` on ``features`` [N, d] with each row's source name.

    Returns the model and the held-out mask [N] (rows no probe was trained on).
    """
    from distalign.shift.calibration import CALIBRATION_METHODS

    if settings.calibration not in CALIBRATION_METHODS:
        raise SetupError(f"--calibration {settings.calibration!r}: valid: {', '.join(CALIBRATION_METHODS)}")
    x = np.asarray(features, dtype=np.float64)
    names = np.asarray(list(sources), dtype=object)
    if x.ndim != 2 or len(x) != len(names):
        raise ValueError(
            f"features must be [N, d] with one source per row, got {x.shape} and {len(names)} sources"
        )
    proportions = check_sources(list(sources), settings)
    heldout = stratified_split(names, settings.heldout_fraction, settings.seed)
    fits = {}
    for name in sorted(set(proportions) - {settings.target}):
        rows = (names == settings.target) | (names == name)
        labels = (names[rows] == settings.target).astype(np.float64)
        fits[name] = _fit_source(x[rows], labels, ~heldout[rows], settings)
    return ShiftModel(settings.target, proportions, fits, settings), heldout
