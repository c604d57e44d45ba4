"""How the processes of a run hold the model: one process, DDP, FSDP2 or DeepSpeed ZeRO, as launched.

``accelerate launch --config_file configs/accelerate/NAME.yaml`` hands its choice to every process in
environment variables. accelerate's own plugin classes read them here, so distalign and accelerate agree
on what a launch config means; :func:`sharding_problems` then checks the combination against the run
config and refuses, before any model or data loads, what distalign cannot train exactly (each problem
names the setting to change). docs/distributed.md explains the choices. The device, the precision
and the process group's end (waiting on every group, tearing them down) are chosen here too.

Two facts about accelerate 1.15 shape this module:

* Without an accelerator it ignores an FSDP or DeepSpeed launch config and trains with plain DDP over
  gloo, silently. distalign refuses such a launch instead, unless sharding on CPU is asked for
  (``DISTALIGN_CPU_SHARDING=1``): torch's ``fully_shard`` works over gloo, and
  :func:`force_fsdp2_on_cpu` puts accelerate's state into FSDP mode so its own FSDP2 code path
  (preparation, sharded checkpoints, full state dicts) runs; DeepSpeed has a CPU accelerator that
  communicates over gloo, reached by building the process group without ``cpu=True``
  (:func:`accelerator_device_arguments`). That is how the test suite checks the sharded paths on a
  CPU-only machine.
* DeepSpeed steps its optimizer inside ``accelerator.backward`` whenever accelerate says gradients are
  synchronised; the engine sets that flag per micro-batch itself (``Engine.sync_context``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, NoReturn

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin

    from distalign.config import RunConfig

#: Set to 1 to run an FSDP2 or DeepSpeed launch config on a machine without GPUs (gloo); see the module
#: docstring. For tests of the sharded code paths: it brings no speed.
CPU_SHARDING_ENV = "DISTALIGN_CPU_SHARDING"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


@dataclass(frozen=True)
class Sharding:
    """How the launch distributes the model's state. ``kind``: "none" (one process or DDP: every process
    holds everything), "fsdp2" or "deepspeed"; ``zero_stage``: DeepSpeed's ZeRO stage (0 otherwise)."""

    kind: Literal["none", "fsdp2", "deepspeed"] = "none"
    zero_stage: int = 0

    @property
    def shards_parameters(self) -> bool:
        """Whether no process holds the whole model's weights (FSDP2, ZeRO-3): a full copy exists only
        when gathered, and every forward pass is a collective all processes must enter together."""
        return self.kind == "fsdp2" or (self.kind == "deepspeed" and self.zero_stage == 3)

    @property
    def name(self) -> str:
        if self.kind == "deepspeed":
            return f"DeepSpeed ZeRO-{self.zero_stage}"
        return {"none": "DDP", "fsdp2": "FSDP2"}[self.kind]


def launch_plugins() -> tuple[FullyShardedDataParallelPlugin | None, DeepSpeedPlugin | None]:
    """The FSDP and DeepSpeed plugins ``accelerate launch`` asked for (through the environment), built
    by accelerate's own classes exactly as ``Accelerator()`` would build them; None where not asked."""
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin

    fsdp = FullyShardedDataParallelPlugin() if _env_flag("ACCELERATE_USE_FSDP") else None
    deepspeed = DeepSpeedPlugin() if _env_flag("ACCELERATE_USE_DEEPSPEED") else None
    return fsdp, deepspeed


def sharding_of(fsdp: FullyShardedDataParallelPlugin | None, deepspeed: DeepSpeedPlugin | None) -> Sharding:
    if deepspeed is not None:
        return Sharding("deepspeed", int(deepspeed.zero_stage))
    if fsdp is not None:
        return Sharding("fsdp2")
    return Sharding()


def sharding_problems(
    fsdp: FullyShardedDataParallelPlugin | None,
    deepspeed: DeepSpeedPlugin | None,
    config: RunConfig,
    *,
    cpu_only: bool,
) -> list[str]:
    """Why this launch cannot train ``config`` exactly, one sentence per problem (empty: it can)."""
    problems: list[str] = []
    if fsdp is not None and deepspeed is not None:
        return ["the launch config asks for both FSDP and DeepSpeed; pick one (configs/accelerate/)"]
    if fsdp is not None:
        problems += _fsdp_problems(fsdp, config, cpu_only)
    if deepspeed is not None:
        problems += _deepspeed_problems(deepspeed, config, cpu_only)
    sharding = sharding_of(fsdp, deepspeed)
    if sharding.kind != "none" and config.train.grad_shares:
        problems.append(
            f"train.grad_shares under {sharding.name}: the per-term gradients are read from whole, "
            "unsynchronised parameter gradients, which a sharded launch does not keep; measure the shares "
            "on one process or under DDP (configs/accelerate/ddp.yaml), or turn train.grad_shares off"
        )
    if sharding.shards_parameters and not config.reference.precompute and config.online is None:
        problems.append(
            f"reference.precompute=false under {sharding.name}: the on-the-fly reference would be a full, "
            "unsharded frozen copy of the model on every process (or a second forward through the sharded "
            "policy every step); precompute it (reference.precompute=true, the default), which scores the "
            "sharded policy once before the first step"
        )
    return problems


def _fsdp_problems(fsdp: FullyShardedDataParallelPlugin, config: RunConfig, cpu_only: bool) -> list[str]:
    problems = []
    if fsdp.fsdp_version != 2:
        problems.append(
            f"fsdp_version {fsdp.fsdp_version}: distalign trains with FSDP2 only (set fsdp_version: 2 in the "
            "accelerate config, as configs/accelerate/fsdp2.yaml does)"
        )
    if fsdp.cpu_ram_efficient_loading:
        problems.append(
            "fsdp_cpu_ram_efficient_loading: true leaves the model empty on every process but the first "
            "until accelerate shards it, and distalign runs the loaded model before that (packing probe, "
            "reference fingerprint); set it to false"
        )
    if fsdp.activation_checkpointing and config.model.gradient_checkpointing:
        problems.append(
            "fsdp_activation_checkpointing: true together with model.gradient_checkpointing=true would "
            "recompute every layer twice; keep one (model.gradient_checkpointing works under every launch)"
        )
    if cpu_only and not _env_flag(CPU_SHARDING_ENV):
        problems.append(
            "an FSDP launch config on a machine without GPUs: accelerate would silently train with plain "
            "DDP instead. Use configs/accelerate/ddp.yaml here, or set "
            f"{CPU_SHARDING_ENV}=1 to run FSDP2 over gloo on CPU (what the tests do; slow)"
        )
    return problems


def _deepspeed_problems(deepspeed: DeepSpeedPlugin, config: RunConfig, cpu_only: bool) -> list[str]:
    problems = []
    if cpu_only and not _env_flag(CPU_SHARDING_ENV):
        problems.append(
            "a DeepSpeed launch config on a machine without GPUs: accelerate would silently train with "
            "plain DDP instead. Use configs/accelerate/ddp.yaml here, or set "
            f"{CPU_SHARDING_ENV}=1 to run DeepSpeed over gloo on CPU (what the tests do; slow)"
        )
    if importlib.util.find_spec("deepspeed") is None:
        problems.append(
            "the launch config asks for DeepSpeed, which is not installed (pip install deepspeed)"
        )
    if config.model.dtype == "float64":
        problems.append(
            "model.dtype=float64 under DeepSpeed: its ZeRO optimizers keep float32 master weights (ZeRO-3 "
            "also computes in float32), so the run would silently train in float32; use float32, or "
            "train float64 under configs/accelerate/ddp.yaml or fsdp2.yaml"
        )
    half = {"bfloat16": "bf16", "float16": "fp16"}.get(config.model.dtype)
    precision = resolve_mixed_precision(config.train.mixed_precision)
    if deepspeed.zero_stage == 3 and half is not None and precision != half:
        problems.append(
            f"model.dtype={config.model.dtype} with train.mixed_precision={config.train.mixed_precision} "
            f"under ZeRO-3: transformers builds the weights straight into ZeRO-3 partitions in DeepSpeed's "
            f"precision, float32 unless mixed precision is on, so the run would train float32 weights; set "
            f"train.mixed_precision={half} (DeepSpeed's {half} mode: {config.model.dtype} weights, float32 "
            "masters)"
        )
    ds = deepspeed.deepspeed_config
    zero = ds.get("zero_optimization", {})
    for section in ("optimizer", "scheduler"):
        if section in ds:
            problems.append(
                f"the DeepSpeed config has a `{section}` section: distalign builds AdamW and its schedule "
                "from train.lr, train.adam_betas, train.weight_decay, train.scheduler and "
                "train.warmup_ratio; remove the section"
            )
    accumulation = ds.get("gradient_accumulation_steps", "auto")
    if accumulation not in ("auto", 1):
        problems.append(
            f"DeepSpeed gradient_accumulation_steps {accumulation}: distalign accumulates micro-batches "
            "itself (train.batch_size / (train.micro_batch_size x processes)); set it to 1 or auto"
        )
    clipping = ds.get("gradient_clipping", "auto")
    wanted = config.train.max_grad_norm or 0.0
    if clipping != "auto" and float(clipping) != float(wanted):
        problems.append(
            f"DeepSpeed gradient_clipping {clipping} differs from train.max_grad_norm "
            f"{config.train.max_grad_norm}; set it to auto (distalign passes train.max_grad_norm)"
        )
    micro = ds.get("train_micro_batch_size_per_gpu", "auto")
    if micro != "auto" and int(micro) != config.train.micro_batch_size:
        problems.append(
            f"DeepSpeed train_micro_batch_size_per_gpu {micro} differs from train.micro_batch_size "
            f"{config.train.micro_batch_size}; set it to auto"
        )
    for offload in ("offload_optimizer", "offload_param"):
        device = zero.get(offload, {}).get("device", "none")
        if device not in (None, "none"):
            problems.append(
                f"DeepSpeed {offload} to {device}: ZeRO-Offload replaces distalign's AdamW with DeepSpeed's "
                "CPU Adam, which distalign does not test; for CPU offload use "
                "configs/accelerate/fsdp2_offload.yaml"
            )
    if deepspeed.zero_stage == 3 and not zero.get("stage3_gather_16bit_weights_on_model_save", False):
        problems.append(
            "ZeRO-3 without zero3_save_16bit_model (stage3_gather_16bit_weights_on_model_save): the "
            "final model could not be gathered into RUN_DIR/final; set it to true"
        )
    return problems


def configure_deepspeed(deepspeed: DeepSpeedPlugin, config: RunConfig) -> None:
    """Fill the DeepSpeed config's "auto" entries from the run config. The micro-batch size is
    bookkeeping for DeepSpeed (distalign forms its own batches); accumulation is 1 because distalign
    accumulates itself; clipping is train.max_grad_norm (0 = off), applied by DeepSpeed in its step."""
    ds = deepspeed.deepspeed_config
    for key, value in (
        ("train_micro_batch_size_per_gpu", config.train.micro_batch_size),
        ("gradient_accumulation_steps", 1),
        ("gradient_clipping", float(config.train.max_grad_norm or 0.0)),
    ):
        if ds.get(key, "auto") == "auto":
            ds[key] = value
    deepspeed.gradient_accumulation_steps = 1
    deepspeed.gradient_clipping = ds["gradient_clipping"]


def silence_deepspeed_deprecations() -> None:
    """DeepSpeed 0.19's collectives call two torch.distributed functions torch 2.13 deprecates, and
    every call site warns (about 15 FutureWarnings per process in a 4-step run): DeepSpeed's to change,
    nothing a user can act on. distalign's own code calls neither."""
    warnings.filterwarnings(
        "ignore",
        message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
        category=FutureWarning,
    )


def accelerator_device_arguments(deepspeed: DeepSpeedPlugin | None, cpu_only: bool) -> dict:
    """The ``Accelerator`` arguments that choose its device and process group. On a CPU-only machine
    that is ``cpu=True`` (a gloo group; without it each process would silently train alone), except
    under DeepSpeed: ``cpu=True`` would make accelerate drop DeepSpeed, so the group is built by
    DeepSpeed itself (its CPU accelerator) over gloo."""
    if not cpu_only:
        return {"cpu": False}
    if deepspeed is None:
        return {"cpu": True}
    from accelerate.utils import InitProcessGroupKwargs

    return {"cpu": False, "kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}


@contextlib.contextmanager
def whole_model_loading(deepspeed: DeepSpeedPlugin | None) -> Iterator[None]:
    """Models loaded inside are whole, in ``model.dtype``, on every process: a separate reference model.

    accelerate 1.15 registers a ZeRO-3 config with transformers whatever ``zero3_init_flag`` says, and
    transformers then builds every model it loads straight into ZeRO-3 partitions
    (``deepspeed.zero.Init``), in DeepSpeed's precision. That is what the policy needs (no process ever
    holds it whole, in host or GPU memory), but a reference model is never prepared by DeepSpeed, and
    its partitions could not run; the registration is lifted while it loads."""
    if deepspeed is None or deepspeed.zero_stage != 3:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        deepspeed.set_deepspeed_weakref()


def force_fsdp2_on_cpu(accelerator: Accelerator, fsdp: FullyShardedDataParallelPlugin) -> None:
    """Make a CPU (gloo) accelerator use ``fsdp`` as on GPUs: accelerate 1.15 keeps FSDP only for
    accelerator devices, so the state is switched after it was built. Both shared states are set, since
    accelerate re-reads the distributed type from ``PartialState`` whenever an ``AcceleratorState`` is
    constructed."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType
    from torch.distributed.fsdp import CPUOffloadPolicy

    if isinstance(fsdp.cpu_offload, CPUOffloadPolicy) and fsdp.cpu_offload.pin_memory:
        # Pinned host memory exists only for an accelerator; the offload path itself runs unpinned.
        fsdp.cpu_offload = CPUOffloadPolicy(pin_memory=False)
    if accelerator.mixed_precision != "no":
        fsdp.set_mixed_precision(accelerator.mixed_precision)
    accelerator.state.fsdp_plugin = fsdp
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def resolve_mixed_precision(setting: str) -> str:
    """ "auto" becomes bf16 on a CUDA device that supports it, otherwise "no"."""
    if setting != "auto":
        return setting
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def no_accelerator_present() -> bool:
    """True on a CPU-only machine. accelerate then needs ``cpu=True`` to form a gloo process group
    under torchrun (otherwise each process silently trains alone)."""
    xpu = getattr(torch, "xpu", None)
    return not (
        torch.cuda.is_available()
        or (xpu is not None and xpu.is_available())
        or torch.backends.mps.is_available()
    )


def exit_process(code: int) -> NoReturn:
    """End the process with ``code``: what ``python -m distalign`` and the ``distalign`` command do last.

    A process that took part in a torch.distributed run ends *without interpreter finalisation*
    (``os._exit`` after flushing). gloo's worker threads release a finished collective's tensors a
    moment after the caller's ``wait`` returned; a tensor whose Python object is gone by then makes
    the thread take the GIL to release it, and a thread that takes the GIL while the interpreter is
    finalising is killed inside C++, which aborts the whole process ("terminate called without an
    active exception") after a run that saved its model. With torch alone, 50 all-reduces and a
    plain exit abort 38 launches in 50 under load; a barrier on every group first (what
    :meth:`Engine.finish` does) 2 in 50; the barrier and then this, 0 in 100
    (``benchmarks/exit_race.py``). No
    Python-level wait can close the window: the threads are C++'s, and the groups outlive
    ``destroy_process_group`` wherever C++ still holds them (DDP's reducer, device meshes, DeepSpeed).

    What a normal exit does before finalisation still happens: the ``atexit`` handlers run (they
    tear the process group down, stop a vLLM engine's processes, flush logging), then stdout and
    stderr are flushed. A one-process run exits normally."""
    if dist.is_available() and dist.is_initialized():
        import atexit

        atexit._run_exitfuncs()  # while the interpreter is whole: the handlers of a normal exit
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def destroy_process_group_if_initialized() -> None:
    """Tear the process group down while the interpreter is still alive.

    A process that exits with a gloo group still up can abort at interpreter finalisation ("terminate
    called without an active exception", pytorch/pytorch#190489): gloo's worker threads are still
    joinable when the C++ destructors run (seen once in this project's CI, in a two-process test). The
    engine registers this with ``atexit`` rather than calling it at the end of training, so several runs
    in one process, and runs that stop early, all keep their group until the process ends.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wait_on_every_process_group() -> None:
    """A barrier on each process group this process belongs to, in the order they were created (the
    same on every process, since groups are created collectively)."""
    from torch.distributed import distributed_c10d

    # torch lists its groups only in a private map; without it, the default group at least.
    groups = list(getattr(getattr(distributed_c10d, "_world", None), "pg_map", None) or [None])
    for group in groups:
        dist.barrier(group=group)
