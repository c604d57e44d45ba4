"""Tier (c) for the shipped launch configs: two CPU processes (gloo) under ``accelerate launch`` train
what one process trains: in float64 for DDP and FSDP2, in float32 for DeepSpeed (its ZeRO optimizers
keep float32 master weights).

accelerate 1.15 runs FSDP and DeepSpeed only on accelerators; ``DISTALIGN_CPU_SHARDING=1`` makes
distalign put accelerate into FSDP2 mode on CPU (torch's ``fully_shard`` works over gloo) or let
DeepSpeed's CPU accelerator build the process group (gloo), so accelerate's own FSDP2 and DeepSpeed code
paths (preparation, sharded checkpoints, gathering the final model) run here as they do on GPUs.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from distalign_testing.runs import (
    ACCELERATE_CONFIGS,
    TINY_BASE,
    accelerate_launch,
    distance_trained,
    final_weights,
    gradients_close,
    largest_gradient,
    max_weight_difference,
    read_metrics,
    run_gradient,
)

from distalign.config import load_config
from distalign.train.distributed import CPU_SHARDING_ENV
from distalign.train.offline import train_offline

pytestmark = pytest.mark.slow

CPU_SHARDING = {CPU_SHARDING_ENV: "1"}
# Clipping at 0.05 is active on every step here, so equal weights also mean a globally reduced norm.
DPO = [
    *TINY_BASE,
    "loss.name=dpo",
    "model.dtype=float64",
    "train.batch_size=8",
    "train.micro_batch_size=2",
    "train.max_steps=4",
    "train.max_grad_norm=0.05",
]


def launch_train(config: str, run_dir, *overrides: str) -> str:
    """Train under ``configs/accelerate/CONFIG.yaml`` with two processes; returns their stdout and
    stderr."""
    args = ["-m", "distalign", "train", *overrides, f"output_dir={run_dir}"]
    result = accelerate_launch(ACCELERATE_CONFIGS / f"{config}.yaml", args, env=CPU_SHARDING)
    return result.stdout + result.stderr


@pytest.mark.parametrize("config", ["ddp", "fsdp2", "fsdp2_offload"])
def test_two_process_launch_trains_what_one_process_trains(tmp_path, config):
    """Final weights (gathered from the shards into one save_pretrained folder) and the logged global
    losses agree; under FSDP2 the reference table is scored by the sharded policy (its own cache)."""
    single = train_offline(load_config(None, [*DPO, f"output_dir={tmp_path / 'one'}"]))
    out = launch_train(config, tmp_path / config, *DPO, f"reference.cache_dir={tmp_path / 'cache'}")
    assert "reference log-probs: computing" in out
    assert max_weight_difference(final_weights(single), final_weights(tmp_path / config)) < 1e-12
    assert distance_trained(single) > 1e-4  # the control: the runs compared did train
    assert [r["loss"] for r in read_metrics(tmp_path / config)] == pytest.approx(
        [r["loss"] for r in read_metrics(single)], abs=1e-12
    )
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / config / "final")
    assert reloaded.dtype == torch.float64


AOT = [
    *TINY_BASE,
    "loss.name=aot_paired",
    "loss.beta=1.0",
    "train.batch_size=8",
    "model.dtype=float64",
]


def test_aot_global_coupling_under_fsdp2_applies_the_one_process_gradient(tmp_path):
    """Two FSDP2 processes x two micro-batches each couple the whole global batch exactly: the gradient
    step 3 applies (gathered from the shards) is the one of a single process on the whole batch."""
    step = 3  # at step 1 the policy is its reference and every AOT gap is 0
    whole = run_gradient(tmp_path / "whole", *AOT, "train.micro_batch_size=8", step=step)
    out = tmp_path / "fsdp2.pt"
    probe = ["-m", "distalign_testing.grad_probe", str(out), str(step)]
    overrides = [*AOT, "train.micro_batch_size=2", f"output_dir={tmp_path / 'fsdp2'}"]
    accelerate_launch(ACCELERATE_CONFIGS / "fsdp2.yaml", [*probe, *overrides], env=CPU_SHARDING)
    sharded = torch.load(out, weights_only=True)
    assert largest_gradient(whole) > 0
    assert gradients_close(sharded, whole)
    # The check can fail: the same micro-batches of 2, each sorted on its own, apply another gradient.
    local = ["train.micro_batch_size=2", "train.coupling_scope=micro_batch"]
    assert not gradients_close(run_gradient(tmp_path / "local", *AOT, *local, step=step), whole, tol=1e-3)


def test_fsdp2_run_resumes_exactly_from_its_sharded_checkpoint(tmp_path):
    """Every process writes its shard of the checkpoint (torch.distributed.checkpoint), all of them
    under checksums.json; a resumed run ends bit for bit where the uninterrupted one did."""
    run = tmp_path / "run"
    args = [*AOT, "train.micro_batch_size=2", "train.max_steps=4", "train.save_every=2"]
    launch_train("fsdp2", run, *args)
    checkpoint = run / "checkpoints" / "step_2"
    shards = sorted(p.name for p in (checkpoint / "pytorch_model_fsdp_0").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]
    assert "pytorch_model_fsdp_0/__1_0.distcp" in (checkpoint / "checksums.json").read_text()
    straight = final_weights(run)
    losses = [r["loss"] for r in read_metrics(run)]
    (run / "final").rename(tmp_path / "uninterrupted_final")  # as if stopped after the checkpoint
    out = launch_train("fsdp2", run, *args)
    assert "resumed from step 2" in out
    assert max_weight_difference(straight, final_weights(run)) == 0.0
    assert [r["loss"] for r in read_metrics(run)] == losses


def test_lora_under_fsdp2_trains_what_one_process_trains(tmp_path):
    """Frozen base and trainable adapters share FSDP2 units; the reference is the base with adapters
    off, scored through the sharded model; final/ holds the merged model and the adapter."""
    lora = [*DPO, "model.lora.enabled=true", "model.lora.r=4", "train.lr=5e-3"]
    single = train_offline(load_config(None, [*lora, f"output_dir={tmp_path / 'one'}"]))
    launch_train("fsdp2", tmp_path / "fsdp2", *lora, f"reference.cache_dir={tmp_path / 'cache'}")
    assert max_weight_difference(final_weights(single), final_weights(tmp_path / "fsdp2")) < 1e-12
    from safetensors.torch import load_file

    adapter = "final/adapter/adapter_model.safetensors"
    assert max_weight_difference(load_file(single / adapter), load_file(tmp_path / "fsdp2" / adapter)) < 1e-12


def test_fsdp2_mixed_precision_scores_the_reference_at_the_policys_precision_and_saves_the_loaded_dtype(
    tmp_path,
):
    """bf16 weights under bf16 mixed precision: FSDP2 trains fp32 master weights and computes in bf16.
    The reference table, scored through the same sharded forward, makes the first DPO loss exactly
    ln 2; final/ is saved in bf16, the dtype the model was loaded in."""
    from safetensors.torch import load_file

    args = [*DPO, "model.dtype=bfloat16", "train.mixed_precision=bf16", "train.max_steps=2"]
    launch_train("fsdp2", tmp_path / "bf16", *args, f"reference.cache_dir={tmp_path / 'cache'}")
    assert read_metrics(tmp_path / "bf16")[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    weights = load_file(tmp_path / "bf16" / "final" / "model.safetensors")
    assert {tensor.dtype for tensor in weights.values()} == {torch.bfloat16}


needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed (the dev extra has it)"
)
# DeepSpeed's ZeRO optimizers step float32 master weights (float64 is refused): both sides in float32,
# so the runs agree to float32 summation order. A real difference (a gradient coupled over the wrong
# rows, a wrong scale) moves weights by ~lr = 1e-3 and norms by percents.
FLOAT32 = ["model.dtype=float32"]
WEIGHT_TOLERANCE = 2e-5


def grad_norms(run_dir) -> list[float]:
    """The logged pre-clip norms of the whole gradient, one per step."""
    return [record["grad_norm"] for record in read_metrics(run_dir)]


@needs_deepspeed
@pytest.mark.parametrize("config", ["zero2", "zero3"])
def test_deepspeed_launch_trains_what_one_process_trains(tmp_path, config):
    """ZeRO-2 and ZeRO-3 over 2 processes x 2 micro-batches: DeepSpeed steps inside the last
    micro-batch's backward and clips with the norm of the whole gradient; the final model (gathered
    from ZeRO-3's partitions) and every step's loss and gradient norm equal one process's. ZeRO-3 also
    packs (the policy loads into partitions, which the packing probe cannot run: a known architecture)."""
    args = [*DPO, *FLOAT32, f"reference.cache_dir={tmp_path / 'cache'}"]
    args += ["data.packing=true"] if config == "zero3" else []
    single = train_offline(load_config(None, [*args, f"output_dir={tmp_path / 'one'}"]))
    out = launch_train(config, tmp_path / config, *args)
    assert "Warning" not in out, "DeepSpeed's deprecation warnings reach the user"
    # The reference cache is keyed by the weights' fingerprint: ZeRO-3's partitions, gathered for it,
    # give the whole model's, so the table one process scored is found.
    assert "reference log-probs: reusing cache" in out
    assert max_weight_difference(final_weights(single), final_weights(tmp_path / config)) < WEIGHT_TOLERANCE
    assert distance_trained(single) > 100 * WEIGHT_TOLERANCE  # the control: the runs compared did train
    assert [r["loss"] for r in read_metrics(tmp_path / config)] == pytest.approx(
        [r["loss"] for r in read_metrics(single)], abs=1e-6
    )
    assert grad_norms(tmp_path / config) == pytest.approx(grad_norms(single), rel=1e-5)


@needs_deepspeed
def test_aot_global_coupling_under_zero3_trains_what_one_process_trains(tmp_path):
    """AOT couples the whole global batch (recompute strategy: a no-grad pass, then one backward per
    micro-batch, DeepSpeed stepping in the last). Coupling each micro-batch alone instead (the
    same run with train.coupling_scope=micro_batch, on one process) is far outside the tolerance."""
    args = [*AOT, *FLOAT32, "train.max_steps=4", "train.max_grad_norm=10"]

    def one_process(name: str, *extra: str):
        return train_offline(load_config(None, [*args, *extra, f"output_dir={tmp_path / name}"]))

    whole = one_process("whole", "train.micro_batch_size=8")
    local = one_process("local", "train.micro_batch_size=2", "train.coupling_scope=micro_batch")
    launch_train("zero3", tmp_path / "zero3", *args, "train.micro_batch_size=2")
    zero3 = final_weights(tmp_path / "zero3")
    assert max_weight_difference(final_weights(whole), zero3) < WEIGHT_TOLERANCE
    assert max_weight_difference(final_weights(local), zero3) > 100 * WEIGHT_TOLERANCE
    assert grad_norms(tmp_path / "zero3") == pytest.approx(grad_norms(whole), rel=1e-5)


@needs_deepspeed
@pytest.mark.parametrize("config", ["zero2", "zero3"])
def test_deepspeed_run_resumes_exactly_from_its_checkpoint(tmp_path, config):
    """DeepSpeed's checkpoint (its model and per-process optimizer partitions) under checksums.json;
    the resumed run ends bit for bit where the uninterrupted one did."""
    run = tmp_path / "run"
    args = [*AOT, *FLOAT32, "train.micro_batch_size=2", "train.max_steps=4", "train.save_every=2"]
    launch_train(config, run, *args)
    checksums = (run / "checkpoints" / "step_2" / "checksums.json").read_text()
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in checksums
    straight = final_weights(run)
    losses = [r["loss"] for r in read_metrics(run)]
    (run / "final").rename(tmp_path / "uninterrupted_final")
    assert "resumed from step 2" in launch_train(config, run, *args)
    assert max_weight_difference(straight, final_weights(run)) == 0.0
    assert [r["loss"] for r in read_metrics(run)] == losses


@needs_deepspeed
def test_lora_under_zero3_trains_what_one_process_trains(tmp_path):
    lora = [*DPO, *FLOAT32, "model.lora.enabled=true", "model.lora.r=4", "train.lr=5e-3"]
    single = train_offline(load_config(None, [*lora, f"output_dir={tmp_path / 'one'}"]))
    launch_train("zero3", tmp_path / "zero3", *lora, f"reference.cache_dir={tmp_path / 'cache'}")
    assert max_weight_difference(final_weights(single), final_weights(tmp_path / "zero3")) < WEIGHT_TOLERANCE
    from safetensors.torch import load_file

    adapter = "final/adapter/adapter_model.safetensors"
    adapters = load_file(single / adapter), load_file(tmp_path / "zero3" / adapter)
    assert max_weight_difference(*adapters) < WEIGHT_TOLERANCE


@needs_deepspeed
def test_zero3_bf16_mode_trains_and_saves_bf16_weights(tmp_path):
    """DeepSpeed's bf16 mode (train.mixed_precision=bf16): the policy loads straight into bf16 ZeRO-3
    partitions, trains with float32 masters, and final/ is gathered in bf16; the reference table,
    scored by the same partitioned policy, makes the first loss ln 2."""
    from safetensors.torch import load_file

    args = [*DPO, "model.dtype=bfloat16", "train.mixed_precision=bf16", "train.max_steps=2"]
    launch_train("zero3", tmp_path / "bf16", *args)
    assert read_metrics(tmp_path / "bf16")[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    weights = load_file(tmp_path / "bf16" / "final" / "model.safetensors")
    assert {tensor.dtype for tensor in weights.values()} == {torch.bfloat16}
