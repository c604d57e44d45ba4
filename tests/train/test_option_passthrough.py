"""Every option of every registered loss and aggregator reaches training.

For each option: a two-step tiny-model run with the option at a value other than its default logs
different losses, or ends with different weights, than the same run at the default, and the run's
model card names the value given.
Covering a new plug-in takes only registering it: its options are found in the registry, and a
non-default value is derived from the default (a string option needs one entry in ``CHOSEN``, since
only the plug-in knows its valid values).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from distalign_testing.runs import (
    TINY_BASE,
    final_weights,
    max_weight_difference,
    read_metrics,
    write_shifted_pairs,
)

from distalign.config import load_config
from distalign.losses import LOSSES
from distalign.losses.aggregators import AGGREGATORS
from distalign.train.offline import train_offline

pytestmark = pytest.mark.slow

TWO_STEPS = ["data.limit=8", "train.batch_size=4", "train.micro_batch_size=4", "train.max_steps=2"]
BREVITY = "designer.rewards=[{name: length, alias: brevity}]"
UNPAIRED = "data.path=builtin:quickstart_unpaired.jsonl"

#: What each loss trains on, beyond the quickstart pairs: the designer reward of the losses that read
#: one, unpaired or listwise rows.
LOSS_RUN = {
    "upo": [BREVITY],
    "modpo": [BREVITY],
    "dpo_relabel": [BREVITY],
    "kto": [UNPAIRED],
    "upo_kto": [UNPAIRED, BREVITY],
    "aot_unpaired": [UNPAIRED],
    "plackett_luce": ["data.path=builtin:quickstart_listwise.jsonl"],
}

#: Values chosen by hand ("plug-in.option" before "option"): string options (their valid values), and
#: numbers whose derived value would be invalid (an expectile must stay in (0, 1)) or would not act on
#: a 4-row batch in two steps: a clip nothing reaches; a soft sort, which is the hard sort until its
#: strength exceeds 1 / the largest gap; CVaR's tail, one row at both 0.1 and 0.2 of 4; relabelling,
#: which changes a run only where the compound reward reorders a pair.
CHOSEN = {
    "cost": "least_squares",
    "aux_likelihood": "sequence",
    "expectile": 0.8,
    "weight_clip": 0.5,
    "max_weight": 1.0,
    "soft_sort_strength": 1e5,
    "cvar.alpha": 0.5,
    "dpo_relabel.lambda_aux": 0.1,
}

#: Settings both runs need for an option to act. The soft sort's strength acts with the soft sort on,
#: and not at step 1, where pi = pi_ref makes every gap 0 for any strength (a soft sort keeps the sum,
#: so the gradient is the hard sort's); after that it shows only where the cost is not linear over
#: the gaps (not where the logistic cost saturates), hence a larger beta, a third step and a learning
#: rate found for each loss.
SOFT_SORT = ["loss.soft_sort=true", "loss.beta=1.0", "train.max_steps=3"]
NEEDS = {
    "aot_paired.soft_sort_strength": [*SOFT_SORT, "train.lr=0.05"],
    "aot_unpaired.soft_sort_strength": [*SOFT_SORT, "train.lr=0.003"],
}


def non_default(name: str, option: str, default: object) -> object:
    for key in (f"{name}.{option}", option):
        if key in CHOSEN:
            return CHOSEN[key]
    if isinstance(default, bool):
        return not default
    if isinstance(default, int | float):
        return 0.25 if default == 0 else default * 2
    raise AssertionError(f"option {option!r} (default {default!r}) needs a value in CHOSEN")


CASES = [
    pytest.param("loss", name, option, default, id=f"loss-{name}-{option}")
    for name in LOSSES
    for option, default in LOSSES.get(name).options.items()
] + [
    pytest.param("aggregator", name, option, default, id=f"aggregator-{name}-{option}")
    for name in AGGREGATORS
    for option, default in AGGREGATORS.get(name).options.items()
]


@pytest.fixture(scope="module")
def shifted_pairs(tmp_path_factory) -> Path:
    return write_shifted_pairs(tmp_path_factory.mktemp("data") / "shifted.jsonl", limit=8)


@pytest.fixture(scope="module")
def train_once(tmp_path_factory):
    """Train (once per distinct set of overrides in this module); returns the run directory."""
    runs: dict[tuple[str, ...], Path] = {}

    def train(overrides: list[str]) -> Path:
        key = tuple(overrides)
        if key not in runs:
            out = tmp_path_factory.mktemp("run")
            runs[key] = train_offline(load_config(None, [*TINY_BASE, *TWO_STEPS, f"output_dir={out}", *key]))
        return runs[key]

    return train


def test_every_option_has_a_case():
    assert len(CASES) >= 50  # 46 loss options and 9 aggregator options when this was written


@pytest.mark.parametrize(("section", "name", "option", "default"), CASES)
def test_a_non_default_option_changes_the_run_and_its_card(
    section, name, option, default, train_once, shifted_pairs
):
    if section == "loss":
        base = [f"loss.name={name}", *LOSS_RUN.get(name, [])]
    else:
        base = ["loss.name=dpo", f"data.path={shifted_pairs}", f"aggregator.name={name}"]
    base += NEEDS.get(f"{name}.{option}", [])
    value = non_default(name, option, default)
    at_default = train_once(base)
    changed = train_once([*base, f"{section}.{option}={value}"])

    same_losses = [r["loss"] for r in read_metrics(changed)] == [r["loss"] for r in read_metrics(at_default)]
    same_weights = max_weight_difference(final_weights(changed), final_weights(at_default)) == 0.0
    assert not (same_losses and same_weights), f"{section}.{option}={value} changed nothing"
    card = (changed / "final" / "README.md").read_text()
    assert f"`{option}={value}`" in card
