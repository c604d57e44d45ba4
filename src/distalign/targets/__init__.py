"""Energy-based targets for f-DPG: P(x|c) = a(x|c) * prod of scorers, and what it takes to use them.

* :class:`Target` combines the base model's log-prob with scorers (constraints, moment tilts, reward
  tilts) behind one batched contract; :data:`FEATURES` and :data:`SCORERS` are the plug-in registries.
* :func:`fit_moment_tilt` solves the convex dual of moment (distributional) constraints.
* :mod:`~distalign.targets.estimators`: running log Z, baselines, importance weights, divergence and
  moment monitors. :mod:`~distalign.targets.qrs`: quasi-rejection sampling of the target itself.
"""

from distalign.targets.estimators import (
    Estimate,
    ImportanceWeights,
    LogZEstimator,
    ProposalRefreshRule,
    WindowedMeanBaseline,
    clipped_importance_weights,
    effective_sample_size,
    estimate_alignment,
    estimate_divergence,
    estimate_kl_to_base,
    estimate_policy_moments,
    importance_weighted_mean,
    leave_one_out_baseline,
)
from distalign.targets.features import FEATURES, Feature, build_feature, evaluate_features
from distalign.targets.moments import MomentFit, fit_moment_tilt
from distalign.targets.qrs import (
    QRSResult,
    lm_proposer,
    log_beta_for_acceptance_rate,
    qrs_acceptance_probabilities,
    qrs_diagnostics,
    qrs_sample,
)
from distalign.targets.scorers import SCORERS, BooleanConstraint, MomentTilt, RewardTilt, Scorer, build_scorer
from distalign.targets.target import Target

__all__ = [
    "FEATURES",
    "SCORERS",
    "BooleanConstraint",
    "Estimate",
    "Feature",
    "ImportanceWeights",
    "LogZEstimator",
    "MomentFit",
    "MomentTilt",
    "ProposalRefreshRule",
    "QRSResult",
    "RewardTilt",
    "Scorer",
    "Target",
    "WindowedMeanBaseline",
    "build_feature",
    "build_scorer",
    "clipped_importance_weights",
    "effective_sample_size",
    "estimate_alignment",
    "estimate_divergence",
    "estimate_kl_to_base",
    "estimate_policy_moments",
    "evaluate_features",
    "fit_moment_tilt",
    "importance_weighted_mean",
    "leave_one_out_baseline",
    "lm_proposer",
    "log_beta_for_acceptance_rate",
    "qrs_acceptance_probabilities",
    "qrs_diagnostics",
    "qrs_sample",
]
