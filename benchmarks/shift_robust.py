"""DPO vs DPO + {DoRA, KL-DRO, KLDPO, Dr.DPO} on the built-in shift task, evaluated on the golden
distribution, over seeds and label-noise levels.

Pipeline (every step a library call; the runs are ordinary run directories):
  1. data: `distalign data make sentiment --kind shift` — SmolLM2 samples pairs for training prompts from
     four sources (golden = plain prompt at temperature 1; hot = temperature 1.6; hype and terse = hidden
     style system prompts), equal proportions (alpha = 1/4), labels from the gold reward (VADER);
  2. density ratios: `distalign shift score` (golden vs each synthetic source, sentence embeddings +
     logistic regression) adds `density_ratio` (the DoRA weight h) to every row;
  3. noise: copies with 20% and 40% of the labels flipped at random (the same pairs, seeded);
  4. for each noise level, seed and method: LoRA training of SmolLM2 (the method = `aggregator.name`);
  5. evaluation on held-out prompts of the golden distribution (plain prompt, temperature 1): gold reward
     and win rate against the base model, whose samples are drawn once and shared.
The table reports, per method and noise level, the mean over seeds and a 95% t-interval over seeds
(3 seeds: wide on purpose), and each run's own bootstrap interval in the JSON.

    python benchmarks/shift_robust.py --output runs/shift_bench                 # the docs/benchmarks.md table
    python benchmarks/shift_robust.py --output /tmp/sb --quick                  # a 2-minute smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

METHODS = {
    "DPO": {"name": "mean"},
    "DPO+DoRA": {"name": "dora", "temperature": 1.0},
    "DPO+KL-DRO": {"name": "kl_dro", "temperature": 1.0},
    "DPO+KLDPO": {"name": "kldpo", "tau": 0.05, "max_weight": 10.0},
    "DPO+Dr.DPO": {"name": "dr_dpo", "beta_prime": 1.0},
}
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776}  # Student t quantiles for 95% intervals


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", required=True, help="directory for data, runs and results.json")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--prompts", type=int, default=96, help="training prompts (one pair each)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--noise", default="0,0.2,0.4", help="label-noise levels, comma-separated")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--eval-prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="tiny sizes to check the pipeline")
    return parser.parse_args()


def make_data(args: argparse.Namespace, root: Path) -> Path:
    """Sampled and density-scored shift data (reused when already there)."""
    raw, scored = root / "data" / "shift.jsonl", root / "data" / "shift_scored.jsonl"
    if not raw.exists():
        from distalign.tasks.sampler import make_task_dataset

        make_task_dataset(
            "sentiment",
            raw,
            model_name=args.model,
            kind="shift",
            k=2,
            num_prompts=args.prompts,
            max_new_tokens=args.max_new_tokens,
            batch_size=32,
        )
    if not scored.exists():
        command = [sys.executable, "-m", "distalign", "shift", "score", str(raw), "--target", "golden"]
        subprocess.run([*command, "--output", str(scored)], check=True)
    return scored


def noisy_copy(scored: Path, rate: float) -> Path:
    from distalign.tasks import read_jsonl
    from distalign.tasks.shift import flip_labels

    if rate == 0:
        return scored
    path = scored.with_name(f"shift_scored_noise{int(rate * 100)}.jsonl")
    if not path.exists():
        rows = flip_labels(read_jsonl(scored), rate, seed=17)
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def train(args: argparse.Namespace, data: Path, method: dict, seed: int, run_dir: Path) -> Path:
    from distalign.config import build_config
    from distalign.train.offline import train_offline

    if (run_dir / "final").exists():
        return run_dir
    tree = {
        "output_dir": str(run_dir),
        "model": {
            "name": args.model,
            "lora": {"enabled": True, "r": 16, "alpha": 32, "target_modules": "all-linear"},
        },
        "data": {"path": str(data), "max_length": 160, "max_prompt_length": 96},
        "loss": {"name": "dpo", "beta": args.beta},
        "aggregator": dict(method),
        "train": {
            "seed": seed,
            "batch_size": args.batch,
            "micro_batch_size": args.batch,
            "max_steps": args.steps,
            "lr": args.lr,
            "warmup_ratio": 0.1,
            "scheduler": "cosine",
            "progress": False,
        },
    }
    return train_offline(build_config(tree, source="shift benchmark"))


def noise_levels(args: argparse.Namespace) -> list[float]:
    return [float(x) for x in args.noise.split(",")]


def methods(args: argparse.Namespace) -> list[str]:
    return args.methods.split(",")


def t_interval(values: list[float]) -> tuple[float, float, float]:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = T_975.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def main() -> None:
    args = parse_args()
    if args.quick:
        args.prompts, args.seeds, args.steps, args.batch, args.eval_prompts = 16, 1, 1, 8, 4
    root = Path(args.output)
    root.mkdir(parents=True, exist_ok=True)
    started = time.time()
    scored = make_data(args, root)

    from distalign.config.evaluation import EvalConfig
    from distalign.eval.run import draw_reference_samples, eval_prompts, evaluate_models, load_eval_model
    from distalign.models.loading import load_model_and_tokenizer

    base, tokenizer = load_model_and_tokenizer(args.model)
    base.eval()
    cfg = EvalConfig(
        num_prompts=args.eval_prompts, samples_per_prompt=2, max_new_tokens=args.max_new_tokens, batch_size=32
    )
    plan = eval_prompts(cfg, tokenizer)
    reference = draw_reference_samples(base, tokenizer, plan, cfg)
    results_path = root / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    # Seed-major order: an interrupted run has every (noise, method) cell with fewer seeds, and a
    # rerun continues where it stopped (results.json).
    cells = [
        (seed, rate, label)
        for seed in range(args.seeds)
        for rate in noise_levels(args)
        for label in methods(args)
    ]
    for seed, rate, label in cells:
        data = noisy_copy(scored, rate)
        key = f"{label}|{rate}|{seed}"
        if key in results:
            continue
        run_dir = train(args, data, METHODS[label], seed, root / "runs" / f"{label}_noise{rate}_seed{seed}")
        from distalign.config import load_config

        policy, _ = load_eval_model(str(run_dir / "final"), load_config(run_dir / "config.yaml"))
        outcome = evaluate_models(policy, base, tokenizer, cfg, reference_samples=reference, plan=plan)
        r = outcome.result
        gold, ref = r.gold_reward["policy"], r.gold_reward["reference"]
        results[key] = {
            "gold_reward": gold.value,
            "gold_reward_ci": [gold.low, gold.high],
            "win_rate": r.win_rate.value,
            "win_rate_ci": [r.win_rate.low, r.win_rate.high],
            "kl": r.kl.k1.value if r.kl is not None else None,
            "reference_gold_reward": ref.value,
        }
        results_path.write_text(json.dumps(results, indent=1))
        print(key, json.dumps(results[key]), flush=True)
        del policy
    print_table(results, args)
    print(f"total wall time {time.time() - started:.0f} s")


def print_table(results: dict, args: argparse.Namespace) -> None:
    print(
        "\n| noise | method | gold reward, mean over seeds [95% t-CI] | win rate vs base [95% t-CI] | KL | seeds |"
    )
    print("|---|---|---|---|---|---|")
    for rate in [float(x) for x in args.noise.split(",")]:
        for label in args.methods.split(","):
            rows = [v for k, v in results.items() if k.startswith(f"{label}|{rate}|")]
            if not rows:
                continue
            g, w = t_interval([r["gold_reward"] for r in rows]), t_interval([r["win_rate"] for r in rows])
            kl = statistics.fmean(r["kl"] for r in rows if r["kl"] is not None)
            print(
                f"| {rate:.0%} | {label} | {g[0]:.3f} [{g[1]:.3f}, {g[2]:.3f}] | {w[0]:.3f} [{w[1]:.3f}, {w[2]:.3f}] "
                f"| {kl:.2f} | {len(rows)} |"
            )
    base = next(iter(results.values()))["reference_gold_reward"] if results else math.nan
    print(f"\nbase model (reference) gold reward on the same prompts: {base:.3f}")


if __name__ == "__main__":
    main()
