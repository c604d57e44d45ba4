"""Helpers for tests that train the tiny model: configs, final weights, metrics, multi-process runs."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from distalign_testing.processes import run_in_own_group

#: Overrides shared by tiny-model test runs (short sequences, fixed seed, no progress bar).
TINY_BASE = [
    "model.name=tiny",
    "data.max_length=64",
    "data.max_prompt_length=32",
    "train.progress=false",
    "train.lr=1e-3",
    "train.seed=0",
]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The saved final model's tensors."""
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / "final" / "model.safetensors"))


def max_weight_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def distance_trained(run_dir: Path) -> float:
    """How far a tiny-model run's final weights are from the tiny model it started from (largest
    |entry|): the control of a comparison of two runs' final weights, which proves nothing if neither
    moved."""
    from distalign.models.tiny import build_tiny_model

    start, _ = build_tiny_model(seed=0)
    final = final_weights(run_dir)
    initial = start.state_dict()
    return max_weight_difference(final, {k: initial[k] for k in final})


def write_shifted_pairs(path: Path, limit: int) -> Path:
    """The first ``limit`` quickstart pairs with what the robust aggregators read: a density ratio
    (larger for the 'food' source) and a group (the source) per row."""
    from distalign.data.loading import load_rows

    rows = load_rows("builtin:quickstart_pairs.jsonl", limit=limit).rows
    with path.open("w") as handle:
        for i, row in enumerate(rows):
            record = {k: row[k] for k in ("prompt", "chosen", "rejected", "source")}
            record["density_ratio"] = 1.8 if row["source"] == "food" else 0.4 + 0.1 * (i % 3)
            record["group"] = row["source"]
            handle.write(json.dumps(record) + "\n")
    return path


@contextlib.contextmanager
def optimizer_steps_taken() -> Iterator[list[int]]:
    """Count the optimizer steps any torch optimizer takes inside the block (``counter[0]``): a resumed
    run must take only the steps after its checkpoint. A seeded restart from step 0 ends with the same
    weights as a resume, so equal final weights alone do not show that a resume happened."""
    counter = [0]

    def count(optimizer, args, kwargs) -> None:
        counter[0] += 1

    handle = register_optimizer_step_post_hook(count)
    try:
        yield counter
    finally:
        handle.remove()


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of ``RUN_DIR/metrics.jsonl``."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]


def torchrun(args: list[str], nproc: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node N ARGS`` on CPU; raises with its output on failure."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), *args]
    result = run_in_own_group(command, timeout=timeout, env=env)
    if result.returncode != 0:
        raise AssertionError(
            f"torchrun failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
        )
    return result


#: The launch configs shipped with distalign (``accelerate launch --config_file``).
ACCELERATE_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "accelerate"


def accelerate_launch(
    config_file: str | Path, args: list[str], nproc: int = 2, timeout: int = 600, env: dict | None = None
) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file CONFIG --num_processes N ARGS`` on this machine (for CPU tests
    of the launch configs: an FSDP or DeepSpeed config needs ``DISTALIGN_CPU_SHARDING=1`` in ``env``);
    raises with its output on failure."""
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config_file),
        "--num_processes",
        str(nproc),
        "--num_machines",
        "1",
        "--machine_rank",
        "0",
        "--main_process_port",
        "0",
        *args,
    ]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    result = run_in_own_group(command, timeout=timeout, env=full_env)
    if result.returncode != 0:
        raise AssertionError(
            f"accelerate launch failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
        )
    return result


def capture_gradient(overrides: list[str], step: int = 1) -> dict[str, torch.Tensor]:
    """Train ``step`` steps with ``overrides`` (offline loop) and return the synchronised gradient the
    last one applies: each trainable parameter's, flattened, float64, by its name in the unwrapped
    model. Under torchrun every process returns the same.

    At step 1 the policy equals its reference, which makes some objectives degenerate (every AOT gap
    is 0), so tests of coupling use a later step."""
    from distalign.config import load_config
    from distalign.train.offline import train_offline

    config = load_config(None, overrides)
    return step_gradient(lambda: train_offline(config, stop_after_step=step), step)


def step_gradient(train: Callable[[], object], step: int) -> dict[str, torch.Tensor]:
    """Call ``train`` (a run stopping after ``step`` steps, either loop) and return the gradient its
    step ``step`` applies, as :func:`capture_gradient` does."""
    from distalign.train import engine as engine_module

    captured: list[dict[str, torch.Tensor]] = []
    original = engine_module.Engine.optimizer_step

    def probe(self):
        if len(captured) < step:
            captured.append(
                {
                    unwrapped_name(name): _whole(p.grad).detach().double().flatten().cpu().clone()
                    for name, p in self.model.named_parameters()
                    if p.grad is not None
                }
            )
        return original(self)

    engine_module.Engine.optimizer_step = probe
    try:
        train()
    finally:
        engine_module.Engine.optimizer_step = original
    return captured[step - 1]


def unwrapped_name(name: str) -> str:
    """A parameter's name in the plain model: without the prefixes DDP and DeepSpeed (``module.``),
    FSDP and activation checkpointing add, so that gradients of differently launched runs line up."""
    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module."):
        name = name.replace(wrapper, "")
    return name.removeprefix("module.")


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor of the whole of ``tensor``: an FSDP2 gradient (a DTensor shard) is gathered; every
    process must call this for it."""
    full_tensor = getattr(tensor, "full_tensor", None)
    return full_tensor() if callable(full_tensor) else tensor


def run_gradient(run_dir: Path, *overrides: str, step: int = 1) -> dict[str, torch.Tensor]:
    """:func:`capture_gradient` of a tiny-model run (``TINY_BASE`` + ``overrides``) in ``run_dir``."""
    return capture_gradient([*TINY_BASE, f"output_dir={run_dir}", *overrides], step=step)


def run_gradient_two_processes(run_dir: Path, *overrides: str, step: int = 1) -> dict[str, torch.Tensor]:
    """The same, trained by two processes (torchrun, gloo); the gradient every process applies."""
    out = Path(f"{run_dir}.pt")
    torchrun(
        [
            "-m",
            "distalign_testing.grad_probe",
            str(out),
            str(step),
            *TINY_BASE,
            f"output_dir={run_dir}",
            *overrides,
        ]
    )
    return torch.load(out, weights_only=True)


def largest_gradient(gradient: dict[str, torch.Tensor]) -> float:
    """The largest |entry| over every parameter's gradient (a gradient that is all zeros proves nothing)."""
    return max(float(g.abs().max()) for g in gradient.values())


def gradients_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float = 1e-6) -> bool:
    """Every parameter's gradient within ``tol`` of ``b``'s, relative to that parameter's own gradient:
    ``||a_k - b_k|| <= tol x ||b_k||`` for each parameter k (a parameter whose gradient is exactly 0
    in ``b`` must be exactly 0 in ``a``). Per parameter, because gradients differ by orders of
    magnitude across parameters: one tolerance scaled by the largest entry lets an error confined to
    the small-gradient parameters through."""
    if a.keys() != b.keys():
        raise AssertionError(f"different parameters: {sorted(a.keys() ^ b.keys())[:5]}")
    return all(float((a[k] - b[k]).norm()) <= tol * float(b[k].norm()) for k in b)
