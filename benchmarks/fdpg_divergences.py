"""f-DPG per divergence on a pointwise constraint: equal steps, then alignment, divergences, diversity.

The task (GDC / f-DPG "pointwise constraint"): the target is the base model conditioned on its sample
containing a word, p(x) ∝ a(x) b(x). Every divergence gets the same base, target, seed, learning rate,
batch and number of steps, then one evaluation on fresh policy samples reports (see
distalign/train/online/evaluation.py): alignment E_pi[b], KL(p || pi) by importance sampling with the ESS of
P/pi, KL(pi || p), JS (unscaled: 2 x textbook), TV, KL(pi || a), distinct-2 and self-BLEU. Because the
importance-sampling KL(p || pi) rests on a handful of samples once pi has moved (low ESS), KL(p || pi) is
also estimated from exact samples of p (rejection sampling from the base, QRS with beta = 1, shared by
all runs) with a 95% CI: the "exact-p" column.

Reverse KL is infinite for a hard constraint (the policy samples violations that p excludes), so the
constraint is soft for *all* divergences: b(x) = 1 if the word occurs, else --epsilon (the "p" row of the
table gives the target's own alignment, Z / (Z + epsilon (1 - Z))).

The base is the tiny model trained briefly on distalign's built-in English corpus (unconditional, from
BOS; cached in OUT/base), so samples are word-like and distinct-2 means something; the word "every"
occurs in about 4% of its samples. Pass --model to use another base (e.g. smollm2; slow on CPU).

    python benchmarks/fdpg_divergences.py --quick                  # smoke run, ~2 minutes
    python benchmarks/fdpg_divergences.py                          # the table in docs/fdpg.md
    python benchmarks/fdpg_divergences.py --seeds 0 1 2            # mean +- sd over seeds
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

from bench_utils import command_line, environment_note, load_average, markdown_table

DIVERGENCES = ["forward_kl", "reverse_kl", "jensen_shannon", "total_variation"]
COLUMNS = [  # (header, key of the evaluation record)
    ("E_pi[b]", "eval/alignment"),
    ("KL(p||pi) exact-p [95% CI]", "exact/kl_p_pi"),
    ("KL(p||pi) IS (ESS)", "eval/kl_p_pi"),
    ("KL(pi||p)", "eval/kl_pi_p"),
    ("JS", "eval/js"),
    ("TV", "eval/tv"),
    ("KL(pi||a)", "eval/kl_pi_a"),
    ("distinct-2", "eval/distinct_2"),
    ("self-BLEU", "eval/self_bleu"),
]


def build_corpus_base(out: Path, steps: int) -> Path:
    """The tiny model after ``steps`` SFT steps on the built-in corpus, as a model directory (cached)."""
    from distalign.config import load_config
    from distalign.models.tiny import tiny_corpus
    from distalign.train import run_training

    final = out / "base" / "final"
    if (final / "config.json").exists():
        return final
    data = out / "base_corpus.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    # Paired rows only because the SFT loss reads the chosen side; the empty prompt becomes BOS.
    data.write_text(
        "".join(json.dumps({"prompt": "", "chosen": s, "rejected": s}) + "\n" for s in tiny_corpus())
    )
    overrides = [
        f"output_dir={out / 'base'}",
        "model.name=tiny",
        f"data.path={data}",
        "data.max_length=64",
        "data.max_prompt_length=8",
        "loss.name=sft",
        "train.batch_size=32",
        "train.micro_batch_size=32",
        f"train.max_steps={steps}",
        "train.lr=3e-3",
        "train.log_every=50",
    ]
    run_training(load_config(None, overrides))
    return final


def run_config(args: argparse.Namespace, model: str, divergence: str, seed: int, output_dir: Path) -> dict:
    """The f-DPG run of one divergence (the same for all but ``online.divergence``)."""
    constraint = {
        "kind": "constraint",
        "feature": {"name": "contains_word", "word": args.word},
        "epsilon": args.epsilon,
    }
    return {
        "output_dir": str(output_dir),
        "model": {"name": model},
        "train": {
            "seed": seed,
            "batch_size": args.samples_per_step,
            "micro_batch_size": args.samples_per_step,
            "max_steps": args.steps,
            "lr": args.lr,
            "scheduler": "constant",
            "log_every": args.steps,
            "progress": False,
        },
        "online": {
            "method": "fdpg",
            "divergence": divergence,
            "target": {"scorers": [constraint]},
            "prompts_per_step": 1,
            "samples_per_prompt": args.samples_per_step,
            "max_new_tokens": args.max_new_tokens,
            "sampling_batch_size": args.samples_per_step,
            "eval_every": args.steps,
            "eval_prompts": 1,
            "eval_samples_per_prompt": args.eval_samples,
        },
    }


def run_divergence(
    args: argparse.Namespace, model: str, divergence: str, seed: int
) -> tuple[dict, dict, float]:
    """Train one divergence; returns (evaluation before training, evaluation after, seconds).

    A finished run in the same directory with the same resolved config is reused (seconds = 0).
    """
    from distalign.config import build_config, dump_config
    from distalign.train import run_training

    output_dir = args.out / f"{divergence}_seed{seed}"
    config = build_config(run_config(args, model, divergence, seed, output_dir), f"{divergence} seed {seed}")
    saved = output_dir / "config.yaml"
    finished = (output_dir / "final" / "config.json").exists()
    start = time.perf_counter()
    if not (finished and saved.exists() and saved.read_text() == dump_config(config)):
        run_training(config)
    seconds = time.perf_counter() - start
    evals = [json.loads(line) for line in (output_dir / "evals.jsonl").read_text().splitlines()]
    return evals[0], evals[-1], seconds


def _cell(values: list[float], digits: int = 3) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def summary_rows(results: dict[str, list[dict]], base: dict, epsilon: float) -> list[list[str]]:
    """One table row per divergence (mean ± sd over seeds), plus the base model and the target p.

    For p the numbers follow from the base's alignment z: Z = z + epsilon (1 - z), E_p[b] = z / Z and
    KL(p || a) = E_p[log b] - log Z = (1 - E_p[b]) log epsilon - log Z (exact up to z's sampling error).
    """
    z = base["eval/alignment"]
    partition = z + epsilon * (1 - z)
    target_alignment = z / partition
    kl_target_base = (
        (1 - target_alignment) * math.log(epsilon) - math.log(partition) if epsilon > 0 else -math.log(z)
    )
    rows = [["base a (step 0)", *_cells([base])]]
    rows.append(
        ["target p", f"{target_alignment:.3f}", "0", "0", "0", "0", "0", f"{kl_target_base:.3f}", "", ""]
    )
    rows += [[divergence, *_cells(finals)] for divergence, finals in results.items()]
    return rows


def _cells(records: list[dict]) -> list[str]:
    cells = [_cell([r[key] for r in records]) for _, key in COLUMNS]
    low = _cell([r["exact/kl_p_pi/ci_low"] for r in records], 2)
    high = _cell([r["exact/kl_p_pi/ci_high"] for r in records], 2)
    cells[1] += f" [{low}, {high}]"
    cells[2] += f" ({_cell([r['eval/kl_p_pi/ess'] for r in records], 0)})"
    return cells


def add_exact_kl(args: argparse.Namespace, model: str, records: list[tuple[Path | str, dict]]) -> int:
    """KL(p || pi) from exact samples of p (rejection from the base, shared by every run) into each
    record as ``exact/kl_p_pi[/ci_low|/ci_high]``; ``records`` = (model directory, record). Returns
    the number of target samples."""
    from distalign.config import build_config
    from distalign.models.loading import load_model_and_tokenizer
    from distalign.train.online.evaluation import kl_target_to_policy, sample_constraint_target
    from distalign.train.online.scoring import build_target
    from distalign.train.online.setup import load_prompts

    config = build_config(run_config(args, model, DIVERGENCES[0], 0, args.out / "unused"))
    base, tokenizer = load_model_and_tokenizer(model)
    samples = sample_constraint_target(
        base,
        tokenizer,
        load_prompts(config, tokenizer, "train"),
        build_target(config),
        num_samples=args.target_samples,
        max_new_tokens=args.max_new_tokens,
        batch_size=256,
    )
    for model_dir, record in records:
        policy = base if str(model_dir) == model else load_model_and_tokenizer(str(model_dir))[0]
        estimate = kl_target_to_policy(samples, policy, tokenizer)
        record.update({"exact/kl_p_pi": estimate.value, "exact/kl_p_pi/ci_low": estimate.ci_low})
        record["exact/kl_p_pi/ci_high"] = estimate.ci_high
    return len(samples)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("runs/fdpg_divergences"))
    parser.add_argument(
        "--model", default=None, help="base model; default: the tiny model trained on the corpus"
    )
    parser.add_argument("--base-steps", type=int, default=300, help="SFT steps of the default base")
    parser.add_argument("--word", default="every")
    parser.add_argument("--epsilon", type=float, default=1e-3)
    parser.add_argument("--divergences", nargs="+", default=DIVERGENCES)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--samples-per-step", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--eval-samples", type=int, default=1024)
    parser.add_argument("--target-samples", type=int, default=512, help="exact samples of p for KL(p||pi)")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 30 base steps, 10 steps, 128 eval samples"
    )
    args = parser.parse_args()
    if args.quick:
        args.base_steps, args.steps, args.eval_samples, args.target_samples = 30, 10, 128, 32
        args.out = args.out.with_name(args.out.name + "_quick")
    started = time.perf_counter()
    model = args.model or str(build_corpus_base(args.out, args.base_steps))
    results: dict[str, list[dict]] = {}
    base_eval = None
    finals: list[tuple[Path | str, dict]] = []
    for seed in args.seeds:  # seed-major: a run cut short still has every divergence of the first seeds
        for divergence in args.divergences:
            before, after, seconds = run_divergence(args, model, divergence, seed)
            base_eval = base_eval or before
            results.setdefault(divergence, []).append(after)
            finals.append((args.out / f"{divergence}_seed{seed}" / "final", after))
            print(
                f"{divergence} seed {seed}: {seconds:.0f} s, E_pi[b] {after['eval/alignment']:.3f}",
                flush=True,
            )
    num_target = add_exact_kl(args, model, [(model, base_eval), *finals])
    header = ["run", *[name for name, _ in COLUMNS]]
    print(f"\n{command_line()}\n")
    print(markdown_table(header, summary_rows(results, base_eval, args.epsilon)))
    print(
        f"\nbase {model}; word {args.word!r}, epsilon {args.epsilon}; {args.steps} steps x {args.samples_per_step} "
        f"samples, lr {args.lr}; evaluation on {args.eval_samples} policy samples and {num_target} exact "
        f"target samples; seeds {args.seeds}. "
        f"Wall time {time.perf_counter() - started:.0f} s, load average {load_average()}; {environment_note()}"
    )
    (args.out / "summary.json").write_text(json.dumps({"base": base_eval, "final": results}, indent=1))


if __name__ == "__main__":
    main()
