"""data.packing in the online loop: the update's forward over a step's samples is packed, each
prompt's samples sharing one copy of it, and applies the padded forward's gradient (float64)."""

from __future__ import annotations

import pytest
import torch
from distalign_testing.runs import gradients_close, largest_gradient, read_metrics, step_gradient

import distalign.train.online.update as online_update
from distalign.train.online import train_online

RLOO_TASK = {
    "method": "rloo",
    "target": None,
    "reward": {"name": "regex", "pattern": "s"},
    "kl_coef": 0.05,
    "prompts": {"task": "keyword", "task_settings": {"topic": "amazing"}},
}


@pytest.mark.parametrize(
    ("online", "micro_batch_size"),
    [
        ({}, 16),  # f-DPG, unconditional: one prompt shared by all of a micro-batch's samples
        (RLOO_TASK, 32),  # RLOO on task prompts: 4 prompts x 8 samples in one packed forward
    ],
    ids=["fdpg", "rloo"],
)
def test_packed_update_applies_the_padded_gradient(
    tmp_path, online_config, float64_norms, plant_packing_bug, online, micro_batch_size
):
    def gradient(packing: bool, name: str = "") -> torch.Tensor:
        config = online_config(
            tmp_path / (name or str(packing)),
            model={"dtype": "float64"},
            data={"packing": packing},
            train={"micro_batch_size": micro_batch_size},
            online=online,
        )
        return step_gradient(lambda: train_online(config, stop_after_step=2), step=2)

    padded, packed = gradient(False), gradient(True)
    assert largest_gradient(padded) > 0
    assert gradients_close(packed, padded, tol=1e-10)
    records = read_metrics(tmp_path / "True")
    assert records[0]["tokens/shared_fraction"] > 0  # the shared prompts went through the model once
    plant_packing_bug(online_update)  # the check can fail: a packer that drops a completion token
    assert not gradients_close(gradient(True, "planted"), padded, tol=1e-3)
