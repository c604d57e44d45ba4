"""The online loop: sample -> score -> loss -> step, for f-DPG and KL-regularised REINFORCE / RLOO.

One step (``OnlineRun.train_step``), on one screen:
  1. sample: the plan gives the step's prompts; this process draws ``samples_per_prompt`` completions of
     its share from q (the policy on-policy, a frozen proposal off-policy) with exact log q;
  2. score: log a under the base; f-DPG: log P = log a + the target's log-scores; RLOO: the reward r;
  3. gather every process's samples, then on the global batch (identically on every process): update
     the running log Z, pseudo-rewards R = -f'(pi/p) (f-DPG, fdpg.md) or R = r - beta (log pi - log a)
     (RLOO), subtract the baseline, clip importance weights pi/q (off-policy);
  4. each micro-batch back-propagates its share of mean_j(-w_j A_j log pi(x_j)); one optimizer step;
     off-policy, q is refreshed when the rule fires.
Pseudo-rewards use the detached log pi of the policy the samples were scored under (on-policy: log q
itself, exact); only the policy gets gradients. Loop state (log Z, baseline window, proposal, fitted
moments) is checkpointed with the weights, so an interrupted run resumes exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from distalign.config import RunConfig
from distalign.configs.online import OnlineConfig
from distalign.data.collate import collate_sequences
from distalign.eval.metrics import distinct_n
from distalign.losses.fdivergence import fdpg_pseudo_rewards, fdpg_policy_gradient_loss
from distalign.models.sampling import score_completions
from distalign.targets import (
    LogZEstimator,
    ProposalRefreshRule,
    WindowedMeanBaseline,
    clipped_importance_weights,
    estimate_divergence,
    importance_weighted_mean,
    leave_one_out_baseline,
)
from distalign.train.batching import BatchPlan, split_for_process
from distalign.train.engine import Engine, iterate_steps
from distalign.train.online_eval import EvalLog, OnlineEvaluator, sample_monitors
from distalign.train.online_setup import (
    BaseScorer,
    FrozenProposal,
    Rollout,
    build_online_reward,
    build_target,
    draw_rollout,
    fit_target_moments,
    gather,
    gather_texts,
    load_prompts,
    restore_moments,
    seeded_generator,
)
from distalign.train.setup import SetupError, load_policy, save_final, wrap_for_training


@dataclass
class GlobalBatch:
    """The step's samples from every process, in rank order; tensors [N] float64 unless noted.

    ``policy_logps``: log pi under the policy being trained (= ``proposal_logps`` on-policy);
    ``target_logps``: log P (f-DPG) and ``rewards``: r (RLOO), the other one None; ``groups`` [N] long:
    leave-one-out groups; ``keys``: log Z keys; ``monitors``: per-sample values (alignment, reward ...).
    """

    policy_logps: torch.Tensor
    proposal_logps: torch.Tensor
    base_logps: torch.Tensor
    target_logps: torch.Tensor | None
    rewards: torch.Tensor | None
    groups: torch.Tensor
    keys: list
    monitors: dict[str, torch.Tensor]
    texts: list[str]
    completion_tokens: torch.Tensor
    ended_with_eos: torch.Tensor


@dataclass
class Signal:
    """What the surrogate needs: R [N], A = R - baseline [N], clipped weights pi/q [N] (None on-policy)."""

    rewards: torch.Tensor
    advantages: torch.Tensor
    weights: torch.Tensor | None
    metrics: dict[str, float]


class LoopState:
    """Everything besides weights and optimizer that a resumed run needs to continue exactly."""

    def __init__(self, window: int, proposal: FrozenProposal | None) -> None:
        self.log_z = LogZEstimator()
        self.window = WindowedMeanBaseline(window)
        self.proposal = proposal
        self.moment_lambdas: list[list[float]] = []

    def state_dict(self) -> dict:
        return {
            "log_z": self.log_z.state_dict(),
            "window": self.window.state_dict(),
            "proposal": None if self.proposal is None else self.proposal.loop_state(),
            "moment_lambdas": self.moment_lambdas,
        }

    def load_state_dict(self, state: dict) -> None:
        self.log_z.load_state_dict(state["log_z"])
        self.window.load_state_dict(state["window"])
        if self.proposal is not None:
            self.proposal.load_loop_state(state["proposal"])
        self.moment_lambdas = state["moment_lambdas"]


# --- the signal: pure functions of the global batch ----------------------------------------------------
def subtract_baseline(kind: str, rewards: torch.Tensor, groups: torch.Tensor, window: WindowedMeanBaseline):
    """A = R - B: per-group leave-one-out mean, windowed mean of *earlier* rewards, or no baseline."""
    if kind == "loo":
        return rewards - leave_one_out_baseline(rewards, groups)
    if kind == "window":
        baseline = window.value()  # read before adding this batch: B must not depend on R_j
        window.update(rewards)
        return rewards - baseline
    return rewards


def compute_signal(cfg: OnlineConfig, batch: GlobalBatch, state: LoopState) -> Signal:
    """Pseudo-rewards (f-DPG) or KL-regularised rewards (RLOO), baseline and importance weights."""
    metrics: dict[str, float] = {}
    if cfg.method == "fdpg":
        state.log_z.update(batch.target_logps, batch.proposal_logps, batch.keys)
        log_z = state.log_z.log_z_for(batch.keys)
        rewards = fdpg_pseudo_rewards(
            batch.policy_logps, batch.target_logps, log_z, cfg.divergence, **cfg.divergence_params
        )
        metrics.update(log_z_metrics(state.log_z, batch.keys))
    else:
        rewards = batch.rewards.double() - cfg.kl_coef * (batch.policy_logps - batch.base_logps)
    if not bool(torch.isfinite(rewards).all()):
        raise SetupError(
            f"non-finite {'pseudo-' if cfg.method == 'fdpg' else ''}reward: with divergence {cfg.divergence!r} "
            "the divergence is infinite at these samples (reverse KL, Neyman chi^2 and alpha >= 1 are infinite "
            "when the policy samples x with P(x) = 0): give the constraint an epsilon > 0 (soft constraint) or "
            "use forward_kl, jensen_shannon or total_variation"
        )
    advantages = subtract_baseline(cfg.baseline, rewards, batch.groups, state.window)
    weights = None
    if cfg.proposal == "offline":
        ratios = clipped_importance_weights(
            batch.policy_logps, batch.proposal_logps, cfg.max_importance_weight
        )
        weights = ratios.weights
        metrics.update(
            {"is/ess_fraction": ratios.ess_fraction, "is/clipped_fraction": ratios.clipped_fraction}
        )
    metrics.update(_summary("reward", rewards))
    metrics["advantage/abs_mean"] = float(advantages.abs().mean())
    return Signal(rewards, advantages, weights, metrics)


def log_z_metrics(estimator: LogZEstimator, keys: list) -> dict[str, float]:
    """log Z with its ESS and standard error; for a conditional target, averaged over the batch's contexts."""
    distinct = list(dict.fromkeys(keys))
    values = [estimator.log_z(k) for k in distinct]
    finite = [v for v in values if math.isfinite(v)]
    metrics = {
        "log_z": sum(finite) / len(finite) if finite else -math.inf,
        "log_z/ess": min(estimator.ess(k) for k in distinct),
        "log_z/stderr": max(math.sqrt(estimator.log_z_variance(k)) for k in distinct),
    }
    if distinct != [None]:
        metrics["log_z/contexts_seen"] = float(len(estimator.keys()))
    return metrics


def _summary(prefix: str, values: torch.Tensor) -> dict[str, float]:
    return {
        f"{prefix}/mean": float(values.mean()),
        f"{prefix}/std": float(values.std()) if values.numel() > 1 else 0.0,
        f"{prefix}/max": float(values.max()),
        f"{prefix}/min": float(values.min()),
    }


def policy_gradient_backward(
    engine: Engine,
    rollout: Rollout,
    signal_slice: tuple,
    global_count: int,
    micro_batch_size: int,
    pad_id: int,
) -> None:
    """Back-propagate this process's share of mean_j(-w_j A_j log pi(x_j)), micro-batch by micro-batch."""
    advantages, weights = signal_slice
    starts = list(range(0, len(rollout), micro_batch_size))
    for k, start in enumerate(starts):
        stop = min(start + micro_batch_size, len(rollout))
        batch = collate_sequences(rollout.prompt_ids[start:stop], rollout.completion_ids[start:stop], pad_id)
        batch = {key: value.to(engine.device) for key, value in batch.items()}
        with engine.sync_context(k == len(starts) - 1):
            with engine.accelerator.autocast():
                logps, _ = engine.model(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
            w = None if weights is None else weights[start:stop].to(engine.device)
            result = fdpg_policy_gradient_loss(logps.float(), advantages[start:stop].to(engine.device), w)
            engine.backward(result.loss * (stop - start) / global_count)
        engine.count_tokens(int(batch["attention_mask"].sum()))


# --- the run ---------------------------------------------------------------------------------------------
class OnlineRun:
    """The parts of one online run (prompts, base, target or reward, proposal, state) and its step."""

    def __init__(self, config: RunConfig, engine: Engine, policy, tokenizer) -> None:
        cfg = self.cfg = config.online
        self.config, self.engine, self.tokenizer = config, engine, tokenizer
        if cfg.prompts_per_step % engine.world_size:
            raise SetupError(
                f"online.prompts_per_step ({cfg.prompts_per_step}) must be divisible by the number of "
                f"processes ({engine.world_size})"
            )
        samples_per_step = cfg.prompts_per_step * cfg.samples_per_prompt
        if "batch_size" in config.train.model_fields_set and config.train.batch_size != samples_per_step:
            raise SetupError(
                f"train.batch_size ({config.train.batch_size}) counts completions per step; the online loop "
                f"draws online.prompts_per_step x online.samples_per_prompt = {samples_per_step}: set it to "
                f"{samples_per_step} or leave it out"
            )
        if cfg.eval_every % config.train.log_every:
            raise SetupError(
                f"online.eval_every ({cfg.eval_every}) must be a multiple of train.log_every "
                f"({config.train.log_every}) so every evaluation is logged"
            )
        self.prompts = load_prompts(config, tokenizer, "train", engine)
        self.plan = BatchPlan(len(self.prompts), cfg.prompts_per_step, config.train.seed)
        self.target = build_target(config) if cfg.method == "fdpg" else None
        self.reward = build_online_reward(config) if cfg.method != "fdpg" else None
        self.base = BaseScorer(config, policy, tokenizer)  # before any step: the policy still is a
        proposal = FrozenProposal(policy) if cfg.proposal == "offline" else None
        self.state = LoopState(cfg.baseline_window, proposal)
        self.refresh_rule = ProposalRefreshRule(cfg.refresh_min_ess_fraction)
        self.evaluator = None
        if cfg.eval_every:
            split = "heldout" if cfg.prompts.task is not None and cfg.eval_split == "heldout" else "train"
            eval_prompts = (
                self.prompts if split == "train" else load_prompts(config, tokenizer, split, engine)
            )
            self.evaluator = OnlineEvaluator(
                config, engine, tokenizer, eval_prompts, self.base, self.target, self.reward
            )

    @property
    def policy(self):
        """The plain (possibly LoRA) model inside the engine's wrappers: what samples and scores."""
        return self.engine.unwrapped().model

    def start(self, state: dict | None) -> None:
        """Restore the loop state of a resumed run, or fit the target's moments on base samples."""
        if state is not None:
            self.state.load_state_dict(state)
        elif self.target is not None:
            self.state.moment_lambdas = fit_target_moments(
                self.target, self.policy, self.tokenizer, self.prompts, self.config, self.engine
            )
        if self.target is not None:
            restore_moments(self.target, self.state.moment_lambdas)

    def train_step(self, step: int) -> dict[str, float]:
        """One optimizer step; returns the step's globally reduced metrics."""
        engine, cfg = self.engine, self.cfg
        rollout = self.sample(step)  # 1. sample
        batch = self.score_and_gather(rollout)  # 2. score + 3. gather
        signal = compute_signal(cfg, batch, self.state)  # 3. log Z, (pseudo-)rewards, baseline, weights
        offset = engine.rank * len(rollout)
        local = slice(offset, offset + len(rollout))
        local_weights = None if signal.weights is None else signal.weights[local]
        policy_gradient_backward(  # 4. loss -> backward, then one optimizer step
            engine,
            rollout,
            (signal.advantages[local], local_weights),
            len(batch.texts),
            self.config.train.micro_batch_size,
            self.tokenizer.pad_token_id,
        )
        grad_norm = engine.optimizer_step()
        metrics = self.step_metrics(batch, signal)
        if grad_norm is not None:
            metrics["grad_norm"] = grad_norm
        if self.state.proposal is not None:
            metrics.update(self.maybe_refresh(step, batch, signal))
        return metrics

    def sample(self, step: int) -> Rollout:
        cfg = self.cfg
        prompt_rows = self.plan.global_batch(step)
        per_process = cfg.prompts_per_step // self.engine.world_size
        (mine,) = split_for_process(prompt_rows, self.engine.rank, self.engine.world_size, per_process)
        proposal = self.state.proposal
        return draw_rollout(
            self.policy if proposal is None else proposal.model,
            self.tokenizer,
            self.prompts,
            mine,
            self.engine.rank * per_process,
            cfg.samples_per_prompt,
            max_new_tokens=cfg.max_new_tokens,
            batch_size=cfg.sampling_batch_size,
            generator=seeded_generator(
                self.engine.device, self.config.train.seed, "sample", step, self.engine.rank
            ),
        )

    @torch.no_grad()
    def score_and_gather(self, rollout: Rollout) -> GlobalBatch:
        engine, proposal = self.engine, self.state.proposal
        log_q = rollout.proposal_logps
        if proposal is not None and proposal.is_base:
            log_a = log_q  # q is still the base model itself
        else:
            log_a = self.base(rollout.prompt_ids, rollout.completion_ids, engine.device)
        log_pi = log_q
        if proposal is not None:  # off-policy: the current policy's log-probs of q's samples
            log_pi = score_completions(
                self.policy,
                self.tokenizer,
                rollout.keys,
                rollout.completion_ids,
                self.cfg.sampling_batch_size,
                prompt_ids=rollout.prompt_ids,
            ).double()
        local = {"log_pi": log_pi, "log_q": log_q, "log_a": log_a, "group": rollout.group.double()}
        local["prompt"] = rollout.prompt_index.double()
        local["tokens"] = torch.tensor([float(len(c)) for c in rollout.completion_ids])
        local["eos"] = rollout.ended_with_eos.double()
        if self.target is not None:
            local["log_p"] = self.target.log_unnormalized(log_a, rollout.texts, rollout.contexts)
        monitors = sample_monitors(self.target, self.reward, rollout.texts, rollout.contexts)
        merged = {name: gather(engine, values.double()) for name, values in {**local, **monitors}.items()}
        prompt_keys = [self.prompts.keys[int(i)] for i in merged["prompt"].tolist()]
        return GlobalBatch(
            policy_logps=merged["log_pi"],
            proposal_logps=merged["log_q"],
            base_logps=merged["log_a"],
            target_logps=merged.get("log_p"),
            rewards=merged.get("reward") if self.reward is not None else None,
            groups=merged["group"].long(),
            keys=self.target.log_z_keys(prompt_keys, len(prompt_keys))
            if self.target is not None
            else prompt_keys,
            monitors={name: merged[name] for name in monitors},
            texts=gather_texts(engine, self.tokenizer, rollout.completion_ids),
            completion_tokens=merged["tokens"],
            ended_with_eos=merged["eos"],
        )

    def step_metrics(self, batch: GlobalBatch, signal: Signal) -> dict[str, float]:
        """Loss and monitors of the step's global batch (IS-weighted towards pi when off-policy)."""
        weights = torch.ones_like(signal.advantages) if signal.weights is None else signal.weights
        metrics = {
            "loss": float(-(weights * signal.advantages * batch.policy_logps).mean()),
            **signal.metrics,
        }
        off_policy = (
            (batch.policy_logps, batch.proposal_logps) if self.state.proposal is not None else (None, None)
        )
        for name, values in batch.monitors.items():
            metrics[name] = importance_weighted_mean(values, *off_policy).value
        metrics["kl_pi_a"] = importance_weighted_mean(
            batch.policy_logps - batch.base_logps, *off_policy
        ).value
        metrics["distinct_2"] = distinct_n(batch.texts, 2)
        metrics["completion_tokens"] = float(batch.completion_tokens.mean())
        metrics["eos_fraction"] = float(batch.ended_with_eos.mean())
        return metrics

    def maybe_refresh(self, step: int, batch: GlobalBatch, signal: Signal) -> dict[str, float]:
        """GDC's rule: q <- pi when pi is estimated closer to the target than q, or when ESS(pi/q) collapses."""
        proposal, cfg = self.state.proposal, self.cfg
        log_z = self.state.log_z.log_z_for(batch.keys)
        estimates = [
            estimate_divergence(
                cfg.refresh_divergence, logps, batch.target_logps, batch.proposal_logps, log_z=log_z
            )
            for logps in (batch.policy_logps, batch.proposal_logps)
        ]
        refresh, _ = self.refresh_rule.should_refresh(
            estimates[0].value, estimates[1].value, signal.metrics["is/ess_fraction"]
        )
        if refresh:
            proposal.refresh(self.policy, step)
        return {
            "proposal/refreshes": float(proposal.refreshes),
            "proposal/last_refresh_step": float(proposal.last_refresh_step),
        }

    def evaluate(self) -> dict[str, float]:
        return self.evaluator(self.policy)

    def evaluates_at(self, step: int, total_steps: int) -> bool:
        return bool(self.cfg.eval_every) and (step % self.cfg.eval_every == 0 or step == total_steps)


def train_online(config: RunConfig, *, stop_after_step: int | None = None) -> Path:
    """Train with the online loop (``config.online``); returns the run directory. Resumes from the newest
    checkpoint in ``output_dir`` when there is one; ``stop_after_step`` interrupts the run (for tests)."""
    if config.online is None:
        raise SetupError("train_online needs an `online` section in the config")
    engine = Engine(config)
    if engine.accelerator.distributed_type.value in ("FSDP", "DEEPSPEED"):
        raise SetupError("the online loop samples with the unsharded model: run it with DDP or one process")
    policy, tokenizer = load_policy(config)
    run = OnlineRun(config, engine, policy, tokenizer)
    engine.open_run_dir()
    plan_steps = run.plan.steps_for_epochs(config.train.epochs)
    total_steps = config.train.max_steps or plan_steps
    engine.prepare(wrap_for_training(policy, config), total_steps)
    if run.state.proposal is not None:
        engine.accelerator.register_for_checkpointing(run.state.proposal.model)
    state = engine.resume_latest()
    first_step = state["step"] if state else 0
    run.start(state)
    eval_log = EvalLog(engine.run_dir, engine.is_main)
    if state:
        engine.print(f"resumed from step {first_step}")
        eval_log.truncate_after(first_step)
    else:  # a fresh run replaces an earlier run's logs
        if engine.is_main:
            engine.metrics_log.truncate_after(0)
        eval_log.reset()
        if run.evaluator is not None and config.online.eval_at_start:
            eval_log.write(0, run.evaluate())
    engine.set_final_step(total_steps)
    label = config.online.method if config.online.method != "fdpg" else f"fdpg:{config.online.divergence}"
    engine.start_progress(total_steps, first_step, label)
    engine.model.train()
    for step in iterate_steps(first_step, total_steps):
        metrics = run.train_step(step)
        if run.evaluates_at(step, total_steps):
            evaluation = run.evaluate()
            eval_log.write(step, evaluation)
            metrics.update(evaluation)
        engine.log(step, metrics)
        if config.train.save_every and step % config.train.save_every == 0 and step != total_steps:
            engine.save_checkpoint(step, run.state.state_dict())
        if stop_after_step is not None and step >= stop_after_step:
            engine.close()
            return engine.run_dir
    engine.close()
    save_final(engine, tokenizer, config)
    return engine.run_dir
