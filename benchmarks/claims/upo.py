"""UPO's claim (seed 001, Badrinath et al. 2025) on the preference world of common.py, where both rewards
are known: a designer objective the preference labels do not carry can be optimised offline, beside
the preferences, past what preference-only methods reach ("beyond the preference frontier").

The world: preference labels come from r* (Bradley-Terry); the designer reward conflicts with it,
r_aux = -0.5 r* + sqrt(0.75) z with z ~ N(0, 1), and reaches training only as a per-row signal (what a
designer: section gives). Each method traces a front by its own knob, 4 values each (the same grid
size for every method), at beta = 0.1:

  DPO                beta in {0.03, 0.1, 0.3, 1} (it cannot see r_aux: its front is its reach)
  DPO+SFT            sft_weight in {0.1, 0.3, 1, 3}
  MODPO              lambda_aux in {0.1, 0.3, 1, 3} (designer reward folded into the margin)
  relabelled DPO     lambda_aux in {0.1, 0.3, 1, 3} (pairs reoriented by the compound reward)
  UPO                lambda_aux in {0.05, 0.1, 0.25, 0.5}, and again with normalize_weights

and is scored exactly on the two objectives: the preference win rate against pi_ref (Bradley-Terry on
r*) and the designer gain E_pi[r_aux] - E_ref[r_aux]. Reported, paired over seeds: the hypervolume of
each front above (gain 0, win rate 0.5), and each method's win rate at matched designer gains
(interpolated along its front). Every method trains the same 400 full-batch Adam steps. For UPO, the
share of the gradient norm from each term (upo/preference, upo/aux, upo/value), averaged over steps,
split by the library's own mechanism (what ``train.grad_shares`` logs; distalign/train/grad_shares.py):
the logged loss values cannot be compared (L_aux has a floor of about mean(w) x the likelihood's
entropy), the gradients can.

    python benchmarks/claims/upo.py               # 10 seeds, 400 steps
    python benchmarks/claims/upo.py --seeds 1 --steps 2 --out /tmp/upo_smoke    # a smoke test
Results are kept in OUT/results.jsonl (default runs/claims/upo), keyed by method, options, steps and
seed: a rerun continues where it stopped.
"""

from __future__ import annotations

import argparse
import math
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
    paired_stats,
    train,
    verdict,
)

from distalign.losses.upo import CHOSEN_DESIGNER, REJECTED_DESIGNER  # noqa: E402
from distalign.train.coupling import detach_stats, linear_surrogate  # noqa: E402
from distalign.train.grad_shares import grad_share_metric, part_coefficients  # noqa: E402

PAIRS = 480
STEPS = 400  # 150 in the first run of this comparison (docs/claims.md): UPO's fronts had not settled
BETA = 0.1
CONFLICT = -0.5
METHODS: dict[str, list[Method]] = {
    "DPO": [Method("dpo", {"beta": b}) for b in (0.03, 0.1, 0.3, 1.0)],
    "DPO+SFT": [Method("dpo", {"beta": BETA}, sft_weight=w) for w in (0.1, 0.3, 1.0, 3.0)],
    "MODPO": [Method("modpo", {"beta": BETA, "lambda_aux": w}) for w in (0.1, 0.3, 1.0, 3.0)],
    "relabelled DPO": [Method("dpo_relabel", {"beta": BETA, "lambda_aux": w}) for w in (0.1, 0.3, 1.0, 3.0)],
    "UPO": [Method("upo", {"beta": BETA, "lambda_aux": w}) for w in (0.05, 0.1, 0.25, 0.5)],
    "UPO normalised": [
        Method("upo", {"beta": BETA, "lambda_aux": w, "normalize_weights": True})
        for w in (0.05, 0.1, 0.25, 0.5)
    ],
}
MATCHED_GAINS = [0.1, 0.25, 0.5]


def designer_reward(world: World, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(30_000 + seed)
    noise = torch.randn(world.contexts, world.responses, generator=generator, dtype=DTYPE)
    return CONFLICT * world.reward + math.sqrt(1 - CONFLICT**2) * noise


SHARES = [grad_share_metric(part) for part in ("upo/preference", "upo/aux", "upo/value")]


def gradient_shares(method: Method, build, logits: torch.Tensor, value: torch.Tensor) -> dict[str, float]:
    """Norm of each term's gradient (logits and value table) over the sum of the three norms, at the
    current parameters, split as ``train.grad_shares`` splits a run's: the objective's terms linearised
    on the batch's statistics, one backward per term."""
    leaves = [logits.detach().clone().requires_grad_(True), value.detach().clone().requires_grad_(True)]
    stats = build(torch.log_softmax(leaves[0], -1), leaves[1])
    norms = {}
    for part, fields in part_coefficients(method.objective(), detach_stats(stats)).items():
        grads = torch.autograd.grad(
            linear_surrogate(stats, fields, 0), leaves, retain_graph=True, allow_unused=True
        )
        norms[part] = math.sqrt(sum(float(g.square().sum()) for g in grads if g is not None))
    total = sum(norms.values())
    return {grad_share_metric(part): norm / total for part, norm in norms.items()}


def run(seed: int, method: Method, shares: bool = False, steps: int = STEPS) -> dict:
    world = World.draw(seed)
    aux = designer_reward(world, seed)
    generator = torch.Generator().manual_seed(10_000 + seed)
    pairs = draw_pairs(world, PAIRS, generator)
    signals = {
        CHOSEN_DESIGNER: aux[pairs.context, pairs.chosen],
        REJECTED_DESIGNER: aux[pairs.context, pairs.rejected],
    }
    build = paired_stats(world, pairs, signals=signals)
    trace: list[dict[str, float]] = []
    if shares:
        # Re-run the same training, reading the parameters at every step through a wrapped builder.
        def tracking(logp, value):
            if value is not None:
                trace.append(gradient_shares(method, build, logp.detach(), value))
            return build(logp, value)

        logp = train(world, method, tracking, steps=steps)
    else:
        logp = train(world, method, build, steps=steps)
    exact = evaluate(world, logp)
    designer_gain = float(((logp.exp() - world.ref_logp.exp()) * aux).sum(-1).mean())
    result = {"win_rate": exact["win_rate"], "designer_gain": designer_gain, "kl": exact["kl"]}
    if trace:
        result["grad_share"] = {name: sum(t[name] for t in trace) / len(trace) for name in trace[0]}
    return result


def hypervolume(points: list[tuple[float, float]]) -> float:
    """Area dominated by ``points`` (designer gain, win rate) above the reference (0, 0.5)."""
    kept = sorted((g, w) for g, w in points if g > 0 and w > 0.5)
    area, best = 0.0, 0.5
    for gain, win in reversed(kept):  # from the largest gain down: each adds its new win-rate strip
        if win > best:
            area += gain * (win - best)
            best = win
    return area


def win_at_gain(points: list[tuple[float, float]], gain: float) -> float | None:
    """The best win rate the front reaches at designer gain >= ``gain``, interpolating between its
    points sorted by gain (None when no point reaches ``gain``)."""
    ordered = sorted(points)
    candidates = [w for g, w in ordered if g >= gain]
    for (g0, w0), (g1, w1) in zip(ordered, ordered[1:]):
        if g0 <= gain <= g1 and g1 > g0:
            candidates.append(w0 + (w1 - w0) * (gain - g0) / (g1 - g0))
    return max(candidates) if candidates else None


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=STEPS, help="Adam steps of every method")
    parser.add_argument("--out", type=Path, default=Path("runs/claims/upo"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = Results(args.out / "results.jsonl")
    started = time.perf_counter()
    seeds = list(range(args.seeds))
    fronts: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for name, grid in METHODS.items():
        for seed in seeds:
            records = [
                results.get_or_run(
                    f"{name}|{m.describe()}|steps={args.steps}|{seed}",
                    lambda m=m, s=seed: run(s, m, steps=args.steps),
                )
                for m in grid
            ]
            fronts[name, seed] = [(r["designer_gain"], r["win_rate"]) for r in records]
    volume = {(n, s): hypervolume(fronts[n, s]) for n in METHODS for s in seeds}
    rows = []
    for name in METHODS:
        interval = mean_interval([volume[name, s] for s in seeds])
        reach = mean_interval([max(g for g, _ in fronts[name, s]) for s in seeds]).mean
        rows.append([name, f"{interval.mean:.4f} [{interval.low:.4f}, {interval.high:.4f}]", f"{reach:+.3f}"])
    volumes = markdown_table(["method", "hypervolume [95% CI]", "largest designer gain"], rows)
    rows = []
    for challenger in ("UPO", "UPO normalised"):
        for baseline in ("DPO", "DPO+SFT", "MODPO", "relabelled DPO"):
            interval = mean_interval([volume[challenger, s] - volume[baseline, s] for s in seeds])
            rows.append(
                [
                    f"hypervolume: {challenger} minus {baseline}",
                    str(interval),
                    interval.n,
                    verdict(interval, +1),
                ]
            )
        for gain in MATCHED_GAINS:
            for baseline in ("MODPO", "relabelled DPO"):
                pairs = [
                    (win_at_gain(fronts[challenger, s], gain), win_at_gain(fronts[baseline, s], gain))
                    for s in seeds
                ]
                both = [a - b for a, b in pairs if a is not None and b is not None]
                interval = mean_interval(both)
                reached = sum(a is not None for a, _ in pairs), sum(b is not None for _, b in pairs)
                rows.append([f"win rate at designer gain {gain}: {challenger} minus {baseline} (reached in {reached[0]}, {reached[1]} seeds)",
                             str(interval), interval.n, verdict(interval, +1)])  # fmt: skip
    comparisons = markdown_table(["claim", "difference [95% CI]", "seeds", "verdict"], rows)
    share_rows = []
    for name in ("UPO", "UPO normalised"):
        for method in METHODS[name]:
            traced = [
                results.get_or_run(
                    f"shares|{name}|{method.describe()}|steps={args.steps}|{s}",
                    lambda m=method, s=s: run(s, m, shares=True, steps=args.steps),
                )
                for s in seeds[:3]
            ]
            share = {k: mean_interval([t["grad_share"][k] for t in traced]).mean for k in SHARES}
            share_rows.append([name, method.loss_options["lambda_aux"], *(f"{share[k]:.3f}" for k in share)])
    shares = markdown_table(["method", "lambda_aux", *SHARES], share_rows)
    print(
        volumes,
        "\n",
        comparisons,
        "\n\nmean gradient-norm share per term over training (3 seeds):\n",
        shares,
        sep="\n",
    )
    print(f"\n{len(seeds)} seeds, {PAIRS} pairs, {args.steps} Adam steps; r_aux = {CONFLICT} r* + noise; "
          f"{time.perf_counter() - started:.0f} s")  # fmt: skip
    (args.out / "summary.md").write_text("\n\n".join([volumes, comparisons, shares]) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
