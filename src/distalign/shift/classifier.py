"""Golden-vs-source probes: standardised features -> logistic regression, stored as arrays.

A :class:`LogisticProbe` is scikit-learn's ``LogisticRegression`` (L2, lbfgs) on features standardised
with the training split's mean and standard deviation. The inverse regularisation ``C`` is given, or
chosen (``C="auto"``) among ``AUTO_CS`` by stratified cross-validated log-loss on the training split
(refitted on the whole training split). Only arrays are kept (mean, scale, coefficients, intercept), so a fitted
probe is saved in safetensors and applied with numpy: no pickles, and scikit-learn is needed only to
fit.

:func:`fit_multinomial_probes` fits one multinomial (softmax) regression over all sources at once and
returns it as one :class:`LogisticProbe` per synthetic source: the softmax's pairwise log-odds
``z_golden - z_i`` are linear in the standardised features, so each is an ordinary probe (coefficients
``w_golden - w_i``) and is stored and applied exactly as a one-vs-golden probe is.
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
        mean, scale, standard = _standardise(x)
        chosen = _choose_c(C, standard, y, seed, minority)
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


def fit_multinomial_probes(
    features: np.ndarray,
    classes: np.ndarray,
    target: int,
    *,
    C: float | str = "auto",
    seed: int = 0,
) -> dict[int, LogisticProbe]:
    """One softmax regression on ``features`` [N, d] and integer ``classes`` [N] (every class in
    ``0..K-1`` present), returned as the pairwise probes ``{i: z_target - z_i}`` for every ``i !=
    target`` (they determine the softmax: ``log p_target = -log(1 + sum_i exp(-(z_target - z_i)))``)."""
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(classes, dtype=np.int64)
    k = int(y.max()) + 1
    counts = np.bincount(y, minlength=k)
    if x.ndim != 2 or len(x) != len(y) or (counts < 1).any():
        raise ValueError(
            f"features must be [N, d] with every class 0..{k - 1} present, got {x.shape}, {counts}"
        )
    mean, scale, standard = _standardise(x)
    chosen = _choose_c(C, standard, y, seed, int(counts.min()))
    model = _logistic(chosen, seed).fit(standard, y)
    coef = np.asarray(model.coef_, dtype=np.float64)
    intercept = np.asarray(model.intercept_, dtype=np.float64)
    if k == 2:  # scikit-learn keeps one row (class 1 vs 0) for two classes; spell out both softmax rows
        coef = np.stack([-coef[0] / 2, coef[0] / 2])
        intercept = np.array([-intercept[0] / 2, intercept[0] / 2])
    return {
        i: LogisticProbe(mean, scale, coef[target] - coef[i], float(intercept[target] - intercept[i]), chosen)
        for i in range(k)
        if i != target
    }


def _standardise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The training split's mean, scale (1 where a feature is constant) and the standardised rows."""
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale = np.where(scale > 1e-12, scale, 1.0)
    return mean, scale, (x - mean) / scale


def _choose_c(C: float | str, x: np.ndarray, y: np.ndarray, seed: int, minority: int) -> float:
    """The given ``C``, or with ``"auto"`` the cross-validated one (1.0 when a class has a single row:
    no fold could hold it out)."""
    if C != "auto":
        return float(C)
    return _cross_validated_c(x, y, seed) if minority >= 2 else 1.0


def _logistic(C: float, seed: int):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=C, max_iter=MAX_ITER, random_state=seed)


def _cross_validated_c(x: np.ndarray, y: np.ndarray, seed: int) -> float:
    """The C of ``AUTO_CS`` with the lowest mean held-out log-loss over stratified folds (ties: the
    smaller C, i.e. the stronger regularisation); ``y`` holds two or more classes."""
    from sklearn.metrics import log_loss
    from sklearn.model_selection import StratifiedKFold

    classes = sorted(set(y.tolist()))
    minority = int(min((y == c).sum() for c in classes))
    folds = StratifiedKFold(n_splits=min(MAX_CV_FOLDS, minority), shuffle=True, random_state=seed)
    losses = np.zeros(len(AUTO_CS))
    for train, test in folds.split(x, y):
        model = _logistic(AUTO_CS[0], seed)
        model.warm_start = True  # each C starts from the previous (smaller) C's solution
        for index, C in enumerate(AUTO_CS):
            model.C = C
            model.fit(x[train], y[train])
            # the full probability matrix: the same loss as P(class 1) for two classes, and multiclass works
            losses[index] += log_loss(y[test], model.predict_proba(x[test]), labels=classes)
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
