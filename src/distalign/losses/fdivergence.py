"""f-divergences for f-DPG, computed in log space, and the f-DPG policy-gradient surrogate.

Go et al., "Aligning Language Models with Preferences through f-divergence Minimization", ICML 2023
(arXiv 2302.08215). For a policy pi and a normalised target p = P / Z,

    D_f(pi || p) = E_{x~p}[ f(t(x)) ],   t = pi(x) / p(x),   f convex, f(1) = 0,

and (fdpg.md, "The gradient") grad D_f = E_{x~pi}[ f'(t) grad log pi(x) ]: gradient descent on D_f
is REINFORCE with the *pseudo-reward* R(x) = -f'(t(x)). Everything here takes the log-ratio
``l = log t = log pi - log p`` (natural log, nats), never t itself: sequence log-ratios of tens of nats
are ordinary for language models, and t = e^l over- or underflows long before the quantities we need do.

Registered generators (``F_DIVERGENCES``; l = log t):

=================  =================================  ============================  ======================
name               f(t)                               pseudo-reward -f'(t)          D_f(pi || p)
=================  =================================  ============================  ======================
forward_kl         -log t                             e^{-l}                        KL(p || pi)   (DPG/GDC)
reverse_kl         t log t                            -l - 1                        KL(pi || p)   (RLHF)
total_variation    |t - 1| / 2                        -sign(l) / 2                  TV(pi, p)
jensen_shannon     t log(2t/(1+t)) + log(2/(1+t))     softplus(-l) - log 2          KL(pi||m) + KL(p||m)
pearson_chi2       (1 - t)^2 / t                      e^{-2l} - 1                   chi^2 Pearson(p || pi)
neyman_chi2        (t - 1)^2                          2 (1 - e^l)                   chi^2 Neyman(pi || p)
alpha (alpha=a)    (t^a - a t - (1 - a)) / (a(a-1))   (1 - e^{(a-1) l}) / (a - 1)   (E_p[t^a] - 1)/(a(a-1))
=================  =================================  ============================  ======================

Notes. ``jensen_shannon`` is the *unscaled* generator of fdpg.md: with m = (pi + p)/2 its divergence is
twice the textbook JS (range [0, 2 log 2]); a constant factor only rescales the gradient step.
The ``alpha`` family is Amari's convention; it is convex for every real a (f'' = t^{a-2}), a -> 1
gives t log t - t + 1 (reverse KL) and a -> 0 gives t - 1 - log t (forward KL); the added linear terms
have zero expectation under p, so D_f and the pseudo-reward (up to a constant, absorbed by any
baseline) match ``reverse_kl`` / ``forward_kl``. a = 1/2 is 4x the squared Hellinger distance,
a = 2 half Neyman chi^2 and a = -1 half Pearson chi^2.

Numerics: each function is finite at any log-ratio where its true value is finite and representable;
it returns +-inf where the true value is infinite or beyond the float range (e.g. forward KL's
pseudo-reward e^{-l} at l = -1e4), never NaN for non-NaN input. ``l = +inf`` (a sample the target
gives zero mass) is valid: the pseudo-reward there is -f'(inf), finite for forward KL, TV, JS, Pearson
and alpha < 1, and -inf for reverse KL, Neyman and alpha >= 1 (those divergences are infinite when pi
puts mass where p has none; :func:`fdpg_policy_gradient_loss` refuses such advantages).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from distalign.losses.base import LossResult
from distalign.registry import Registry

LOG2 = math.log(2.0)

#: ``fn(log_ratio, **params) -> Tensor`` elementwise.
LogRatioFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class FDivergence:
    """One registered generator. ``f`` and ``pseudo_reward`` take the log-ratio l = log(pi/p).

    ``conjugate_f`` is the generator of the reversed divergence, f~(u) = u f(1/u), also of a log-ratio;
    it lets :func:`f_perspective` evaluate p f(pi/p) as pi f~(p/pi) where pi > p, so no branch ever
    multiplies a huge ratio by a tiny probability. ``parameters`` names the required keyword options.
    """

    name: str
    f: LogRatioFn
    pseudo_reward: LogRatioFn
    conjugate_f: LogRatioFn
    divergence: str
    parameters: tuple[str, ...] = ()


F_DIVERGENCES: Registry[FDivergence] = Registry("f-divergence")


def _where_neg_inf(log_ratio: torch.Tensor, value_at_neg_inf: float, fn: LogRatioFn) -> torch.Tensor:
    """``fn(l)`` with l = -inf replaced by its limit; fn only ever sees finite-or-+inf inputs (no 0 * inf)."""
    at_neg_inf = torch.isneginf(log_ratio)
    safe = torch.where(at_neg_inf, torch.zeros_like(log_ratio), log_ratio)
    return torch.where(at_neg_inf, torch.full_like(log_ratio, value_at_neg_inf), fn(safe))


# --- forward / reverse KL ------------------------------------------------------------------------------
def _forward_kl_f(log_ratio: torch.Tensor) -> torch.Tensor:
    return -log_ratio


def _forward_kl_reward(log_ratio: torch.Tensor) -> torch.Tensor:
    return torch.exp(-log_ratio)


def _reverse_kl_f(log_ratio: torch.Tensor) -> torch.Tensor:
    return _where_neg_inf(log_ratio, 0.0, lambda safe: safe * torch.exp(safe))


def _reverse_kl_reward(log_ratio: torch.Tensor) -> torch.Tensor:
    return -log_ratio - 1.0


# --- total variation ------------------------------------------------------------------------------------
def _tv_f(log_ratio: torch.Tensor) -> torch.Tensor:
    return 0.5 * torch.abs(torch.expm1(log_ratio))


def _tv_reward(log_ratio: torch.Tensor) -> torch.Tensor:
    return -0.5 * torch.sign(log_ratio)


# --- Jensen-Shannon -------------------------------------------------------------------------------------
def _js_f_nonpositive(log_ratio: torch.Tensor) -> torch.Tensor:
    """f_JS(e^l) for l <= 0, where both terms are bounded: t (log 2 - softplus(-l)) + log 2 - softplus(l)."""

    def finite(safe: torch.Tensor) -> torch.Tensor:
        return torch.exp(safe) * (LOG2 - F.softplus(-safe)) + (LOG2 - F.softplus(safe))

    return _where_neg_inf(log_ratio, LOG2, finite)


def _js_f(log_ratio: torch.Tensor) -> torch.Tensor:
    # JS is self-conjugate (f(t) = t f(1/t)), so the t > 1 side is e^l f(e^{-l}) with a bounded factor.
    lower = _js_f_nonpositive(torch.clamp(log_ratio, max=0.0))
    upper = torch.exp(torch.clamp(log_ratio, min=0.0)) * _js_f_nonpositive(torch.clamp(-log_ratio, max=0.0))
    return torch.where(log_ratio <= 0, lower, upper)


def _js_reward(log_ratio: torch.Tensor) -> torch.Tensor:
    return F.softplus(-log_ratio) - LOG2


# --- chi-squared ----------------------------------------------------------------------------------------
def _pearson_f(log_ratio: torch.Tensor) -> torch.Tensor:
    # (1 - t)^2 / t = t - 2 + 1/t = 4 sinh^2(l / 2): no cancellation near t = 1.
    return 4.0 * torch.sinh(0.5 * log_ratio) ** 2


def _pearson_reward(log_ratio: torch.Tensor) -> torch.Tensor:
    return torch.expm1(-2.0 * log_ratio)


def _neyman_f(log_ratio: torch.Tensor) -> torch.Tensor:
    return torch.expm1(log_ratio) ** 2


def _neyman_reward(log_ratio: torch.Tensor) -> torch.Tensor:
    return -2.0 * torch.expm1(log_ratio)


# --- alpha family ---------------------------------------------------------------------------------------
def _alpha_f_nonpositive(log_ratio: torch.Tensor, alpha: float) -> torch.Tensor:
    """Amari's f_a(e^l) for l <= 0: (expm1(a l) - a expm1(l)) / (a (a - 1)), exact limits at a in {0, 1}."""
    if alpha == 0.0:
        return torch.expm1(log_ratio) - log_ratio
    if alpha == 1.0:
        return _where_neg_inf(log_ratio, 1.0, lambda safe: safe * torch.exp(safe) - torch.expm1(safe))
    return (torch.expm1(alpha * log_ratio) - alpha * torch.expm1(log_ratio)) / (alpha * (alpha - 1.0))


def _alpha_f(log_ratio: torch.Tensor, *, alpha: float) -> torch.Tensor:
    # For t > 1 use f_a(t) = t f_{1-a}(1/t): the second factor stays bounded (or is truly infinite).
    lower = _alpha_f_nonpositive(torch.clamp(log_ratio, max=0.0), alpha)
    reflected = _alpha_f_nonpositive(torch.clamp(-log_ratio, max=0.0), 1.0 - alpha)
    upper = torch.exp(torch.clamp(log_ratio, min=0.0)) * reflected
    return torch.where(log_ratio <= 0, lower, upper)


def _alpha_conjugate_f(log_ratio: torch.Tensor, *, alpha: float) -> torch.Tensor:
    return _alpha_f(log_ratio, alpha=1.0 - alpha)


def _alpha_reward(log_ratio: torch.Tensor, *, alpha: float) -> torch.Tensor:
    if alpha == 1.0:
        return -log_ratio
    return -torch.expm1((alpha - 1.0) * log_ratio) / (alpha - 1.0)


def _register_builtins() -> None:
    entries = [
        FDivergence("forward_kl", _forward_kl_f, _forward_kl_reward, _reverse_kl_f, "KL(p || pi)"),
        FDivergence("reverse_kl", _reverse_kl_f, _reverse_kl_reward, _forward_kl_f, "KL(pi || p)"),
        FDivergence("total_variation", _tv_f, _tv_reward, _tv_f, "TV(pi, p)"),
        FDivergence("jensen_shannon", _js_f, _js_reward, _js_f, "KL(pi || m) + KL(p || m), m = (pi + p) / 2"),
        FDivergence("pearson_chi2", _pearson_f, _pearson_reward, _neyman_f, "sum (p - pi)^2 / pi"),
        FDivergence("neyman_chi2", _neyman_f, _neyman_reward, _pearson_f, "sum (pi - p)^2 / p"),
        FDivergence(
            "alpha",
            _alpha_f,
            _alpha_reward,
            _alpha_conjugate_f,
            "(sum pi^a p^(1-a) - 1) / (a (a - 1))",
            ("alpha",),
        ),
    ]
    for entry in entries:
        F_DIVERGENCES.add(entry.name, entry)


_register_builtins()


def _checked(name: str, params: dict[str, float]) -> tuple[FDivergence, dict[str, float]]:
    entry = F_DIVERGENCES.get(name)
    missing = [p for p in entry.parameters if p not in params]
    unknown = [p for p in params if p not in entry.parameters]
    if missing or unknown:
        expected = ", ".join(entry.parameters) or "no parameters"
        raise TypeError(f"f-divergence {name!r} takes {expected}; missing {missing}, unknown {unknown}")
    return entry, {k: float(v) for k, v in params.items()}


def f_value(name: str, log_ratio: torch.Tensor, **params: float) -> torch.Tensor:
    """Generator value f(t) at t = exp(log_ratio), elementwise (same shape and dtype as ``log_ratio``)."""
    entry, params = _checked(name, params)
    return entry.f(log_ratio, **params)


def pseudo_reward(name: str, log_ratio: torch.Tensor, **params: float) -> torch.Tensor:
    """f-DPG pseudo-reward -f'(t) at t = exp(log_ratio) (Go et al. 2023; fdpg.md "The gradient"), elementwise.

    ``log_ratio`` [...]: log pi(x) - log p(x) with p *normalised* (log P(x) - log Z), nats.
    E.g. ``pseudo_reward("alpha", l, alpha=0.5)``.
    """
    entry, params = _checked(name, params)
    return entry.pseudo_reward(log_ratio, **params)


def f_perspective(name: str, log_pi: torch.Tensor, log_p: torch.Tensor, **params: float) -> torch.Tensor:
    """Per-outcome term p(x) f(pi(x)/p(x)) of D_f(pi || p), from log-masses, elementwise.

    ``sum_x f_perspective(log pi, log p) = D_f(pi || p)`` for enumerable distributions. Because the
    perspective is 1-homogeneous, ``f_perspective(log pi - log q, log p - log q)`` is the importance-
    sampling integrand p f(pi/p) / q for x ~ q. Limits are exact: p = 0 gives pi f'(inf), pi = 0 gives
    p f(0), both zero gives 0. Computed in the input dtype; pass float64 for extreme ratios.
    """
    entry, params = _checked(name, params)
    both_zero = torch.isneginf(log_pi) & torch.isneginf(log_p)
    log_ratio = torch.where(both_zero, torch.zeros_like(log_pi), log_pi - log_p)
    # p f(t) for t <= 1 and pi f~(1/t) for t > 1: each branch multiplies a mass by a bounded factor.
    lower = torch.exp(log_p) * entry.f(torch.clamp(log_ratio, max=0.0), **params)
    upper = torch.exp(log_pi) * entry.conjugate_f(torch.clamp(-log_ratio, max=0.0), **params)
    terms = torch.where(log_ratio <= 0, lower, upper)
    return torch.where(both_zero, torch.zeros_like(terms), terms)


def f_divergence(name: str, log_pi: torch.Tensor, log_p: torch.Tensor, **params: float) -> torch.Tensor:
    """Exact D_f(pi || p) of two enumerated distributions: log-masses [..., S] -> [...] (nats for KL)."""
    return f_perspective(name, log_pi, log_p, **params).sum(dim=-1)


def fdpg_pseudo_rewards(
    policy_logps: torch.Tensor,
    target_log_unnormalized: torch.Tensor,
    log_z: torch.Tensor | float,
    divergence: str,
    **params: float,
) -> torch.Tensor:
    """Pseudo-rewards R = -f'(pi/p) of sampled sequences (fdpg.md pseudocode), float64, detached.

    ``policy_logps`` [N]: log pi(x|c) summed over tokens incl. EOS; ``target_log_unnormalized`` [N]:
    log P(x|c) = log a + sum of log-scores; ``log_z``: scalar or [N] (per-context log Z_c).
    """
    log_target = target_log_unnormalized.detach().double()
    log_ratio = policy_logps.detach().double() - log_target
    log_ratio = log_ratio + torch.as_tensor(log_z, dtype=torch.float64, device=log_ratio.device)
    # A sample the target excludes has pi/p = +inf whatever log Z is; without this, a context whose
    # samples all have P = 0 (log Z_c = -inf) would give inf - inf = NaN.
    log_ratio = torch.where(torch.isneginf(log_target), torch.full_like(log_ratio, math.inf), log_ratio)
    return pseudo_reward(divergence, log_ratio, **params)


def fdpg_policy_gradient_loss(
    policy_logps: torch.Tensor,
    advantages: torch.Tensor,
    importance_weights: torch.Tensor | None = None,
) -> LossResult:
    """REINFORCE surrogate of D_f: mean_j( -w_j A_j log pi(x_j) ); its gradient estimates grad D_f.

    ``policy_logps`` [N] (with grad): log pi_theta(x_j|c_j). ``advantages`` [N]: pseudo-reward minus
    a baseline (detached). ``importance_weights`` [N]: pi/q for off-policy samples (detached, clipped
    by the caller), ``None`` on-policy. Off-policy the estimator is E_q[(pi/q) f'(pi/p) grad log pi]
    (fdpg.md); with clipped weights it is biased towards q, by design.
    """
    advantages = advantages.detach()
    if not torch.isfinite(advantages).all():
        raise ValueError(
            "non-finite f-DPG advantage: the divergence is infinite at these samples (reverse KL, Neyman "
            "chi^2 and alpha >= 1 are infinite when the policy samples x with P(x) = 0, and forward KL's "
            "e^{-l} overflows for samples far more likely under the target than the policy); use a "
            "soft constraint, or a divergence bounded there (forward_kl, jensen_shannon, total_variation)"
        )
    advantages = advantages.to(policy_logps.dtype)
    weights = torch.ones_like(advantages) if importance_weights is None else importance_weights.detach()
    weights = weights.to(policy_logps.dtype)
    loss = -(weights * advantages * policy_logps).mean()
    metrics = {
        "advantage_mean": advantages.mean().detach(),
        "advantage_abs_mean": advantages.abs().mean().detach(),
        "importance_weight_mean": weights.mean().detach(),
    }
    return LossResult(loss=loss, metrics=metrics)
