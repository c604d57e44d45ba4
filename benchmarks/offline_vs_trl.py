"""distalign's offline loop vs TRL's DPOTrainer: steps/s and peak memory on identical work.

Same weights (the same saved model directory, loaded by each framework), same rows, same global batch
and micro-batch, same number of optimizer steps, the same loss (sigmoid DPO, beta 0.1), fp32 on CPU,
AdamW with the same learning rate / betas / weight decay / clipping, no gradient checkpointing, no
evaluation, no saving, no external trackers. Each run is a fresh subprocess, distalign and TRL
alternate within every repetition, and the tables report medians over repetitions.

Where the two frameworks' defaults differ, both are measured. Reference log-probs: distalign
precomputes them before training (reference.precompute=true); TRL computes them on the fly with a
second model copy (precompute_ref_log_probs=False). TRL also defaults to gradient checkpointing and to
fused AdamW. Settings (--settings):
  precomputed   both precompute the reference; equal footing (no GC, torch.optim.AdamW, fp32)
  on_the_fly    both run a reference forward every step; equal footing
  trl_defaults  TRL only, with its defaults except precision (fp32): on-the-fly reference,
                gradient checkpointing, fused AdamW. Compared with distalign's defaults (precomputed).
--prototype-fixes adds "distalign+fixes" runs with proposed library changes patched in by the worker
(offline_vs_trl_workers.FIXES); the library itself does not depend on this file.

steps/s excludes one-time setup (imports aside: model load, tokenisation, reference precompute) and the
first --warmup steps; "setup s" is the time from the framework's entry call to the end of its first
step, minus one median step. Peak RSS is the worker process's VmHWM when training has finished (before
anything is saved), read the same way in both workers.

    python benchmarks/offline_vs_trl.py --quick                 # CI-sized, ~1 minute
    python benchmarks/offline_vs_trl.py --model tiny            # tiny model, quickstart pairs
    python benchmarks/offline_vs_trl.py --model smollm2         # SmolLM2-135M, batch 2, length 128
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from bench_utils import (
    command_line,
    environment_note,
    load_average,
    markdown_table,
    median_of,
    run_worker,
    thread_env,
)

SETTINGS = ("precomputed", "on_the_fly", "trl_defaults")
FIXES = ("malloc_mmap_threshold",)  # see offline_vs_trl_workers.FIXES
PRESETS = {
    # batch, micro-batch, steps, warm-up steps, repetitions, max length, max prompt length, lr
    "tiny": dict(batch=16, micro=8, steps=40, warmup=5, repeats=5, max_length=64, max_prompt=32, lr=1e-3),
    "smollm2": dict(batch=2, micro=2, steps=12, warmup=2, repeats=3, max_length=128, max_prompt=64, lr=1e-6),
}


# -------------------------------------------------------------------------------------------- data
def fixed_length_pairs(
    model_path: str, path: Path, rows: int, prompt_tokens: int, completion_tokens: int
) -> Path:
    """Write paired rows whose prompt is exactly ``prompt_tokens`` tokens and whose completions are
    ``completion_tokens - 1`` tokens (+ EOS) under the model's tokenizer, so both frameworks see
    sequences of exactly prompt + completion tokens without truncating anything."""
    from transformers import AutoTokenizer

    from distalign.models.tiny import tiny_corpus

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    words = " ".join(tiny_corpus()).split()
    cursor = 0

    def text_of(count: int, leading_space: bool) -> str:
        nonlocal cursor
        text = ""
        while True:
            word = words[cursor % len(words)]
            cursor += 1
            candidate = f"{text} {word}" if (text or leading_space) else word
            size = len(tokenizer(candidate, add_special_tokens=False)["input_ids"])
            if size == count:
                return candidate
            if size < count:
                text = candidate

    with path.open("w") as handle:
        for _ in range(rows):
            row = {
                "prompt": text_of(prompt_tokens, leading_space=False),
                "chosen": text_of(completion_tokens - 1, leading_space=True),
                "rejected": text_of(completion_tokens - 1, leading_space=True),
            }
            handle.write(json.dumps(row) + "\n")
    return path


# ------------------------------------------------------------------------------------------ parent
def _prepare_inputs(args: argparse.Namespace, scratch: Path) -> tuple[str, str]:
    if args.model == "tiny":
        from distalign.data.loading import resource_path
        from distalign.models.tiny import tiny_model_path

        return str(tiny_model_path()), str(resource_path("quickstart_pairs.jsonl"))
    from distalign.models.gguf import smollm2_path

    model_path = str(smollm2_path())
    completion = args.max_length - args.max_prompt
    rows = max(8, args.steps * args.batch)  # every row is trained on once; the precompute covers no more
    data = fixed_length_pairs(model_path, scratch / "pairs.jsonl", rows, args.max_prompt, completion)
    return model_path, str(data)


def _arms(args: argparse.Namespace) -> list[tuple[str, str, str, str]]:
    """(label, framework, setting, prototype fixes) of every run in one repetition; a label ending in
    "packed" runs distalign with data.packing on ("packed-mask": with the block-diagonal mask); "compiled"
    with train.compile."""
    arms = []
    for setting in args.settings:
        if setting == "trl_defaults":
            arms.append(("trl", "trl", setting, ""))
            continue
        arms += [("distalign", "distalign", setting, ""), ("trl", "trl", setting, "")]
        if args.packed:
            arms.append(("distalign packed", "distalign", setting, ""))
        if args.packed_mask:
            arms.append(("distalign packed-mask", "distalign", setting, ""))
        if args.compiled:
            arms.append(("distalign compiled", "distalign", setting, ""))
        if args.prototype_fixes and setting in args.fix_settings:
            arms.append(("distalign+fixes", "distalign", setting, ",".join(args.prototype_fixes)))
    return arms


def _worker_args(
    args: argparse.Namespace, arm: tuple[str, str, str, str], model_path: str, data: str
) -> list[str]:
    _, framework, setting, fixes = arm
    values = {
        "--worker": framework,
        "--setting": setting,
        "--model-path": model_path,
        "--data": data,
        "--batch": args.batch,
        "--micro": args.micro,
        "--steps": args.steps,
        "--warmup": args.warmup,
        "--lr": args.lr,
        "--max-length": args.max_length,
        "--max-prompt": args.max_prompt,
    }
    flags = [str(item) for pair in values.items() for item in pair]
    if fixes:
        flags += ["--fixes", fixes]
    if "packed" in arm[0]:
        flags.append("--packing")
    if arm[0].endswith("packed-mask"):
        flags.append("--block-diagonal-mask")
    if arm[0].endswith("compiled"):
        flags.append("--compile")
    if args.lora_r:
        flags += ["--lora-r", str(args.lora_r)]
    return flags + (["--profile", framework] if args.profile == framework else [])


METRICS = (
    "steps_per_s",
    "s_per_step",
    "cpu_steps_per_s",
    "peak_rss_mb",
    "rss_after_imports_mb",
    "setup_s",
    "tokens_per_pair",
)
# (ours, theirs, what the ratio means); keys are (label, setting)
COMPARISONS = [
    (("distalign", "precomputed"), ("trl", "trl_defaults"), "defaults: distalign vs TRL defaults (fp32)"),
    (
        ("distalign", "precomputed"),
        ("trl", "on_the_fly"),
        "defaults: distalign vs TRL on-the-fly reference, no GC",
    ),
    (("distalign", "precomputed"), ("trl", "precomputed"), "equal footing: both precompute"),
    (("distalign", "on_the_fly"), ("trl", "on_the_fly"), "equal footing: both on the fly"),
    (("distalign packed", "precomputed"), ("trl", "precomputed"), "packed, both precompute"),
    (("distalign packed", "on_the_fly"), ("trl", "on_the_fly"), "packed, both on the fly"),
    (
        ("distalign packed-mask", "precomputed"),
        ("trl", "precomputed"),
        "packed with the mask, both precompute",
    ),
    (
        ("distalign packed", "precomputed"),
        ("distalign packed-mask", "precomputed"),
        "packed: span attention vs block-diagonal mask",
    ),
    (("distalign compiled", "precomputed"), ("trl", "precomputed"), "train.compile, both precompute"),
    (("distalign compiled", "precomputed"), ("distalign", "precomputed"), "train.compile vs eager"),
    (("distalign+fixes", "precomputed"), ("trl", "trl_defaults"), "prototype fixes vs TRL defaults (fp32)"),
    (("distalign+fixes", "precomputed"), ("trl", "on_the_fly"), "prototype fixes vs TRL on-the-fly, no GC"),
    (("distalign+fixes", "precomputed"), ("trl", "precomputed"), "prototype fixes, both precompute"),
    (("distalign+fixes", "on_the_fly"), ("trl", "on_the_fly"), "prototype fixes, both on the fly"),
]


def _medians(results: dict[tuple[str, str], list[dict]]) -> dict[tuple[str, str], dict[str, float]]:
    return {key: {m: median_of(runs, m) for m in METRICS} for key, runs in results.items()}


def _summary_rows(results: dict[tuple[str, str], list[dict]]) -> list[list]:
    """Medians per (framework, setting), with ratios to TRL in the same setting."""
    medians = _medians(results)
    rows = []
    for (label, setting), m in medians.items():
        trl = medians.get(("trl", setting))
        ratios = (
            [m["steps_per_s"] / trl["steps_per_s"], m["peak_rss_mb"] / trl["peak_rss_mb"]]
            if trl
            else ["", ""]
        )
        rows.append([label, setting, len(results[(label, setting)]), *(m[k] for k in METRICS), *ratios])
    return rows


def _comparison_rows(results: dict[tuple[str, str], list[dict]]) -> list[list]:
    """Ratios of medians, and the range of per-repetition ratios (each run over its TRL neighbour)."""
    medians = _medians(results)

    def ratio(ours, theirs, key: str) -> tuple[float, str]:
        per_rep = [a[key] / b[key] for a, b in zip(results[ours], results[theirs])]
        return medians[ours][key] / medians[theirs][key], f"{min(per_rep):.2f}-{max(per_rep):.2f}"

    rows = []
    for ours, theirs, meaning in COMPARISONS:
        if ours in results and theirs in results:
            wall, cpu, memory = (
                ratio(ours, theirs, key) for key in ("steps_per_s", "cpu_steps_per_s", "peak_rss_mb")
            )
            rows.append([meaning, *wall, *cpu, *memory])
    return rows


def _model_shape(model_path: str) -> dict:
    """gpu_step.py's shape dict (FLOP counting) from a saved model's config.json."""
    config = json.loads((Path(model_path) / "config.json").read_text())
    heads = config["num_attention_heads"]
    return dict(
        hidden=config["hidden_size"],
        mlp=config["intermediate_size"],
        layers=config["num_hidden_layers"],
        heads=heads,
        kv_heads=config.get("num_key_value_heads", heads),
        vocab=config["vocab_size"],
    )


def _flop_rate_rows(
    args: argparse.Namespace, results: dict, model_path: str
) -> tuple[float, float, list[list]]:
    """(FLOPs per step, this machine's float32 matmul rate at --threads, rows): each arm's rate of the
    FLOPs a padded DPO step needs (gpu_step.dpo_step_flops: linear layers, causal attention, the output
    layer on completion tokens; a packed arm does less work for the same step, so its rate can exceed
    what it computes) and that rate as a fraction of the matmul rate (the physical limit)."""
    import torch
    from gpu_step import dpo_step_flops, matmul_tflops

    torch.set_num_threads(args.threads)
    completion = args.max_length - args.max_prompt
    flops = dpo_step_flops(
        _model_shape(model_path), [(args.max_prompt, completion, completion)] * args.batch, 1
    )
    peak = matmul_tflops("cpu") * 1e12
    rows = []
    for (label, setting), m in _medians(results).items():
        rate = flops * m["steps_per_s"]
        rows.append([label, setting, rate / 1e9, rate / peak])
    return flops, peak, rows


def parent_main(args: argparse.Namespace) -> None:
    print(f"$ {command_line()}")
    print(f"load average before: {load_average()}")
    results: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="distalign_bench_inputs_") as scratch:
        model_path, data = _prepare_inputs(args, Path(scratch))
        arms = _arms(args)
        for repetition in range(args.repeats):
            for arm in arms if repetition % 2 == 0 else arms[::-1]:  # alternate the order too
                result = run_worker(
                    __file__,
                    _worker_args(args, arm, model_path, data),
                    timeout=args.timeout,
                    env=thread_env(args.threads),
                )
                results.setdefault((arm[0], arm[2]), []).append(result)
                print(
                    f"  rep {repetition + 1} {arm[0]:15s} {arm[2]:12s} {result['steps_per_s']:.3f} steps/s "
                    f"{result['peak_rss_mb']:.0f} MB peak, setup {result['setup_s']:.1f} s "
                    f"(load {load_average()})",
                    flush=True,
                )
                if "profile" in result:
                    print(result["profile"])
    print(f"load average after: {load_average()}")
    print(
        f"\nmodel={args.model} batch={args.batch} micro_batch={args.micro} steps={args.steps} "
        f"(first {args.warmup} not timed) lr={args.lr} max_length={args.max_length} "
        f"max_prompt={args.max_prompt} threads={args.threads} repeats={args.repeats} "
        f"{'LoRA r=' + str(args.lora_r) if args.lora_r else 'full fine-tune'}"
    )
    header = ["framework", "setting", "runs", "steps/s", "s/step", "steps per CPU s", "peak RSS MB",
              "RSS after imports MB", "setup s", "tokens/pair",
              "steps/s vs TRL", "RSS vs TRL"]  # fmt: skip
    print(markdown_table(header, _summary_rows(results)))
    print()
    header = ["comparison", "steps/s ratio", "per-rep range", "steps per CPU s ratio", "per-rep range",
              "peak RSS ratio", "per-rep range"]  # fmt: skip
    print(markdown_table(header, _comparison_rows(results)))
    # Fixed-length rows: every step needs the same FLOPs. Not for LoRA, which skips the weight
    # gradients the count includes (its step needs about 4/6 of the linear-layer FLOPs).
    if args.model == "smollm2" and not args.lora_r:
        flops, peak, rows = _flop_rate_rows(args, results, model_path)
        print(
            f"\nFLOPs a padded DPO step needs: {flops / 1e9:.0f} GFLOP; this machine's float32 matmul "
            f"(1024^3) at {args.threads} thread(s): {peak / 1e9:.1f} GFLOP/s"
        )
        print(markdown_table(["framework", "setting", "model GFLOP/s", "of the matmul rate"], rows))
    print(environment_note(args.threads))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=sorted(PRESETS), default="tiny")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="CI-sized: 12 steps, 1 repetition (with the default --model tiny, about a minute)",
    )
    parser.add_argument("--steps", type=int, help="optimizer steps per run (preset default)")
    parser.add_argument("--warmup", type=int, help="initial steps left out of steps/s (preset default)")
    parser.add_argument("--repeats", type=int, help="alternating repetitions (preset default)")
    parser.add_argument("--batch", type=int, help="global batch (pairs)")
    parser.add_argument("--micro", type=int, help="micro-batch (pairs per forward)")
    parser.add_argument("--lr", type=float)
    parser.add_argument("--max-length", type=int)
    parser.add_argument("--max-prompt", type=int)
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    parser.add_argument(
        "--prototype-fixes",
        nargs="+",
        choices=sorted(FIXES),  # names only; offline_vs_trl_workers applies them
        default=[],
        help="also run distalign with these changes patched in (measures proposed library changes)",
    )
    parser.add_argument(
        "--fix-settings",
        nargs="+",
        choices=SETTINGS[:2],
        default=list(SETTINGS[:2]),
        help="settings in which to run the prototype fixes",
    )
    parser.add_argument(
        "--packed", action="store_true", help="also run distalign with data.packing (padding-free batches)"
    )
    parser.add_argument(
        "--packed-mask",
        action="store_true",
        help="also run distalign packed with the block-diagonal mask instead of span attention (as before it)",
    )
    parser.add_argument(
        "--lora-r",
        type=int,
        default=0,
        help="LoRA rank for both frameworks (adapters on q/k/v/o, alpha 2r); 0 = full fine-tune",
    )
    parser.add_argument(
        "--compiled",
        action="store_true",
        help="also run distalign with train.compile (compiled decoder layers)",
    )
    parser.add_argument("--profile", choices=("distalign", "trl"), help="cProfile that framework's workers")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads per worker (default 1: on a shared machine, busy cores stall multi-threaded "
        "kernels unpredictably; both frameworks get the same)",
    )
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per worker")
    # worker-only arguments (set by the parent)
    parser.add_argument("--worker", choices=("distalign", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--setting", choices=SETTINGS, help=argparse.SUPPRESS)
    parser.add_argument("--model-path", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    parser.add_argument("--fixes", default="", help=argparse.SUPPRESS)
    # worker-only, set by gpu_step.py (this script's own runs are fp32, padded)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--packing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--block-diagonal-mask", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is None:
        preset = dict(PRESETS[args.model])
        if args.quick:
            preset.update(steps=12, warmup=3, repeats=1)
        for key, value in preset.items():
            if getattr(args, key, None) is None:
                setattr(args, key, value)
    return args


if __name__ == "__main__":
    parsed = parse_args(sys.argv[1:])
    if parsed.worker:
        from offline_vs_trl_workers import worker_main

        parsed.profile = parsed.profile is not None
        worker_main(parsed)
    else:
        parent_main(parsed)
