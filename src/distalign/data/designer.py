"""Designer rewards over a dataset: scored once, normalised, combined, and attached as per-row signals.

The ``designer:`` config section names rewards (``distalign.rewards`` specs, or columns the data
already carries). :func:`fit_designer` scores every training response once (raw scores cached on disk
under the distalign cache, keyed by reward and text), fits each reward's normalisation over all
responses of the data (chosen and rejected alike) and returns a :class:`FittedDesigner`.
:func:`attach_designer` writes, into each validated row, the normalised rewards under their aliases and
the composite ``r_aux = sum_k w_k normalise(r_k)`` under ``designer``, so they travel as the signals
``chosen_reward/<alias>``, ``rejected_reward/<alias>`` or ``reward/<alias>`` (``data/signals.py``).

The fitted statistics are saved in the run directory (``designer.json``), so that ``distalign eval``
scores the samples of every run of a comparison on one scale (:meth:`FittedDesigner.score`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distalign.registry import UnknownNameError
from distalign.rewards import Normalization, RewardFn, build_reward

#: The alias of the composite designer reward; no single reward may take it.
COMPOSITE = "designer"
#: Per format: (completion field, reward column) for each response of a row.
_RESPONSES = {
    "paired": (("chosen", "chosen_rewards"), ("rejected", "rejected_rewards")),
    "unpaired": (("completion", "rewards"),),
}


def _text(value: Any) -> str:
    """A prompt or completion as plain text: the string itself, or the contents of its messages (the
    last user turn for a conversational prompt, since designer rewards score the exchange at hand)."""
    if isinstance(value, str):
        return value
    messages = list(value)
    users = [m for m in messages if m.get("role") == "user"]
    if users and messages[-1].get("role") != "assistant":
        return str(users[-1].get("content", ""))
    return "\n".join(str(m.get("content", "")) for m in messages)


@dataclass
class DesignerReward:
    """One designer reward: ``reward`` computes it; ``None`` means it is read from the data's column
    ``alias``. ``normalization`` is fitted over the training responses."""

    alias: str
    weight: float
    spec: dict[str, Any]
    reward: RewardFn | None
    normalization: Normalization
    direction: str = "maximize"

    def oriented(self, prompts: list[str], completions: list[str]) -> np.ndarray:
        if self.reward is None:
            raise ValueError(
                f"designer reward {self.alias!r} is read from a data column and cannot score new text"
            )
        return self.reward.oriented(prompts, completions)

    def raw(self, prompts: list[str], completions: list[str]) -> np.ndarray:
        if self.reward is None:
            raise ValueError(f"designer reward {self.alias!r} is read from a data column")
        return self.reward.raw_scores(prompts, completions)


@dataclass
class FittedDesigner:
    """The designer rewards with their fitted normalisations; ``score`` gives r_aux for any text."""

    rewards: list[DesignerReward]

    @property
    def can_score_text(self) -> bool:
        return all(r.reward is not None for r in self.rewards)

    def composite(self, normalised: dict[str, np.ndarray]) -> np.ndarray:
        """``sum_k w_k normalise(r_k)`` from the normalised values by alias."""
        return sum(r.weight * normalised[r.alias] for r in self.rewards)  # type: ignore[return-value]

    def score(self, prompts: list[str], completions: list[str]) -> dict[str, np.ndarray]:
        """For each reward its raw scores (own units) by alias, and the composite under ``designer``
        (normalised with the training statistics, higher is better)."""
        out: dict[str, np.ndarray] = {}
        normalised: dict[str, np.ndarray] = {}
        for r in self.rewards:
            out[r.alias] = r.raw(prompts, completions)
            oriented = -out[r.alias] if r.direction == "minimize" else out[r.alias]
            normalised[r.alias] = r.normalization.apply(oriented)
        out[COMPOSITE] = self.composite(normalised)
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "composite": f"{COMPOSITE} = sum_k weight_k * normalise(reward_k)",
            "rewards": [
                {
                    "alias": r.alias,
                    "weight": r.weight,
                    "spec": r.spec,
                    "direction": r.direction,
                    "normalization": {k: v for k, v in vars(r.normalization).items() if v is not None},
                }
                for r in self.rewards
            ],
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path, cache_dir: str | None = None) -> FittedDesigner:
        saved = json.loads(Path(path).read_text(encoding="utf-8"))
        rewards = []
        for entry in saved["rewards"]:
            reward = _build(entry["spec"], cache_dir)
            normalization = Normalization(**entry["normalization"])
            rewards.append(
                DesignerReward(
                    entry["alias"], entry["weight"], entry["spec"], reward, normalization, entry["direction"]
                )
            )
        return cls(rewards)


def _build(spec: dict[str, Any], cache_dir: str | None) -> RewardFn | None:
    if "column" in spec:
        return None
    from distalign.cache import cache_root

    # Raw scores only: the designer fits the normalisation itself, over the training responses.
    unnormalised = {k: v for k, v in spec.items() if k != "normalize"}
    return build_reward(unnormalised, cache_dir=cache_root(cache_dir) / "rewards")


def build_designer(section, cache_dir: str | None = None) -> list[DesignerReward]:
    """The rewards of a ``designer:`` config section, not yet fitted (ValueError naming the entry)."""
    rewards: list[DesignerReward] = []
    for index, entry in enumerate(section.rewards):
        spec: dict[str, Any] = {"name": entry} if isinstance(entry, str) else dict(entry)
        where = f"designer.rewards[{index}]"
        if "column" in spec:
            if set(spec) - {"column", "direction", "normalize"}:
                raise ValueError(f"{where}: a column entry takes only column, direction and normalize")
            alias = str(spec["column"])
        else:
            try:
                reward = _build(spec, cache_dir)
            except (ValueError, UnknownNameError) as err:
                raise ValueError(f"{where}: {err}") from None
            alias = reward.alias  # type: ignore[union-attr]
        if alias == COMPOSITE:
            raise ValueError(f"{where}: the alias {COMPOSITE!r} is reserved for the composite r_aux")
        if alias in {r.alias for r in rewards}:
            raise ValueError(f"{where}: two designer rewards are called {alias!r}; give one an alias")
        kind = spec.get("normalize", section.normalize)
        kind = kind.get("kind", section.normalize) if isinstance(kind, dict) else kind
        rewards.append(
            DesignerReward(
                alias,
                float(section.weights.get(alias, 1.0)),
                spec,
                None if "column" in spec else reward,
                Normalization(kind=kind),
                spec.get("direction", "maximize"),
            )
        )
    unknown = sorted(set(section.weights) - {r.alias for r in rewards})
    if unknown:
        raise ValueError(f"designer.weights names {unknown}, which are not designer rewards")
    return rewards


def _responses(rows: list[dict[str, Any]], fmt: str) -> list[tuple[int, str, str, str]]:
    """(row index, completion field, prompt text, completion text) of every response of the data."""
    if fmt not in _RESPONSES:
        raise ValueError(f"designer rewards need paired or unpaired rows, not {fmt}")
    return [
        (i, field, _text(row["prompt"]), _text(row[field]))
        for i, row in enumerate(rows)
        for field, _ in _RESPONSES[fmt]
    ]


def _column_values(rows: list[dict[str, Any]], fmt: str, alias: str, path: str) -> np.ndarray:
    values = []
    for i, row in enumerate(rows):
        for field, column in _RESPONSES[fmt]:
            value = (row.get(column) or {}).get(alias)
            if value is None:
                raise ValueError(
                    f"{path}: row {i + 1} has no {column}[{alias!r}] for its {field!r} response "
                    f"(designer.rewards names the column {alias!r})"
                )
            values.append(float(value))
    return np.asarray(values, dtype=np.float64)


def fit_designer(
    rewards: list[DesignerReward], rows: list[dict[str, Any]], fmt: str, path: str
) -> tuple[FittedDesigner, dict[str, np.ndarray]]:
    """Score every response of ``rows`` with every reward (cached), fit the normalisations over them;
    returns the fitted designer and the normalised values by alias (response-major, as ``_responses``)."""
    responses = _responses(rows, fmt)
    prompts = [p for _, _, p, _ in responses]
    completions = [c for _, _, _, c in responses]
    normalised: dict[str, np.ndarray] = {}
    for r in rewards:
        if r.reward is None:
            raw = _column_values(rows, fmt, r.alias, path)
            oriented = -raw if r.direction == "minimize" else raw
        else:
            oriented = r.oriented(prompts, completions)
        r.normalization = Normalization.fit(r.normalization.kind, oriented, r.normalization.clip)
        normalised[r.alias] = r.normalization.apply(oriented)
    return FittedDesigner(rewards), normalised


def attach_designer(
    rows: list[dict[str, Any]], fmt: str, designer: FittedDesigner, normalised: dict[str, np.ndarray]
) -> list[dict[str, Any]]:
    """Copies of ``rows`` whose reward columns hold each normalised reward and the composite."""
    composite = designer.composite(normalised)
    out = [dict(row) for row in rows]
    for position, (i, field, _, _) in enumerate(_responses(rows, fmt)):
        column = dict(_RESPONSES[fmt])[field]
        values = dict(out[i].get(column) or {})
        values.update({alias: float(v[position]) for alias, v in normalised.items()})
        values[COMPOSITE] = float(composite[position])
        out[i][column] = values
    return out


def designer_for_run(config, run_dir: str | Path | None = None) -> FittedDesigner | None:
    """The run's fitted designer: ``RUN_DIR/designer.json`` when training wrote one, else fitted anew on
    the config's training data (an untrained baseline); ``None`` without a ``designer:`` section."""
    if not config.designer.enabled:
        return None
    saved = Path(run_dir) / "designer.json" if run_dir is not None else None
    if saved is not None and saved.is_file():
        return FittedDesigner.load(saved, config.reference.cache_dir)
    from distalign.data.formats import unpair_rows
    from distalign.data.loading import load_rows

    d = config.data
    loaded = load_rows(d.path, format=d.format, split=d.split, subset=d.subset, limit=d.limit)
    rows, fmt = loaded.rows, loaded.format
    if d.unpair and fmt == "paired":
        rows, fmt = unpair_rows(rows), "unpaired"
    designer, _ = fit_designer(build_designer(config.designer, config.reference.cache_dir), rows, fmt, d.path)
    return designer
