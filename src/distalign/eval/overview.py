"""The top of the report: the verdict block (one sentence per run, :mod:`distalign.eval.verdict`) and
each run's key hyperparameters for the comparison table.

Hyperparameters come from the run's resolved ``config.yaml``; the steps done from ``metrics.jsonl``;
the number of training rows from ``final/distalign_training.json`` (the exact count, written with the
model); for a run saved before that record existed, from ``dominance.json``, which scores at most
:data:`SCORED_ROWS_CAP` rows (a count at the cap is a lower bound), else ``data.limit`` as an upper
bound, or nothing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from distalign.eval.page import Raw, escape, estimate_cell, swatch, table
from distalign.eval.verdict import run_verdict

if TYPE_CHECKING:
    from distalign.eval.run_dir import RunSummary

#: ``write_dominance_summary`` scores at most this many training rows (its ``max_rows`` default).
SCORED_ROWS_CAP = 512

SETTING_HEADERS = ("run", "method", "beta", "lr", "steps", "batch", "LoRA", "data rows")


def _section(config: Mapping[str, Any] | None, key: str) -> dict[str, Any]:
    value = (config or {}).get(key)
    return value if isinstance(value, dict) else {}


def lora_label(config: Mapping[str, Any] | None) -> str:
    """``"r=16"`` for a LoRA run, ``"full"`` for full fine-tuning, ``""`` without a config."""
    if not config:
        return ""
    lora = _section(_section(config, "model"), "lora")
    return f"r={lora.get('r')}" if lora.get("enabled") else "full"


def steps_label(run: RunSummary) -> str:
    """The last logged step, as ``"done/planned"`` while it is short of ``train.max_steps``."""
    done = run.metrics[-1].get("step") if run.metrics else None
    planned = _section(run.config, "train").get("max_steps")
    if isinstance(planned, int) and planned > 0 and (done is None or done < planned):
        return f"{done if done is not None else 0}/{planned}"
    return "" if done is None else str(done)


def data_rows_label(run: RunSummary) -> str:
    """Training rows as the run recorded them (see the module docstring); ``""`` when unknown."""
    from distalign.train.record import TrainingRecord

    try:
        record = TrainingRecord.load(run.path / "final")
    except (OSError, ValueError, TypeError, KeyError):
        record = None
    if record is not None:
        return str(record.rows)
    try:
        rows = json.loads((run.path / "dominance.json").read_text(encoding="utf-8")).get("rows")
    except (OSError, ValueError, AttributeError):
        rows = None
    if isinstance(rows, int) and not isinstance(rows, bool):
        return f"≥ {rows}" if rows >= SCORED_ROWS_CAP else str(rows)
    limit = _section(run.config, "data").get("limit")
    return f"≤ {limit}" if isinstance(limit, int) else ""


def aggregator_name(config: Mapping[str, Any] | None) -> str:
    """``aggregator.name`` (``"mean"`` when absent)."""
    return str(_section(config, "aggregator").get("name") or "mean")


def run_label(name: str, colors: Mapping[str, str]) -> Raw:
    """A run's name behind its plot colour, for a table cell."""
    return Raw(f'<span class="runname">{swatch(colors.get(name, "#999"))}{escape(name)}</span>')


def setting_columns(runs: Sequence[RunSummary]) -> list[str]:
    """:data:`SETTING_HEADERS`, plus ``aggregator`` when a run's is not the plain mean."""
    extra = ["aggregator"] if any(aggregator_name(r.config) != "mean" for r in runs if r.config) else []
    return [*SETTING_HEADERS, *extra]


def setting_cells(run: RunSummary, colors: Mapping[str, str], with_aggregator: bool) -> list[Any]:
    """The row of :func:`setting_columns` for ``run``."""
    loss, train = _section(run.config, "loss"), _section(run.config, "train")
    cells = [
        run_label(run.name, colors),
        run.method,
        loss.get("beta"),
        train.get("lr"),
        steps_label(run),
        train.get("batch_size"),
        lora_label(run.config),
        data_rows_label(run),
    ]
    return cells + ([aggregator_name(run.config)] if with_aggregator else [])


def verdict_section(
    runs: Sequence[RunSummary], samples: Mapping[str, Sequence[dict[str, Any]]], colors: Mapping[str, str]
) -> str:
    """The verdict block (anchor ``#verdict``): a sentence per run and the numbers behind it."""
    cards, rows = [], []
    designer = any("difference" in (r.eval.designer.get("designer") or {}) for r in runs if r.eval)
    for run in runs:
        label = swatch(colors.get(run.name, "#999")) + f'<span class="run">{escape(run.name)}</span>'
        if run.eval is None:
            cards.append(f'<div class="verdict">{label}<p>no verdict yet: no eval/eval.json</p></div>')
            continue
        found, difference = run_verdict(run.eval, samples.get(run.name, ()))
        cards.append(f'<div class="verdict {found.kind}">{label}<p>{escape(found.sentence)}</p></div>')
        gold = run.eval.gold_reward
        row: list[Any] = [
            run_label(run.name, colors),
            estimate_cell(gold.get("policy")),
            estimate_cell(gold.get("reference")),
            estimate_cell(difference, sign=True),
            estimate_cell(run.eval.win_rate),
            estimate_cell(run.eval.kl.k1 if run.eval.kl else None),
        ]
        if designer:
            row.append(estimate_cell((run.eval.designer.get("designer") or {}).get("difference"), sign=True))
        rows.append(row)
    level = _level(runs)
    headers = [
        "run",
        f"gold reward, policy [{level}]",
        "gold reward, reference",
        "difference policy − reference",
        "win rate vs reference",
        "KL(policy‖reference) [nats]",
    ] + (["designer score difference"] if designer else [])
    parts = ['<h2 id="verdict">Verdict</h2>', f'<div class="verdicts">{"".join(cards)}</div>']
    if rows:
        parts.append(table(headers, rows))
        parts.append(
            "<p class=\"muted\">Dominates: the gold-reward difference's CI lies above 0 and the win rate's "
            "above 0.5; mixed: only one of them does; does not beat: neither does. Differences pair the "
            "policy's and the reference's samples on the same prompt; KL is the k1 estimate per sequence.</p>"
        )
    return "".join(parts)


def _level(runs: Sequence[RunSummary]) -> str:
    alphas = {float(r.eval.settings.get("alpha", 0.05)) for r in runs if r.eval is not None}
    return f"{100 * (1 - alphas.pop()):g}% CI" if len(alphas) == 1 else "CI"
