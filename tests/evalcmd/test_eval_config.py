"""The `eval:` config section: defaults, YAML spellings, and errors that name the field."""

from __future__ import annotations

import pytest

from distalign.config import ConfigError, RunConfig, load_config


def test_defaults_are_documented_and_valid():
    config = load_config(None, [])
    assert config.eval.task == "sentiment" and config.eval.split == "heldout"
    assert config.eval.num_prompts == 64 and config.eval.samples_per_prompt == 2
    for name, field in type(config.eval).model_fields.items():
        assert field.description, f"eval.{name} has no docstring"
    assert "eval" in RunConfig.model_fields


@pytest.mark.parametrize(
    ("raw", "expected"), [("off", "off"), ("on", "on"), ("auto", "auto"), ("false", "off")]
)
def test_chat_template_accepts_yaml_on_off(raw, expected):
    assert load_config(None, [f"eval.chat_template={raw}"]).eval.chat_template == expected


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "eval.task=sentimnt",
            "eval.task: unknown task 'sentimnt'; valid names: keyword, readability",
        ),
        ("eval.samples_per_prompt=0", "eval.samples_per_prompt"),
        ("eval.alpha=1.5", "eval.alpha"),
        ("eval.split=test", "eval.split"),
        ("eval.temperature=0.7", "eval.temperature: unknown field"),
    ],
)
def test_bad_values_name_the_field(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert message in str(info.value)
