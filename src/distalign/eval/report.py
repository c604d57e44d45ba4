"""``write_report``: one self-contained HTML page (plus PNG files) for one or more run directories.

A run directory holds ``config.yaml`` (resolved config), ``metrics.jsonl`` (training log),
``eval/eval.json`` (:class:`~distalign.eval.metrics.EvalResult`) and optionally PNGs under ``plots/``
and ``eval/``. Every piece is optional: a missing or unreadable piece is reported on the page and the
rest still renders. Images are embedded as base64 data URIs so the page can be mailed or archived
alone, and are also written as files in ``<report stem>_files/`` beside it.
"""

from __future__ import annotations

import base64
import html
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from distalign.eval.metrics import Estimate, EvalResult
from distalign.eval.pareto import has_designer_scores, pareto_rows, shared_designer_reference
from distalign.eval.plots import (
    FrontierPoint,
    curve_keys,
    plot_designer_pareto,
    plot_frontier,
    plot_gold_rewards,
    plot_quantile_curves,
    plot_training_curves,
    plot_win_rates,
    read_metrics_jsonl,
)

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1150px; color: #222; }
h1 { border-bottom: 2px solid #ccc; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 3px 9px; text-align: left; } th { background: #f2f2f2; }
img { max-width: 100%; margin: 0.5em 0; border: 1px solid #eee; } .note { color: #a33; }
.muted { color: #777; font-size: 0.9em; } details { margin: 0.5em 0; }
"""


@dataclass
class RunSummary:
    """What could be read from one run directory; ``problems`` lists what could not."""

    name: str
    path: Path
    config: dict[str, Any] | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    eval: EvalResult | None = None
    pngs: list[Path] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def method(self) -> str:
        """The loss name from the config (``loss.name``), or "?" when unknown."""
        loss = (self.config or {}).get("loss")
        name = loss.get("name") if isinstance(loss, dict) else loss
        return str(name) if name is not None else "?"


def load_run(run_dir: str | Path, name: str | None = None) -> RunSummary:
    """Read a run directory; never raises for missing or malformed pieces (they go to ``problems``)."""
    path = Path(run_dir)
    run = RunSummary(name=name or path.name, path=path)
    if not path.is_dir():
        run.problems.append(f"{path} is not a directory")
        return run
    try:
        loaded = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8"))
        run.config = loaded if isinstance(loaded, dict) else None
    except FileNotFoundError:
        run.problems.append("no config.yaml")
    except (OSError, yaml.YAMLError) as err:
        run.problems.append(f"config.yaml unreadable: {err}")
    if (path / "metrics.jsonl").is_file():
        run.metrics = read_metrics_jsonl(path / "metrics.jsonl")
    else:
        run.problems.append("no metrics.jsonl")
    eval_path = path / "eval" / "eval.json"
    if eval_path.is_file():
        try:
            run.eval = EvalResult.load(eval_path)
        except (OSError, ValueError, KeyError, TypeError) as err:
            run.problems.append(f"eval/eval.json unreadable: {err!r}")
    else:
        run.problems.append("no eval/eval.json (run `distalign eval` to add gold-reward results)")
    run.pngs = sorted(p for sub in ("plots", "eval") for p in (path / sub).glob("*.png") if p.is_file())
    return run


def _unique_names(run_dirs: Sequence[Path]) -> list[str]:
    names: list[str] = []
    for index, run_dir in enumerate(run_dirs):
        name = run_dir.name or f"run{index}"
        if name in names:
            name = f"{run_dir.parent.name}/{name}"
        while name in names:
            name = f"{name}#{index}"
        names.append(name)
    return names


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "run"


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> ``{"a.b.c": value}``."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _fmt(value: Any) -> str:
    if isinstance(value, Estimate):
        return f"{value.value:.4g} [{value.low:.4g}, {value.high:.4g}]"
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _image(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    alt = html.escape(caption, quote=True)
    return f'<figure><img src="data:image/png;base64,{data}" alt="{alt}"><figcaption class="muted">{alt}</figcaption></figure>'


def _eval_tables(result: EvalResult) -> str:
    rows: list[list[Any]] = [
        [f"gold reward ({result.reward or 'gold'}), {m}", e] for m, e in result.gold_reward.items()
    ]
    if result.win_rate is not None:
        rows.append(["win rate vs reference (ties 1/2)", result.win_rate])
    if result.kl is not None:
        rows += [["KL(policy||ref) k1 [nats]", result.kl.k1], ["KL(policy||ref) k3 [nats]", result.kl.k3]]
    dominance_labels = {
        "violation_rate": "dominance: share of quantile levels where policy < reference",
        "w1": "W1 distance policy vs reference (gold-reward units)",
        "w1_violation": "W1 part where the policy is behind",
    }
    rows += [
        [label, result.dominance[key]] for key, label in dominance_labels.items() if key in result.dominance
    ]
    level = 100 * (1 - float(result.settings.get("alpha", 0.05)))
    parts = [_table(["metric", f"value [{level:g}% CI]"], rows)]
    models = list(result.diversity or result.length)
    if models:
        div_keys = sorted({k for m in models for k in result.diversity.get(m, {})})
        div_rows = [[k, *(result.diversity.get(m, {}).get(k) for m in models)] for k in div_keys]
        for unit in ("words", "chars"):
            for stat in ("mean", "median", "p90"):
                div_rows.append(
                    [
                        f"length {stat} ({unit})",
                        *(result.length.get(m, {}).get(unit, {}).get(stat) for m in models),
                    ]
                )
        parts.append(_table(["diversity / length", *models], div_rows))
    return "".join(parts)


WEIGHT_METRIC_PREFIXES = ("weights/", "group/")


def _run_section(run: RunSummary, assets: Path) -> str:
    parts = [f"<h2>Run: {html.escape(run.name)}</h2>", f'<p class="muted">{html.escape(str(run.path))}</p>']
    parts += [f'<p class="note">{html.escape(p)}</p>' for p in run.problems]
    if run.config:
        flat = flatten(run.config)
        summary_keys = [
            k for k in flat if k.split(".")[0] in ("model", "loss", "data", "task") and not k.endswith("path")
        ]
        parts.append(_table(["setting", "value"], [[k, flat[k]] for k in summary_keys[:20]]))
        parts.append("<details><summary>full resolved config</summary>")
        parts.append(_table(["key", "value"], [[k, v] for k, v in flat.items()]) + "</details>")
    slug = _slug(run.name)
    # Robust aggregators log the weights they put on examples (weights/*, group/*): a panel of their own.
    weight_keys = [k for k in curve_keys(run.metrics, limit=1000) if k.startswith(WEIGHT_METRIC_PREFIXES)]
    training_keys = [k for k in curve_keys(run.metrics, limit=1000) if k not in weight_keys][:12]
    curves = (
        plot_training_curves(run.metrics, assets / f"{slug}_training.png", keys=training_keys, title=run.name)
        if run.metrics
        else None
    )
    if curves is not None:
        parts.append("<h3>Training curves</h3>" + _image(curves, f"{run.name}: training curves"))
    weights_png = (
        plot_training_curves(run.metrics, assets / f"{slug}_weights.png", keys=weight_keys, title=run.name)
        if weight_keys
        else None
    )
    if weights_png is not None:
        parts.append(
            "<h3>Example weights of the aggregator</h3><p>Effective sample size (fraction of the batch), "
            "largest weight, clipped fraction and mean weight per source / group, per step (1 = the "
            "weight of a plain mean).</p>" + _image(weights_png, f"{run.name}: aggregator weights")
        )
    if run.eval is not None:
        parts.append(
            f"<h3>Evaluation: {html.escape(run.eval.task)} ({run.eval.num_prompts} held-out prompts)</h3>"
        )
        parts.append(_eval_tables(run.eval))
        levels = run.eval.quantiles.get("levels")
        curves_by_model = {k: v for k, v in run.eval.quantiles.items() if k != "levels"}
        # `distalign eval` leaves a finer picture (every sample's quantile, violations shaded) in eval/.
        has_eval_plot = any(p.name == "gold_reward_quantiles.png" for p in run.pngs)
        if levels and curves_by_model and not has_eval_plot:
            png = plot_quantile_curves(
                levels,
                curves_by_model,
                assets / f"{slug}_quantiles.png",
                title=f"{run.name}: gold-reward quantiles",
            )
            parts.append(_image(png, f"{run.name}: gold-reward quantiles (dominance view)"))
    for png in run.pngs:
        copy = assets / f"{slug}_{png.parent.name}_{png.name}"
        shutil.copyfile(png, copy)
        parts.append(_image(copy, f"{run.name}: {png.parent.name}/{png.name}"))
    return "".join(parts)


def _shared_reference(runs: Sequence[RunSummary]) -> Estimate | None:
    """The reference's gold reward when every evaluated run measured the same one, else ``None``."""
    refs = [r.eval.gold_reward.get("reference") for r in runs if r.eval is not None]
    if refs and all(ref is not None and ref == refs[0] for ref in refs):
        return refs[0]
    return None


def _comparison_row(run: RunSummary) -> list[Any]:
    last = run.metrics[-1] if run.metrics else {}
    row: list[Any] = [run.name, run.method, last.get("step"), last.get("loss")]
    ev = run.eval
    if ev is None:
        return row + [None] * 6
    div = ev.diversity.get("policy", {})
    words = ev.length.get("policy", {}).get("words", {})
    kl = ev.kl.k1 if ev.kl else None
    return row + [
        ev.gold_reward.get("policy"),
        ev.win_rate,
        kl,
        div.get("distinct_2"),
        div.get("self_bleu"),
        words.get("mean"),
    ]


def _comparison_section(runs: Sequence[RunSummary], assets: Path) -> str:
    headers = [
        "run",
        "method",
        "steps",
        "final loss",
        "gold reward",
        "win rate",
        "KL k1 [nats]",
        "distinct-2",
        "self-BLEU",
        "mean words",
    ]
    rows = [_comparison_row(run) for run in runs]
    reference = _shared_reference(runs)
    if reference is not None:
        rows.insert(0, ["reference", "(base)", None, None, reference, None, 0.0, *_reference_diversity(runs)])
    parts = ["<h2>Comparison</h2>", _table(headers, rows)]
    evaluated = [(r.name, r.eval) for r in runs if r.eval is not None and "policy" in r.eval.gold_reward]
    if not evaluated:
        return "".join(parts) + '<p class="muted">No run has eval/eval.json: no comparison plots.</p>'
    quantiles = _comparison_quantiles(evaluated, reference is not None)
    if quantiles is not None:
        png = plot_quantile_curves(
            quantiles["levels"],
            {k: v for k, v in quantiles.items() if k != "levels"},
            assets / "quantiles.png",
            title="Gold-reward quantiles: a curve above another dominates it",
        )
        parts.append(_image(png, "gold-reward quantile curves of every run (the dominance view)"))
    labels = [name for name, _ in evaluated] + (["reference"] if reference else [])
    rewards = [ev.gold_reward["policy"] for _, ev in evaluated] + ([reference] if reference else [])
    parts.append(
        _image(plot_gold_rewards(labels, rewards, assets / "gold_reward.png"), "mean gold reward per run")
    )
    wins = [(name, ev.win_rate) for name, ev in evaluated if ev.win_rate is not None]
    if wins:
        png = plot_win_rates([n for n, _ in wins], [w for _, w in wins], assets / "win_rate.png")
        parts.append(_image(png, "win rate against the reference per run"))
    points = [_frontier_point(name, ev) for name, ev in evaluated if ev.kl is not None]
    if points:
        if reference is not None:
            points.append(
                FrontierPoint("reference", 0.0, reference.value, None, (reference.low, reference.high))
            )
        png = plot_frontier(points, assets / "frontier.png")
        parts.append(_image(png, "gold reward vs KL(policy || reference): the frontier"))
    if any(has_designer_scores(ev) for _, ev in evaluated):
        parts.append(_designer_section(runs, assets))
    return "".join(parts)


def _designer_section(runs: Sequence[RunSummary], assets: Path) -> str:
    """The Pareto view of runs with designer scores: plot and table (see :mod:`distalign.eval.pareto`)."""
    rows = pareto_rows([(r.name, r.config, r.eval) for r in runs])
    reference = shared_designer_reference([r.eval for r in runs if r.eval is not None])
    png = plot_designer_pareto(
        [row.point for row in rows], assets / "designer_pareto.png", reference=reference
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
        + f'<p class="muted">{html.escape(note)}</p>'
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


def report_paths(output: str | Path) -> tuple[Path, Path]:
    """``(html_file, assets_dir)``: ``output`` ending in .html/.htm is the page, else a directory for ``report.html``."""
    output = Path(output)
    page = output if output.suffix.lower() in (".html", ".htm") else output / "report.html"
    return page, page.parent / f"{page.stem}_files"


def write_report(run_dirs: Sequence[str | Path], output: str | Path) -> Path:
    """Write the HTML report for ``run_dirs`` and return the page's path (see :func:`report_paths`)."""
    if not run_dirs:
        raise ValueError("write_report needs at least one run directory")
    paths = [Path(p) for p in run_dirs]
    runs = [load_run(p, name) for p, name in zip(paths, _unique_names(paths))]
    page, assets = report_paths(output)
    assets.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    body = [
        f"<h1>distalign report: {html.escape(', '.join(r.name for r in runs))}</h1>",
        f'<p class="muted">generated {html.escape(stamp)}; images also in {html.escape(assets.name)}/</p>',
    ]
    if len(runs) > 1 or runs[0].eval is not None:
        body.append(_comparison_section(runs, assets))
    body += [_run_section(run, assets) for run in runs]
    title = html.escape("distalign report: " + ", ".join(r.name for r in runs))
    document = (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>\n"
    )
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(document, encoding="utf-8")
    return page
