"""train.compile: the policy's decoder layers compiled with torch.compile (inductor runs on the CPU)
train as eager ones do, padded and packed (span attention stays outside the compiled graph)."""

from __future__ import annotations

import pytest
import torch
from distalign_testing.runs import gradients_close, largest_gradient, run_gradient

from distalign.config import load_config
from distalign.errors import SetupError
from distalign.train.setup import wrap_for_training


@pytest.mark.slow
def test_compiled_layers_apply_the_eager_gradient(tmp_path):
    """Float64 weights; Llama's RMSNorm computes in float32, where fused and unfused kernels round
    differently (about 1e-7 relative), hence the tolerance."""
    common = ["loss.name=dpo", "train.batch_size=8", "train.micro_batch_size=4", "model.dtype=float64"]
    common += ["data.packing=true"]
    eager = run_gradient(tmp_path / "eager", *common, step=1)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = run_gradient(tmp_path / "compiled", *common, "train.compile=true", step=1)
    # The control: the layers really ran compiled (a compile that never happened would pass trivially).
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    assert largest_gradient(eager) > 0 and gradients_close(compiled, eager, tol=1e-6)
    torch._dynamo.reset()


def test_a_model_without_decoder_layers_is_refused_naming_it():
    class NoLayers(torch.nn.Module):
        def forward(self, input_ids):
            return input_ids

    config = load_config(None, ["train.compile=true"])
    with pytest.raises(SetupError, match=r"train.compile: NoLayers has no list of decoder layers"):
        wrap_for_training(NoLayers(), config)
