"""Does every multi-process launch that saved its model exit 0? Repeats the same short two-process DPO
run under each shipped launch config and counts exit codes, aborts ("terminate called without an
active exception") and runs that saved no final model; also the first logged loss, which is ln 2 exactly
when the reference table was scored at the policy's own precision.

For checking a new accelerate, transformers, torch or DeepSpeed release: an exit-time abort shows in a
few percent of launches, so one green test run proves little. On a CPU machine (gloo) the sharded
configs need DISTALIGN_CPU_SHARDING=1, which this script sets.

    python benchmarks/launch_stress.py                          # 30 launches per config, 2 processes
    python benchmarks/launch_stress.py --configs fsdp2,zero3 --launches 10
    python benchmarks/launch_stress.py --configs fsdp2_bf16     # FSDP2 with bf16 weights and mixed precision

Each launch has its own run directory and reference cache (the tiny model is built once, before the
first launch). Prints one row per config and exits 1 if any launch failed.
"""

from __future__ import annotations

import argparse
import collections
import importlib.metadata
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "testing"))  # the test helpers (not installed)
from distalign_testing.runs import ACCELERATE_CONFIGS, TINY_BASE

from distalign.models.loading import build_cached_model
from distalign.train.distributed import CPU_SHARDING_ENV

RUN = [*TINY_BASE, "loss.name=dpo", "train.batch_size=8", "train.micro_batch_size=2", "train.max_steps=4"]
# (launch config file, extra overrides): DDP and FSDP2 train float64, DeepSpeed float32 (its masters).
CONFIGS = {
    "ddp": ("ddp", ["model.dtype=float64"]),
    "fsdp2": ("fsdp2", ["model.dtype=float64"]),
    "fsdp2_offload": ("fsdp2_offload", ["model.dtype=float64"]),
    "zero2": ("zero2", ["model.dtype=float32"]),
    "zero3": ("zero3", ["model.dtype=float32"]),
    "fsdp2_bf16": ("fsdp2", ["model.dtype=bfloat16", "train.mixed_precision=bf16"]),
}
ABORT = "terminate called without an active exception"


def launch(config: str, run_dir: Path, processes: int, timeout: int) -> dict:
    """One ``accelerate launch`` of RUN under ``config``: its exit code, whether it aborted, whether
    the final model was saved, and the first logged loss."""
    config_file, extra = CONFIGS[config]
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(ACCELERATE_CONFIGS / f"{config_file}.yaml"),
        "--num_processes", str(processes), "--num_machines", "1", "--machine_rank", "0",
        "--main_process_port", "0",
        "-m", "distalign", "train", *RUN, *extra,
        f"output_dir={run_dir}", f"reference.cache_dir={run_dir.parent / (run_dir.name + '-cache')}",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", CPU_SHARDING_ENV: "1"}
    started = time.perf_counter()
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
        returncode, output = result.returncode, result.stdout + result.stderr
    except subprocess.TimeoutExpired as expired:
        returncode, output = "timeout", str(expired.stdout or "") + str(expired.stderr or "")
    metrics = run_dir / "metrics.jsonl"
    first = json.loads(metrics.read_text().splitlines()[0])["loss"] if metrics.is_file() else None
    return {
        "returncode": returncode,
        "aborted": ABORT in output,
        "saved": (run_dir / "final" / "model.safetensors").is_file(),
        "first_loss": first,
        "seconds": time.perf_counter() - started,
        "tail": output[-12000:] if returncode != 0 else "",
    }


def versions() -> str:
    names = ("torch", "accelerate", "transformers", "deepspeed")
    found = []
    for name in names:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} absent")
    return ", ".join(found)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configs", default="ddp,fsdp2,fsdp2_offload,zero2,zero3,fsdp2_bf16")
    parser.add_argument("--launches", type=int, default=30, help="launches per config")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=600, help="seconds per launch")
    parser.add_argument("--json", type=Path, help="also write every launch's record here")
    args = parser.parse_args()
    configs = args.configs.split(",")
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown:
        parser.error(f"unknown config(s) {unknown}; choose from {sorted(CONFIGS)}")
    if any(c.startswith("zero") for c in configs) and importlib.util.find_spec("deepspeed") is None:
        parser.error("the zero configs need DeepSpeed (pip install deepspeed, or the dev extra)")

    print(versions(), flush=True)
    records: dict[str, list[dict]] = collections.defaultdict(list)
    with tempfile.TemporaryDirectory(prefix="launch-stress-") as scratch:
        os.environ.setdefault("DISTALIGN_CACHE", str(Path(scratch) / "cache"))
        build_cached_model("tiny")  # built once here, not raced for by the first launch's processes
        for config in configs:
            for index in range(args.launches):
                record = launch(config, Path(scratch) / f"{config}-{index}", args.processes, args.timeout)
                records[config].append(record)
                mark = "." if record["returncode"] == 0 and record["saved"] else "F"
                print(mark, end="", flush=True)
            print(f" {config}", flush=True)

    print(f"\n{'config':<15} {'launches':>8} {'exit 0':>6} {'aborts':>6} {'saved':>5} "
          f"{'first loss (min..max)':>25} {'s/launch':>8}")  # fmt: skip
    failed = False
    for config, runs in records.items():
        losses = [r["first_loss"] for r in runs if r["first_loss"] is not None]
        span = f"{min(losses):.7f}..{max(losses):.7f}" if losses else "-"
        ok = sum(r["returncode"] == 0 for r in runs)
        print(
            f"{config:<15} {len(runs):>8} {ok:>6} {sum(r['aborted'] for r in runs):>6} "
            f"{sum(r['saved'] for r in runs):>5} {span:>25} {sum(r['seconds'] for r in runs) / len(runs):>8.1f}"
        )
        failed |= ok < len(runs)
    print(f"ln 2 = {math.log(2):.7f}")
    for config, runs in records.items():
        for index, run in enumerate(runs):
            if run["returncode"] != 0:
                print(f"\n--- {config} launch {index}: exit {run['returncode']}\n{run['tail']}")
    if args.json:
        args.json.write_text(json.dumps({"versions": versions(), "launches": records}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
