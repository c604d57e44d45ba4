"""Fixtures for tiny-model training runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from distalign_testing.runs import TINY_BASE

from distalign.config import load_config
from distalign.train.offline import train_offline


@pytest.fixture
def run_tiny(tmp_path):
    """Train the tiny model with overrides; returns the run directory."""

    def run(*overrides: str, name: str = "run", stop_after_step: int | None = None) -> Path:
        config = load_config(None, [*TINY_BASE, f"output_dir={tmp_path / name}", *overrides])
        return train_offline(config, stop_after_step=stop_after_step)

    return run
