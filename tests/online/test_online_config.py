"""The ``online`` config section: shipped configs load, and every mistake names its field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from distalign.config import ConfigError, load_config

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("fdpg_*.yaml")) + sorted(
    (Path(__file__).parents[2] / "configs").glob("rloo_*.yaml")
)
FDPG = [
    "online.method=fdpg",
    "online.target={scorers: [{kind: constraint, feature: {name: contains_word, word: park}}]}",
]


def test_the_shipped_online_configs_are_valid():
    assert len(CONFIGS) >= 5
    for path in CONFIGS:
        config = load_config(path)
        assert config.online is not None, path
        assert config.online.prompts_per_step * config.online.samples_per_prompt == config.train.batch_size


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["online.divergence=kl"], "divergence: unknown f-divergence 'kl'"),
        (["online.divergence=alpha"], "divergence_params: 'alpha' takes alpha"),
        (
            ["online.divergence_params={alpha: 0.5}"],
            "divergence_params: 'jensen_shannon' takes no parameters",
        ),
        (["online.method=fdpg"], "needs online.target"),
        (["online.method=rloo"], "needs online.reward"),
        (["online.method=rloo", "online.reward=length", "online.baseline=window"], "leave-one-out"),
        (["online.samples_per_prompt=1"], "samples_per_prompt >= 2"),
        (["online.target={scorers: [{kind: constrain}]}"], "scorers[0].kind: unknown scorer 'constrain'"),
        (["online.target={scorers: []}"], "online.target.scorers"),
        (["online.prompts.task=keywrd"], "task: unknown task 'keywrd'"),
        (["online.prompts.task=keyword", "online.prompts.path=x.jsonl"], "not both"),
        (["online.samples_per_promt=4"], "online.samples_per_promt: unknown field"),
        (["online.qrs_acceptance_rates=[0.0]"], "must be in (0, 1]"),
        (["online.max_new_tokens=0"], "online.max_new_tokens"),
        (["online.refresh_divergence=foo"], "refresh_divergence: unknown f-divergence"),
    ],
)
def test_invalid_online_settings_name_the_field(overrides: list[str], message: str):
    base = [] if any(o.startswith("online.method=") for o in overrides) else FDPG
    with pytest.raises(ConfigError) as error:
        load_config(None, base + overrides)
    assert message in str(error.value)


def test_reward_and_target_belong_to_their_methods():
    with pytest.raises(ConfigError, match="online.reward is for the methods scored by a reward"):
        load_config(None, [*FDPG, "online.reward=length"])
    with pytest.raises(ConfigError, match="online.target is for method 'fdpg'"):
        load_config(None, [*FDPG, "online.method=reinforce", "online.reward=length"])


@pytest.mark.parametrize(
    ("divergence", "params"), [("reverse_kl", ""), ("neyman_chi2", ""), ("alpha", "{alpha: 1.5}")]
)
def test_divergences_infinite_off_the_support_refuse_a_hard_constraint(divergence, params):
    extra = [f"online.divergence_params={params}"] if params else []
    with pytest.raises(ConfigError, match=r"target.scorers\[0\] is a hard constraint: give it an epsilon"):
        load_config(None, [*FDPG, f"online.divergence={divergence}", *extra])
    soft = "online.target={scorers: [{kind: constraint, epsilon: 0.001, feature: {name: contains_word, word: park}}]}"
    assert (
        load_config(None, [*FDPG, soft, f"online.divergence={divergence}", *extra]).online.divergence
        == divergence
    )
    for finite in ("forward_kl", "jensen_shannon", "total_variation", "pearson_chi2"):
        load_config(None, [*FDPG, f"online.divergence={finite}"])  # finite there: a hard constraint is fine


@pytest.mark.parametrize("override", ["aggregator.name=cvar", "loss.name=ipo", "loss.beta=0.5"])
def test_an_offline_setting_in_an_online_run_is_refused_naming_it(override):
    """The online loop reads neither the loss nor the aggregator section: a setting there would be
    silently ignored."""
    field = override.split("=")[0]
    with pytest.raises(ConfigError, match=f"{field}: the {field.split('.')[0]} section is for offline runs"):
        load_config(None, [*FDPG, override])


@pytest.mark.parametrize("override", ["train.sft_weight=0.5", "train.coupling_scope=micro_batch"])
def test_an_offline_loop_setting_in_an_online_run_is_refused_naming_it(override):
    """The loop settings that moved out of the loss section (the SFT term, the batch coupling) are read by
    the offline loop only: an online run refuses them as it refuses a loss setting."""
    field = override.split("=")[0]
    with pytest.raises(ConfigError, match=f"{field}: an offline-loop setting"):
        load_config(None, [*FDPG, override])


def test_a_saved_online_config_loads_back():
    """A run saves its config with every default written out (loss, aggregator and online.vllm
    included); reading it back (``distalign eval RUN``, the model card's refresh) must not refuse those
    defaults as settings."""
    from distalign.config import build_config, dump_config

    saved = dump_config(load_config(None, FDPG))
    assert "vllm:" in saved and "aggregator:" in saved
    assert build_config(yaml.safe_load(saved)) == load_config(None, FDPG)
