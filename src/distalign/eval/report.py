"""``write_report``: one self-contained HTML page (plus PNG files) for one or more run directories.

A run directory holds ``config.yaml`` (resolved config), ``metrics.jsonl`` (training log),
``eval/eval.json`` (:class:`~distalign.stats.metrics.EvalResult`) and optionally PNGs under ``plots/``
and ``eval/``. Every piece is optional: a missing or unreadable piece is reported on the page and the
rest still renders. Images are embedded as base64 data URIs so the page can be mailed or archived
alone, and are also written as files in ``<report stem>_files/`` beside it.

The page answers the question first: the verdict per run (:mod:`distalign.eval.overview`), then the
comparison across runs (:mod:`distalign.eval.comparison`), example generations from
``eval/samples.jsonl`` (:mod:`distalign.eval.generations`) and one section per run. Each run keeps one
colour in every plot (:func:`distalign.eval.plots.run_colors`; the reference is grey).
"""

from __future__ import annotations

import html
import os
import re
import shutil
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from distalign.eval.comparison import comparison_section
from distalign.eval.generations import by_prompt, generations_section, read_samples
from distalign.eval.overview import verdict_section
from distalign.eval.page import CSS
from distalign.eval.page import image as _image
from distalign.eval.page import table as _table
from distalign.eval.plots import (
    GRAD_SHARE_NOTE,
    REFERENCE_COLOR,
    curve_keys,
    grad_share_keys,
    plot_grad_shares,
    plot_policy_vs_reference,
    plot_quantile_curves,
    plot_training_curves,
    run_colors,
)
from distalign.eval.run_dir import RunSummary, load_run
from distalign.stats.metrics import EvalResult

Samples = dict[str, list[dict[str, Any]]]
"""samples.jsonl rows per run name (empty list: none)."""


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


#: PNGs of ``distalign eval`` the report redraws in the run's colours when it has the samples.
REDRAWN_EVAL_PNGS = frozenset({"gold_reward_quantiles.png", "gold_reward_histogram.png"})


def _run_section(run: RunSummary, assets: Path, color: str, samples: list[dict[str, Any]]) -> str:
    parts = [
        f'<h2 id="run-{_slug(run.name)}">Run: {html.escape(run.name)}</h2>',
        f'<p class="muted">{html.escape(str(run.path))}</p>',
    ]
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
    share_keys = grad_share_keys(run.metrics)  # stacked in a plot of their own
    own_panel = set(weight_keys) | set(share_keys)
    training_keys = [k for k in curve_keys(run.metrics, limit=1000) if k not in own_panel][:12]
    curves = (
        plot_training_curves(
            run.metrics, assets / f"{slug}_training.png", keys=training_keys, title=run.name, color=color
        )
        if run.metrics
        else None
    )
    if curves is not None:
        parts.append("<h3>Training curves</h3>" + _image(curves, f"{run.name}: training curves"))
    weights_png = (
        plot_training_curves(
            run.metrics, assets / f"{slug}_weights.png", keys=weight_keys, title=run.name, color=color
        )
        if weight_keys
        else None
    )
    if weights_png is not None:
        parts.append(
            "<h3>Example weights of the aggregator</h3><p>Effective sample size (fraction of the batch), "
            "largest weight, clipped fraction and mean weight per source / group, per step (1 = the "
            "weight of a plain mean).</p>" + _image(weights_png, f"{run.name}: aggregator weights")
        )
    shares_png = (
        plot_grad_shares(
            run.metrics, assets / f"{slug}_grad_shares.png", title=f"{run.name}: gradient share per term"
        )
        if share_keys
        else None
    )
    if shares_png is not None:
        parts.append(f"<h3>Gradient share per loss term</h3><p>{GRAD_SHARE_NOTE}</p>")
        parts.append(_image(shares_png, f"{run.name}: gradient-norm share per loss term"))
    if run.eval is not None:
        parts.append(
            f"<h3>Evaluation: {html.escape(run.eval.task)} ({run.eval.num_prompts} held-out prompts)</h3>"
        )
        parts.append(_eval_tables(run.eval))
        parts.append(_eval_pictures(run, assets / f"{slug}_quantiles.png", color, samples))
    redrawn = samples and run.eval is not None
    for png in run.pngs:
        if redrawn and png.parent.name == "eval" and png.name in REDRAWN_EVAL_PNGS:
            continue
        copy = assets / f"{slug}_{png.parent.name}_{png.name}"
        shutil.copyfile(png, copy)
        parts.append(_image(copy, f"{run.name}: {png.parent.name}/{png.name}"))
    return "".join(parts)


def _eval_pictures(run: RunSummary, output: Path, color: str, samples: list[dict[str, Any]]) -> str:
    """The run's gold rewards against the reference's, in the report's colours: from every sample
    when samples.jsonl is there, else from the quantile curves of eval.json unless `distalign eval`
    left its own picture in eval/."""
    assert run.eval is not None
    prompts = by_prompt(samples).values()
    policy = [r for prompt in prompts for _, r in prompt.policy]
    reference = [r for prompt in prompts for _, r in prompt.reference]
    if policy and reference:
        png = plot_policy_vs_reference(
            policy, reference, output, label=run.name, color=color, reward=run.eval.reward or "gold reward"
        )
        return _image(png, f"{run.name}: gold rewards of the policy and the reference (dominance view)")
    levels = run.eval.quantiles.get("levels")
    curves = {k: v for k, v in run.eval.quantiles.items() if k != "levels"}
    if not levels or not curves or any(p.name == "gold_reward_quantiles.png" for p in run.pngs):
        return ""
    named = {(run.name if k == "policy" else k): v for k, v in curves.items()}
    png = plot_quantile_curves(
        levels,
        named,
        output,
        title=f"{run.name}: gold-reward quantiles",
        colors={run.name: color, "reference": REFERENCE_COLOR},
    )
    return _image(png, f"{run.name}: gold-reward quantiles (dominance view)")


def report_paths(output: str | Path) -> tuple[Path, Path]:
    """``(html_file, assets_dir)``: ``output`` ending in .html/.htm is the page, else a directory for ``report.html``."""
    output = Path(output)
    page = output if output.suffix.lower() in (".html", ".htm") else output / "report.html"
    return page, page.parent / f"{page.stem}_files"


def _read_run_samples(run: RunSummary) -> list[dict[str, Any]]:
    if run.eval is None:
        return []
    return read_samples(run.path / "eval" / (run.eval.samples_file or "samples.jsonl"))


def write_report(
    run_dirs: Sequence[str | Path], output: str | Path, *, refresh_seconds: float | None = None
) -> Path:
    """Write the HTML report for ``run_dirs`` and return the page's path (see :func:`report_paths`).

    The page opens with the verdict per run, then the comparison (settings, results, plots with one
    colour per run and the reference in grey), example generations, and one section per run.
    ``refresh_seconds`` (the live view of ``distalign report --watch``) makes the browser reload the
    page that often. The page is replaced atomically, so a reload never sees half of it.
    """
    if not run_dirs:
        raise ValueError("write_report needs at least one run directory")
    paths = [Path(p) for p in run_dirs]
    runs = [load_run(p, name) for p, name in zip(paths, _unique_names(paths))]
    page, assets = report_paths(output)
    assets.mkdir(parents=True, exist_ok=True)
    colors = run_colors([r.name for r in runs])
    samples: Samples = {run.name: _read_run_samples(run) for run in runs}
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    body = [
        f"<h1>distalign report: {html.escape(', '.join(r.name for r in runs))}</h1>",
        f'<p class="muted">generated {html.escape(stamp)}; images also in {html.escape(assets.name)}/</p>',
    ]
    head = ""
    if refresh_seconds is not None:
        seconds = max(1, round(refresh_seconds))
        head = f'<meta http-equiv="refresh" content="{seconds}">'
        body.append(
            f'<p class="live">Live view: <code>distalign report --watch</code> rewrites this page when a '
            f"run's metrics or evaluation change; the browser reloads it every {seconds} s.</p>"
        )
    body.append(verdict_section(runs, samples, colors))
    if len(runs) > 1 or runs[0].eval is not None:
        body.append(comparison_section(runs, assets, colors))
    body.append(generations_section({name: by_prompt(rows) for name, rows in samples.items()}, colors))
    body += [_run_section(run, assets, colors[run.name], samples[run.name]) for run in runs]
    title = html.escape("distalign report: " + ", ".join(r.name for r in runs))
    document = (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">{head}<title>{title}</title>'
        f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>\n"
    )
    page.parent.mkdir(parents=True, exist_ok=True)
    temporary = page.with_name(f".{page.name}.tmp")
    temporary.write_text(document, encoding="utf-8")
    os.replace(temporary, page)
    return page
