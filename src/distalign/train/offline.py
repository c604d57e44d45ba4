"""The offline loop: preference (or labelled) rows -> sequence log-probs -> loss -> optimizer step.

One step, on one screen (``_train_step``):
  1. the plan gives the global batch's rows; this process takes its shard, in micro-batches;
  2. each micro-batch runs one concatenated forward (chosen + rejected, or completions) -> statistics;
  3. decomposable losses back-propagate their share of the global mean micro-batch by micro-batch;
     batch-coupled losses gather the detached statistics of the whole global batch first and
     back-propagate the exact linear surrogate (see ``coupling.py``);
  4. one optimizer step; the loss and metrics are recomputed once on the gathered global statistics,
     so what is logged is the global value on every process, not rank 0's.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from distalign.config import RunConfig
from distalign.losses.base import LossResult, LossSpec, PairedStats, Stats, UnpairedStats, get_loss
from distalign.train.batching import BatchPlan, split_for_process
from distalign.train.coupling import (
    concat_stats,
    coupling_coefficients,
    detach_stats,
    linear_surrogate,
)
from distalign.train.engine import Engine, iterate_steps
from distalign.train.setup import (
    OfflineData,
    ReferenceLogps,
    load_offline_data,
    load_policy,
    save_final,
    wrap_for_training,
)
from distalign.train.summary import write_dominance_summary


def with_sft_term(objective, weight: float):
    """Add ``weight`` x the token-mean NLL of chosen / positive completions (averaged over all rows,
    so the term stays decomposable for unpaired data: negatives contribute zero)."""
    if weight == 0.0:
        return objective

    def combined(stats: Stats) -> LossResult:
        result = objective(stats)
        if isinstance(stats, PairedStats):
            nll = -stats.policy_chosen_logps / stats.chosen_lengths.clamp(min=1)
        else:
            nll = -stats.policy_logps / stats.lengths.clamp(min=1) * stats.labels
        sft = nll.mean()
        return LossResult(result.loss + weight * sft, {**result.metrics, "sft_nll": sft.detach()})

    return combined


class StatsComputer:
    """Runs the policy forward on rows and assembles the loss statistics (with reference values)."""

    def __init__(self, engine: Engine, data: OfflineData, reference: ReferenceLogps | None) -> None:
        self.engine = engine
        self.data = data
        self.reference = reference

    def __call__(self, rows: list[int], with_kl: bool = True) -> Stats:
        """Statistics of ``rows``; ``with_kl=False`` skips KTO's mismatched pairs (for evaluation)."""
        with_kl = with_kl and self.data.needs_kl
        batch = {k: v.to(self.engine.device) for k, v in self.data.collate(rows, with_kl).items()}
        with self.engine.accelerator.autocast():
            logps, counts = self.engine.model(
                batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
            )
        self.engine.count_tokens(int(batch["attention_mask"].sum()))
        # Losses run in at least float32 (float64 models keep float64, for exactness checks).
        precision = torch.promote_types(logps.dtype, torch.float32)
        logps, counts = logps.to(precision), counts.to(precision)
        ref = self.reference.for_rows(rows) if self.reference is not None else {}
        weights = self.data.weights(rows, self.engine.device)
        n = len(rows)
        if self.data.kind == "paired":
            return PairedStats(
                policy_chosen_logps=logps[:n],
                policy_rejected_logps=logps[n:],
                chosen_lengths=counts[:n],
                rejected_lengths=counts[n:],
                ref_chosen_logps=ref.get("chosen"),
                ref_rejected_logps=ref.get("rejected"),
                weights=weights,
            )
        kl_policy = None
        if with_kl:
            # The mismatched pairs only anchor KTO's reference point; no gradient flows through them.
            logps, kl_policy = logps[:n], logps[n:].detach()
            counts = counts[:n]
        return UnpairedStats(
            policy_logps=logps,
            lengths=counts,
            labels=self.data.labels(rows, self.engine.device),
            ref_logps=ref.get("completion"),
            kl_policy_logps=kl_policy,
            kl_ref_logps=ref.get("kl") if with_kl else None,
            weights=weights,
        )


def _train_step(
    engine: Engine, spec: LossSpec, objective, compute: StatsComputer, micro_batches: list[list[int]], data
) -> LossResult:
    """Forward/backward every micro-batch of this process, then one optimizer step. Returns the
    global-batch loss and metrics (identical on every process)."""
    cfg = engine.config.loss
    last = len(micro_batches) - 1
    coupled_globally = spec.batch_coupled and cfg.coupling_scope == "global"
    if not coupled_globally:
        global_weight = engine.sum_across(sum(data.weight_total(mb) for mb in micro_batches))
        detached = []
        for k, rows in enumerate(micro_batches):
            with engine.sync_context(k == last):
                stats = compute(rows)
                result = objective(stats)
                if spec.batch_coupled:  # coupled within each micro-batch only: mean of micro-batch losses
                    share = result.loss / (len(micro_batches) * engine.world_size)
                else:
                    share = result.loss * data.weight_total(rows) / global_weight
                engine.backward(share)
            detached.append(detach_stats(stats))
    elif cfg.global_strategy == "retain" or len(micro_batches) == 1:
        live = [compute(rows) for rows in micro_batches]
        detached = [detach_stats(s) for s in live]
        global_stats, offset = _gather(engine, concat_stats(detached))
        coefficients, _ = coupling_coefficients(objective, global_stats)
        with engine.sync_context(True):
            engine.backward(linear_surrogate(concat_stats(live), coefficients, offset))
    else:  # "recompute": a no-grad pass fixes the coupling, then each micro-batch back-propagates alone
        with torch.no_grad():
            detached = [compute(rows) for rows in micro_batches]
        global_stats, offset = _gather(engine, concat_stats(detached))
        coefficients, _ = coupling_coefficients(objective, global_stats)
        for k, rows in enumerate(micro_batches):
            with engine.sync_context(k == last):
                engine.backward(linear_surrogate(compute(rows), coefficients, offset))
            offset += len(rows)
    engine.optimizer_step()
    global_stats, _ = _gather(engine, concat_stats(detached))
    with torch.no_grad():
        if spec.batch_coupled and not coupled_globally:
            return _mean_over_micro_batches(engine, objective, detached)
        return objective(global_stats)


def _gather(engine: Engine, local: Stats) -> tuple[Stats, int]:
    """Global statistics in global-batch order, and where this process's rows start in them."""
    fields = {}
    for name, tensor in vars(local).items():
        fields[name] = None if tensor is None else engine.gather_varlen(tensor)
    sizes = engine.gather_varlen(torch.tensor([len(local)], device=engine.device)).tolist()
    return type(local)(**fields), int(sum(sizes[: engine.rank]))


def _mean_over_micro_batches(engine: Engine, objective, detached: list[Stats]) -> LossResult:
    results = [objective(stats) for stats in detached]
    scale = 1.0 / (len(results) * engine.world_size)
    loss = engine.sum_across(float(sum(r.loss for r in results))) * scale
    metrics = {
        key: torch.tensor(engine.sum_across(float(sum(r.metrics[key] for r in results))) * scale)
        for key in results[0].metrics
    }
    return LossResult(torch.tensor(loss), metrics)


def train_offline(config: RunConfig, *, stop_after_step: int | None = None) -> Path:
    """Train with an offline loss; returns the run directory. Resumes from the newest checkpoint in
    ``output_dir`` when there is one. ``stop_after_step`` interrupts the run (used to test resume)."""
    engine = Engine(config)
    spec = get_loss(config.loss.name)
    objective = with_sft_term(
        functools.partial(spec.objective, **config.loss.loss_options()), config.loss.sft_weight
    )
    policy, tokenizer = load_policy(config)
    data = load_offline_data(config, tokenizer, spec, engine)
    reference = ReferenceLogps.build(config, spec, policy, data, engine) if spec.needs_reference else None
    engine.open_run_dir()

    plan = BatchPlan(len(data), config.train.batch_size, config.train.seed, data.plan_labels())
    total_steps = config.train.max_steps or plan.steps_for_epochs(config.train.epochs)
    engine.prepare(wrap_for_training(policy, config), total_steps)
    state = engine.resume_latest()
    first_step = state["step"] if state else 0
    if state:
        engine.print(f"resumed from step {first_step}")
    elif engine.is_main:
        engine.metrics_log.truncate_after(0)  # a fresh run replaces an earlier run's log
    compute = StatsComputer(engine, data, reference)
    engine.set_final_step(total_steps)
    engine.start_progress(total_steps, first_step, f"{spec.name}")
    engine.model.train()
    for step in iterate_steps(first_step, total_steps):
        rows = plan.global_batch(step)
        micro_batches = split_for_process(rows, engine.rank, engine.world_size, config.train.micro_batch_size)
        result = _train_step(engine, spec, objective, compute, micro_batches, data)
        engine.log(step, {"loss": float(result.loss), **{k: float(v) for k, v in result.metrics.items()}})
        if config.train.save_every and step % config.train.save_every == 0 and step != total_steps:
            engine.save_checkpoint(step)
        if stop_after_step is not None and step >= stop_after_step:
            engine.close()
            return engine.run_dir
    engine.close()
    if reference is not None:
        write_dominance_summary(engine, compute, len(data), config.train.micro_batch_size)
    save_final(engine, tokenizer, config)
    return engine.run_dir
