"""The offline loop: preference (labelled, listwise) rows -> sequence log-probs -> objective -> step.

One step, on one screen (``_train_step``):
  1. the plan gives the global batch's rows; this process takes its shard, in micro-batches;
  2. each micro-batch runs one concatenated forward (chosen + rejected, completions, or every response
     of a listwise row) -> statistics (with weights, per-row signals and model-head outputs);
  3. the objective is the loss's per-example values reduced by the aggregator (``objective.py``). A
     decomposable one (weighted mean) back-propagates each micro-batch's share of the global weight;
     a batch-coupled one gathers the detached statistics of the whole global batch first and
     back-propagates the exact linear surrogate (see ``coupling.py``);
  4. one optimizer step; what is logged is the objective on the gathered global statistics, the global
     value on every process, not rank 0's; a stateful aggregator advances its state once.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from distalign.config import RunConfig
from distalign.data.collate import PackingLayout, to_device, token_counts
from distalign.losses.base import (
    ListwiseStats,
    LossResult,
    PairedStats,
    Stats,
    UnpairedStats,
)
from distalign.models.attention import without_cudnn_attention
from distalign.models.logprobs import batch_logprobs
from distalign.train.batching import BatchPlan, split_for_process
from distalign.train.coupling import (
    concat_stats,
    coupling_coefficients,
    detach_stats,
    gather_stats,
    linear_surrogate,
)
from distalign.train.engine import Engine, iterate_steps
from distalign.train.grad_shares import gradient_shares
from distalign.train.objective import BatchObjective, build_objective, state_from_json, state_to_json
from distalign.train.reference import ReferenceLogps
from distalign.train.setup import (
    OfflineData,
    load_offline_data,
    load_policy,
    packing_layout,
    save_final,
    wrap_for_training,
)
from distalign.train.summary import write_dominance_summary


class StatsComputer:
    """Runs the policy forward on rows and assembles the loss statistics: log-probs, reference values,
    weights, per-row signals and the outputs of the model heads the loss declares. ``packing``: the
    run's packing layout (``data.packing``), None for padded batches."""

    def __init__(
        self,
        engine: Engine,
        data: OfflineData,
        reference: ReferenceLogps | None,
        heads: bool = False,
        packing: PackingLayout | None = None,
    ) -> None:
        self.engine = engine
        self.data = data
        self.reference = reference
        self.heads = heads
        self.packing = packing

    def __call__(self, rows: list[int], with_kl: bool = True, count_tokens: bool = True) -> Stats:
        """Statistics of ``rows``; ``with_kl=False`` skips KTO's mismatched pairs (for evaluation);
        ``count_tokens=False`` for a pass that repeats one already counted (throughput is honest)."""
        with_kl = with_kl and self.data.needs_kl
        device = self.engine.device
        host_batch = self.data.collate(rows, with_kl, self.packing)
        if count_tokens:
            tokens, positions, forwarded = token_counts(host_batch)
            self.engine.count_tokens(tokens, positions, forwarded=forwarded)
        batch = to_device(host_batch, device)
        with self.engine.accelerator.autocast():
            logps, counts, *head_outputs = batch_logprobs(self.engine.model, batch, self.heads)
        # Losses run in at least float32 (float64 models keep float64, for exactness checks).
        precision = torch.promote_types(logps.dtype, torch.float32)
        logps, counts = logps.to(precision), counts.to(precision)
        first = self.data.first_sequence(rows).to(device)
        common = {
            "weights": self.data.weights(rows, device).to(precision),
            "signals": self.data.signals(rows, device),
            "heads": {
                name: v[first].to(precision) for name, v in (head_outputs[0] if head_outputs else {}).items()
            },
        }
        ref = self.reference.for_rows(rows) if self.reference is not None else {}
        n = len(rows)
        if self.data.kind == "paired":
            return PairedStats(
                policy_chosen_logps=logps[:n],
                policy_rejected_logps=logps[n:],
                chosen_lengths=counts[:n],
                rejected_lengths=counts[n:],
                ref_chosen_logps=ref.get("chosen"),
                ref_rejected_logps=ref.get("rejected"),
                **common,
            )
        if self.data.kind == "listwise":
            scores, present = self.data.listwise_targets(rows, device)
            return ListwiseStats(
                policy_logps=self.data.to_grid(rows, logps),
                lengths=self.data.to_grid(rows, counts),
                scores=scores.to(precision),
                present=present.to(precision),
                ref_logps=ref.get("responses"),
                **common,
            )
        kl_policy = None
        if with_kl:
            # The mismatched pairs only anchor KTO's reference point; no gradient flows through them.
            logps, kl_policy = logps[:n], logps[n:].detach()
            counts = counts[:n]
        return UnpairedStats(
            policy_logps=logps,
            lengths=counts,
            labels=self.data.labels(rows, device),
            ref_logps=ref.get("completion"),
            kl_policy_logps=kl_policy,
            kl_ref_logps=ref.get("kl") if with_kl else None,
            **common,
        )


def _train_step(
    engine: Engine,
    objective: BatchObjective,
    compute: StatsComputer,
    micro_batches: list[list[int]],
    data: OfflineData,
    global_weight: float,
) -> LossResult:
    """Forward/backward every micro-batch of this process, then one optimizer step. Returns the
    global-batch loss and metrics (identical on every process), as tensors on the device: nothing in a
    step waits on the device until the loop reads them, once. ``global_weight``: the global batch's
    total row weight (host data, the same on every process)."""
    cfg = engine.config.train
    last = len(micro_batches) - 1
    coupled_globally = objective.batch_coupled and cfg.coupling_scope == "global"
    if not coupled_globally:
        detached = []
        for k, rows in enumerate(micro_batches):
            with engine.sync_context(k == last):
                stats = compute(rows)
                result = objective(stats)
                if objective.batch_coupled:  # coupled within each micro-batch only: mean of their losses
                    share = result.loss / (len(micro_batches) * engine.world_size)
                else:  # a weighted mean: each micro-batch's share of the global weight
                    share = result.loss * data.weight_total(rows) / global_weight
                engine.backward(share)
            detached.append(detach_stats(stats))
        grad_norm = engine.optimizer_step()
        with torch.no_grad():
            if objective.batch_coupled:
                result = _mean_over_micro_batches(engine, objective, detached)
            else:
                result = objective(gather_stats(engine, concat_stats(detached))[0])
        return _with_grad_norm(result, grad_norm)
    if cfg.global_strategy == "retain" or len(micro_batches) == 1:
        live = [compute(rows) for rows in micro_batches]
        global_stats, offset = gather_stats(engine, concat_stats([detach_stats(s) for s in live]))
        coefficients, result = coupling_coefficients(objective, global_stats)
        with engine.sync_context(True):
            engine.backward(linear_surrogate(concat_stats(live), coefficients, offset))
    else:  # "recompute": a no-grad pass fixes the coupling, then each micro-batch back-propagates alone
        # The no-grad pass keeps no activations, so it takes the rows in larger groups
        # (train.no_grad_micro_batch_size); their order, and so each row's offset, is the micro-batches'.
        rows_in_order = [row for rows in micro_batches for row in rows]
        group = engine.config.train.no_grad_rows
        with torch.no_grad():
            detached = [
                compute(rows_in_order[i : i + group], count_tokens=False)
                for i in range(0, len(rows_in_order), group)
            ]
        global_stats, offset = gather_stats(engine, concat_stats(detached))
        coefficients, result = coupling_coefficients(objective, global_stats)
        for k, rows in enumerate(micro_batches):
            with engine.sync_context(k == last):
                engine.backward(linear_surrogate(compute(rows), coefficients, offset))
            offset += len(rows)
    grad_norm = engine.optimizer_step()
    objective.advance(result)
    return _with_grad_norm(result, grad_norm)


def _with_grad_norm(result: LossResult, grad_norm: torch.Tensor | None) -> LossResult:
    """``result`` with the step's pre-clip gradient norm (the whole gradient's, however it is sharded)
    among its metrics, as ``grad_norm``, when clipping is on (``train.max_grad_norm``)."""
    if grad_norm is not None:
        result.metrics["grad_norm"] = grad_norm
    return result


def name_codes(metric: str, vocabularies: dict[str, list[str]]) -> str:
    """``weights/source=2`` -> ``weights/source=hype``: aggregators see categorical signals as codes;
    the log names them with the data's own strings."""
    prefix, sep, code = metric.rpartition("=")
    if not sep or not code.isdigit():
        return metric
    segments = prefix.split("/")  # the signal is named first (group/weight=) or last (weights/source=)
    for signal in (segments[-1], segments[0]):
        names = vocabularies.get(signal, [])
        if int(code) < len(names):
            return f"{prefix}={names[int(code)]}"
    return metric


def _mean_over_micro_batches(engine: Engine, objective, detached: list[Stats]) -> LossResult:
    """Micro-batch coupling scope: the mean over micro-batches and processes of the objective and of
    its metrics. Metrics per source or group (``...=<name>``) exist only for the rows a micro-batch
    happens to hold, so they are left out (every process must enter the same collectives)."""
    results = [objective(stats) for stats in detached]
    scale = 1.0 / (len(results) * engine.world_size)

    def mean(values: list[torch.Tensor]) -> torch.Tensor:
        return engine.reduce_sum(torch.stack([v.detach().to(engine.device) for v in values]).sum()) * scale

    keys = [key for key in results[0].metrics if "=" not in key]
    metrics = {key: mean([r.metrics[key] for r in results]) for key in keys}
    return LossResult(mean([r.loss for r in results]), metrics)


@without_cudnn_attention
def train_offline(config: RunConfig, *, stop_after_step: int | None = None) -> Path:
    """Train with an offline loss; returns the run directory. Resumes from the newest checkpoint in
    ``output_dir`` when there is one. ``stop_after_step`` interrupts the run (used to test resume)."""
    engine = Engine(config)
    objective = build_objective(config)
    spec = objective.loss
    policy, tokenizer = load_policy(config)
    packing = packing_layout(policy, config)  # refuses a model packing cannot be exact for
    data = load_offline_data(config, tokenizer, objective, engine)
    reference = (
        ReferenceLogps.build(config, spec, policy, data, engine, packing) if spec.needs_reference else None
    )
    engine.open_run_dir()
    if data.designer is not None and engine.is_main:
        data.designer.save(engine.run_dir / "designer.json")  # eval scores samples on this scale

    plan = BatchPlan(len(data), config.train.batch_size, config.train.seed, data.plan_labels())
    total_steps = config.train.max_steps or plan.steps_for_epochs(config.train.epochs)
    engine.prepare(wrap_for_training(policy, config, objective.heads, packing), total_steps)
    if reference is not None:  # FSDP2 / ZeRO-3: scored by the sharded policy, before any update
        reference.score_with_prepared_policy()
    state = engine.resume_latest()
    first_step = state["step"] if state else 0
    if state:
        objective.state = state_from_json(state.get("aggregator_state"), engine.device)
        engine.print(f"resumed from step {first_step}")
    elif engine.is_main:
        engine.metrics_log.truncate_after(0)  # a fresh run replaces an earlier run's log
    compute = StatsComputer(engine, data, reference, heads=bool(objective.heads), packing=packing)
    engine.set_final_step(total_steps)
    engine.start_progress(total_steps, first_step, f"{spec.name}")
    engine.model.train()
    for step in iterate_steps(first_step, total_steps):
        rows = plan.global_batch(step)
        lengths = data.row_lengths(rows) if config.data.group_by_length else None
        micro_batches = split_for_process(
            rows, engine.rank, engine.world_size, config.train.micro_batch_size, lengths
        )
        shares = {}
        if config.train.grad_shares and engine.logs_step(step):  # before the step: its parameters
            scope = config.train.coupling_scope
            shares = gradient_shares(engine, objective, compute, micro_batches, coupling_scope=scope)
        result = _train_step(engine, objective, compute, micro_batches, data, data.weight_total(rows))
        # The step's one read from the device: the global loss and metrics, the same on every process.
        values = engine.read_scalars({"loss": result.loss, **result.metrics, **shares})
        if not math.isfinite(values["loss"]):  # every process stops here
            from distalign.errors import NonFiniteLossError

            engine.close()
            raise NonFiniteLossError.at_step(
                step, "the loss", values["loss"], applied=True, checkpoints=engine.list_checkpoints()
            )
        engine.log(step, {name_codes(k, data.signal_vocab): v for k, v in values.items()})
        if config.train.save_every and step % config.train.save_every == 0 and step != total_steps:
            engine.save_checkpoint(step, {"aggregator_state": state_to_json(objective.state)})
        if stop_after_step is not None and step >= stop_after_step:
            engine.close()
            return engine.finish()
    engine.close()
    if reference is not None and data.kind != "listwise":
        write_dominance_summary(engine, compute, len(data), config.train.no_grad_rows)
    save_final(engine, tokenizer, config, data.record(config, total_steps, engine.world_size))
    return engine.finish()
