"""Where a distalign DPO step's time goes on a GPU: torch.profiler over a few steps of
gpu_step.py's setting (a Qwen2-shaped model from a config, mixed-length pairs, bf16 autocast), at
one or more micro-batch sizes.

    python benchmarks/profile_step.py                         # qwen2-0.5b, 2048 tokens, micro 2 and 8
    python benchmarks/profile_step.py --quick                 # tiny shape: checks it runs (any device)

Prints, per micro-batch size: the median wall time of the profiled steps, how much of it the GPU was
busy (sum of kernel times) and the top operators by self CPU time and by self device time. A step
whose GPU-busy time is far below its wall time is bound by the host (Python, dispatch, launches),
not by the model's arithmetic.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_step  # noqa: E402
import offline_vs_trl_workers  # noqa: E402


def profile_run(args: argparse.Namespace, model: Path, data: Path, micro: int) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    from distalign.train import engine as engine_module

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    wait, active = args.skip, args.active
    profiler = profile(activities=activities, schedule=schedule(wait=wait, warmup=1, active=active, repeat=1))
    step_ends: list[float] = []
    log_step = engine_module.Engine.log

    def log_and_profile(engine, step, metrics):
        log_step(engine, step, metrics)
        if cuda:
            torch.cuda.synchronize()
        step_ends.append(time.perf_counter())
        profiler.step()

    engine_module.Engine.log = log_and_profile
    worker_args = argparse.Namespace(
        scratch=tempfile.mkdtemp(prefix="distalign_profile_"), model_path=str(model), data=str(data),
        max_length=args.length, max_prompt=3 * args.length // 8 + 1, setting="precomputed", batch=args.batch,
        micro=micro, steps=wait + 1 + active + 1, lr=1e-6, precision="bf16", packing=args.packing, lora_r=0,
    )  # fmt: skip
    try:
        with profiler:
            offline_vs_trl_workers._distalign_worker(worker_args)
    finally:
        engine_module.Engine.log = log_step
    profiled = [b - a for a, b in zip(step_ends, step_ends[1:])][wait : wait + 1 + active][-active:]
    events = profiler.key_averages()
    device_key = (
        "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    )
    kernel_us = sum(getattr(e, device_key, 0) for e in events) / active
    wall = statistics.median(profiled)
    print(
        f"\n=== micro-batch {micro} pairs: {wall:.3f} s/step wall, device busy {kernel_us / 1e6:.3f} s/step"
    )
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    if cuda:
        print(events.table(sort_by=device_key.replace("_total", "_total"), row_limit=args.rows))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=sorted(gpu_step.SHAPES), default="qwen2-0.5b")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--micro", type=lambda t: [int(v) for v in t.split(",")], default=[2, 8])
    parser.add_argument("--packing", action="store_true")
    parser.add_argument("--skip", type=int, default=3, help="steps before profiling")
    parser.add_argument("--active", type=int, default=2, help="profiled steps")
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.shape, args.length, args.batch, args.micro, args.skip, args.active = "tiny", 128, 4, [2], 1, 1
    with tempfile.TemporaryDirectory(prefix="distalign_profile_inputs_") as scratch:
        model = gpu_step.build_model(gpu_step.SHAPES[args.shape], args.length, Path(scratch) / "model")
        data = Path(scratch) / "pairs.jsonl"
        steps = args.skip + args.active + 2
        gpu_step.mixed_length_pairs(model, data, steps * args.batch, args.length)
        for micro in args.micro:
            profile_run(args, model, data, micro)


if __name__ == "__main__":
    main()
