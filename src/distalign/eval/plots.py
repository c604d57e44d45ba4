"""Evaluation and training plots as PNG files (matplotlib, no display needed).

Figures are built with ``matplotlib.figure.Figure`` directly rather than ``pyplot``: no global figure
state and no GUI backend, so plotting is safe in headless jobs, threads and tests. Every function
writes one PNG and returns its path.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from distalign.stats.metrics import Estimate

#: Keys of metrics.jsonl rows that are bookkeeping, not curves.
NON_CURVE_KEYS = frozenset(
    {"step", "epoch", "time", "timestamp", "wall_time", "elapsed", "samples_seen", "tokens_seen"}
)
DPI = 110

#: The reference's colour in every plot of the report.
REFERENCE_COLOR = "#4d4d4d"
#: Run colours in order: matplotlib's tab10 without its grey (the reference's), then tab20's light tones.
RUN_COLORS = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf",
    "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5",
)  # fmt: skip


def run_colors(names: Sequence[str]) -> dict[str, str]:
    """One colour per run name, in order (cycling after 18 runs), plus ``"reference"`` in
    :data:`REFERENCE_COLOR`: the report passes this map to every plot so a run keeps its colour."""
    colors = {name: RUN_COLORS[i % len(RUN_COLORS)] for i, name in enumerate(names)}
    colors["reference"] = REFERENCE_COLOR
    return colors


#: Panel titles for metric prefixes that are easy to misread: DPO-family losses log their *implicit*
#: reward, which is not the gold reward the evaluation measures.
PANEL_NOTES = {"rewards/": "implicit reward (β·log π/π_ref), not the gold reward"}


def panel_title(key: str) -> str:
    """A training-curve panel's title: the metric key, with a second line for keys in :data:`PANEL_NOTES`."""
    for prefix, note in PANEL_NOTES.items():
        if key.startswith(prefix):
            return f"{key}\n{note}"
    return key


def read_metrics_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a run's metrics.jsonl; malformed lines (e.g. a last line cut off by a crash) are skipped
    with one warning giving their count."""
    rows, bad = [], 0
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad += 1
    if bad:
        warnings.warn(f"{path}: skipped {bad} malformed line(s)", stacklevel=2)
    return rows


def curve_keys(rows: Sequence[Mapping[str, Any]], limit: int = 12) -> list[str]:
    """Numeric metric keys in first-seen order, ``loss`` first, at most ``limit``."""
    keys: dict[str, None] = {}
    for row in rows:
        for key, value in row.items():
            if key not in NON_CURVE_KEYS and isinstance(value, int | float) and not isinstance(value, bool):
                keys.setdefault(key)
    ordered = (["loss"] if "loss" in keys else []) + [k for k in keys if k != "loss"]
    return ordered[:limit]


def save_figure(fig: Figure, output: str | Path) -> Path:
    """Write ``fig`` as a PNG at ``output`` (its folder created); returns the path."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, format="png", dpi=DPI, bbox_inches="tight")
    return output


def _moving_average(values: np.ndarray, window: int) -> np.ndarray:
    kernel = np.ones(window) / window
    return np.convolve(values, kernel, mode="valid")


def plot_training_curves(
    rows: Sequence[Mapping[str, Any]],
    output: str | Path,
    *,
    keys: Sequence[str] | None = None,
    title: str = "",
    color: str = "tab:blue",
) -> Path | None:
    """One panel per metric key against ``step`` (``keys`` default: :func:`curve_keys`), in ``color``
    (the run's); with more than 20 points a moving average over 1/20 of the run is drawn over the raw
    curve. Keys of one family ``name=<value>`` (e.g. ``weights/source=golden``, ``weights/source=hot``)
    share a panel with a legend at the best place. Panel titles: :func:`panel_title`. ``None`` if
    nothing to plot."""
    keys = list(keys) if keys is not None else curve_keys(rows)
    panels: dict[str, dict[str, np.ndarray]] = {}
    for key in keys:
        points = [(row.get("step", i), row[key]) for i, row in enumerate(rows) if _is_number(row.get(key))]
        if points:
            family, sep, member = key.rpartition("=")
            panel, label = (family, member) if sep else (key, key)
            panels.setdefault(panel, {})[label] = np.asarray(points, dtype=np.float64)
    if not panels:
        return None
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.0 * nrows))
    for index, (panel, series) in enumerate(panels.items()):
        ax = fig.add_subplot(nrows, ncols, index + 1)
        several = len(series) > 1
        for number, (label, points) in enumerate(series.items()):
            line_color = f"C{number}" if several else color
            steps, values = points[:, 0], points[:, 1]
            window = max(1, len(values) // 20)
            raw_label = None if window > 1 or not several else label
            ax.plot(
                steps,
                values,
                color=line_color,
                alpha=0.35 if window > 1 else 1.0,
                linewidth=1,
                marker="." if len(values) <= 20 else None,  # a few points (or one) stay visible
                label=raw_label,
            )
            if window > 1:
                smooth = _moving_average(values, window)
                ax.plot(
                    steps[window - 1 :],
                    smooth,
                    color=line_color,
                    linewidth=1.8,
                    label=label if several else None,
                )
        if several:
            ax.legend(fontsize=8, loc="best")
        ax.set_title(panel_title(panel), fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, output)


GRAD_SHARE_PREFIX = "grad_share_"

#: How to read the gradient-share plots (the report prints it above them).
GRAD_SHARE_NOTE = (
    "Each band is one term's share of the step's gradient norm, ||g_k|| / sum_j ||g_j|| over the trainable "
    "parameters (the bands add up to 1), on the logged steps (train.grad_shares). Unlike the terms' loss "
    "values, which have different scales and floors, these compare: the widest band is the term that "
    "moves the parameters most. A term whose weight is 0 has share 0. See docs/upo.md."
)


def grad_share_keys(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Metric keys of per-term gradient-norm shares (``upo/grad_share_aux``, ``grad_share_sft``, ...;
    logged with ``train.grad_shares``), in first-seen order."""
    keys = curve_keys(rows, limit=10_000)
    return [k for k in keys if k.rpartition("/")[2].startswith(GRAD_SHARE_PREFIX)]


def grad_shares_by_step(rows: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``(steps, {term: shares})`` over the logged steps that carry every share (the term is the key's
    part after ``grad_share_``); empty when none does."""
    keys = grad_share_keys(rows)
    logged = [row for row in rows if keys and all(_is_number(row.get(k)) for k in keys)]
    steps = np.array([row.get("step", i) for i, row in enumerate(logged)], dtype=np.float64)
    return steps, {k.rpartition(GRAD_SHARE_PREFIX)[2]: np.array([row[k] for row in logged]) for k in keys}


def _share_legend(ax) -> None:
    handles, names = ax.get_legend_handles_labels()  # listed top band first, as they are stacked
    ax.legend(handles[::-1], names[::-1], loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)


def plot_grad_shares(
    rows: Sequence[Mapping[str, Any]], output: str | Path, *, title: str = ""
) -> Path | None:
    """Each loss term's share of the gradient norm per logged step, stacked (the bands sum to 1): one
    band per key of :func:`grad_share_keys`, the legend outside the axes. ``None`` if no step has them."""
    steps, shares = grad_shares_by_step(rows)
    if not len(steps):
        return None
    colors = [f"C{i}" for i in range(len(shares))]
    fig = Figure(figsize=(7.5, 3.4))
    ax = fig.add_subplot(1, 1, 1)
    if len(steps) > 1:
        ax.stackplot(steps, list(shares.values()), labels=list(shares), colors=colors, alpha=0.85)
        ax.set_xlim(steps[0], steps[-1])
    else:  # one logged step: a stacked bar (an area needs two)
        bottom = 0.0
        for (label, share), color in zip(shares.items(), colors):
            ax.bar(steps[0], share[0], bottom=bottom, width=0.6, label=label, color=color, alpha=0.85)
            bottom += share[0]
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("step")
    ax.set_ylabel("share of the gradient norm")
    ax.set_title(title or "Gradient-norm share per loss term", fontsize=10)
    _share_legend(ax)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, output)


def plot_grad_share_comparison(shares: Mapping[str, Mapping[str, float]], output: str | Path) -> Path:
    """One horizontal stacked bar per run: each term's share of the gradient norm, averaged over the run's
    logged steps (``shares[run][term]``; a term a run lacks counts 0)."""
    runs = list(shares)
    terms = list(dict.fromkeys(term for run in runs for term in shares[run]))
    fig = Figure(figsize=(7.5, 1.4 + 0.4 * len(runs)))
    ax = fig.add_subplot(1, 1, 1)
    left = np.zeros(len(runs))
    for index, term in enumerate(terms):
        widths = np.array([shares[run].get(term, 0.0) for run in runs])
        ax.barh(runs, widths, left=left, color=f"C{index}", alpha=0.85, label=term)
        left += widths
    ax.set_xlim(0.0, 1.0)
    ax.invert_yaxis()  # the first run on top, as in the tables
    ax.set_xlabel("share of the gradient norm, mean over logged steps")
    ax.set_title("Gradient-norm share per loss term", fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, output)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def plot_estimates(
    labels: Sequence[str],
    estimates: Sequence[Estimate],
    output: str | Path,
    *,
    title: str,
    ylabel: str,
    reference_line: float | None = None,
    ylim: tuple[float, float] | None = None,
    colors: Mapping[str, str] | None = None,
) -> Path:
    """Bar chart of point estimates with their confidence intervals as error bars (one bar per label,
    coloured by ``colors[label]`` where given)."""
    values = np.array([e.value for e in estimates])
    errors = np.array([[e.value - e.low for e in estimates], [e.high - e.value for e in estimates]])
    fig = Figure(figsize=(max(4.0, 1.1 * len(labels) + 2), 3.6))
    ax = fig.add_subplot(1, 1, 1)
    positions = np.arange(len(labels))
    bar_colors = [(colors or {}).get(label, "tab:blue") for label in labels]
    ax.bar(positions, values, yerr=np.clip(errors, 0, None), capsize=5, color=bar_colors, alpha=0.85)
    ax.set_xticks(
        positions,
        list(labels),
        rotation=20 if len(labels) > 3 else 0,
        ha="right" if len(labels) > 3 else "center",
    )
    if reference_line is not None:
        ax.axhline(reference_line, color="gray", linestyle="--", linewidth=1)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, output)


def plot_gold_rewards(
    labels: Sequence[str],
    estimates: Sequence[Estimate],
    output: str | Path,
    *,
    colors: Mapping[str, str] | None = None,
) -> Path:
    """Mean gold reward per model with its CI."""
    return plot_estimates(
        labels,
        estimates,
        output,
        title="Gold reward (mean, bootstrap CI)",
        ylabel="gold reward",
        colors=colors,
    )


def plot_win_rates(
    labels: Sequence[str],
    estimates: Sequence[Estimate],
    output: str | Path,
    *,
    colors: Mapping[str, str] | None = None,
) -> Path:
    """Win rate against the reference per model, with CI and the 0.5 line of no improvement."""
    return plot_estimates(
        labels,
        estimates,
        output,
        title="Win rate vs reference (bootstrap CI)",
        ylabel="win rate",
        reference_line=0.5,
        ylim=(0, 1),
        colors=colors,
    )


def plot_quantile_curves(
    levels: Sequence[float],
    curves: Mapping[str, Sequence[float]],
    output: str | Path,
    *,
    title: str = "Gold-reward quantiles",
    ylabel: str = "gold reward",
    colors: Mapping[str, str] | None = None,
) -> Path:
    """Quantile functions (level on x, reward quantile on y), one line per model, coloured by
    ``colors[label]`` where given, the legend outside the axes. A curve lying on or above another at
    every level dominates it in the first-order stochastic sense."""
    fig = Figure(figsize=(6.8, 4.0))
    ax = fig.add_subplot(1, 1, 1)
    for label, values in curves.items():
        ax.plot(list(levels), list(values), marker=".", label=label, color=(colors or {}).get(label))
    ax.set_xlabel("quantile level")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, output)


def plot_policy_vs_reference(
    policy: Sequence[float],
    reference: Sequence[float],
    output: str | Path,
    *,
    label: str = "policy",
    color: str = RUN_COLORS[0],
    reward: str = "gold reward",
) -> Path:
    """One run's gold rewards against the reference's: their quantile functions on the merged grid
    (:func:`distalign.stats.dominance.quantile_curves`; where the policy's is below, dominance is
    violated, shaded) and their histograms; the policy in ``color``, the reference in
    :data:`REFERENCE_COLOR`, legends outside the axes."""
    from distalign.stats.dominance import draw_quantile_curves

    fig = Figure(figsize=(11.0, 3.8))
    quantiles, histogram = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    draw_quantile_curves(
        quantiles,
        policy,
        reference,
        labels=(label, "reference"),
        colors=(color, REFERENCE_COLOR),
        shade=color,
    )
    quantiles.set_xlim(0.0, 1.0)
    quantiles.set_xlabel("quantile level")
    quantiles.set_ylabel(reward)
    quantiles.set_title("Quantiles: a curve above the other dominates it", fontsize=10)
    bins = np.histogram_bin_edges(np.concatenate([np.asarray(policy), np.asarray(reference)]), bins=20)
    histogram.hist(reference, bins=bins, color=REFERENCE_COLOR, alpha=0.45, label="reference")
    histogram.hist(policy, bins=bins, color=color, alpha=0.55, label=label)
    histogram.set_xlabel(reward)
    histogram.set_ylabel("completions")
    histogram.set_title("Histogram", fontsize=10)
    for ax in (quantiles, histogram):
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8)
    fig.tight_layout()
    return save_figure(fig, output)
