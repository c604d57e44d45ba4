"""Per-row signals: the optional data columns that travel beside the token ids to losses and aggregators.

A validated row (``formats.validate_row``) may carry a ``source`` and a ``group`` tag and designer
rewards. :func:`row_signals` names them once, flat, so that every later stage (collation, gathering
across processes, the loss, the aggregator) handles them as one dict of per-row values, and a new kind
of column needs no new field anywhere:

* ``source``, ``group``: strings (categorical);
* ``group_size``: derived when the data loads, not a column: the number of rows of the data set in
  the row's group (group DRO's size adjustment uses the training-set size of each group);
* ``density_ratio``: a number, the row's ``dQ_target / dP`` for shift-robust aggregators;
* ``reward/<name>`` for unpaired rows; ``chosen_reward/<name>`` and ``rejected_reward/<name>`` for
  pairs (per-response rewards of listwise rows are not per-row signals and are not carried).

:func:`signal_table` turns them into tensors over a dataset: numbers as float64 (NaN where a row has
none), categories as integer codes into a sorted vocabulary (-1 where a row has none).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

CATEGORICAL_SIGNALS = ("source", "group")
#: Each row's group's number of rows in the whole data set (float64), added by :func:`signal_table`.
GROUP_SIZE = "group_size"
NUMERIC_SIGNALS = ("density_ratio",)
_REWARD_SIGNALS = {
    "paired": (("chosen_rewards", "chosen_reward/"), ("rejected_rewards", "rejected_reward/")),
    "unpaired": (("rewards", "reward/"),),
    "listwise": (),
}


def row_signals(row: Mapping[str, Any], fmt: str) -> dict[str, float | str]:
    """The signals of one validated row, by flat name (see the module docstring)."""
    signals: dict[str, float | str] = {}
    for name in CATEGORICAL_SIGNALS:
        if row.get(name) is not None:
            signals[name] = str(row[name])
    for name in NUMERIC_SIGNALS:
        if row.get(name) is not None:
            signals[name] = float(row[name])
    for column, prefix in _REWARD_SIGNALS.get(fmt, ()):
        for reward, value in (row.get(column) or {}).items():
            signals[prefix + reward] = float(value)
    return signals


def signal_table(
    per_row: Sequence[Mapping[str, float | str]],
) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """Tensors [R] for every signal any row has, and the vocabulary of each categorical one.

    Returns ``(table, vocabularies)``: ``table[name]`` is float64 (NaN = missing) for numbers and long
    codes (-1 = missing) for strings, ``vocabularies[name]`` the sorted strings the codes index. Where
    rows have a ``group``, ``table["group_size"]`` is the size of each row's group in ``per_row``.
    """
    names = sorted({name for signals in per_row for name in signals})
    table: dict[str, torch.Tensor] = {}
    vocabularies: dict[str, list[str]] = {}
    for name in names:
        values = [signals.get(name) for signals in per_row]
        if any(isinstance(v, str) for v in values):
            vocabulary = sorted({str(v) for v in values if v is not None})
            code = {value: i for i, value in enumerate(vocabulary)}
            table[name] = torch.tensor([-1 if v is None else code[str(v)] for v in values], dtype=torch.long)
            vocabularies[name] = vocabulary
        else:
            table[name] = torch.tensor(
                [float("nan") if v is None else float(v) for v in values], dtype=torch.float64
            )
    if "group" in table:
        codes = table["group"]
        sizes = torch.bincount(codes[codes >= 0], minlength=len(vocabularies["group"])).double()
        table[GROUP_SIZE] = torch.where(codes >= 0, sizes[codes.clamp(min=0)], float("nan"))
    return table, vocabularies


def matches(declared: str, name: str) -> bool:
    """Whether signal ``name`` satisfies a declaration: an exact name, or a prefix ending in ``*``
    (``"reward/*"`` = any designer reward of an unpaired row)."""
    return name.startswith(declared[:-1]) if declared.endswith("*") else name == declared


def missing_signals(declared: Sequence[str], table: Mapping[str, torch.Tensor]) -> list[str]:
    """The declared signals that no column of ``table`` provides for every row."""
    missing = []
    for want in declared:
        provided = [
            name
            for name, values in table.items()
            if matches(want, name)
            and not bool((values.isnan() if values.is_floating_point() else values < 0).any())
        ]
        if not provided:
            missing.append(want)
    return missing
