"""Helpers shared by the command modules."""

from __future__ import annotations

from collections.abc import Sequence

EPILOG_OVERRIDES = """\
Overrides use dotted keys and YAML values, e.g.:
  distalign train configs/quickstart.yaml loss.name=ipo loss.beta=0.5 train.max_steps=20 output_dir=runs/ipo
"""


def split_config_and_overrides(items: Sequence[str]) -> tuple[str | None, list[str]]:
    """The first item without '=' is the config file; the rest are key=value overrides."""
    config, overrides = None, []
    for item in items:
        if config is None and not overrides and "=" not in item:
            config = item
        else:
            overrides.append(item)
    return config, overrides


def load_run_config(items: Sequence[str]):
    """Load and validate a run config from ``[CONFIG] [KEY=VALUE ...]``."""
    from distalign.config import load_config

    config_path, overrides = split_config_and_overrides(items)
    return load_config(config_path, overrides)
