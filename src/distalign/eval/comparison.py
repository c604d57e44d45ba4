"""The comparison section of the report: every run's settings and results in one table (with the
shared reference's row), then the plots across runs — gold-reward quantile curves, mean gold reward,
win rate, gold reward against KL — and the designer Pareto view when runs have designer scores. Every
plot takes the report's colour map, so a run has one colour throughout the page.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distalign.eval.frontier_plots import FrontierPoint, plot_designer_pareto, plot_frontier
from distalign.eval.overview import run_label, setting_cells, setting_columns
from distalign.eval.page import escape, estimate_cell
from distalign.eval.page import image as _image
from distalign.eval.page import table as _table
from distalign.eval.pareto import has_designer_scores, pareto_rows, shared_designer_reference
from distalign.eval.plots import (
    GRAD_SHARE_NOTE,
    grad_shares_by_step,
    plot_gold_rewards,
    plot_grad_share_comparison,
    plot_quantile_curves,
    plot_win_rates,
)
from distalign.stats.metrics import Estimate, EvalResult

if TYPE_CHECKING:
    from distalign.eval.run_dir import RunSummary


def _shared_reference(runs: Sequence[RunSummary]) -> Estimate | None:
    """The reference's gold reward when every evaluated run measured the same one, else ``None``."""
    refs = [r.eval.gold_reward.get("reference") for r in runs if r.eval is not None]
    if refs and all(ref is not None and ref == refs[0] for ref in refs):
        return refs[0]
    return None


RESULT_HEADERS = [
    "final loss",
    "gold reward",
    "win rate",
    "KL k1 [nats]",
    "distinct-2",
    "self-BLEU",
    "mean words",
]


def _comparison_row(run: RunSummary, colors: dict[str, str], with_aggregator: bool) -> list[Any]:
    last = run.metrics[-1] if run.metrics else {}
    row: list[Any] = [*setting_cells(run, colors, with_aggregator), last.get("loss")]
    ev = run.eval
    if ev is None:
        return row + [None] * 6
    div = ev.diversity.get("policy", {})
    words = ev.length.get("policy", {}).get("words", {})
    kl = ev.kl.k1 if ev.kl else None
    return row + [
        estimate_cell(ev.gold_reward.get("policy")),
        estimate_cell(ev.win_rate),
        estimate_cell(kl),
        div.get("distinct_2"),
        div.get("self_bleu"),
        words.get("mean"),
    ]


def comparison_section(runs: Sequence[RunSummary], assets: Path, colors: dict[str, str]) -> str:
    settings = setting_columns(runs)
    headers = [*settings, *RESULT_HEADERS]
    with_aggregator = "aggregator" in settings
    rows = [_comparison_row(run, colors, with_aggregator) for run in runs]
    reference = _shared_reference(runs)
    if reference is not None:
        blank = [None] * (len(settings) - 2)
        base = [run_label("reference", colors), "(base)", *blank, None, estimate_cell(reference), None, 0.0]
        rows.insert(0, base + _reference_diversity(runs))
    parts = ["<h2>Comparison</h2>", f'<div class="wide">{_table(headers, rows)}</div>']
    evaluated = [(r.name, r.eval) for r in runs if r.eval is not None and "policy" in r.eval.gold_reward]
    shares = _grad_share_section(runs, assets)
    if not evaluated:
        return (
            "".join(parts) + '<p class="muted">No run has eval/eval.json: no comparison plots.</p>' + shares
        )
    parts.append('<div class="plots">')  # side by side where the page is wide enough
    quantiles = _comparison_quantiles(evaluated, reference is not None)
    if quantiles is not None:
        png = plot_quantile_curves(
            quantiles["levels"],
            {k: v for k, v in quantiles.items() if k != "levels"},
            assets / "quantiles.png",
            title="Gold-reward quantiles: a curve above another dominates it",
            colors=colors,
        )
        parts.append(_image(png, "gold-reward quantile curves of every run (the dominance view)"))
    labels = [name for name, _ in evaluated] + (["reference"] if reference else [])
    rewards = [ev.gold_reward["policy"] for _, ev in evaluated] + ([reference] if reference else [])
    parts.append(
        _image(
            plot_gold_rewards(labels, rewards, assets / "gold_reward.png", colors=colors),
            "mean gold reward per run",
        )
    )
    wins = [(name, ev.win_rate) for name, ev in evaluated if ev.win_rate is not None]
    if wins:
        png = plot_win_rates(
            [n for n, _ in wins], [w for _, w in wins], assets / "win_rate.png", colors=colors
        )
        parts.append(_image(png, "win rate against the reference per run"))
    points = [_frontier_point(name, ev) for name, ev in evaluated if ev.kl is not None]
    if points:
        if reference is not None:
            points.append(
                FrontierPoint("reference", 0.0, reference.value, None, (reference.low, reference.high))
            )
        png = plot_frontier(points, assets / "frontier.png", colors=colors)
        parts.append(_image(png, "gold reward vs KL(policy || reference): the frontier"))
    parts.append("</div>")
    if any(has_designer_scores(ev) for _, ev in evaluated):
        parts.append(_designer_section(runs, assets, colors))
    return "".join(parts) + shares


def _grad_share_section(runs: Sequence[RunSummary], assets: Path) -> str:
    """Runs that logged gradient shares (train.grad_shares), side by side: each term's mean share."""
    means = {}
    for run in runs:
        steps, shares = grad_shares_by_step(run.metrics)
        if len(steps):
            means[run.name] = {term: float(values.mean()) for term, values in shares.items()}
    if len(means) < 2:
        return ""
    png = plot_grad_share_comparison(means, assets / "grad_shares.png")
    return (
        "<h3>Gradient share per loss term, per run</h3>"
        f"<p>{GRAD_SHARE_NOTE} Here each bar is a run's mean over its logged steps; each run's section "
        "shows them step by step.</p>" + _image(png, "gradient-norm share per loss term, per run")
    )


def _designer_section(runs: Sequence[RunSummary], assets: Path, colors: dict[str, str]) -> str:
    """The Pareto view of runs with designer scores: plot and table (see :mod:`distalign.eval.pareto`)."""
    rows = pareto_rows([(r.name, r.config, r.eval) for r in runs])
    reference = shared_designer_reference([r.eval for r in runs if r.eval is not None])
    png = plot_designer_pareto(
        [row.point for row in rows], assets / "designer_pareto.png", reference=reference, colors=colors
    )
    table = _table(
        [
            "run",
            "designer score [CI]",
            "difference vs reference [CI]",
            "win rate [CI]",
            "on the Pareto front",
        ],
        [
            [
                row.point.label,
                row.point.designer,
                row.difference,
                row.point.win_rate,
                "yes" if row.on_front else "no",
            ]
            for row in rows
        ],
    )
    note = (
        "Designer score: the composite designer reward of the policy's samples (higher is better); win rate: "
        "gold reward against the reference. The front joins the runs no other run beats on both, judged on "
        "point estimates: runs whose intervals overlap are not separated beyond noise. Squares are plain DPO."
    )
    if reference is None:
        note += " The runs were scored against different references, so no reference point is drawn."
    return (
        "<h3>Designer score vs win rate (Pareto view)</h3>"
        + f'<p class="muted">{escape(note)}</p>'
        + _image(png, "designer score vs gold-reward win rate: the Pareto view")
        + table
    )


def _reference_diversity(runs: Sequence[RunSummary]) -> list[Any]:
    """distinct-2, self-BLEU and mean words of the shared reference (from the first evaluated run)."""
    ev = next(r.eval for r in runs if r.eval is not None)
    div = ev.diversity.get("reference", {})
    words = ev.length.get("reference", {}).get("words", {})
    return [div.get("distinct_2"), div.get("self_bleu"), words.get("mean")]


def _comparison_quantiles(
    evaluated: Sequence[tuple[str, EvalResult]], shared_reference: bool
) -> dict[str, list[float]] | None:
    """Quantile curves of every run's policy (plus the shared reference) when all use the same levels."""
    levels = evaluated[0][1].quantiles.get("levels")
    if not levels or any(
        ev.quantiles.get("levels") != levels or "policy" not in ev.quantiles for _, ev in evaluated
    ):
        return None
    curves: dict[str, list[float]] = {"levels": levels}
    if shared_reference and "reference" in evaluated[0][1].quantiles:
        curves["reference"] = evaluated[0][1].quantiles["reference"]
    for name, ev in evaluated:
        curves[name] = ev.quantiles["policy"]
    return curves


def _frontier_point(name: str, result: EvalResult) -> FrontierPoint:
    assert result.kl is not None
    kl, reward = result.kl.k1, result.gold_reward["policy"]
    return FrontierPoint(name, kl.value, reward.value, (kl.low, kl.high), (reward.low, reward.high))
