"""Do the shipped launch configs train what one process trains on this machine? A smoke check of
configs/accelerate/ (docs/distributed.md) for a GPU node, or for a CPU machine with
DISTALIGN_CPU_SHARDING=1 (what the tests do).

Trains the same run once in this process and once under each launch config with N processes (default:
one per GPU, or 2 on CPU), then prints per config: the wall time, the last loss, the largest weight gap
of the final model to the one-process run, the largest relative gap of the logged gradient norms, and
whether the reference table the one-process run cached was found (the weights' fingerprint agreed).
On one GPU, N = 1 still runs each config's code path (FSDP2 units, ZeRO partitions, the 16-bit gather)
on CUDA. Float32 weights, no mixed precision: the gaps are float32 rounding (DeepSpeed keeps float32
masters, so its runs cannot be compared in float64).

    python benchmarks/sharded_smoke.py                                  # every config, N = GPUs
    python benchmarks/sharded_smoke.py --configs zero3 --model smollm2 --steps 8
    DISTALIGN_CPU_SHARDING=1 python benchmarks/sharded_smoke.py --configs fsdp2,zero3   # CPU, N = 2
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "testing"))  # the test helpers (not installed)
from distalign_testing.runs import (
    ACCELERATE_CONFIGS,
    accelerate_launch,
    final_weights,
    max_weight_difference,
    read_metrics,
)

from distalign.config import load_config
from distalign.train.distributed import CPU_SHARDING_ENV
from distalign.train.offline import train_offline

CONFIGS = ("ddp", "fsdp2", "fsdp2_offload", "zero2", "zero3")


def run_overrides(args, cache_dir: Path) -> list[str]:
    return [
        f"model.name={args.model}",
        "model.dtype=float32",
        "train.mixed_precision=no",
        "loss.name=dpo",
        f"train.batch_size={args.batch}",
        f"train.micro_batch_size={args.micro}",
        f"train.max_steps={args.steps}",
        "train.max_grad_norm=1.0",
        "train.progress=false",
        f"data.max_length={args.max_length}",
        f"data.max_prompt_length={args.max_length // 2}",
        f"reference.cache_dir={cache_dir}",
    ]


def relative_gap(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--configs", default=",".join(CONFIGS), help="comma-separated names in configs/accelerate"
    )
    parser.add_argument("--processes", type=int, default=None, help="default: the GPUs, or 2 on CPU")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--micro", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=64)
    args = parser.parse_args()
    processes = args.processes or torch.cuda.device_count() or 2
    configs = [name for name in args.configs.split(",") if name]
    if not torch.cuda.is_available() and os.environ.get(CPU_SHARDING_ENV) != "1":
        configs = [name for name in configs if name == "ddp"]
        print(f"no GPU: only ddp runs (set {CPU_SHARDING_ENV}=1 to run FSDP2 and DeepSpeed on CPU)")
    if importlib.util.find_spec("deepspeed") is None:
        configs = [name for name in configs if not name.startswith("zero")]
        print("DeepSpeed is not installed: the zero configs are skipped (pip install 'distalign[deepspeed]')")

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        overrides = run_overrides(args, work / "reference_cache")
        start = time.perf_counter()
        single = train_offline(load_config(None, [*overrides, f"output_dir={work / 'one'}"]))
        rows = [
            ("1 process", 1, time.perf_counter() - start, read_metrics(single)[-1]["loss"], 0.0, 0.0, "-")
        ]
        single_weights, single_norms = final_weights(single), [r["grad_norm"] for r in read_metrics(single)]
        for name in configs:
            run_dir = work / name
            command = ["-m", "distalign", "train", *overrides, f"output_dir={run_dir}"]
            start = time.perf_counter()
            result = accelerate_launch(
                ACCELERATE_CONFIGS / f"{name}.yaml", command, nproc=processes, timeout=3600
            )
            seconds = time.perf_counter() - start
            records = read_metrics(run_dir)
            rows.append(
                (
                    name,
                    processes,
                    seconds,
                    records[-1]["loss"],
                    max_weight_difference(single_weights, final_weights(run_dir)),
                    relative_gap(single_norms, [r["grad_norm"] for r in records]),
                    "yes" if "reference log-probs: reusing cache" in result.stdout else "NO",
                )
            )
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (gloo)"
    print(
        f"\n{args.model}, {args.steps} DPO steps, batch {args.batch}, micro-batch {args.micro}, on {device}"
    )
    print(
        "| launch | processes | seconds | last loss | max weight gap | grad_norm gap (rel) | cached reference found |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, count, seconds, loss, gap, norm_gap, found in rows:
        print(f"| {name} | {count} | {seconds:.1f} | {loss:.6f} | {gap:.2e} | {norm_gap:.2e} | {found} |")


if __name__ == "__main__":
    main()
