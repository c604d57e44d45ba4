"""First-order stochastic dominance between two reward samples: metrics and the quantile-curve plot.

U dominates V (``U >=_FSD V``) iff ``Q_U(t) >= Q_V(t)`` for every quantile level t. AOT (Melnyk et al.
2024, arXiv 2406.05882) trains for it; these functions measure it on finite samples, using the same
merged quantile grid as the loss (:func:`distalign.losses.aot.quantile_grid`), so samples of different
sizes compare exactly: on ``(t[k-1], t[k]]`` both empirical quantile functions are constant.

Inputs are 1-D array-likes (torch tensors, numpy arrays or lists of floats), e.g. rewards of positive
and negative completions, or a policy's and a reference model's chosen-minus-rejected margins.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from distalign.losses.aot import QuantileGrid, cost_values, quantile_grid

ArrayLike = torch.Tensor | np.ndarray | Sequence[float]


def _grid(u: ArrayLike, v: ArrayLike) -> QuantileGrid:
    as_tensor = [
        torch.as_tensor(np.asarray(x, dtype=np.float64)) if not torch.is_tensor(x) else x for x in (u, v)
    ]
    return quantile_grid(*(x.detach().double().cpu().reshape(-1) for x in as_tensor))


def quantile_curves(u: ArrayLike, v: ArrayLike) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The two empirical quantile functions on their merged grid.

    Args:
        u: shape [n] sample of U; v: shape [m] sample of V (n != m allowed).

    Returns:
        ``(t, q_u, q_v)``, float64 tensors of shape [K] with K <= n + m - 1: ``t`` is the increasing
        right end of each grid interval (``t[-1] == 1``), and ``q_u[k]``, ``q_v[k]`` are the values of
        ``Q_U`` and ``Q_V`` on ``(t[k-1], t[k]]`` (``t[-1] := 0``), i.e. sorted samples, repeated.
    """
    grid = _grid(u, v)
    return grid.t, grid.positive_quantiles, grid.negative_quantiles


def quantile_violation_rate(u: ArrayLike, v: ArrayLike) -> float:
    """Fraction of quantile levels t in (0, 1] where ``Q_U(t) < Q_V(t)``; 0.0 iff U dominates V.

    For n == m this is the fraction of ranks i with ``u_(i) < v_(i)``.
    """
    grid = _grid(u, v)
    return float((grid.mass * (grid.gaps < 0)).sum())


def ot_cost(u: ArrayLike, v: ArrayLike, cost: str = "logistic", beta: float = 0.01) -> float:
    """1-D optimal-transport cost ``integral_0^1 h(Q_U(t) - Q_V(t)) dt`` (AOT's relaxed violation).

    ``cost`` / ``beta`` name an AOT cost (see :data:`distalign.losses.aot.COSTS`); no label smoothing.
    """
    grid = _grid(u, v)
    return float((grid.mass * cost_values(grid.gaps, cost=cost, beta=beta)).sum())


class W1Gap(NamedTuple):
    """Wasserstein-1 comparison of U and V, in the units of the samples.

    ``w1``: ``integral |Q_U - Q_V| dt``, the 1-Wasserstein distance (>= 0, symmetric).
    ``signed_mean_gap``: ``integral (Q_U - Q_V) dt = mean(U) - mean(V)``; positive when U is ahead on average.
    ``violation``: ``integral max(0, Q_V - Q_U) dt``, the part of ``w1`` where dominance fails; zero iff
    U dominates V. ``w1 = signed_mean_gap + 2 * violation``.
    """

    w1: float
    signed_mean_gap: float
    violation: float


def w1_gap(u: ArrayLike, v: ArrayLike) -> W1Gap:
    """1-Wasserstein distance between the empirical distributions of u and v, and its signed parts."""
    grid = _grid(u, v)
    gaps, mass = grid.gaps, grid.mass
    return W1Gap(
        w1=float((mass * gaps.abs()).sum()),
        signed_mean_gap=float((mass * gaps).sum()),
        violation=float((mass * torch.relu(-gaps)).sum()),
    )


def dominance_metrics(
    u: ArrayLike, v: ArrayLike, cost: str = "logistic", beta: float = 0.01
) -> dict[str, float]:
    """All of the above as one flat dict of floats (for reports and JSONL logs)."""
    gap = w1_gap(u, v)
    return {
        "violation_rate": quantile_violation_rate(u, v),
        "ot_cost": ot_cost(u, v, cost, beta),
        "w1": gap.w1,
        "signed_mean_gap": gap.signed_mean_gap,
        "w1_violation": gap.violation,
    }


def draw_quantile_curves(
    axes,
    u: ArrayLike,
    v: ArrayLike,
    *,
    labels: tuple[str, str] = ("positives", "negatives"),
    colors: tuple[str, str] = ("tab:blue", "tab:red"),
    shade: str | None = None,
) -> None:
    """Draw ``Q_U(t)`` and ``Q_V(t)`` on matplotlib ``axes`` as step curves over the merged quantile
    grid, and one shaded rectangle (``shade``, default V's colour) per grid interval where U's curve is
    below V's, labelled with the violated share of t."""
    t, q_u, q_v = (x.numpy() for x in quantile_curves(u, v))
    edges = np.concatenate([[0.0], t])
    axes.stairs(q_u, edges, label=labels[0], baseline=None, linewidth=2.0, color=colors[0])
    axes.stairs(q_v, edges, label=labels[1], baseline=None, linewidth=2.0, color=colors[1])
    violated = q_u < q_v
    axes.bar(
        edges[:-1][violated],
        (q_v - q_u)[violated],
        width=np.diff(edges)[violated],
        bottom=q_u[violated],
        align="edge",
        color=shade or colors[1],
        alpha=0.25,
        linewidth=0,
        label=f"dominance violated ({quantile_violation_rate(u, v):.1%} of t)",
    )


def plot_quantile_curves(
    u: ArrayLike,
    v: ArrayLike,
    path: str | Path,
    *,
    labels: tuple[str, str] = ("positives", "negatives"),
    title: str | None = None,
    ylabel: str = "reward",
) -> Path:
    """Save a PNG of ``Q_U(t)`` and ``Q_V(t)`` against t, shading where dominance is violated.

    The picture of the AOT paper's Figure 1: U first-order dominates V iff its curve is never below.

    Args:
        u, v: 1-D samples (labelled ``labels[0]`` and ``labels[1]``).
        path: output file; parent directories are created.
        title: figure title; default names the two samples.

    Returns:
        the path written.
    """
    # The object-oriented Agg API leaves pyplot's global state and backend untouched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.0, 4.0), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    draw_quantile_curves(axes, u, v, labels=labels)
    axes.set_xlim(0.0, 1.0)
    axes.set_xlabel("quantile level t")
    axes.set_ylabel(ylabel)
    axes.set_title(title if title is not None else f"Quantile curves: {labels[0]} vs {labels[1]}")
    axes.legend(loc="upper left")
    axes.grid(alpha=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path
