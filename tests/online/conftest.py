"""Shared fixtures of the online-loop tests: one torch thread and small tiny-model run configs."""

from __future__ import annotations

from typing import Any

import pytest

from distalign.config import RunConfig, build_config, merge_config_trees


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread(single_thread_torch):
    """Every module here runs on tiny tensors or the tiny model (see the root conftest)."""


#: The tiny random model writes byte soup; about 37% of its 8-token completions contain an "s", so a
#: constraint on that letter has a learning signal from the first step.
LETTER_S = {"kind": "constraint", "feature": {"name": "regex", "pattern": "s"}}


def _tiny_online_config(output_dir, **sections: Any) -> RunConfig:
    """An unconditional f-DPG run on the tiny model (32 samples of 8 tokens per step), with overrides."""
    tree = {
        "output_dir": str(output_dir),
        "model": {"name": "tiny"},
        "train": {
            "seed": 0,
            "batch_size": 32,
            "micro_batch_size": 16,
            "max_steps": 4,
            "lr": 3e-3,
            "scheduler": "constant",
            "log_every": 1,
            "progress": False,
        },
        "online": {
            "method": "fdpg",
            "divergence": "jensen_shannon",
            "target": {"scorers": [LETTER_S]},
            "prompts_per_step": 4,
            "samples_per_prompt": 8,
            "max_new_tokens": 8,
        },
    }
    return build_config(merge_config_trees(tree, sections), "test")


@pytest.fixture
def online_config():
    """``factory(output_dir, **sections) -> RunConfig``: an unconditional f-DPG run on the tiny model
    (4 steps of 32 samples of 8 tokens, constraint: contains an "s"); ``sections`` are merged in."""
    return _tiny_online_config
