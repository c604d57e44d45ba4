"""AOT's claims (seed 000, Melnyk et al. 2024) on the preference world of common.py, where r* is known.

  (a) dominance: at equal KL(pi || pi_ref), AOT violates first-order dominance less than DPO (fewer and
      smaller quantile violations). Measured exactly over every pair of responses ordered by r*
      (weighted by pi_ref x pi_ref), for what AOT's objective asks (the implicit reward r = log pi/pi_ref
      of the better responses dominating that of the worse ones; the pair margin Z_pi dominating
      Z_ref, paired AOT's target) and for the policy's true-reward distribution against pi_ref's;
  (b) label noise: with 20% and 40% of the training labels flipped, AOT orders held-out pairs by r* better
      than DPO (the earlier quickstart comparison: 0.944 vs 0.833 held-out accuracy);
  (c) unpaired: on truly unpaired data (single responses labelled desirable or not, positives and
      negatives from different prompts, n != m), unpaired AOT against KTO.

Every method trains the same table for the same steps with the same data per seed; beta is the one knob
and gets the same grid for every method. (a) compares the methods along their whole beta grid at fixed
KL values (interpolated in log KL); (b) and (c) choose beta on a validation split from the observed
(noisy) labels, then report exact truth. Differences are AOT minus the baseline, paired over seeds.

    python benchmarks/claims/aot.py                 # 10 seeds, about 3 minutes on 2 cores
    python benchmarks/claims/aot.py --seeds 3       # a quick look
Results are kept in OUT/results.jsonl (default runs/claims/aot): a rerun continues where it stopped.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    DTYPE,
    Method,
    Results,
    World,
    draw_pairs,
    evaluate,
    markdown_table,
    mean_interval,
    pair_agreement,
    paired_stats,
    split,
    train,
    verdict,
)

from distalign.losses.base import UnpairedStats  # noqa: E402
from distalign.losses.quantiles import quantile_grid  # noqa: E402

BETAS = [0.03, 0.1, 0.3, 1.0, 3.0]
PAIRS = 600
STEPS = 150
TARGET_KLS = [0.05, 0.2, 0.5]


def paired_method(name: str, beta: float) -> Method:
    return Method(name, {"beta": beta})


def implicit_dominance(world: World, logp: torch.Tensor) -> dict[str, float]:
    """First-order dominance, exactly, over every pair (better y+, worse y-) of responses of a prompt
    ordered by r*, weighted by pi_ref(y+) pi_ref(y-): the implicit reward r = log pi/pi_ref of y+ against
    that of y- (unpaired AOT's U >= V) and the margin Z_pi = log pi(y+) - log pi(y-) against Z_ref
    (paired AOT's target)."""
    ref = world.ref_logp
    better = world.reward.unsqueeze(-1) > world.reward.unsqueeze(-2)  # [C, K+, K-]
    weight = (ref.exp().unsqueeze(-1) * ref.exp().unsqueeze(-2))[better]
    implicit = logp - ref
    metrics = {}
    for name, ours, theirs in (
        (
            "unpaired",
            implicit.unsqueeze(-1).expand_as(better)[better],
            implicit.unsqueeze(-2).expand_as(better)[better],
        ),
        (
            "paired",
            (logp.unsqueeze(-1) - logp.unsqueeze(-2))[better],
            (ref.unsqueeze(-1) - ref.unsqueeze(-2))[better],
        ),
    ):
        grid = quantile_grid(ours, theirs, positive_weights=weight, negative_weights=weight)
        metrics[f"{name}_violation_rate"] = float((grid.mass * (grid.gaps < 0)).sum())
        metrics[f"{name}_w1_violation"] = float((grid.mass * torch.relu(-grid.gaps)).sum())
    return metrics


#: What a training trajectory records after every step (column order).
TRAJECTORY = ["kl", "unpaired_violation_rate", "unpaired_w1_violation", "paired_violation_rate",
              "paired_w1_violation", "violation_rate", "w1_violation", "true_reward_gain"]  # fmt: skip


def run_paired(seed: int, name: str, beta: float, flip: float, trajectory: bool = False) -> dict:
    """Train ``name`` at ``beta`` on seed ``seed``'s pairs (``flip`` of the labels flipped); the exact
    metrics of the final policy and, with ``trajectory``, the TRAJECTORY columns after every step."""
    world = World.draw(seed)
    generator = torch.Generator().manual_seed(10_000 + seed)
    train_pairs, validation = split(draw_pairs(world, PAIRS, generator, flip=flip), [0.8, 0.2], generator)
    path: list[list[float]] = []

    def record(step: int, logp: torch.Tensor, metrics: dict) -> None:
        exact = {**evaluate(world, logp), **implicit_dominance(world, logp)}
        path.append([exact[column] for column in TRAJECTORY])

    logp = train(world, paired_method(name, beta), paired_stats(world, train_pairs), steps=STEPS,
                 record=record if trajectory else None)  # fmt: skip
    result = {
        **evaluate(world, logp),
        **implicit_dominance(world, logp),
        "validation_agreement": pair_agreement(logp, world, validation),
    }
    return {**result, "trajectory": path} if trajectory else result


def interpolate_at_kl(path: list[list[float]], kl: float, column: int) -> float | None:
    """``column`` of a training trajectory where its KL (column 0) first reaches ``kl`` (linear between
    the two steps around it), or None when the run never reached ``kl``."""
    previous = [0.0] * len(TRAJECTORY)  # pi_ref itself: KL 0, equal distributions (no violation), no gain
    for point in path:
        if point[0] >= kl:
            share = (kl - previous[0]) / (point[0] - previous[0]) if point[0] > previous[0] else 1.0
            return previous[column] + share * (point[column] - previous[column])
        previous = point
    return None


def claim_a(results: Results, seeds: list[int]) -> list[list]:
    """Along each method's training path (beta chosen on validation, as in (b)), at the step where
    KL(pi || pi_ref) reaches each target: dominance, and the reward bought with that KL."""
    rows = []
    measures = [
        ("unpaired_violation_rate", "r(y+) over r(y-): violation rate", -1),
        ("unpaired_w1_violation", "r(y+) over r(y-): W1 violation", -1),
        ("paired_violation_rate", "Z_pi over Z_ref: violation rate", -1),
        ("paired_w1_violation", "Z_pi over Z_ref: W1 violation", -1),
        ("violation_rate", "true reward of pi over pi_ref: violation rate", -1),
        ("true_reward_gain", "true reward gain", +1),
    ]
    for flip in (0.0, 0.2):
        paths = {}
        for seed in seeds:
            for name in ("aot_paired", "dpo"):
                beta = chosen_beta(results, name, flip, seed)[0]
                paths[name, seed] = results.get_or_run(
                    f"a|{name}|{beta}|{flip}|{seed}",
                    lambda n=name, b=beta, s=seed, f=flip: run_paired(s, n, b, f, trajectory=True),
                )["trajectory"]
        for kl in TARGET_KLS:
            for metric, label, sign in measures:
                column = TRAJECTORY.index(metric)
                at = {
                    (name, seed): interpolate_at_kl(paths[name, seed], kl, column)
                    for name in ("aot_paired", "dpo")
                    for seed in seeds
                }
                both = [s for s in seeds if at["aot_paired", s] is not None and at["dpo", s] is not None]
                interval = mean_interval([at["aot_paired", s] - at["dpo", s] for s in both])
                aot = mean_interval([at["aot_paired", s] for s in both]).mean
                dpo = mean_interval([at["dpo", s] for s in both]).mean
                rows.append(
                    [f"(a) {label} at KL {kl}, {int(flip * 100)}% flipped", f"{aot:.4f}", f"{dpo:.4f}", str(interval),
                     interval.n, verdict(interval, claimed_sign=sign)]
                )  # fmt: skip
    return rows


def choose_by_validation(records: list[dict], key: str = "validation_agreement") -> dict:
    """The grid point with the best validation score (observed labels only; ties: the first, smallest beta)."""
    return max(records, key=lambda r: r[key])


def chosen_beta(results: Results, name: str, flip: float, seed: int) -> tuple[float, dict]:
    """``name``'s beta grid on seed ``seed`` (``flip`` of the labels flipped), run or read back, and the
    beta validation picks with its run's metrics."""
    grid = [
        results.get_or_run(
            f"b|{name}|{beta}|{flip}|{seed}",
            lambda n=name, b=beta, s=seed, f=flip: run_paired(s, n, b, f),
        )
        for beta in BETAS
    ]
    best = choose_by_validation(grid)
    return BETAS[grid.index(best)], best


def paired_row(label: str, ours: list[dict], theirs: list[dict], metric: str, sign: int) -> list:
    """One table row: ``metric`` of ours minus theirs, paired over seeds (the lists align by seed)."""
    interval = mean_interval([a[metric] - b[metric] for a, b in zip(ours, theirs)])
    mine = mean_interval([a[metric] for a in ours]).mean
    other = mean_interval([b[metric] for b in theirs]).mean
    return [
        label,
        f"{mine:.4f}",
        f"{other:.4f}",
        str(interval),
        interval.n,
        verdict(interval, claimed_sign=sign),
    ]


def claim_b(results: Results, seeds: list[int]) -> list[list]:
    rows = []
    for flip in (0.0, 0.2, 0.4):
        chosen = {}
        for seed in seeds:
            for name in ("aot_paired", "dpo"):
                chosen[name, seed] = chosen_beta(results, name, flip, seed)[1]
        for metric, label in (
            ("pair_accuracy", "held-out pair accuracy"),
            ("true_reward_gain", "true reward gain"),
        ):
            ours, theirs = [chosen["aot_paired", s] for s in seeds], [chosen["dpo", s] for s in seeds]
            rows.append(paired_row(f"(b) {label}, {int(flip * 100)}% flipped", ours, theirs, metric, +1))
    return rows


def unpaired_rows(world: World, count: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Single responses y ~ pi_ref for uniformly drawn prompts, desirable with probability sigmoid(r*):
    positives and negatives come from different prompts and their counts differ."""
    context = torch.randint(world.contexts, (count,), generator=generator)
    response = torch.multinomial(world.ref_logp.exp()[context], 1, generator=generator).squeeze(1)
    desirable = torch.rand(count, generator=generator, dtype=DTYPE) < torch.sigmoid(
        world.reward[context, response]
    )
    # KTO's reference point pairs each prompt with another row's response (a fixed derangement).
    partner = torch.roll(torch.randperm(count, generator=generator), 1)
    return {
        "context": context,
        "response": response,
        "label": desirable.double(),
        "partner": response[partner],
    }


def unpaired_builder(world: World, rows: dict[str, torch.Tensor]):
    ref = world.ref_logp
    ones = torch.ones(len(rows["context"]), dtype=DTYPE)

    def build(logp: torch.Tensor, value) -> UnpairedStats:
        return UnpairedStats(
            policy_logps=logp[rows["context"], rows["response"]],
            lengths=ones,
            labels=rows["label"],
            ref_logps=ref[rows["context"], rows["response"]],
            kl_policy_logps=logp[rows["context"], rows["partner"]].detach(),
            kl_ref_logps=ref[rows["context"], rows["partner"]],
        )

    return build


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """P(score of a random positive > score of a random negative) (ties 1/2): the validation score of
    the unpaired methods, from observed labels only."""
    positive, negative = scores[labels > 0.5], scores[labels <= 0.5]
    if positive.numel() == 0 or negative.numel() == 0:
        return 0.5
    greater = (positive.unsqueeze(1) > negative.unsqueeze(0)).double()
    ties = (positive.unsqueeze(1) == negative.unsqueeze(0)).double()
    return float((greater + 0.5 * ties).mean())


def run_unpaired(seed: int, name: str, beta: float) -> dict:
    world = World.draw(seed)
    generator = torch.Generator().manual_seed(20_000 + seed)
    rows = unpaired_rows(world, PAIRS, generator)
    cut = round(0.8 * PAIRS)
    train_rows = {k: v[:cut] for k, v in rows.items()}
    validation = {k: v[cut:] for k, v in rows.items()}
    logp = train(world, Method(name, {"beta": beta}), unpaired_builder(world, train_rows), steps=STEPS)
    implicit = (logp - world.ref_logp)[validation["context"], validation["response"]]
    positives = int(train_rows["label"].sum())
    return {
        **evaluate(world, logp),
        "validation_auc": auc(implicit, validation["label"]),
        "positives": positives,
        "negatives": cut - positives,
    }


def claim_c(results: Results, seeds: list[int]) -> list[list]:
    chosen = {}
    for seed in seeds:
        for name in ("aot_unpaired", "kto"):
            grid = [
                results.get_or_run(
                    f"c|{name}|{beta}|{seed}", lambda n=name, b=beta, s=seed: run_unpaired(s, n, b)
                )
                for beta in BETAS
            ]
            chosen[name, seed] = choose_by_validation(grid, "validation_auc")
    rows = []
    for metric, label in (
        ("pair_accuracy", "held-out pair accuracy"),
        ("true_reward_gain", "true reward gain"),
        ("violation_rate", "violation rate vs pi_ref"),
    ):
        ours, theirs = [chosen["aot_unpaired", s] for s in seeds], [chosen["kto", s] for s in seeds]
        sign = -1 if metric == "violation_rate" else +1
        rows.append(paired_row(f"(c) {label}, unpaired AOT vs KTO", ours, theirs, metric, sign))
    counts = [(chosen["kto", s]["positives"], chosen["kto", s]["negatives"]) for s in seeds]
    rows.append(
        ["(c) training rows per seed (positives, negatives)", "", "", str(counts[:3]) + " ...", "", ""]
    )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("runs/claims/aot"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = list(range(args.seeds))
    results = Results(args.out / "results.jsonl")
    started = time.perf_counter()
    rows = claim_a(results, seeds) + claim_b(results, seeds) + claim_c(results, seeds)
    header = ["claim (AOT minus baseline)", "AOT", "baseline", "difference [95% CI]", "seeds", "verdict"]
    table = markdown_table(header, rows)
    print(table)
    print(f"\n{len(seeds)} seeds, betas {BETAS}, {PAIRS} pairs (80% train), {STEPS} Adam steps; "
          f"{time.perf_counter() - started:.0f} s")  # fmt: skip
    (args.out / "summary.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
