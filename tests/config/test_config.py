"""Configs: defaults validate, overrides apply, and every mistake names its field."""

from pathlib import Path

import pytest

from distalign.config import ConfigError, dump_config, load_config, parse_overrides


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("loss:\n  name: dpo\n  beta: 0.2\ntrain:\n  batch_size: 4\n  micro_batch_size: 2\n")
    config = load_config(
        path, ["loss.beta=0.5", "output_dir=runs/x", "train.lr=1e-4", "model.lora.enabled=true"]
    )
    assert config.loss.beta == 0.5
    assert config.output_dir == "runs/x"
    assert config.train.lr == pytest.approx(1e-4)
    assert config.model.lora.enabled is True
    assert config.loss.loss_options() == {"beta": 0.5}


def test_parse_overrides_nests_and_parses_yaml_scalars():
    assert parse_overrides(["a.b.c=3", "a.d=true", "e=text"]) == {
        "a": {"b": {"c": 3}, "d": True},
        "e": "text",
    }
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["nonsense"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["loss.betaa=1"], "loss.betaa: unknown field"),
        (["train.lr=fast"], "train.lr"),
        (["train.batch_size=0"], "train.batch_size"),
        (["data.truncation=cut"], "data.truncation"),
        (["loss.name=nope"], "valid names"),
        (["loss.name=dpo", "loss.gamma=0.3"], "loss.gamma is not an option of loss 'dpo'"),
        (["train.batch_size=6", "train.micro_batch_size=4"], "multiple of"),
        (["data.max_prompt_length=300", "data.max_length=256"], "max_prompt_length"),
    ],
)
def test_mistakes_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_unreadable_or_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(scalar)


def test_dump_round_trips(tmp_path):
    config = load_config(None, ["loss.name=ipo", "loss.beta=0.3"])
    saved = tmp_path / "config.yaml"
    saved.write_text(dump_config(config))
    assert load_config(saved) == config


def test_shipped_configs_validate():
    from pathlib import Path

    configs = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))
    assert configs, "no shipped configs found"
    for path in configs:
        load_config(path)


def test_yaml_on_off_reads_as_the_switch_value():
    assert load_config(None, ["data.chat_template=off"]).data.chat_template == "off"
    assert load_config(None, ["data.chat_template=on"]).data.chat_template == "on"
    assert load_config(None, ["eval.chat_template=off"]).eval.chat_template == "off"
    online = load_config(
        Path(__file__).parents[2] / "configs" / "fdpg_tiny.yaml", ["online.prompts.chat_template=off"]
    )
    assert online.online.prompts.chat_template == "off"
    # YAML reads a bare `no` as false; `train.mixed_precision=no` means no mixed precision.
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="mixed_precision"):
        load_config(None, ["train.mixed_precision=yes"])


def _option_cases():
    """(kind, plug-in name, option, a value of the wrong type) for every option of every registered
    loss and aggregator whose default declares a type."""
    from distalign.losses import AGGREGATORS, LOSSES

    wrong = {float: "quarter", int: "quarter", bool: "maybe", str: 3}
    for kind, registry in (("loss", LOSSES), ("aggregator", AGGREGATORS)):
        for name in registry:
            for option, default in registry.get(name).options.items():
                if type(default) in wrong:
                    yield kind, name, option, wrong[type(default)]


@pytest.mark.parametrize(("kind", "name", "option", "value"), list(_option_cases()))
def test_every_plugin_option_is_checked_by_type_naming_the_field_and_value(kind, name, option, value):
    """A value of the wrong type fails at config time with ``kind.option`` and the value, whether the
    option is a typed config field (loss.beta) or only the plug-in's keyword (loss.lambda_aux, every
    aggregator option): ``aggregator.alpha=quarter`` used to exit with "'<' not supported between
    instances of 'float' and 'str'"."""
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"{kind}.name={name}", f"{kind}.{option}={value}"])
    assert f"\n  {kind}.{option}: " in str(info.value)
    assert f"(got {value!r})" in str(info.value)


def test_plugin_option_values_are_coerced_like_config_fields():
    """A quoted number for a float option is that number (as for train.lr), and an int is a float."""
    config = load_config(None, ["aggregator.name=cvar", "aggregator.alpha='0.25'"])
    assert config.aggregator.options() == {"alpha": 0.25}
    config = load_config(None, ["loss.name=upo", "loss.lambda_aux=1"])
    assert config.loss.loss_options()["lambda_aux"] == 1.0
    assert isinstance(config.loss.loss_options()["lambda_aux"], float)


def test_an_option_out_of_range_names_the_field():
    with pytest.raises(ConfigError, match=r"aggregator\.alpha: cvar alpha must lie in \(0, 1\]"):
        load_config(None, ["aggregator.name=cvar", "aggregator.alpha=2"])


def test_the_resume_neutral_fields_are_the_ones_marked_on_the_fields():
    """Marked once, where each field is defined; the resume check reads them from there. Marking a
    field changes what a resume accepts, so this list changes with it, deliberately."""
    from distalign.config import RunConfig
    from distalign.config.base import resume_neutral_fields
    from distalign.train.checkpoints import RESULT_NEUTRAL_FIELDS

    expected = {
        "output_dir",
        "eval",
        "train.log_every",
        "train.save_every",
        "train.keep_checkpoints",
        "train.trackers",
        "train.progress",
        "train.overwrite_output_dir",
        "train.micro_batch_size",
        "train.no_grad_micro_batch_size",
        "train.compile",
        "model.lora.save_merged",
        "model.gradient_checkpointing",
        "model.logprob_chunk_size",
        "data.packing",
        "data.share_prompts",
        "data.group_by_length",
        "train.global_strategy",
        "train.grad_shares",
        "reference.precompute",
        "reference.cache_dir",
    }
    assert set(RESULT_NEUTRAL_FIELDS) == set(resume_neutral_fields(RunConfig)) == expected


def test_loop_settings_given_in_the_loss_section_load_from_their_new_place(tmp_path):
    """coupling_scope, global_strategy and sft_weight moved from loss to train: a config (or a run
    directory's config.yaml) written before the move still loads, with a warning naming the new key, and
    means what it meant."""
    old = tmp_path / "old.yaml"
    old.write_text("loss:\n  name: aot_paired\n  coupling_scope: micro_batch\n  sft_weight: 0.25\n")
    with pytest.warns(FutureWarning, match=r"loss.sft_weight is now train.sft_weight"):
        config = load_config(old)
    assert config.train.coupling_scope == "micro_batch" and config.train.sft_weight == 0.25
    assert "coupling_scope" not in config.loss.model_dump()
    # The same settings at both places must agree; otherwise the config is ambiguous.
    with pytest.warns(FutureWarning):
        assert load_config(old, ["train.sft_weight=0.25"]).train.sft_weight == 0.25
    with pytest.raises(ConfigError, match=r"loss.sft_weight \(0.25\) and train.sft_weight \(0.5\)"):
        load_config(old, ["train.sft_weight=0.5"])
