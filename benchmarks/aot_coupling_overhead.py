"""What exact global-batch coupling costs AOT: steps/s and peak RSS of train.coupling_scope=global vs
micro_batch (sorting within each micro-batch, what other tools do), on the same data, model and steps.

Cases (paired AOT on the quickstart pairs, tiny model by default):
  accumulation  1 process, batch 16 = 4 micro-batches of 4: micro_batch | global+recompute | global+retain
  no_accum      1 process, batch 16 = 1 micro-batch of 16:  micro_batch | global
  two_procs     2 processes (torch.distributed.run, gloo), batch 16 = 8 per process, no accumulation:
                micro_batch | global

By design, "recompute" runs one extra no-grad forward per step (it fixes the sorted matching on the whole
batch first, then back-propagates micro-batch by micro-batch), and "retain" keeps every micro-batch's
autograd graph alive until the single backward (no extra compute, the memory of the whole batch).
Without accumulation both global strategies are the same code path, so what remains is the cost of the
coupling itself: gathering 2 scalars per pair (across processes), one sort and one autograd call on
scalars. Overhead = s/step(global) / s/step(micro_batch) - 1, from medians over alternating repetitions.

    python benchmarks/aot_coupling_overhead.py --quick
    python benchmarks/aot_coupling_overhead.py --repeats 5 --steps 40
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from bench_utils import (
    command_line,
    distalign_step_times,
    environment_note,
    load_average,
    markdown_table,
    median_of,
    peak_rss_mb,
    run_worker,
    steady_state,
    thread_env,
    write_result,
)

# case -> (processes, micro-batches per process, [(coupling_scope, global_strategy), ...])
CASES = {
    "accumulation": (1, 4, [("micro_batch", "recompute"), ("global", "recompute"), ("global", "retain")]),
    "no_accum": (1, 1, [("micro_batch", "recompute"), ("global", "recompute")]),
    "two_procs": (2, 1, [("micro_batch", "recompute"), ("global", "recompute")]),
}


def micro_batch_size(case: str, batch: int) -> int:
    processes, micro_batches, _ = CASES[case]
    return batch // (processes * micro_batches)


def worker_main(args: argparse.Namespace) -> None:
    """One training run (one rank of it under torch.distributed.run); rank 0 writes the result."""
    from distalign.config import load_config
    from distalign.train.offline import train_offline

    run_dir = Path(args.run_dir)
    overrides = [
        f"output_dir={run_dir}",
        f"model.name={args.model_path}",
        "data.path=builtin:quickstart_pairs.jsonl",
        "data.max_length=64",
        "data.max_prompt_length=32",
        "loss.name=aot_paired",
        f"train.coupling_scope={args.scope}",
        f"train.global_strategy={args.strategy}",
        f"reference.cache_dir={args.reference_cache}",  # shared and warm: the precompute is not measured
        f"train.batch_size={args.batch}",
        f"train.micro_batch_size={args.micro}",
        f"train.max_steps={args.steps}",
        "train.lr=1e-3",
        "train.scheduler=constant",
        "train.progress=false",
        "train.log_every=1",
    ]
    train_offline(load_config(None, overrides), stop_after_step=args.steps)
    rank = int(os.environ.get("RANK", "0"))
    write_result(f"{args.result}.rank{rank}", {"rank": rank, "peak_rss_mb": peak_rss_mb()})
    if rank == 0:
        step_times, _ = distalign_step_times(run_dir)
        write_result(args.result, steady_state(step_times, args.warmup))


def _build_model(kind: str, scratch: Path) -> str:
    from distalign.models.tiny import build_tiny_model, tiny_model_path

    if kind == "tiny":
        return str(tiny_model_path())
    path = scratch / "small_model"  # a heavier random Llama, so compute dominates a step as it does at scale
    build_tiny_model(path, hidden_size=256, num_layers=4, num_heads=4)
    return str(path)


def _run(args, case: str, scope: str, strategy: str, model_path: str, cache: Path) -> dict:
    processes, micro = CASES[case][0], micro_batch_size(case, args.batch)
    with tempfile.TemporaryDirectory(prefix="distalign_aot_run_") as run_dir:
        worker_args = [
            "--worker",
            "--model-path", model_path,
            "--scope", scope,
            "--strategy", strategy,
            "--batch", str(args.batch),
            "--micro", str(micro),
            "--steps", str(args.steps),
            "--warmup", str(args.warmup),
            "--run-dir", str(Path(run_dir) / "run"),
            "--reference-cache", str(cache),
        ]  # fmt: skip
        launcher = None
        if processes > 1:
            launcher = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={processes}",
            ]
        result = run_worker(__file__, worker_args, timeout=args.timeout, env=thread_env(1), launcher=launcher)
    result["peak_rss_mb"] = max(rank["peak_rss_mb"] for rank in result["ranks"])
    return result


def _rows(results: dict[tuple[str, str, str], list[dict]], batch: int) -> list[list]:
    rows = []
    for (case, scope, strategy), runs in results.items():
        baseline = results[(case, "micro_batch", "recompute")]
        step, rss = median_of(runs, "s_per_step"), median_of(runs, "peak_rss_mb")
        overhead = step / median_of(baseline, "s_per_step") - 1
        per_rep = [run["s_per_step"] / base["s_per_step"] - 1 for run, base in zip(runs, baseline)]
        processes, micro = CASES[case][0], micro_batch_size(case, batch)
        label = "micro_batch" if scope == "micro_batch" else f"global ({strategy})"
        if scope == "global" and case != "accumulation":
            label = "global"  # one micro-batch per process: both strategies run the same code
        rows.append(
            [case, processes, micro, label, len(runs), 1.0 / step, step * 1000, f"{100 * overhead:+.1f}%",
             f"{100 * min(per_rep):+.0f}% .. {100 * max(per_rep):+.0f}%", rss,
             f"{rss - median_of(baseline, 'peak_rss_mb'):+.0f}"]
        )  # fmt: skip
    return rows


def parent_main(args: argparse.Namespace) -> None:
    print(f"$ {command_line()}")
    print(f"load average before: {load_average()}")
    results: dict[tuple[str, str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="distalign_aot_bench_") as scratch:
        model_path = _build_model(args.model, Path(scratch))
        cache = Path(scratch) / "reference_cache"
        for repetition in range(args.repeats):
            for case in args.cases:
                arms = CASES[case][2]
                for scope, strategy in arms if repetition % 2 == 0 else arms[::-1]:
                    started = time.perf_counter()
                    result = _run(args, case, scope, strategy, model_path, cache)
                    results.setdefault((case, scope, strategy), []).append(result)
                    print(
                        f"  rep {repetition + 1} {case:12s} {scope:11s} {strategy:9s} {result['steps_per_s']:.2f} "
                        f"steps/s, peak {result['peak_rss_mb']:.0f} MB ({time.perf_counter() - started:.0f} s, "
                        f"load {load_average()})",
                        flush=True,
                    )
    print(f"load average after: {load_average()}")
    print(f"\nmodel={args.model} batch={args.batch} steps={args.steps} (first {args.warmup} not timed) "
          f"repeats={args.repeats}, 1 thread per process")  # fmt: skip
    header = ["case", "procs", "micro", "coupling", "runs", "steps/s", "ms/step", "step time vs micro_batch",
              "per-rep range", "peak RSS MB", "RSS vs micro_batch MB"]  # fmt: skip
    print(markdown_table(header, _rows(results, args.batch)))
    print(environment_note(1))


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", choices=("tiny", "small"), default="tiny", help="small: hidden 256, 4 layers"
    )
    parser.add_argument("--quick", action="store_true", help="CI-sized: 12 steps, 1 repetition")
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for hidden in (
        "--model-path",
        "--scope",
        "--strategy",
        "--run-dir",
        "--reference-cache",
        "--result",
        "--scratch",
    ):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--micro", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.repeats = 12, 3, 1
    return args


if __name__ == "__main__":
    parsed = parse_args(sys.argv[1:])
    if parsed.worker:
        worker_main(parsed)
    else:
        parent_main(parsed)
