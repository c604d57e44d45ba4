"""The shipped launch configs (configs/accelerate/) as accelerate reads them, and the launches distalign
refuses before anything loads. No process group is started here (tests/train/test_sharded_runs.py
trains under the configs with two CPU processes)."""

from __future__ import annotations

import importlib.util
import os

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env
from distalign_testing.runs import ACCELERATE_CONFIGS, TINY_BASE

from distalign.config import load_config
from distalign.errors import SetupError
from distalign.train.distributed import (
    CPU_SHARDING_ENV,
    configure_deepspeed,
    launch_plugins,
    sharding_of,
    sharding_problems,
)

SHIPPED = {
    "ddp": DistributedType.MULTI_GPU,
    "fsdp2": DistributedType.FSDP,
    "fsdp2_offload": DistributedType.FSDP,
    "zero2": DistributedType.DEEPSPEED,
    "zero3": DistributedType.DEEPSPEED,
}
DEEPSPEED_MISSING = importlib.util.find_spec("deepspeed") is None


@pytest.fixture(autouse=True)
def _environment_restored():
    """accelerate's plugins write some of their settings into os.environ (e.g. FSDP's
    cpu_ram_efficient_loading); keep them from leaking into later tests."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def run_config(*overrides: str):
    return load_config(None, [*TINY_BASE, "output_dir=unused", *overrides])


def launch_environment(name: str) -> dict[str, str]:
    """The environment ``accelerate launch --config_file configs/accelerate/NAME.yaml`` gives every
    process, computed by accelerate's own launcher code (argument parser, config-file validation and
    the per-launcher environment), without starting anything."""
    args = launch_command_parser().parse_args(
        ["--config_file", str(ACCELERATE_CONFIGS / f"{name}.yaml"), "-m", "distalign", "train"]
    )
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        return prepare_deepspeed_cmd_env(args)[1]
    return prepare_multi_gpu_env(args)


@pytest.fixture
def launched(monkeypatch):
    """Put a shipped config's launch environment into this process; returns the plugins built from it."""

    def launch(name: str):
        for key, value in launch_environment(name).items():
            if key.startswith(("ACCELERATE_", "FSDP_")):
                monkeypatch.setenv(key, value)
        return launch_plugins()

    return launch


def test_every_shipped_config_is_listed_and_parses_with_accelerates_loader():
    assert {path.stem for path in ACCELERATE_CONFIGS.glob("*.yaml")} == set(SHIPPED)
    for name, kind in SHIPPED.items():
        config = load_config_from_file(str(ACCELERATE_CONFIGS / f"{name}.yaml"))
        assert config.distributed_type == kind, name
        assert config.mixed_precision == "no", f"{name}: precision is distalign's train.mixed_precision"


@pytest.mark.parametrize("name", ["ddp", "fsdp2", "fsdp2_offload"])
def test_ddp_and_fsdp2_configs_give_the_plugins_distalign_trains_with(launched, name):
    from torch.distributed.fsdp import CPUOffloadPolicy

    fsdp, deepspeed = launched(name)
    assert deepspeed is None
    if name == "ddp":
        assert fsdp is None
        assert sharding_of(fsdp, deepspeed).name == "DDP"
        return
    assert fsdp.fsdp_version == 2
    assert fsdp.state_dict_type.name == "SHARDED_STATE_DICT"
    assert fsdp.reshard_after_forward is True
    assert isinstance(fsdp.cpu_offload, CPUOffloadPolicy) == (name == "fsdp2_offload")
    assert sharding_of(fsdp, deepspeed).shards_parameters
    assert sharding_problems(fsdp, deepspeed, run_config(), cpu_only=False) == []


@pytest.mark.parametrize("name, stage", [("zero2", 2), ("zero3", 3)])
def test_deepspeed_configs_give_the_plugins_distalign_trains_with(launched, name, stage):
    fsdp, deepspeed = launched(name)
    assert fsdp is None
    assert deepspeed.zero_stage == stage
    assert sharding_of(fsdp, deepspeed).shards_parameters == (stage == 3)
    ds = deepspeed.deepspeed_config
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "none"
    if stage == 3:
        assert deepspeed.zero3_init_flag is True
        assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    config = run_config("train.micro_batch_size=4", "train.max_grad_norm=0.5")
    problems = sharding_problems(fsdp, deepspeed, config, cpu_only=False)
    assert problems == (
        ["the launch config asks for DeepSpeed, which is not installed (pip install deepspeed)"]
        if DEEPSPEED_MISSING
        else []
    )
    configure_deepspeed(deepspeed, config)
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 1
    assert ds["gradient_clipping"] == 0.5


def test_clipping_off_reaches_deepspeed_as_zero(launched):
    _, deepspeed = launched("zero2")
    configure_deepspeed(deepspeed, run_config("train.max_grad_norm=null"))
    assert deepspeed.deepspeed_config["gradient_clipping"] == 0.0


def deepspeed_plugin(stage: int = 2, **entries) -> DeepSpeedPlugin:
    """A plugin as accelerate builds it from a DeepSpeed config file with these top-level ``entries``
    (``zero``: entries of its zero_optimization section)."""
    zero = {"stage": stage, **entries.pop("zero", {})}
    return DeepSpeedPlugin(hf_ds_config={"zero_optimization": zero, **entries})


def only_problem(problems: list[str]) -> str:
    problems = [p for p in problems if "not installed" not in p]
    assert len(problems) == 1, problems
    return problems[0]


@pytest.mark.parametrize(
    "plugin, overrides, named",
    [
        (lambda: deepspeed_plugin(optimizer={"type": "AdamW"}), [], "`optimizer` section"),
        (lambda: deepspeed_plugin(scheduler={"type": "WarmupLR"}), [], "`scheduler` section"),
        (lambda: deepspeed_plugin(gradient_accumulation_steps=4), [], "gradient_accumulation_steps 4"),
        (lambda: deepspeed_plugin(gradient_clipping=2.0), ["train.max_grad_norm=1.0"], "train.max_grad_norm"),
        (
            lambda: deepspeed_plugin(train_micro_batch_size_per_gpu=2),
            ["train.micro_batch_size=8"],
            "train_micro_batch_size_per_gpu 2",
        ),
        (lambda: deepspeed_plugin(zero={"offload_optimizer": {"device": "cpu"}}), [], "offload_optimizer"),
        (
            lambda: deepspeed_plugin(3, zero={"stage3_gather_16bit_weights_on_model_save": False}),
            [],
            "zero3_save_16bit_model",
        ),
        (lambda: deepspeed_plugin(), ["model.dtype=float64"], "float32 master weights"),
        (
            lambda: deepspeed_plugin(3, zero={"stage3_gather_16bit_weights_on_model_save": True}),
            ["model.dtype=bfloat16", "train.mixed_precision=no"],
            "set train.mixed_precision=bf16",
        ),
    ],
)
def test_deepspeed_settings_distalign_cannot_honour_are_refused_by_name(plugin, overrides, named):
    problem = only_problem(sharding_problems(None, plugin(), run_config(*overrides), cpu_only=False))
    assert named in problem


@pytest.mark.parametrize(
    "plugin, overrides, named",
    [
        (lambda: FullyShardedDataParallelPlugin(fsdp_version=1), [], "fsdp_version 1"),
        (
            lambda: FullyShardedDataParallelPlugin(fsdp_version=2, cpu_ram_efficient_loading=True),
            [],
            "fsdp_cpu_ram_efficient_loading",
        ),
        (
            lambda: FullyShardedDataParallelPlugin(fsdp_version=2, activation_checkpointing=True),
            ["model.gradient_checkpointing=true"],
            "model.gradient_checkpointing",
        ),
        (
            lambda: FullyShardedDataParallelPlugin(fsdp_version=2),
            ["reference.precompute=false"],
            "reference.precompute",
        ),
    ],
)
def test_fsdp_settings_distalign_cannot_honour_are_refused_by_name(plugin, overrides, named):
    problem = only_problem(sharding_problems(plugin(), None, run_config(*overrides), cpu_only=False))
    assert named in problem


def test_sharded_launches_without_gpus_are_refused_unless_sharding_on_cpu_is_asked_for(monkeypatch):
    """accelerate would quietly train these with DDP on a CPU-only machine."""
    fsdp = FullyShardedDataParallelPlugin(fsdp_version=2)
    deepspeed = deepspeed_plugin()
    monkeypatch.delenv(CPU_SHARDING_ENV, raising=False)
    for fsdp_or_none, deepspeed_or_none in ((fsdp, None), (None, deepspeed)):
        problem = only_problem(
            sharding_problems(fsdp_or_none, deepspeed_or_none, run_config(), cpu_only=True)
        )
        assert "without GPUs" in problem and CPU_SHARDING_ENV in problem
    monkeypatch.setenv(CPU_SHARDING_ENV, "1")
    assert sharding_problems(fsdp, None, run_config(), cpu_only=True) == []
    assert [
        p for p in sharding_problems(None, deepspeed, run_config(), cpu_only=True) if "not installed" not in p
    ] == []


def test_engine_refuses_a_deepspeed_launch_here_before_anything_loads(monkeypatch, tmp_path):
    from distalign.train.distributed import no_accelerator_present
    from distalign.train.engine import Engine

    if not no_accelerator_present():
        pytest.skip("checks the CPU-only refusal")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    config = load_config(None, [*TINY_BASE, f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(SetupError, match="DeepSpeed launch config on a machine without GPUs"):
        Engine(config)
    assert not (tmp_path / "run").exists()
