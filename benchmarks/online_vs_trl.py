"""distalign's online RLOO vs TRL's RLOOTrainer: samples/s, peak memory and where a step's time goes.

Same weights (the same saved model directory, loaded by each framework), the same prompts (a task's
train prompts as chat messages, rendered by the tokenizer's chat template with the generation prompt:
the parent checks both frameworks get the same token ids), the same samples per prompt, prompts per step,
max new tokens, micro-batch, optimizer steps and objective: KL-regularised RLOO with the sequence-level
penalty r - beta (log pi - log a), the same reward function object (distalign's registered reward),
exact sampling at temperature 1 with no top-k / top-p in both (TRL: ``temperature=1.0, top_k=0,
top_p=1.0``), fp32, AdamW with the same lr / betas / clipping, constant LR, no gradient checkpointing,
no evaluation, no saving. Full fine-tune (a frozen reference copy in both) unless ``--lora`` (the
reference is the base with adapters off in both). Each run is a fresh subprocess; the arms alternate
within every repetition and reverse order every other one; tables report medians over repetitions.

samples/s = prompts_per_step x samples_per_prompt / (mean step wall time) over the steps after
``--warmup``; samples per CPU s uses the worker process's CPU time instead (one intra-op thread: the
work done, less sensitive to other jobs on a shared machine than wall time). Phases: distalign's own
``time/<phase>`` metrics; TRL's are measured by wrapping its generation, no-grad log-prob passes (old
policy + reference) and reward calls in the worker (the rest of the step is reported as "update").

``--revisions REV ...`` adds arms running distalign as it was at those git revisions (``git archive`` of
``src/`` on ``PYTHONPATH``), for before/after comparisons in the same run (a revision needs the
``time/*`` metrics: c0347b1 or later).

    python benchmarks/online_vs_trl.py --quick                          # tiny model, ~2 minutes
    python benchmarks/online_vs_trl.py --model tiny --revisions c0347b1  # before/after + TRL, tiny model
    python benchmarks/online_vs_trl.py --no-trl --revisions c0347b1 --distalign-set online.method=fdpg \
        online.reward=null 'online.target={scorers: [{kind: constraint, feature: {name: regex, pattern: s}}]}' \
        online.proposal=offline                                         # off-policy f-DPG, before/after
    # to run on a quiet machine (not run yet; SmolLM2-135M-Instruct, LoRA r=16 as configs/rloo_sentiment.yaml):
    python benchmarks/online_vs_trl.py --model smollm2 --threads 2 --revisions c0347b1
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_utils import (
    apply_preset,
    command_line,
    environment_note,
    load_average,
    markdown_table,
    median_of,
    run_worker,
    thread_env,
)

REPO = Path(__file__).resolve().parents[1]
PRESETS = {
    # prompts/step, samples/prompt, max new tokens, micro-batch, steps, warm-up, repetitions, lr, LoRA
    "tiny": dict(prompts=8, samples=4, new_tokens=32, micro=32, steps=12, warmup=2, repeats=3, lr=1e-4, lora=False),
    "smollm2": dict(prompts=8, samples=4, new_tokens=32, micro=16, steps=6, warmup=1, repeats=3, lr=1e-5, lora=True),
}  # fmt: skip
QUICK = dict(steps=4, warmup=1, repeats=1)
PHASES = (
    "sample",
    "score_reference",
    "score_policy",
    "reward",
    "gather",
    "signal",
    "update",
    "refresh",
    "step",
)


# ------------------------------------------------------------------------------------------ inputs
def model_path(name: str) -> str:
    if name == "tiny":
        from distalign.models.tiny import tiny_model_path

        return str(tiny_model_path())
    from distalign.models.gguf import smollm2_path

    return str(smollm2_path())


def check_same_prompts(path: str, task: str) -> float:
    """Mean prompt tokens; raises if distalign's prompt ids differ from TRL's rendering of the same messages."""
    from transformers import AutoTokenizer

    from distalign.config import load_config
    from distalign.tasks import get_task
    from distalign.train.online.setup import load_prompts

    tokenizer = AutoTokenizer.from_pretrained(path)
    config = load_config(None, [f"model.name={path}", f"online.prompts.task={task}", "online.method=rloo",
                                "online.reward=vader_sentiment"])  # fmt: skip
    ours = load_prompts(config, tokenizer, "train").ids
    spec = get_task(task)
    theirs = [
        tokenizer.apply_chat_template(
            spec.messages(t), add_generation_prompt=True, tokenize=True, return_dict=True
        )
        for t in spec.prompts("train")
    ]
    theirs = [list(t["input_ids"]) for t in theirs]
    if ours != theirs:
        raise SystemExit("distalign and TRL would condition on different prompt token ids; fix the benchmark")
    return statistics.mean(len(ids) for ids in ours)


def revision_source(revision: str, scratch: Path) -> str:
    """``src/`` of the repository at ``revision``, extracted under ``scratch``; returns its path."""
    target = scratch / f"src_{revision}"
    target.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", revision, "src"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return str(target / "src")


# ------------------------------------------------------------------------------------------ parent
def _worker_args(args: argparse.Namespace, framework: str, path: str, packed: bool = False) -> list[str]:
    values = {
        "--worker": framework,
        "--model-path": path,
        "--task": args.task,
        "--prompts": args.prompts,
        "--samples": args.samples,
        "--new-tokens": args.new_tokens,
        "--micro": args.micro,
        "--steps": args.steps,
        "--warmup": args.warmup,
        "--lr": args.lr,
        "--kl-coef": args.kl_coef,
    }
    flags = [str(item) for pair in values.items() for item in pair] + (["--lora"] if args.lora else [])
    overrides = [*args.distalign_set, *(["data.packing=true"] if packed else [])]
    return flags + (["--distalign-set", *overrides] if framework == "distalign" and overrides else [])


def _ratio(ours: list[dict], theirs: list[dict], key: str) -> tuple[float, str]:
    """Ratio of medians, and the range of per-repetition ratios (each run over the same repetition's)."""
    per_rep = [a[key] / b[key] for a, b in zip(ours, theirs)]
    return median_of(ours, key) / median_of(theirs, key), f"{min(per_rep):.2f}-{max(per_rep):.2f}"


def _summary_rows(results: dict[str, list[dict]], baseline: str) -> list[list]:
    """Medians per arm, with samples/s and peak RSS over the ``baseline`` arm's (TRL, or an old revision)."""
    rows = []
    for arm, runs in results.items():
        ratios = ["", "", "", "", ""]
        if baseline in results and arm != baseline:
            ratios = [
                *_ratio(runs, results[baseline], "samples_per_s"),
                *_ratio(runs, results[baseline], "samples_per_cpu_s"),
                _ratio(runs, results[baseline], "peak_rss_mb")[0],
            ]
        keys = (
            "samples_per_s",
            "samples_per_cpu_s",
            "s_per_step",
            "peak_rss_mb",
            "completion_tokens",
            "setup_s",
        )
        rows.append([arm, len(runs), *(median_of(runs, k) for k in keys), *ratios])
    return rows


def _phase_rows(results: dict[str, list[dict]], arms: list[str]) -> list[list]:
    """Median seconds per phase and arm; with two arms or more, the first arm over the second (new / old):
    the ratio of medians and the range of per-repetition ratios."""
    rows = []
    for phase in PHASES:
        per_arm = [[{"v": r["phases"].get(phase)} for r in results[a]] for a in arms]
        medians = [median_of(runs, "v") for runs in per_arm]
        if all(m != m for m in medians):  # nan everywhere: a phase no arm has
            continue
        ratio: list = []
        if len(arms) > 1:
            pairs = [(a["v"], b["v"]) for a, b in zip(*per_arm[:2]) if a["v"] is not None and b["v"]]
            ratio = ["", ""]
            if pairs:
                per_rep = [a / b for a, b in pairs]
                ratio = [medians[0] / medians[1], f"{min(per_rep):.2f}-{max(per_rep):.2f}"]
        rows.append([phase, *medians, *ratio])
    return rows


def parent_main(args: argparse.Namespace) -> None:
    print(f"$ {command_line()}")
    print(f"load average before: {load_average()}")
    path = model_path(args.model)
    prompt_tokens = check_same_prompts(path, args.task)
    arms: list[tuple[str, str, dict]] = [("distalign", "distalign", {})]
    if args.packed:  # exact, so TRL still does the same work
        arms.insert(0, ("distalign packed", "distalign", {}))
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="distalign_bench_src_") as scratch:
        for revision in args.revisions:
            source = revision_source(revision, Path(scratch))
            arms.append((f"distalign@{revision}", "distalign", {"PYTHONPATH": source}))
        if not args.no_trl:
            arms.append(("trl", "trl", {}))
        for repetition in range(args.repeats):
            for label, framework, env in arms if repetition % 2 == 0 else arms[::-1]:
                result = run_worker(
                    __file__,
                    _worker_args(args, framework, path, packed=label == "distalign packed"),
                    timeout=args.timeout,
                    env={**thread_env(args.threads), **env},
                )
                results.setdefault(label, []).append(result)
                print(
                    f"  rep {repetition + 1} {label:20s} {result['samples_per_s']:.2f} samples/s "
                    f"{result['peak_rss_mb']:.0f} MB peak (load {load_average()})",
                    flush=True,
                )
    print(f"load average after: {load_average()}")
    print(
        f"\nmodel={args.model} task={args.task} prompts/step={args.prompts} samples/prompt={args.samples} "
        f"max_new_tokens={args.new_tokens} micro_batch={args.micro} steps={args.steps} (first {args.warmup} "
        f"not timed) lr={args.lr} kl_coef={args.kl_coef} lora={args.lora} threads={args.threads} "
        f"repeats={args.repeats}; prompt tokens per sample (both): {prompt_tokens:.1f}"
    )
    labels = [label for label, _, _ in arms]
    baseline = "trl" if "trl" in results else labels[-1]
    header = ["framework", "runs", "samples/s", "samples per CPU s", "s/step", "peak RSS MB",
              "completion tokens/sample", "setup s", f"samples/s vs {baseline}", "per-rep range",
              f"per CPU s vs {baseline}", "per-rep range", f"RSS vs {baseline}"]  # fmt: skip
    print(markdown_table(header, _summary_rows(results, baseline)))
    for label in labels[1:]:
        if label.startswith("distalign@"):
            speed, spread = _ratio(results[labels[0]], results[label], "samples_per_s")
            work, work_spread = _ratio(results[labels[0]], results[label], "samples_per_cpu_s")
            print(
                f"{labels[0]} vs {label}: samples/s x{speed:.2f} (per-repetition {spread}), samples per CPU "
                f"second x{work:.2f} (per-repetition {work_spread})"
            )
    print("\nmedian seconds per step and phase (TRL: sample = generate, score_reference = its no-grad "
          "passes, old policy + reference):")  # fmt: skip
    ratio = [f"{labels[0]} / {labels[1]}", "per-rep range"] if len(labels) > 1 else []
    print(markdown_table(["phase", *labels, *ratio], _phase_rows(results, labels)))
    print(environment_note(args.threads))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--quick", action="store_true", help="4 steps (1 not timed), 1 repetition")
    parser.add_argument("--task", default="sentiment", help="distalign task whose train prompts are used")
    parser.add_argument("--prompts", type=int, help="prompts per step (TRL: batch / num_generations)")
    parser.add_argument("--samples", type=int, help="samples per prompt (TRL: num_generations)")
    parser.add_argument("--new-tokens", type=int, help="max new tokens (TRL: max_completion_length)")
    parser.add_argument("--micro", type=int, help="sequences per forward/backward (TRL: per-device batch)")
    parser.add_argument("--steps", type=int, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, help="initial steps left out of samples/s")
    parser.add_argument("--repeats", type=int, help="alternating repetitions")
    parser.add_argument("--lr", type=float)
    parser.add_argument("--kl-coef", type=float, default=0.1, help="beta of r - beta (log pi - log a)")
    parser.add_argument(
        "--lora", action=argparse.BooleanOptionalAction, default=None, help="LoRA r=16, all-linear"
    )
    parser.add_argument(
        "--revisions", nargs="*", default=[], help="also run distalign at these git revisions"
    )
    parser.add_argument("--no-trl", action="store_true", help="distalign arms only")
    parser.add_argument(
        "--packed",
        action="store_true",
        help="also run distalign with data.packing (the update's forward packed)",
    )
    parser.add_argument(
        "--distalign-set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="extra config overrides for the distalign arms (with --no-trl: e.g. another method, off-policy)",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="intra-op threads per worker (as offline_vs_trl)"
    )
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per worker")
    parser.add_argument("--worker", choices=("distalign", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--model-path", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.distalign_set and not args.no_trl and args.worker is None:
        parser.error(
            "--distalign-set changes what distalign runs, so TRL would no longer do the same: add --no-trl"
        )
    if args.worker is None:
        apply_preset(args, {**PRESETS[args.model], **(QUICK if args.quick else {})})
    return args


if __name__ == "__main__":
    parsed = parse_args(sys.argv[1:])
    if parsed.worker:
        from online_vs_trl_workers import worker_main

        worker_main(parsed)
    else:
        parent_main(parsed)
