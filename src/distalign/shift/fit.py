"""Fit the DoRA density ratio from golden-vs-source classifiers: held-out metrics, calibration, and the
fitted model as arrays + JSON.

The classifier is a pluggable :data:`Scorer`: given every row's source and the training mask, it fits
whatever it fits and returns, per synthetic source ``i``, the log-odds ``z_i = log P(golden | x) /
P(source i | x)`` on *every* row (:class:`PairScores`). :func:`logistic_scorer` fits logistic probes on
feature vectors (:func:`fit_density_ratio`: the command embeds texts first; the tests use Gaussian
points with a known ratio); ``distalign.shift.finetune`` fine-tunes a transformers classifier on the
texts. Two schemes (``FitSettings.scheme``):

* ``one-vs-golden``: one binary classifier per synthetic source, trained on the target's and source
  ``i``'s training rows;
* ``multinomial``: one softmax classifier over all sources; ``z_i = z_golden - z_i`` of its class
  logits is the log-odds of the two-class posterior restricted to {golden, i}, so every ratio comes
  from one model (``Q_0 / Q_i = (n_i / n_0) p_golden / p_i`` with the training class sizes).

Then, per synthetic source ``i``, the same code whatever the classifier:

1. the rows of every source are split once (seeded, stratified by source) into a training and a
   held-out part; classifiers see only the training part;
2. the held-out logits of the target's and source ``i``'s rows give the raw metrics (accuracy, ECE, NLL, Brier, reliability bins); the
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
from collections.abc import Callable, Sequence
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
from distalign.shift.classifier import LogisticProbe, fit_multinomial_probes, stratified_split
from distalign.shift.ratio import density_ratio, resolve_proportions

MODEL_FILE = "model.json"
ARRAYS_FILE = "classifiers.safetensors"
FORMAT_VERSION = 1
ONE_VS_GOLDEN = "one-vs-golden"
MULTINOMIAL = "multinomial"
SCHEMES = (ONE_VS_GOLDEN, MULTINOMIAL)


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
    scheme: str = ONE_VS_GOLDEN

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise SetupError(f"--scheme {self.scheme!r}: valid: {', '.join(SCHEMES)}")
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
            "scheme": self.scheme,
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
class PairScores:
    """One synthetic source's classifier output: the log-odds golden vs that source on every row."""

    logits: np.ndarray  # [N], every row of the data (train and held-out)
    probe: LogisticProbe | None = None  # scores new features; None: a fine-tuned model scores its rows only
    info: dict[str, Any] = field(default_factory=dict)  # added to the source's report (e.g. the probe's C)


Scorer = Callable[[np.ndarray, np.ndarray, "FitSettings"], dict[str, PairScores]]
"""``(sources [N] (object array), train mask [N], settings) -> {synthetic source: PairScores}``: fits
on the training rows only, following ``settings.scheme``."""


def class_indices(names: np.ndarray, target: str) -> tuple[np.ndarray, list[str]]:
    """Integer classes [N] with the target as class 0 and the synthetic sources 1..k in sorted order,
    and that order (the multinomial scheme's classes)."""
    order = [target, *sorted(set(names.tolist()) - {target})]
    index = {name: i for i, name in enumerate(order)}
    return np.array([index[name] for name in names.tolist()], dtype=np.int64), order


def logistic_scorer(features: np.ndarray) -> Scorer:
    """Logistic probes on ``features`` [N, d] (standardised; ``C`` given or cross-validated)."""
    x = np.asarray(features, dtype=np.float64)

    def score(names: np.ndarray, train: np.ndarray, settings: FitSettings) -> dict[str, PairScores]:
        if settings.scheme == MULTINOMIAL:
            classes, order = class_indices(names, settings.target)
            probes = fit_multinomial_probes(x[train], classes[train], 0, C=settings.C, seed=settings.seed)
            pairs = {order[i]: probe for i, probe in probes.items()}
        else:
            pairs = {}
            for name in sorted(set(names.tolist()) - {settings.target}):
                rows = train & ((names == settings.target) | (names == name))
                labels = (names[rows] == settings.target).astype(np.float64)
                pairs[name] = LogisticProbe.fit(x[rows], labels, C=settings.C, seed=settings.seed)
        return {name: PairScores(probe.logits(x), probe, {"C": probe.C}) for name, probe in pairs.items()}

    return score


def multiclass_metrics(pair_logits: np.ndarray, classes: np.ndarray) -> dict[str, float]:
    """Accuracy and NLL of the softmax that the pairwise log-odds ``pair_logits`` [N, k] (``z_golden -
    z_i``) determine, against ``classes`` [N] (0 = golden, i = the i-th column's source)."""
    # log p_golden = -log(1 + sum_i exp(-z_i)); log p_i = log p_golden - z_i
    negated = np.concatenate([np.zeros((len(pair_logits), 1)), -pair_logits], axis=1)
    log_p = negated - np.logaddexp.reduce(negated, axis=1, keepdims=True)
    return {
        "accuracy": float((log_p.argmax(axis=1) == classes).mean()),
        "nll": float(-log_p[np.arange(len(classes)), classes].mean()),
    }


@dataclass
class SourceFit:
    """One synthetic source's probe (None when fine-tuned), calibrator, class-size ratio and held-out
    report."""

    probe: LogisticProbe | None
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
    report: dict[str, Any] = field(default_factory=dict)  # the scheme's own metrics (multinomial)

    @property
    def synthetic(self) -> list[str]:
        return sorted(self.fits)

    @property
    def bound(self) -> float:
        return 1.0 / self.proportions[self.target]

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """Calibrated ``c_i`` [N, k] of new features, columns in :attr:`synthetic` order (logistic
        probes only: a fine-tuned classifier's values are those of the rows it was fitted on)."""
        probes = [self.fits[name].probe for name in self.synthetic]
        if any(probe is None for probe in probes):
            raise ValueError(
                "this shift model holds no probes (a fine-tuned classifier): it scores no new rows"
            )
        return self.calibrated(np.stack([probe.logits(features) for probe in probes], axis=1))

    def calibrated(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated ``c_i`` [N, k] from raw log-odds [N, k], both in :attr:`synthetic` order."""
        return np.stack(
            [self.fits[name].calibrator(logits[:, i]) for i, name in enumerate(self.synthetic)], axis=1
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
            if fit.probe is not None:
                arrays |= fit.probe.arrays(prefix)
            arrays[f"{prefix}.isotonic_x"] = fit.calibrator.thresholds_x
            arrays[f"{prefix}.isotonic_y"] = fit.calibrator.thresholds_y
            sources.append(
                {
                    "name": name,
                    "arrays": prefix,
                    "probe": None if fit.probe is None else "logistic",
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
            "report": self.report,
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
            probe = LogisticProbe.from_arrays(arrays, prefix) if source.get("probe", "logistic") else None
            fits[source["name"]] = SourceFit(probe, calibrator, source["gamma"], source["report"])
        settings = FitSettings(**record["settings"])
        return cls(record["target"], record["proportions"], fits, settings, record.get("report", {}))


def _fit_source(
    scores: PairScores, logits: np.ndarray, labels: np.ndarray, train: np.ndarray, settings: FitSettings
) -> SourceFit:
    """Evaluate / calibrate one classifier's ``logits`` of the golden and source rows on its held-out
    rows (``~train``; labels: 1 = golden)."""
    heldout = ~train
    z_held, y_held = logits[heldout], labels[heldout]
    raw = binary_metrics(Calibrator()(z_held), y_held, settings.bins)
    report: dict[str, Any] = {
        "train_rows": {"target": int(labels[train].sum()), "source": int((1 - labels[train]).sum())},
        "heldout_rows": {"target": int(y_held.sum()), "source": int((1 - y_held).sum())},
        **scores.info,
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
    return SourceFit(scores.probe, calibrator, gamma, report)


def fit_scored(
    scorer: Scorer, sources: Sequence[str], settings: FitSettings
) -> tuple[ShiftModel, np.ndarray, np.ndarray]:
    """Split the rows, fit the classifier(s) with ``scorer`` and evaluate / calibrate every source.

    Returns the model, the held-out mask [N] (rows no classifier was trained on) and the calibrated
    ``c_i`` of every row [N, k] (columns in ``model.synthetic`` order).
    """
    from distalign.shift.calibration import CALIBRATION_METHODS

    if settings.calibration not in CALIBRATION_METHODS:
        raise SetupError(f"--calibration {settings.calibration!r}: valid: {', '.join(CALIBRATION_METHODS)}")
    names = np.asarray(list(sources), dtype=object)
    proportions = check_sources(list(sources), settings)
    heldout = stratified_split(names, settings.heldout_fraction, settings.seed)
    scores = scorer(names, ~heldout, settings)
    fits = {}
    for name in sorted(scores):
        rows = (names == settings.target) | (names == name)
        labels = (names[rows] == settings.target).astype(np.float64)
        fits[name] = _fit_source(scores[name], scores[name].logits[rows], labels, ~heldout[rows], settings)
    logits = np.stack([scores[name].logits for name in sorted(scores)], axis=1)
    report: dict[str, Any] = {"scheme": settings.scheme}
    if settings.scheme == MULTINOMIAL:
        classes, _ = class_indices(names, settings.target)
        report["heldout_multiclass"] = multiclass_metrics(logits[heldout], classes[heldout])
    model = ShiftModel(settings.target, proportions, fits, settings, report)
    return model, heldout, model.calibrated(logits)


def fit_density_ratio(
    features: np.ndarray, sources: Sequence[str], settings: FitSettings
) -> tuple[ShiftModel, np.ndarray]:
    """Fit a :class:`ShiftModel` of logistic probes on ``features`` [N, d] with each row's source name.

    Returns the model and the held-out mask [N] (rows no probe was trained on).
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) != len(sources):
        raise ValueError(
            f"features must be [N, d] with one source per row, got {x.shape} and {len(sources)} sources"
        )
    model, heldout, _ = fit_scored(logistic_scorer(x), sources, settings)
    return model, heldout
