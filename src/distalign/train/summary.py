"""End-of-training dominance view: does the trained policy's reward distribution dominate?

For every run with a reference, the final policy's implicit rewards ``log pi - log pi_ref`` are
measured on (up to ``max_rows`` of) the training rows, and the two quantile curves AOT cares about are
saved as ``RUN_DIR/plots/dominance.png`` with their metrics in ``RUN_DIR/dominance.json``:

* paired data: the policy's chosen-minus-rejected margins vs the reference's (``Z_theta >=_FSD Z_ref``);
* unpaired data: rewards of positive completions vs rewards of negative ones.
"""

from __future__ import annotations

import json

import torch

from distalign.losses.base import PairedStats, Stats, stats_fields, stats_from_fields
from distalign.stats.dominance import dominance_metrics, plot_quantile_curves
from distalign.train.coupling import concat_stats, slice_stats


def _curves(stats: Stats) -> tuple[torch.Tensor, torch.Tensor, tuple[str, str], str]:
    if isinstance(stats, PairedStats):
        policy = stats.policy_chosen_logps - stats.policy_rejected_logps
        reference = stats.ref_chosen_logps - stats.ref_rejected_logps
        return (
            policy,
            reference,
            ("policy margins", "reference margins"),
            "log-prob margin (chosen - rejected)",
        )
    rewards = stats.policy_logps - stats.ref_logps
    positive = stats.labels > 0.5
    return (
        rewards[positive],
        rewards[~positive],
        ("positive rewards", "negative rewards"),
        "log pi - log pi_ref",
    )


@torch.no_grad()
def write_dominance_summary(
    engine, compute, num_rows: int, rows_per_forward: int, max_rows: int = 512
) -> dict:
    """Score the first ``max_rows`` training rows with the final policy, ``rows_per_forward`` at a time
    (``train.no_grad_micro_batch_size``); write the plot and metrics.

    Every process scores an interleaved shard; the statistics are gathered so the figure covers all
    of them. Returns the metrics (identical on every process).
    """
    scored = min(num_rows, max_rows)
    rows = list(range(scored))[engine.rank :: engine.world_size]
    engine.model.eval()
    batches = [rows[i : i + rows_per_forward] for i in range(0, len(rows), rows_per_forward)]
    # Every process runs the busiest one's number of forward passes, counted before the first: under
    # FSDP2 / ZeRO-3 each forward is a collective, and under DDP one can sync buffers (a broadcast), so
    # a process entering the count's all-reduce while another is in a forward would wait for ever.
    passes = engine.max_across(len(batches))
    parts = [compute(batch, with_kl=False, count_tokens=False) for batch in batches]
    spare = [compute([0], with_kl=False, count_tokens=False) for _ in range(passes - len(batches))]
    if parts:
        local = concat_stats(parts)
    else:  # fewer rows than processes: still enter every collective below, with no rows of our own
        local = slice_stats(spare[0] if spare else compute([0], with_kl=False, count_tokens=False), 0, 0)
    gathered = stats_from_fields(
        type(local), {k: engine.gather_varlen(v).cpu() for k, v in stats_fields(local).items()}
    )
    u, v, labels, ylabel = _curves(gathered)
    if len(u) == 0 or len(v) == 0:
        return {}
    metrics = dominance_metrics(u, v)
    if engine.is_main:
        title = f"Final policy on {scored} training rows: {labels[0]} vs {labels[1]}"
        plot_quantile_curves(
            u, v, engine.run_dir / "plots" / "dominance.png", labels=labels, ylabel=ylabel, title=title
        )
        (engine.run_dir / "dominance.json").write_text(json.dumps({"rows": scored, **metrics}, indent=2))
    return metrics
