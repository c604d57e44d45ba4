"""The designer-score vs win-rate view of several runs: which runs are points, which are plain DPO,
which are on the Pareto front. Pure functions over run configs (as dicts) and
:class:`~distalign.stats.metrics.EvalResult`; the report draws and tabulates what they return.

A run takes part when its eval.json has designer scores (``EvalResult.designer["designer"]`` with a
``"policy"`` estimate) and a win rate. The front is computed on point estimates among the runs only
(the reference is drawn as a landmark, not a candidate): see :func:`distalign.eval.frontier_plots.non_dominated`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from distalign.eval.frontier_plots import DesignerPoint, non_dominated
from distalign.stats.metrics import Estimate, EvalResult

#: The composite designer score's key in ``EvalResult.designer``.
COMPOSITE = "designer"


@dataclass
class ParetoRow:
    """One run of the Pareto table: its point, the designer difference vs the reference, front or not."""

    point: DesignerPoint
    difference: Estimate | None
    on_front: bool


def is_plain_dpo(config: dict[str, Any] | None) -> bool:
    """``loss.name == "dpo"`` with no SFT term and a loss that reads no designer signal: the baseline
    that sees only the preference labels (DPO on pairs relabelled by a designer reward is not it)."""
    from distalign.config.run import move_renamed_settings

    config = move_renamed_settings(config or {}, warn=False)  # a run saved before a setting moved
    loss, train = config.get("loss"), config.get("train")
    sft_weight = train.get("sft_weight") if isinstance(train, dict) else None
    if not isinstance(loss, dict) or loss.get("name") != "dpo" or (sft_weight or 0) != 0:
        return False
    return not _reads_designer(str(loss["name"]))


def _reads_designer(loss_name: str) -> bool:
    """Whether the registered loss declares a designer signal (``..._reward/designer`` and the like)."""
    from distalign.losses import LOSSES

    if loss_name not in LOSSES:
        return False
    return any("designer" in signal or "reward" in signal for signal in LOSSES.get(loss_name).signals)


def has_designer_scores(result: EvalResult | None) -> bool:
    """The eval result carries the composite designer score of the policy and a win rate."""
    return (
        result is not None and result.win_rate is not None and "policy" in result.designer.get(COMPOSITE, {})
    )


def pareto_rows(runs: Sequence[tuple[str, dict[str, Any] | None, EvalResult | None]]) -> list[ParetoRow]:
    """Rows for the runs ``(name, config, eval result)`` that have designer scores, in the given order."""
    rows = []
    for name, config, result in runs:
        if not has_designer_scores(result):
            continue
        assert result is not None and result.win_rate is not None
        entry = result.designer[COMPOSITE]
        point = DesignerPoint(name, entry["policy"], result.win_rate, dpo=is_plain_dpo(config))
        rows.append(ParetoRow(point, entry.get("difference"), on_front=False))
    for index in non_dominated([(r.point.designer.value, r.point.win_rate.value) for r in rows]):
        rows[index].on_front = True
    return rows


def shared_designer_reference(results: Sequence[EvalResult]) -> Estimate | None:
    """The reference's composite designer score when every result with designer scores measured the
    same one (the same reference samples, as a sweep shares them), else ``None``: a landmark drawn for
    one run only would mislead about the others."""
    references = [r.designer.get(COMPOSITE, {}).get("reference") for r in results if has_designer_scores(r)]
    if references and all(ref is not None and ref == references[0] for ref in references):
        return references[0]
    return None
