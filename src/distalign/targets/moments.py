"""Fitting the exponential tilt of a moment-constrained target (GDC's distributional constraints).

Target: P(x) = a(x) exp(lambda . phi(x)) with lambda chosen so that E_p[phi] = mu, the information
projection of a onto {q : E_q[phi] = mu} (Khalifa et al., ICLR 2021). With samples x_j ~ q and
log-weights lw_j = log a(x_j) - log q(x_j) (zero when q = a), the self-normalised importance-sampling
estimate of E_p[phi] is mu_hat(lambda) = sum_j s_j phi_j, s = softmax(lw + Phi lambda). It is the
gradient of the convex dual

    g(lambda) = log sum_j exp(lw_j + lambda . phi_j) - lambda . mu,

whose Hessian is the s-weighted covariance of phi. We minimise g by damped Newton with Armijo
backtracking: quadratic convergence, no step size to tune (the fixed-step loop of fdpg.md needs one).

Boolean features asked to hold with moment exactly 1 (or 0) have lambda = +inf (-inf): they are
pointwise constraints b(x) = 1[phi(x) = mu]; the remaining features are fitted on the samples that
satisfy them. If every feature is such, the target is a times the product of the constraints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class MomentFit:
    """Result of :func:`fit_moment_tilt`; tensors are float64 of shape [K].

    ``lambdas`` are the tilt coefficients (+-inf for hard constraints, see ``hard``).
    ``achieved_moments`` are the importance-sampling moments under the fitted target;
    ``max_abs_error`` = max |achieved - target|; ``converged`` is ``max_abs_error <= tolerance``.
    ``effective_sample_size`` is the ESS of the final weights (how many samples the fit rests on).
    """

    lambdas: torch.Tensor
    target_moments: torch.Tensor
    achieved_moments: torch.Tensor
    hard: torch.Tensor
    max_abs_error: float
    tolerance: float
    iterations: int
    converged: bool
    effective_sample_size: float
    num_samples: int

    def report(self) -> dict[str, object]:
        """Plain-Python summary for logs."""
        return {
            "lambdas": self.lambdas.tolist(),
            "target_moments": self.target_moments.tolist(),
            "achieved_moments": self.achieved_moments.tolist(),
            "max_abs_error": self.max_abs_error,
            "tolerance": self.tolerance,
            "iterations": self.iterations,
            "converged": self.converged,
            "effective_sample_size": self.effective_sample_size,
            "num_samples": self.num_samples,
        }


def _dual(lambdas: torch.Tensor, features: torch.Tensor, log_weights: torch.Tensor, moments: torch.Tensor):
    """Dual value g, gradient (mu_hat - mu) and Hessian (weighted covariance of phi) at ``lambdas``."""
    logits = log_weights + features @ lambdas
    value = torch.logsumexp(logits, dim=0) - lambdas @ moments
    probs = torch.softmax(logits, dim=0)
    mean = probs @ features
    centered = features - mean
    hessian = centered.T @ (probs[:, None] * centered)
    return value, mean - moments, hessian


def _value_rounding(
    lambdas: torch.Tensor, features: torch.Tensor, log_weights: torch.Tensor, moments: torch.Tensor
) -> float:
    """A generous bound on the float64 rounding error of the dual value g at ``lambdas``.

    g = logsumexp(lw + Phi lambda) - lambda . mu carries an absolute error of a few ulps of the
    magnitudes that enter it (the largest |lw_j| + sum_k |phi_jk lambda_k|, sum_k |lambda_k mu_k|, and
    log N from the sum inside the logsumexp); how many ulps depends on the summation order, i.e. on the
    CPU kernels (ATen's avx2 and avx512 logsumexp differ) and the thread count.
    """
    eps = torch.finfo(torch.float64).eps
    logit_size = float((log_weights.abs() + features.abs() @ lambdas.abs()).max())
    size = logit_size + float((lambdas * moments).abs().sum()) + math.log(features.shape[0]) + 1.0
    return 64 * eps * size


def _newton_direction(gradient: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    # A tiny ridge keeps the solve defined when features are collinear on the samples; g stays convex.
    scale = float(torch.diagonal(hessian).abs().max().clamp(min=1e-300))
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype)
    for ridge in (1e-12, 1e-9, 1e-6, 1e-3):
        try:
            return -torch.linalg.solve(hessian + ridge * scale * eye, gradient)
        except RuntimeError:
            continue
    return -gradient


def _check_reachable(features: torch.Tensor, moments: torch.Tensor) -> None:
    low, high = features.min(dim=0).values, features.max(dim=0).values
    bad = ((moments <= low) | (moments >= high)).nonzero().flatten().tolist()
    if bad:
        i = bad[0]
        raise ValueError(
            f"moment {float(moments[i])} of feature {i} is not strictly inside the range "
            f"[{float(low[i])}, {float(high[i])}] of its values on the samples: the dual has no finite "
            "solution (draw more samples, or use a boolean feature with moment 0/1 for a hard constraint)"
        )


def _hard_constraints(features: torch.Tensor, moments: torch.Tensor) -> torch.Tensor:
    boolean = ((features == 0) | (features == 1)).all(dim=0)
    return boolean & ((moments == 0) | (moments == 1))


def _newton(features, log_weights, moments, tolerance, max_iterations) -> tuple[torch.Tensor, int]:
    """Damped Newton on the dual; stops at ``tolerance`` on max |mu_hat - mu|, or when no step helps.

    Near the solution the decrease a Newton step buys in g is half the squared Newton decrement,
    -slope/2 ~ |grad|^2 / (2 H), e.g. 9e-19 at |grad| = 8e-10: far below the rounding of g itself
    (an ulp of g is 1.1e-16 for g ~ 0.57 and 1.8e-12 for g ~ 1e4, see :func:`_value_rounding`). An
    Armijo test on g alone is then decided by rounding noise: it used to reject the full Newton step
    to the exact solution (|grad| 8e-10 -> 9e-16) because the rounded g came out 2-3e-16 higher (one
    ulp at g ~ 1e4), and after 60 halvings took whatever tiny step was left, so the fit wandered at
    |grad| ~ 1e-10 until max_iterations (seen with ATen's avx2 kernels, ATEN_CPU_CAPABILITY=avx2, or
    with log-weights shifted by 1e4 on any kernel; avx512 happened to round the other way). The gradient, unlike the
    value, is computed to an absolute accuracy of a few ulps of phi, so when g moves by no more than
    its rounding a step is accepted if it shrinks ||grad||^2 with the same Armijo constant (the Newton
    direction -H^-1 grad descends ||grad||^2 too: its slope is -2 grad . H (H + ridge)^-1 grad < 0).
    If no step length passes either test the fit is stalled at float64 precision and stops there
    (``converged`` then reports honestly whether ``tolerance`` was reached).
    """
    lambdas = torch.zeros(features.shape[1], dtype=torch.float64)
    for iteration in range(max_iterations + 1):
        value, gradient, hessian = _dual(lambdas, features, log_weights, moments)
        if float(gradient.abs().max()) <= tolerance or iteration == max_iterations:
            return lambdas, iteration
        direction = _newton_direction(gradient, hessian)
        slope = float(gradient @ direction)
        if slope >= 0:  # not a descent direction (numerically singular Hessian): fall back to gradient
            direction, slope = -gradient, -float(gradient @ gradient)
        rounding = _value_rounding(lambdas, features, log_weights, moments)
        squared_norm = float(gradient @ gradient)
        step, accepted = 1.0, False
        for _ in range(60):
            candidate = lambdas + step * direction
            candidate_value, candidate_gradient, _ = _dual(candidate, features, log_weights, moments)
            if float(candidate_value) <= float(value) + 1e-4 * step * slope:
                accepted = True
            elif float(candidate_value) <= float(value) + rounding:
                # g cannot tell this step from no step: judge it by the gradient it leaves.
                candidate_norm = float(candidate_gradient @ candidate_gradient)
                accepted = candidate_norm <= (1 - 2e-4 * step) * squared_norm
            if accepted:
                break
            step *= 0.5
        if not accepted:  # no step length improves g or ||grad|| beyond rounding: float64 stall
            return lambdas, iteration
        lambdas = candidate
    return lambdas, max_iterations


def fit_moment_tilt(
    feature_values: torch.Tensor,
    target_moments: torch.Tensor | list[float],
    log_weights: torch.Tensor | None = None,
    *,
    tolerance: float = 1e-6,
    max_iterations: int = 100,
) -> MomentFit:
    """Fit lambda so that the importance-sampling moments of a exp(lambda . phi) equal ``target_moments``.

    ``feature_values`` [N, K]: phi(x_j) for samples x_j ~ q; ``target_moments`` [K]: mu;
    ``log_weights`` [N]: log a(x_j) - log q(x_j) plus the log-scores of any other factors of the target
    (``None`` when q = a; -inf drops a sample). Raises ``ValueError`` when a moment lies outside the
    range of its feature on the samples (no finite solution).
    """
    features = torch.as_tensor(feature_values, dtype=torch.float64)
    moments = torch.as_tensor(target_moments, dtype=torch.float64).reshape(-1)
    if features.ndim != 2 or features.shape[1] != moments.shape[0]:
        raise ValueError(f"feature_values must be [N, {moments.shape[0]}], got {tuple(features.shape)}")
    weights = (
        torch.zeros(features.shape[0], dtype=torch.float64) if log_weights is None else log_weights.double()
    )
    keep = torch.isfinite(weights)
    features, weights = features[keep], weights[keep]
    hard = _hard_constraints(features, moments)
    satisfied = (features[:, hard] == moments[hard]).all(dim=1)
    if not bool(satisfied.any()):
        raise ValueError("no sample satisfies the hard (boolean, moment 0/1) constraints; cannot fit")
    soft_features, soft_weights, soft_moments = (
        features[satisfied][:, ~hard],
        weights[satisfied],
        moments[~hard],
    )
    lambdas = torch.where(moments == 1, float("inf"), float("-inf")).to(torch.float64)
    iterations = 0
    if soft_moments.numel():
        _check_reachable(soft_features, soft_moments)
        soft_lambdas, iterations = _newton(
            soft_features, soft_weights, soft_moments, tolerance, max_iterations
        )
        lambdas[~hard] = soft_lambdas
    else:
        soft_lambdas = torch.zeros(0, dtype=torch.float64)
    final_logits = soft_weights + soft_features @ soft_lambdas
    probs = torch.softmax(final_logits, dim=0)
    achieved = moments.clone()
    achieved[~hard] = probs @ soft_features
    achieved[hard] = probs @ features[satisfied][:, hard] if hard.any() else achieved[hard]
    error = float((achieved - moments).abs().max()) if moments.numel() else 0.0
    ess = float(torch.exp(2 * torch.logsumexp(final_logits, 0) - torch.logsumexp(2 * final_logits, 0)))
    return MomentFit(
        lambdas=lambdas,
        target_moments=moments,
        achieved_moments=achieved,
        hard=hard,
        max_abs_error=error,
        tolerance=tolerance,
        iterations=iterations,
        converged=error <= tolerance,
        effective_sample_size=ess,
        num_samples=int(features.shape[0]),
    )
