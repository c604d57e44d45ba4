"""Golden-vs-source probes: standardised features -> logistic regression, stored as arrays.

A :class:`LogisticProbe` is scikit-learn's ``LogisticRegression`` (L2, lbfgs) on features standardised
with the training split's mean and standard deviation. The inverse regularisation ``C`` is given, or
chosen (``C="auto"``) among ``AUTO_CS`` by stratified cross-validated log-loss on the training split
(refitted on the whole training split). Only arrays are kept (mean, scale, coefficients, intercept), so a fitted
probe is saved in safetensors and applied with numpy: no pickles, and scikit-learn is needed only to
fit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

AUTO_CS = tuple(float(c) for c in np.logspace(-4, 2, 13))
MAX_CV_FOLDS = 5
MAX_ITER = 2000


@dataclass
class LogisticProbe:
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float
    C: float

    @classmethod
    def fit(
        cls,
        features: np.ndarray,
        labels: np.ndarray,
        *,
        C: float | str = "auto",
        seed: int = 0,
    ) -> LogisticProbe:
        """Fit on ``features`` [N, d] and binary ``labels`` [N] (1 = golden); both classes required."""
        x = np.asarray(features, dtype=np.float64)
        y = np.asarray(labels, dtype=np.int64)
        if x.ndim != 2 or len(x) != len(y):
            raise ValueError(f"features must be [N, d] with one label per row, got {x.shape} and {y.shape}")
        minority = int(min((y == 1).sum(), (y == 0).sum()))
        if minority < 1:
            raise ValueError("a probe needs examples of both classes")
        mean = x.mean(axis=0)
        scale = x.std(axis=0)
        scale = np.where(scale > 1e-12, scale, 1.0)
        standard = (x - mean) / scale
        if C == "auto":
            chosen = _cross_validated_c(standard, y, seed) if minority >= 2 else 1.0
        else:
            chosen = float(C)
        model = _logistic(chosen, seed).fit(standard, y)
        return cls(
            mean=mean,
            scale=scale,
            coef=np.asarray(model.coef_, dtype=np.float64).reshape(-1),
            intercept=float(np.asarray(model.intercept_).reshape(-1)[0]),
            C=chosen,
        )

    def logits(self, features: np.ndarray) -> np.ndarray:
        """``log(c / (1 - c))`` per row, ``c`` = P(golden | features) under the training class sizes."""
        x = np.asarray(features, dtype=np.float64)
        return ((x - self.mean) / self.scale) @ self.coef + self.intercept

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {
            f"{prefix}.mean": self.mean,
            f"{prefix}.scale": self.scale,
            f"{prefix}.coef": self.coef,
            f"{prefix}.intercept_and_C": np.array([self.intercept, self.C]),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str) -> LogisticProbe:
        intercept, C = arrays[f"{prefix}.intercept_and_C"]
        return cls(
            mean=arrays[f"{prefix}.mean"],
            scale=arrays[f"{prefix}.scale"],
            coef=arrays[f"{prefix}.coef"],
            intercept=float(intercept),
            C=float(C),
        )


def _logistic(C: float, seed: int):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=C, max_iter=MAX_ITER, random_state=seed)


def _cross_validated_c(x: np.ndarray, y: np.ndarray, seed: int) -> float:
    """The C of ``AUTO_CS`` with the lowest mean held-out log-loss over stratified folds (ties: the
    smaller C, i.e. the stronger regularisation)."""
    from sklearn.metrics import log_loss
    from sklearn.model_selection import StratifiedKFold

    minority = int(min((y == 1).sum(), (y == 0).sum()))
    folds = StratifiedKFold(n_splits=min(MAX_CV_FOLDS, minority), shuffle=True, random_state=seed)
    losses = np.zeros(len(AUTO_CS))
    for train, test in folds.split(x, y):
        model = _logistic(AUTO_CS[0], seed)
        model.warm_start = True  # each C starts from the previous (smaller) C's solution
        for index, C in enumerate(AUTO_CS):
            model.C = C
            model.fit(x[train], y[train])
            losses[index] += log_loss(y[test], model.predict_proba(x[test])[:, 1], labels=[0, 1])
    return AUTO_CS[int(np.argmin(losses))]


def stratified_split(groups: np.ndarray, heldout_fraction: float, seed: int) -> np.ndarray:
    """A boolean mask [N] of held-out rows: in every group, ``round(fraction * n)`` rows (at least 1,
    at most n - 1) drawn with ``numpy.random.default_rng(seed)``; the same seed gives the same split."""
    groups = np.asarray(groups)
    rng = np.random.default_rng(seed)
    heldout = np.zeros(len(groups), dtype=bool)
    for group in sorted(set(groups.tolist())):
        members = np.flatnonzero(groups == group)
        take = int(min(max(round(heldout_fraction * len(members)), 1), len(members) - 1))
        heldout[rng.permutation(members)[:take]] = True
    return heldout
