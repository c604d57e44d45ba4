"""The report's trade-off plots: gold reward against KL (:func:`plot_frontier`) and win rate against a
designer reward, with the Pareto front (:func:`plot_designer_pareto`); PNG files, as in
:mod:`distalign.eval.plots`."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from distalign.eval.plots import REFERENCE_COLOR, save_figure
from distalign.stats.metrics import Estimate


@dataclass
class FrontierPoint:
    """One run on the reward-vs-KL plane: KL(pi || ref) in nats and mean gold reward, with optional CIs."""

    label: str
    kl: float
    reward: float
    kl_ci: tuple[float, float] | None = None
    reward_ci: tuple[float, float] | None = None


def non_dominated(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices (in input order) of the points no other point dominates when both coordinates are
    maximised: ``q`` dominates ``p`` if it is at least as high on both axes and higher on one.

    Decided on the point estimates alone: two runs whose intervals overlap are still ordered by their
    means, so a run just off the front may not be worse beyond noise (read the CIs beside it). Equal
    points do not dominate each other, so ties are all on the front. A point with a NaN coordinate is
    never on the front and dominates nothing.
    """
    finite = [i for i, (x, y) in enumerate(points) if not (math.isnan(x) or math.isnan(y))]
    front = []
    for i in finite:
        x, y = points[i]
        beaten = any(
            points[j][0] >= x and points[j][1] >= y and (points[j][0] > x or points[j][1] > y) for j in finite
        )
        if not beaten:
            front.append(i)
    return front


def pareto_front(points: Sequence[FrontierPoint]) -> list[FrontierPoint]:
    """Points no other point beats on both axes (lower KL and higher reward), sorted by KL."""
    front = [points[i] for i in non_dominated([(-p.kl, p.reward) for p in points])]
    return sorted(front, key=lambda p: p.kl)


def plot_frontier(
    points: Sequence[FrontierPoint],
    output: str | Path,
    *,
    title: str = "Gold reward vs KL",
    colors: Mapping[str, str] | None = None,
) -> Path:
    """Scatter of gold reward against KL(pi || ref), one labelled point per run (coloured by
    ``colors[label]`` where given), CIs as error bars, labels placed apart (:func:`_place_labels`); the
    Pareto front (less KL, more reward) is joined by a dashed line."""
    fig = Figure(figsize=(5.6, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    for p in points:
        xerr, yerr = _error_bar(p.kl, p.kl_ci), _error_bar(p.reward, p.reward_ci)
        color = (colors or {}).get(p.label)
        ax.errorbar([p.kl], [p.reward], xerr=xerr, yerr=yerr, fmt="o", capsize=3, color=color)
    front = pareto_front(points)
    if len(front) > 1:
        ax.plot([p.kl for p in front], [p.reward for p in front], linestyle="--", color="gray", linewidth=1)
    ax.set_xlabel("KL(policy || reference) [nats / sequence]")
    ax.set_ylabel("mean gold reward")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.autoscale_view()
    fig.tight_layout()  # before the labels: they are placed in display space
    _place_labels(ax, [p.kl for p in points], [p.reward for p in points], [p.label for p in points])
    return save_figure(fig, output)


def _error_bar(value: float, interval: tuple[float, float] | None) -> list[list[float]] | None:
    """matplotlib's asymmetric error bar ``[[below], [above]]`` for ``value`` and its CI (clipped at 0:
    a point estimate may sit just outside a percentile-bootstrap interval)."""
    if interval is None:
        return None
    return [[max(value - interval[0], 0.0)], [max(interval[1] - value, 0.0)]]


@dataclass
class DesignerPoint:
    """One run on the designer-score vs win-rate plane (the Pareto view of UPO-style sweeps)."""

    label: str
    designer: Estimate
    """Mean composite designer score of the policy's samples, with CI (higher is better)."""
    win_rate: Estimate
    """Gold-reward win rate of the policy against the reference, with CI."""
    dpo: bool = False
    """A plain DPO run: the baseline that ignores the designer, drawn distinctly."""


#: Label positions tried around a point, in typographic points (dx, dy); the first free one is used.
_LABEL_OFFSETS = (
    (6, 5),
    (6, -5),
    (-6, 5),
    (-6, -5),
    (0, 11),
    (0, -11),
    (6, 19),
    (-6, 19),
    (6, -19),
    (-6, -19),
)
_LABEL_FONTSIZE = 8


def _label_box(anchor: np.ndarray, offset: tuple[int, int], text: str, scale: float) -> tuple:
    """Approximate display-space box (x0, y0, x1, y1) of a label placed at ``offset`` from ``anchor``,
    with 3 points of margin all round so that labels that merely touch count as overlapping; character
    width taken as 0.6 of the font size, which is close enough to tell overlaps apart."""
    width = 0.6 * _LABEL_FONTSIZE * len(text) * scale
    height = _LABEL_FONTSIZE * 1.2 * scale
    x = anchor[0] + offset[0] * scale
    y = anchor[1] + offset[1] * scale
    x0 = x if offset[0] > 0 else x - width if offset[0] < 0 else x - width / 2
    y0 = y if offset[1] >= 0 else y - height
    margin = 3 * scale
    return (x0 - margin, y0 - margin, x0 + width + margin, y0 + height + margin)


def _overlap(a: tuple, b: tuple) -> float:
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def _place_labels(
    ax: Any, xs: Sequence[float], ys: Sequence[float], labels: Sequence[str], obstacles: Sequence = ()
) -> None:
    """Annotate each point, trying a few offsets and keeping the one that covers the fewest already
    placed labels and markers (the points' and the ``obstacles``' (x, y)): a greedy stand-in for a
    label-repelling library."""
    scale = ax.figure.dpi / 72.0
    anchors = ax.transData.transform(np.column_stack([xs, ys]))
    marker = 4 * scale
    spots = [*anchors, *(ax.transData.transform(np.asarray(obstacles)) if len(obstacles) else [])]
    taken = [(x - marker, y - marker, x + marker, y + marker) for x, y in spots]
    for anchor, text in sorted(zip(anchors, labels), key=lambda item: (item[0][0], item[0][1])):
        candidates = [(offset, _label_box(anchor, offset, text, scale)) for offset in _LABEL_OFFSETS]
        offset, box = min(candidates, key=lambda c: sum(_overlap(c[1], other) for other in taken))
        taken.append(box)
        ha = "left" if offset[0] > 0 else "right" if offset[0] < 0 else "center"
        va = "bottom" if offset[1] >= 0 else "top"
        ax.annotate(
            text,
            ax.transData.inverted().transform(anchor),
            textcoords="offset points",
            xytext=offset,
            ha=ha,
            va=va,
            fontsize=_LABEL_FONTSIZE,
        )


def plot_designer_pareto(
    points: Sequence[DesignerPoint],
    output: str | Path,
    *,
    reference: Estimate | None = None,
    title: str = "Designer score vs win rate: the Pareto view",
    colors: Mapping[str, str] | None = None,
) -> Path:
    """Scatter of the policy's designer score (x, horizontal CI bar) against its gold-reward win rate
    vs the reference (y, vertical CI bar), one labelled point per run; plain DPO runs as squares; the
    runs no other run beats on both axes (:func:`non_dominated`, on point estimates) ringed and joined;
    the reference (its designer score, win rate 0.5 by definition) as a star. With ``colors`` each run
    has its colour (the legend then shows the shapes in grey). Legend outside the axes."""
    fig = Figure(figsize=(6.8, 4.6))
    ax = fig.add_subplot(1, 1, 1)
    ax.axhline(0.5, color="gray", linestyle=":", linewidth=1)
    styles = {False: ("o", "tab:blue", "run"), True: ("s", "tab:orange", "DPO (ignores the designer)")}
    shown: set[bool] = set()
    for p in points:
        marker, color, legend = styles[p.dpo]
        if colors and p.label in colors:
            color, legend = colors[p.label], None
            if p.dpo not in shown:  # a grey stand-in for the shape's legend entry
                ax.plot([], [], marker, color="0.45", linestyle="none", label=styles[p.dpo][2])
        ax.errorbar(
            [p.designer.value],
            [p.win_rate.value],
            xerr=_error_bar(p.designer.value, (p.designer.low, p.designer.high)),
            yerr=_error_bar(p.win_rate.value, (p.win_rate.low, p.win_rate.high)),
            fmt=marker,
            color=color,
            capsize=3,
            label=None if p.dpo in shown else legend,
        )
        shown.add(p.dpo)
    front = sorted(
        (points[i] for i in non_dominated([(p.designer.value, p.win_rate.value) for p in points])),
        key=lambda p: p.designer.value,
    )
    if front:
        xs, ys = [p.designer.value for p in front], [p.win_rate.value for p in front]
        # Dark and dashed, not a hue: every hue may be a run's colour.
        ax.plot(xs, ys, color="0.2", linestyle="--", linewidth=1.2, zorder=1)
        ax.scatter(xs, ys, s=170, facecolors="none", edgecolors="0.2", label="Pareto front")
    if reference is not None:
        ax.errorbar(
            [reference.value],
            [0.5],
            xerr=_error_bar(reference.value, (reference.low, reference.high)),
            fmt="*",
            color=REFERENCE_COLOR,
            markersize=12,
            capsize=3,
            zorder=1.5,  # under the runs: a run at the reference's score stays visible
            label="reference (win rate 0.5)",
        )
    ax.set_xlabel("designer score of the policy (composite, higher is better)")
    ax.set_ylabel("gold-reward win rate vs reference")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8)
    ax.autoscale_view()
    fig.tight_layout()  # before the labels: they are placed in display space, which the layout changes
    landmarks = [(reference.value, 0.5)] if reference is not None else []
    xs, ys = [p.designer.value for p in points], [p.win_rate.value for p in points]
    _place_labels(ax, xs, ys, [p.label for p in points], landmarks)
    return save_figure(fig, output)
