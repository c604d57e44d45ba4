"""Two empirical quantile functions on their merged grid: the 1-D optimal coupling behind AOT.

For samples U (n values) and V (m values), ``Q_U`` and ``Q_V`` are piecewise constant with breakpoints
``{i/n}`` and ``{j/m}``; on the merged grid both are constant per interval, so the integral
``integral_0^1 h(Q_U(t) - Q_V(t)) dt`` is an exact finite sum even when n != m (and the sorted mean
when n == m). Weighted samples use the breakpoints of their weighted CDFs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from distalign.losses.softsort import soft_sort as differentiable_sort


@dataclass(frozen=True)
class QuantileGrid:
    """Two empirical quantile functions on their merged piecewise-constant grid.

    Interval ``k`` is ``(t[k-1], t[k]]`` (with ``t[-1] := 0``); on it ``Q_U = positive_quantiles[k]`` and
    ``Q_V = negative_quantiles[k]``. All tensors have shape [K]; ``mass`` sums to 1.
    ``positive_index[k]`` / ``negative_index[k]`` are the samples (indices into the unsorted inputs)
    whose order statistics those are: which sample each slab of the transport plan belongs to (for a
    soft sort, the sample of that rank under the hard sort).
    """

    t: torch.Tensor
    mass: torch.Tensor
    positive_quantiles: torch.Tensor
    negative_quantiles: torch.Tensor
    positive_index: torch.Tensor
    negative_index: torch.Tensor

    @property
    def gaps(self) -> torch.Tensor:
        """``Q_U - Q_V`` per interval, shape [K]."""
        return self.positive_quantiles - self.negative_quantiles


@functools.lru_cache(maxsize=128)
def _uniform_coupling(n: int, m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact merged grid of ``{i/n} U {j/m}`` for uniform weights: (index_u, index_v, mass, t), CPU.

    Breakpoints are kept as integer numerators over ``n * m`` so that shared breakpoints merge exactly;
    on ``(t[k-1], t[k]]`` the order statistics are ``ceil(t[k] n)`` and ``ceil(t[k] m)`` (1-based).
    """
    numerators = torch.unique(torch.cat([torch.arange(1, n + 1) * m, torch.arange(1, m + 1) * n]))
    index_u = (numerators + m - 1) // m - 1
    index_v = (numerators + n - 1) // n - 1
    widths = torch.diff(numerators, prepend=numerators.new_zeros(1))
    total = float(n * m)
    return index_u, index_v, widths.double() / total, numerators.double() / total


def _weighted_coupling(
    sorted_u_weights: torch.Tensor, sorted_v_weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merged grid of two weighted empirical CDFs (weights in sorted-value order), float64."""
    cdf_u = torch.cumsum(sorted_u_weights.double(), 0) / sorted_u_weights.double().sum()
    cdf_v = torch.cumsum(sorted_v_weights.double(), 0) / sorted_v_weights.double().sum()
    cdf_u[-1] = cdf_v[-1] = 1.0  # rounding must not leave a sliver of t without a quantile
    t = torch.unique(torch.cat([cdf_u, cdf_v]))
    t = t[t > 0]
    # Q(t) = first order statistic whose CDF reaches t; constant on (t[k-1], t[k]] since CDF values are breakpoints.
    index_u = torch.searchsorted(cdf_u, t).clamp(max=cdf_u.numel() - 1)
    index_v = torch.searchsorted(cdf_v, t).clamp(max=cdf_v.numel() - 1)
    return index_u, index_v, torch.diff(t, prepend=t.new_zeros(1)), t


def checked_weights(weights: torch.Tensor | None, size: int, name: str) -> torch.Tensor | None:
    if weights is None:
        return None
    weights = weights.detach()
    if weights.shape != (size,):
        raise ValueError(f"{name} must have shape [{size}], got {tuple(weights.shape)}")
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()) or not bool(weights.sum() > 0):
        raise ValueError(f"{name} must be finite, non-negative and not all zero")
    return weights


def quantile_grid(
    positive: torch.Tensor,
    negative: torch.Tensor,
    *,
    positive_weights: torch.Tensor | None = None,
    negative_weights: torch.Tensor | None = None,
    soft_sort: bool = False,
    soft_sort_strength: float = 1.0,
) -> QuantileGrid:
    """Quantile functions of two samples on the merged grid ``{i/n} U {j/m}`` (or weighted CDF levels).

    Args:
        positive: shape [n], the sample U (rewards in nats). n >= 1.
        negative: shape [m], the sample V. m >= 1; n != m is allowed.
        positive_weights / negative_weights: optional shape [n] / [m] non-negative weights (constants)
            defining weighted empirical distributions; ``None`` = uniform (exact integer grid).
        soft_sort: replace the hard sort by :func:`distalign.losses.softsort.soft_sort` (no weights).
        soft_sort_strength: its regularisation strength ``eps`` (1 / reward units): sorted neighbours
            further apart than ``1 / eps`` are pulled together; smaller is closer to the hard sort.

    Returns:
        a :class:`QuantileGrid` with at most ``n + m - 1`` intervals, differentiable in both samples;
        computed in the common dtype of the inputs, at least float32.
    """
    for name, sample in (("positive", positive), ("negative", negative)):
        if sample.dim() != 1:
            raise ValueError(f"{name} rewards must be 1-D, got shape {tuple(sample.shape)}")
    n, m = positive.numel(), negative.numel()
    if n == 0 or m == 0:
        raise ValueError(f"AOT needs at least one sample on each side; got {n} positive and {m} negative")
    dtype = torch.promote_types(torch.promote_types(positive.dtype, negative.dtype), torch.float32)
    positive, negative = positive.to(dtype), negative.to(dtype)
    positive_weights = checked_weights(positive_weights, n, "positive_weights")
    negative_weights = checked_weights(negative_weights, m, "negative_weights")
    weighted = positive_weights is not None or negative_weights is not None
    if soft_sort:
        if weighted:
            raise ValueError("soft sorting with per-sample weights is not supported; use the hard sort")
        sorted_u = differentiable_sort(positive, strength=soft_sort_strength)
        sorted_v = differentiable_sort(negative, strength=soft_sort_strength)
        order_u = torch.argsort(positive.detach(), stable=True)
        order_v = torch.argsort(negative.detach(), stable=True)
        coupling = _uniform_coupling(n, m)
    else:
        sorted_u, order_u = torch.sort(positive)
        sorted_v, order_v = torch.sort(negative)
        if weighted:
            u_weights = positive.new_ones(n) if positive_weights is None else positive_weights
            v_weights = negative.new_ones(m) if negative_weights is None else negative_weights
            coupling = _weighted_coupling(u_weights[order_u], v_weights[order_v])
        else:
            coupling = _uniform_coupling(n, m)
    # Copy: the uniform coupling is cached and callers may modify the grid they get.
    index_u, index_v, mass, t = (part.to(positive.device, copy=True) for part in coupling)
    return QuantileGrid(
        t.to(dtype),
        mass.to(dtype),
        sorted_u[index_u],
        sorted_v[index_v],
        order_u[index_u],
        order_v[index_v],
    )
