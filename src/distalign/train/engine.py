"""The one engine both training loops run on: accelerate, optimisation, gathering, logging, checkpoints.

The loops (``offline.py``, ``online/loop.py``) own *what* a step computes; the engine owns *how* it is
executed across processes and saved. Gradient accumulation is managed explicitly (not through
accelerate's accumulation plugin) because batch-coupled losses need to see every micro-batch of the
optimizer step before any backward: the loop decides when gradients are synchronised.

Gradient convention: DDP, FSDP2 and DeepSpeed all average gradients over processes, so a process
back-propagates ``world_size x`` its share of the global objective; :meth:`Engine.backward` applies that
factor. How the launch shards the model (``distributed.py``) changes how gradients are synchronised per
micro-batch (:meth:`Engine.sync_context`) and how the final model is gathered (:meth:`Engine.full_state_dict`).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, broadcast_object_list, set_seed
from tqdm.auto import tqdm

from distalign.config import RunConfig, dump_config
from distalign.errors import SetupError
from distalign.models.loading import build_cached_model
from distalign.models.logprobs import SequenceLogprobModel
from distalign.train.checkpoints import (
    CHECKPOINT_PREFIX,
    DAMAGED_PREFIX,
    RunDirPlan,
    RunFinished,
    list_checkpoints,
    move_aside,
    plan_run_dir,
    read_loop_state,
    remove_run_files,
    write_manifest,
)
from distalign.train.distributed import (
    Sharding,
    accelerator_device_arguments,
    configure_deepspeed,
    destroy_process_group_if_initialized,
    force_fsdp2_on_cpu,
    launch_plugins,
    no_accelerator_present,
    resolve_mixed_precision,
    sharding_of,
    sharding_problems,
    silence_deepspeed_deprecations,
    wait_on_every_process_group,
    whole_model_loading,
)
from distalign.train.optim import build_adamw, build_scheduler


class TrackerUnavailableError(ValueError):
    """An experiment tracker was requested whose package is not installed."""


class MetricsLog:
    """Append-only ``metrics.jsonl``: one JSON object per logged step, always with ``step`` and ``loss``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """On resume, drop records past the checkpoint so the log matches the resumed trajectory."""
        if not self.path.exists():
            return
        kept = [
            line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step
        ]
        self.path.write_text("".join(line + "\n" for line in kept))


class Engine:
    """Process group, devices, optimiser bookkeeping, gathering, logging and checkpoints for one run."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.check_trackers()
        self.run_dir = Path(config.output_dir)
        cfg = config.train
        cpu_only = no_accelerator_present()
        if cpu_only:
            # transformers' save_pretrained imports DeepSpeed (through accelerate) wherever it is
            # installed, and its accelerator probe then warns "Setting accelerator to CPU"; say so
            # first (DeepSpeed's own switch), as every run on this machine would find the same.
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        fsdp, deepspeed = launch_plugins()
        problems = sharding_problems(fsdp, deepspeed, config, cpu_only=cpu_only)
        if problems:
            raise SetupError("this launch cannot train the run: " + "; ".join(problems))
        if deepspeed is not None:
            configure_deepspeed(deepspeed, config)
            silence_deepspeed_deprecations()
        self.sharding: Sharding = sharding_of(fsdp, deepspeed)
        self._deepspeed = deepspeed
        # Before the process group starts, where every process may write a cached model (transformers
        # saves models on rank 0 only once a group exists): each process builds or finds it here.
        for name in filter(None, (config.model.name, config.reference.model)):
            build_cached_model(name)
        self.accelerator = Accelerator(
            mixed_precision=resolve_mixed_precision(cfg.mixed_precision),
            log_with=list(cfg.trackers) or None,
            project_config=ProjectConfiguration(
                project_dir=str(self.run_dir), logging_dir=str(self.run_dir / "logs")
            ),
            step_scheduler_with_optimizer=False,
            fsdp_plugin=fsdp,
            deepspeed_plugin=deepspeed,
            **accelerator_device_arguments(deepspeed, cpu_only),
        )
        if fsdp is not None and cpu_only:
            force_fsdp2_on_cpu(self.accelerator, fsdp)
        if self.accelerator.num_processes > 1:
            atexit.unregister(destroy_process_group_if_initialized)  # once per process, however many runs
            atexit.register(destroy_process_group_if_initialized)
        set_seed(cfg.seed)
        self.run_plan = self._plan_run_dir()
        self.metrics_log = MetricsLog(self.run_dir / "metrics.jsonl")
        self.model: torch.nn.Module | None = None
        self.optimizer = None
        self.scheduler = None
        self.loaded_dtypes: dict[str, torch.dtype] = {}
        self._progress = None
        self._last_log_time = time.perf_counter()
        self._tokens_since_log = 0
        self._positions_since_log = self._forwarded_since_log = 0
        self._steps_since_log = 0
        self._final_step = -1

    def check_trackers(self) -> None:
        """accelerate silently drops a tracker whose package is missing; refuse instead."""
        from accelerate.utils import is_mlflow_available, is_tensorboard_available, is_wandb_available

        available = {
            "tensorboard": is_tensorboard_available,
            "wandb": is_wandb_available,
            "mlflow": is_mlflow_available,
        }
        install = {"tensorboard": "tensorboardX (or tensorboard)", "wandb": "wandb", "mlflow": "mlflow"}
        for tracker in self.config.train.trackers:
            if not available[tracker]():
                raise TrackerUnavailableError(
                    f"train.trackers: {tracker!r} was requested but its package is not installed "
                    f"(pip install {install[tracker]})"
                )

    def _plan_run_dir(self) -> RunDirPlan:
        """Decide what to do with an output_dir that holds an earlier run (resume, start over, refuse:
        :func:`distalign.train.checkpoints.plan_run_dir`) before any model or data is loaded. The main
        process decides (it reads and hashes the checkpoints) and every process gets its answer.
        A finished run of this config raises :class:`RunFinished` (a SetupError the CLI answers with
        exit 0)."""
        plan = broadcast_object_list([plan_run_dir(self.config) if self.is_main else None])[0]
        if plan.finished:
            raise RunFinished(plan.error, self.run_dir)
        if plan.error:
            raise SetupError(plan.error)
        return plan

    def open_run_dir(self) -> None:
        """Create the run directory and save the resolved config. Called only once the model and data
        have loaded and validated, so a bad input leaves nothing half-written behind; with
        ``train.overwrite_output_dir`` this is also when the earlier run's files are deleted."""
        if self.is_main:
            if self.run_plan.clear:
                removed = remove_run_files(self.run_dir)
                self.warn(
                    f"--overwrite-output-dir: deleted the earlier run's {', '.join(removed)} in {self.run_dir}"
                )
            self.run_dir.mkdir(parents=True, exist_ok=True)
            saved = self.config.model_copy(deep=True)
            saved.train.overwrite_output_dir = False  # re-running the saved config must not delete this run
            temp = self.run_dir / ".config.yaml.tmp"
            temp.write_text(dump_config(saved))
            os.replace(temp, self.run_dir / "config.yaml")
        self.barrier()
        if self.config.train.trackers:
            self.accelerator.init_trackers(self.run_dir.name, config=self.config.model_dump(mode="json"))

    # ----------------------------------------------------------------------------------- processes
    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def print(self, message: str) -> None:
        """Print once (main process), above the progress bar if one is showing."""
        if self.is_main:
            (self._progress.write if self._progress is not None else print)(message)

    def warn(self, message: str) -> None:
        """``distalign: warning: MESSAGE`` on stderr, once (main process)."""
        if self.is_main:
            print(f"distalign: warning: {message}", file=sys.stderr, flush=True)

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def gather_varlen(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate along dim 0 a tensor whose first dimension differs between processes (the other
        dimensions agree), in rank order (detached)."""
        tensor = tensor.detach()
        if self.world_size == 1:
            return tensor
        size = torch.tensor([tensor.shape[0]], device=self.device)
        sizes = [int(s) for s in self.accelerator.gather(size).tolist()]
        trailing = tuple(tensor.shape[1:])
        padded = torch.zeros((max(sizes), *trailing), dtype=tensor.dtype, device=self.device)
        padded[: tensor.shape[0]] = tensor
        gathered = self.accelerator.gather(padded).view(self.world_size, max(sizes), *trailing)
        return torch.cat([gathered[r, : sizes[r]] for r in range(self.world_size)])

    def gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate along dim 0, in rank order (detached), a tensor with the same shape on every
        process (statistics of a global batch, which every process holds equally many rows of): one
        collective, and no size exchange read back to the host."""
        tensor = tensor.detach()
        return tensor if self.world_size == 1 else self.accelerator.gather(tensor)

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over processes on the device (detached): nothing is read back to the host."""
        tensor = tensor.detach().clone()
        if self.world_size > 1:
            dist.all_reduce(tensor)
        return tensor

    def read_scalars(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        """Scalar tensors as Python floats, read from the device in one transfer: each separate read
        (``float(t)``, ``.item()``) would wait for the device on its own."""
        if not values:
            return {}
        stacked = torch.stack(
            [v.detach().to(self.device, torch.float64).reshape(()) for v in values.values()]
        )
        return dict(zip(values, stacked.tolist(), strict=True))

    def sum_across(self, value: float) -> float:
        """Sum a Python number over processes."""
        if self.world_size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return float(tensor.item())

    def max_across(self, value: int) -> int:
        """The largest of a Python integer over processes (e.g. how many forward passes the busiest
        process has to run, so that the others can match it under a sharded model)."""
        if self.world_size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return int(tensor.item())

    def from_main(self, value: Any) -> Any:
        """The main process's ``value`` on every process (picklable objects, tensors included), sent
        over the process group: no shared filesystem is assumed between machines."""
        if self.world_size == 1:
            return value
        return broadcast_object_list([value if self.is_main else None])[0]

    # ------------------------------------------------------------------------------- optimisation
    def prepare(self, model: torch.nn.Module, total_steps: int) -> torch.nn.Module:
        """Wrap ``model`` for the process group and build AdamW + the LR schedule over its trainable
        weights; model heads (parameters under ``heads.``) form a group with ``train.head_lr``."""
        cfg = self.config.train
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise RuntimeError("the model has no trainable parameters")
        heads = [p for name, p in named if name.startswith("heads.")]
        groups = [{"params": [p for name, p in named if not name.startswith("heads.")]}]
        if heads:
            groups.append({"params": heads, "lr": cfg.head_lr or cfg.lr})
        optimizer = build_adamw([g for g in groups if g["params"]], cfg)
        # Sharded weights are gathered for saving in whatever dtype they trained in (FSDP2 keeps fp32
        # masters under mixed precision); the final model is saved in the dtype it was loaded in.
        self.loaded_dtypes = {name: tensor.dtype for name, tensor in model.state_dict().items()}
        zero3 = self.sharding.kind == "deepspeed" and self.sharding.zero_stage == 3
        if zero3 and isinstance(model, SequenceLogprobModel):
            # ZeRO-3 gathers a module's weights only around that module's own forward; the lean path
            # reads the output head's weight without calling the head, so take the model's logits.
            model.lean = False
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        # The schedule is stepped by hand once per optimizer step; accelerate's prepared scheduler would
        # step once per process, so it is only registered for checkpointing.
        self.scheduler = build_scheduler(self.optimizer, cfg, total_steps)
        self.accelerator.register_for_checkpointing(self.scheduler)
        return self.model

    def sync_context(self, sync: bool):
        """Context for one backward; ``sync`` marks the optimizer step's last micro-batch.

        DDP all-reduces only then (``no_sync`` before: each process keeps its local sum). FSDP2 and
        DeepSpeed reduce-scatter every micro-batch's gradients into the shards instead: skipping that
        would keep a full unsharded gradient on every process, the memory sharding exists to save, and
        the sum of the reduced gradients is the same. DeepSpeed also steps its optimizer inside the
        backward of a micro-batch accelerate marks as synchronising, so the flag is set for each one.
        """
        if self.sharding.kind == "deepspeed":
            return self._deepspeed_boundary(sync)
        if sync or self.world_size == 1 or self.sharding.kind == "fsdp2":
            return contextlib.nullcontext()
        return self.accelerator.no_sync(self.model)

    @contextlib.contextmanager
    def _deepspeed_boundary(self, sync: bool):
        state = self.accelerator.gradient_state
        state._set_sync_gradients(sync)
        try:
            yield
        finally:
            state._set_sync_gradients(True)

    def backward(self, share_of_global_loss: torch.Tensor) -> None:
        """Back-propagate this process's share of the global objective (scaled for DDP's mean)."""
        self.accelerator.backward(share_of_global_loss * self.world_size)

    def optimizer_step(self) -> torch.Tensor | None:
        """Clip, step, schedule, zero. Returns the pre-clip gradient norm when clipping is on, as a
        scalar tensor on the device (not read back here): the norm of the whole synchronised gradient
        (under FSDP2 reduced over every process's shard, under DeepSpeed the norm DeepSpeed clipped with
        when it stepped in the last backward)."""
        grad_norm = None
        if self.config.train.max_grad_norm is not None:
            norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.config.train.max_grad_norm)
            grad_norm = whole_scalar(norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    # ------------------------------------------------------------------------------------ logging
    def start_progress(self, total_steps: int, first_step: int, description: str) -> None:
        if self.is_main and self.config.train.progress:
            self._progress = tqdm(total=total_steps, initial=first_step, desc=description, dynamic_ncols=True)

    def count_tokens(self, tokens: int, positions: int | None = None, forwarded: int | None = None) -> None:
        """Record tokens processed by this process (for throughput) and, when given, the positions the
        forward pass processed for them, padding included (for ``tokens/padding_fraction``), and the
        tokens it forwarded when fewer than ``tokens`` (a shared prompt counts once: for
        ``tokens/shared_fraction``)."""
        self._tokens_since_log += tokens
        self._forwarded_since_log += tokens if forwarded is None else forwarded
        if positions is not None:
            self._positions_since_log += positions

    def logs_step(self, step: int) -> bool:
        """Whether :meth:`log` writes a record for ``step`` (every ``train.log_every``-th and the last)."""
        return step % self.config.train.log_every == 0 or step == self._final_step

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Record globally reduced ``metrics`` for ``step`` (every process calls this; rank 0 writes)."""
        self._steps_since_log += 1
        if self._progress is not None:
            self._progress.update(1)
        if not self.logs_step(step):
            return
        counted = [self._tokens_since_log, self._forwarded_since_log, self._positions_since_log]
        if self.world_size > 1:  # one collective and one read for the three counts
            summed = torch.tensor(counted, dtype=torch.float64, device=self.device)
            dist.all_reduce(summed)
            counted = summed.tolist()
        tokens, forwarded, positions = (float(c) for c in counted)
        elapsed = max(time.perf_counter() - self._last_log_time, 1e-9)
        record = {"step": step, **metrics, "lr": self.lr}
        # the trained sequences' tokens (prompt + completion each) since the last record
        record["tokens"] = tokens
        if positions > 0:  # padded positions / all positions processed (0 = padding-free)
            record["tokens/padding_fraction"] = max(0.0, 1.0 - forwarded / positions)
        if forwarded < tokens:  # tokens not forwarded because a prompt was shared
            record["tokens/shared_fraction"] = 1.0 - forwarded / tokens
        record["steps_per_s"] = self._steps_since_log / elapsed
        record["tokens_per_s"] = tokens / elapsed
        self._last_log_time, self._tokens_since_log, self._steps_since_log = time.perf_counter(), 0, 0
        self._positions_since_log = self._forwarded_since_log = 0
        if self.is_main:
            self.metrics_log.write(record)
            if self._progress is not None:
                self._progress.set_postfix(loss=f"{record['loss']:.4f}", it_s=f"{record['steps_per_s']:.2f}")
        if self.config.train.trackers:
            self.accelerator.log(record, step=step)

    def set_final_step(self, step: int) -> None:
        self._final_step = step

    def finish(self) -> Path:
        """End a run that every process completed (after :meth:`close` and the final save): every
        process waits for the others on every process group, then the run directory is returned.

        No process may end while another still needs it in a collective. The wait also narrows, but
        cannot close, the window in which a process that ends normally aborts at interpreter shutdown
        (gloo's worker threads still releasing tensors: 38 launches in 50 without it, 2 in 50 with it,
        in ``benchmarks/exit_race.py``); ``python -m distalign`` and the ``distalign`` command end with
        :func:`~distalign.train.distributed.exit_process`, which closes it. Each process group has its
        own worker threads (DeepSpeed communicates over a clone of the world group), hence every
        group. Only on success: a process that raised must not wait for ones that may be stuck in a
        collective."""
        if self.accelerator.num_processes > 1:
            wait_on_every_process_group()
        return self.run_dir

    def close(self) -> None:
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        if self.config.train.trackers:
            self.accelerator.end_training()

    # -------------------------------------------------------------------------------- checkpoints
    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def save_checkpoint(self, step: int, loop_state: dict[str, Any] | None = None) -> Path:
        """Write model, optimizer, scheduler and RNG states, ``loop_state.json`` and, last,
        ``checksums.json`` into a temporary directory, then rename it into place (atomic)."""
        final = self.checkpoint_dir / f"{CHECKPOINT_PREFIX}{step}"
        temp = self.checkpoint_dir / f".tmp_{CHECKPOINT_PREFIX}{step}"
        if self.is_main:
            shutil.rmtree(temp, ignore_errors=True)
            # left by a replace or prune that was interrupted
            for stale in self.checkpoint_dir.glob(f".old_{CHECKPOINT_PREFIX}*"):
                shutil.rmtree(stale, ignore_errors=True)
            temp.mkdir(parents=True)
        self.barrier()
        self.accelerator.save_state(str(temp))
        self.barrier()
        if self.is_main:
            (temp / "loop_state.json").write_text(json.dumps({"step": step, **(loop_state or {})}))
            write_manifest(temp)
            old = move_aside(final, ".old_") if final.exists() else None
            os.replace(temp, final)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            self._prune_checkpoints()
        self.barrier()
        return final

    def _prune_checkpoints(self) -> None:
        kept = self.config.train.keep_checkpoints
        for old in self.list_checkpoints()[:-kept]:
            shutil.rmtree(move_aside(old, ".old_"), ignore_errors=True)

    def list_checkpoints(self) -> list[Path]:
        """Checkpoint directories (``step_N``), oldest first; temporary ones are not listed."""
        return list_checkpoints(self.checkpoint_dir)

    def resume_latest(self) -> dict[str, Any] | None:
        """Load the newest intact checkpoint, if any, and return its loop state (with ``step``).

        Which one was decided (and verified against its checksums) when the engine was built; damaged
        newer ones are reported and moved aside to ``checkpoints/damaged_step_N`` here. Any error while
        loading becomes a :class:`SetupError` naming the checkpoint."""
        plan = self.run_plan
        if plan.resume is None:
            return None
        latest = plan.resume
        if self.is_main and plan.damaged:
            damaged = "; ".join(
                f"{path} is damaged ({problem}), kept as {move_aside(path, DAMAGED_PREFIX).name}"
                for path, problem in plan.damaged
            )
            self.warn(f"{damaged}; resuming from {latest}, the newest intact checkpoint")
        if plan.legacy:
            self.warn(
                f"checkpoint {latest} has no checksums.json (written by an older distalign); loading it unverified"
            )
        self.barrier()
        try:
            self.accelerator.load_state(str(latest))
            state = read_loop_state(latest)
        except Exception as err:  # noqa: BLE001  (any loading failure: see the docstring)
            reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
            why = (
                "it has no checksums.json, so it may be damaged"
                if plan.legacy
                else "it passed its checksums, so it was probably written by another version of distalign "
                "or of its dependencies"
            )
            raise SetupError(
                f"checkpoint {latest} could not be loaded ({type(err).__name__}: {reason}); {why}. Delete it "
                "to resume from the checkpoint before it (or from step 0), pass --overwrite-output-dir "
                "(config: train.overwrite_output_dir=true) to start the run over, or choose a new output_dir"
            ) from err
        if self.is_main:
            self.metrics_log.truncate_after(state["step"])
        self.barrier()
        return state

    def loading_whole_models(self) -> contextlib.AbstractContextManager:
        """Context for loading a model no launch shards (a separate reference model): whole, in
        ``model.dtype``, under every launch (see :func:`distalign.train.distributed.whole_model_loading`)."""
        return whole_model_loading(self._deepspeed)

    def unwrapped(self) -> torch.nn.Module:
        """The prepared model without its DDP / DeepSpeed wrapper. Under FSDP2 and ZeRO-3 its weights
        are this process's shards: use :meth:`full_state_dict` to read them whole."""
        return self.accelerator.unwrap_model(self.model)

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The trained model's whole state dict on the main process (CPU tensors, in the dtypes the model
        was loaded in), None on the others. Every process must call it: with FSDP2 or ZeRO-3 it gathers
        the shards."""
        if not self.sharding.shards_parameters:
            return self.unwrapped().state_dict() if self.is_main else None
        gathered = self.accelerator.get_state_dict(self.model)
        if not self.is_main:
            return None
        return {
            name: tensor.detach().to("cpu", self.loaded_dtypes.get(name, tensor.dtype))
            for name, tensor in gathered.items()
        }


def whole_scalar(value: Any) -> torch.Tensor | None:
    """A scalar as a plain tensor: a DTensor (FSDP2's replicated gradient norm) is made whole, a Python
    number (DeepSpeed's norm) becomes a tensor; None stays None (DeepSpeed before its first step)."""
    if value is None:
        return None
    full_tensor = getattr(value, "full_tensor", None)
    if callable(full_tensor):
        value = full_tensor()
    return torch.as_tensor(value).detach()


def iterate_steps(first_step: int, total_steps: int) -> Iterator[int]:
    """Optimizer step numbers, 1-based: ``first_step + 1 .. total_steps``."""
    return iter(range(first_step + 1, total_steps + 1))
