"""AOT paired, AOT unpaired and DPO on the quickstart data: margins and dominance on held-out pairs.

Every method trains the tiny model with the same steps, batch, learning rate and schedule (the
quickstart's), through the `distalign train` CLI; the commands are printed. The 240 quickstart pairs
are split once (seeded) into 192 training and 48 held-out pairs. Variants of the training data:
  clean  the pairs as shipped (easy: DPO's training accuracy reaches 1.0 within a few steps)
  noisy  the same pairs with --flip-fraction (30%) of them swapped (chosen <-> rejected); for the
         unpaired file, that fraction of the labels flipped. Held-out pairs keep their true labels.
AOT unpaired trains either on the pairs split into positives and negatives (data.unpair=true) or on
the shipped unpaired file (different prompts, 140 positives vs 100 negatives, so n != m).

After training, with r(x, y) = log pi(y|x) - log pi_ref(y|x) (pi_ref = the initial tiny model) on the
held-out pairs:
  acc / margin        fraction of pairs with r(chosen) > r(rejected); mean of r(chosen) - r(rejected)
  paired viol / W1-   quantile violation rate and W1 violation of Z_pi = log pi(c) - log pi(r) against
                      Z_ref (paired AOT's target: Z_pi >=_FSD Z_ref)
  unpaired viol / W1- the same for U = r(chosen) against V = r(rejected) (unpaired AOT's target)
computed with distalign.stats.dominance. Results are means over --seeds.

    python benchmarks/compare_methods.py --quick
    python benchmarks/compare_methods.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_utils import WORKER_ENV, command_line, load_average, markdown_table, thread_env

HELD_OUT = 48
FLIP_FRACTION = 0.3
TRAIN_OVERRIDES = [  # the quickstart config's model, lengths, batch, steps and schedule
    "model.name=tiny",
    "data.max_length=64",
    "data.max_prompt_length=32",
    "train.batch_size=16",
    "train.micro_batch_size=8",
    "train.lr=1e-3",
    "train.scheduler=cosine",
    "train.warmup_ratio=0.05",
    "train.log_every=5",
    "train.progress=false",
]
# label -> (loss, training data kind, extra overrides)
METHODS = {
    "dpo (beta 0.1)": ("dpo", "pairs", ["loss.beta=0.1"]),
    "aot_paired (beta 0.01)": ("aot_paired", "pairs", []),
    "aot_paired (beta 0.1)": ("aot_paired", "pairs", ["loss.beta=0.1"]),
    "aot_unpaired, unpair=true": ("aot_unpaired", "pairs", ["data.unpair=true"]),
    "aot_unpaired, unpaired file": ("aot_unpaired", "unpaired", []),
}


# -------------------------------------------------------------------------------------------- data
def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def prepare_data(work_dir: Path, flip_fraction: float = FLIP_FRACTION, seed: int = 0) -> dict[str, str]:
    """Write the split and the noisy variants; returns name -> path."""
    from distalign.data.loading import resource_path

    pairs = _read_jsonl(Path(resource_path("quickstart_pairs.jsonl")))
    unpaired = _read_jsonl(Path(resource_path("quickstart_unpaired.jsonl")))
    rng = random.Random(seed)
    order = list(range(len(pairs)))
    rng.shuffle(order)
    held_out = [pairs[i] for i in order[:HELD_OUT]]
    train = [pairs[i] for i in order[HELD_OUT:]]
    swapped = set(rng.sample(range(len(train)), round(flip_fraction * len(train))))
    noisy_train = [
        {**row, "chosen": row["rejected"], "rejected": row["chosen"]} if i in swapped else row
        for i, row in enumerate(train)
    ]
    flipped = set(rng.sample(range(len(unpaired)), round(flip_fraction * len(unpaired))))
    noisy_unpaired = [
        {**row, "label": not row["label"]} if i in flipped else row for i, row in enumerate(unpaired)
    ]
    work_dir.mkdir(parents=True, exist_ok=True)
    return {
        "held_out": _write_jsonl(work_dir / "held_out_pairs.jsonl", held_out),
        "train": _write_jsonl(work_dir / "train_pairs.jsonl", train),
        "clean/pairs": str(work_dir / "train_pairs.jsonl"),
        "noisy/pairs": _write_jsonl(work_dir / "train_pairs_noisy.jsonl", noisy_train),
        "clean/unpaired": "builtin:quickstart_unpaired.jsonl",
        "noisy/unpaired": _write_jsonl(work_dir / "unpaired_noisy.jsonl", noisy_unpaired),
    }


# ---------------------------------------------------------------------------------------- training
def train_command(
    method: str, variant: str, seed: int, steps: int, data: dict[str, str], run_dir: Path
) -> list[str]:
    loss, kind, extra = METHODS[method]
    return [
        "distalign", "train", *TRAIN_OVERRIDES,
        f"output_dir={run_dir}",
        f"data.path={data[f'{variant}/{kind}']}",
        f"loss.name={loss}",
        *extra,
        f"train.max_steps={steps}",
        f"train.seed={seed}",
    ]  # fmt: skip


def run_training(command: list[str]) -> None:
    env = {**os.environ, **WORKER_ENV, **thread_env(1)}
    completed = subprocess.run(command, capture_output=True, text=True, env=env)
    if completed.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed:\n{(completed.stdout + completed.stderr)[-3000:]}")


# -------------------------------------------------------------------------------------- evaluation
class PairScorer:
    """Summed completion log-probs of a fixed set of pairs under any model (chosen [N], rejected [N])."""

    def __init__(self, path: str, tokenizer) -> None:
        from distalign.data.loading import load_rows
        from distalign.data.tokenize import tokenize_paired
        from distalign.data.tokenized import TokenizationSettings

        rows = load_rows(path).rows
        self.pairs, _ = tokenize_paired(
            rows, tokenizer, TokenizationSettings(max_length=64, max_prompt_length=32)
        )
        self.pad_token_id = tokenizer.pad_token_id

    def __call__(self, model, batch_size: int = 16):
        import torch

        from distalign.data.collate import collate_pairs
        from distalign.models.reference import compute_reference_logprobs

        chosen, rejected = [], []
        for start in range(0, len(self.pairs), batch_size):
            batch = collate_pairs(self.pairs[start : start + batch_size], self.pad_token_id)
            scores = compute_reference_logprobs(model, [batch], adapters_off=False)
            half = scores.shape[0] // 2
            chosen.append(scores[:half])
            rejected.append(scores[half:])
        return torch.cat(chosen).double(), torch.cat(rejected).double()


def pair_metrics(policy: tuple, reference: tuple) -> dict[str, float]:
    from distalign.stats.dominance import quantile_violation_rate, w1_gap

    (pi_c, pi_r), (ref_c, ref_r) = policy, reference
    reward_c, reward_r = pi_c - ref_c, pi_r - ref_r
    margin = reward_c - reward_r
    z_policy, z_reference = pi_c - pi_r, ref_c - ref_r
    return {
        "acc": float((margin > 0).double().mean()),
        "margin": float(margin.mean()),
        "r_chosen": float(reward_c.mean()),
        "r_rejected": float(reward_r.mean()),
        "paired_viol": quantile_violation_rate(z_policy, z_reference),
        "paired_w1_viol": w1_gap(z_policy, z_reference).violation,
        "unpaired_viol": quantile_violation_rate(reward_c, reward_r),
        "unpaired_w1_viol": w1_gap(reward_c, reward_r).violation,
    }


def evaluate(
    run_dir: Path, scorers: dict[str, PairScorer], reference_scores: dict[str, tuple]
) -> dict[str, float]:
    from distalign.models.loading import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(str(run_dir / "final"))
    held_out = pair_metrics(scorers["held_out"](model), reference_scores["held_out"])
    train = pair_metrics(scorers["train"](model), reference_scores["train"])
    return {**held_out, "train_acc": train["acc"]}


# ------------------------------------------------------------------------------------------ report
COLUMNS = [
    ("acc", "held-out acc"),
    ("margin", "margin"),
    ("r_chosen", "r(chosen)"),
    ("r_rejected", "r(rejected)"),
    ("paired_viol", "paired viol"),
    ("paired_w1_viol", "paired W1-"),
    ("unpaired_viol", "unpaired viol"),
    ("unpaired_w1_viol", "unpaired W1-"),
    ("train_acc", "train acc (true labels)"),
]


def _table(results: dict[tuple[str, str], list[dict]], variant: str) -> str:
    rows = []
    for (method, run_variant), runs in results.items():
        if run_variant != variant:
            continue
        rows.append([method, *(statistics.mean(r[key] for r in runs) for key, _ in COLUMNS)])
    return markdown_table(["method", *(title for _, title in COLUMNS)], rows)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variants", nargs="+", choices=("clean", "noisy"), default=["clean", "noisy"])
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps (the quickstart's 60)")
    parser.add_argument("--flip-fraction", type=float, default=FLIP_FRACTION, help="label noise of 'noisy'")
    parser.add_argument("--work-dir", help="where data and runs go (default: a temporary directory)")
    parser.add_argument("--quick", action="store_true", help="CI-sized: 10 steps, clean data, one seed")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.variants, args.seeds = 10, ["clean"], [0]
    print(f"$ {command_line()}")
    print(f"load average before: {load_average()}")
    with tempfile.TemporaryDirectory(prefix="distalign_compare_") as scratch:
        work_dir = Path(args.work_dir or scratch)
        _compare(args, work_dir)
    print(f"load average after: {load_average()}")


def _compare(args: argparse.Namespace, work_dir: Path) -> None:
    import torch

    from distalign.models.loading import load_model_and_tokenizer

    torch.set_num_threads(1)
    data = prepare_data(work_dir, args.flip_fraction)
    reference, tokenizer = load_model_and_tokenizer("tiny")
    scorers = {name: PairScorer(data[name], tokenizer) for name in ("held_out", "train")}
    reference_scores = {name: scorer(reference) for name, scorer in scorers.items()}
    baseline = pair_metrics(reference_scores["held_out"], reference_scores["held_out"])
    print(
        f"reference model on held-out pairs: log-prob accuracy {float((reference_scores['held_out'][0] > reference_scores['held_out'][1]).double().mean()):.3f} (margins are 0 by definition)"
    )  # noqa: E501
    del baseline
    results: dict[tuple[str, str], list[dict]] = {}
    commands = []
    for variant in args.variants:
        for method in args.methods:
            for seed in args.seeds:
                slug = re.sub("[^a-z0-9]+", "_", method).strip("_")
                run_dir = work_dir / "runs" / f"{variant}_{slug}_seed{seed}"
                command = train_command(method, variant, seed, args.steps, data, run_dir)
                if seed == args.seeds[0]:
                    commands.append(shlex.join(command))
                run_training(command)
                metrics = evaluate(run_dir, scorers, reference_scores)
                results.setdefault((method, variant), []).append(metrics)
                print(f"  {variant:5s} {method:28s} seed {seed}: held-out acc {metrics['acc']:.3f} "
                      f"margin {metrics['margin']:.2f} paired viol {metrics['paired_viol']:.3f}", flush=True)  # fmt: skip
    print(
        f"\nsteps={args.steps} seeds={args.seeds} held-out pairs={HELD_OUT} noisy={args.flip_fraction:.0%} flipped "
        "(means over seeds)"
    )
    for variant in args.variants:
        print(f"\n{variant} training data:")
        print(_table(results, variant))
    print("\ncommands (first seed; data files as written by prepare_data):")
    print("\n".join(commands))


if __name__ == "__main__":
    main(sys.argv[1:])
