"""The online loop: sample -> score -> loss -> step, for f-DPG and KL-regularised REINFORCE / RLOO.

One step (``OnlineRun.run_step``), on one screen:
  1. sample: the plan gives the step's prompts; this process draws ``samples_per_prompt`` completions of
     its share from q (the policy on-policy, a frozen proposal off-policy) with exact log q (a vLLM
     engine holding q's weights draws token ids only, and log q is our own head's: samplers.py);
  2. score: log a under the base; f-DPG: log P = log a + the target's log-scores; RLOO: the reward r;
  3. gather every process's samples, then on the global batch (identically on every process): update
     the running log Z, pseudo-rewards R = -f'(pi/p) (f-DPG, fdpg.md) or R = r - beta (log pi - log a)
     (RLOO), subtract the baseline, clip importance weights pi/q (off-policy);
  4. each micro-batch back-propagates its share of mean_j(-w_j A_j log pi(x_j)); one optimizer step;
     off-policy, q is refreshed when the rule fires.
Pseudo-rewards use the detached log pi of the policy the samples were scored under (on-policy: log q
itself, exact); only the policy gets gradients. Loop state (log Z, baseline window, proposal, fitted
moments) is checkpointed with the weights, so an interrupted run resumes exactly. Each step's phases are
timed (``time/<phase>`` in metrics.jsonl, :data:`STEP_PHASES`).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from distalign.config import RunConfig
from distalign.errors import NonFiniteLossError, SetupError, TrainingStoppedError
from distalign.models.attention import without_cudnn_attention
from distalign.models.sampling import score_completions
from distalign.online_methods import get_online_method
from distalign.stats.diversity import distinct_n
from distalign.targets import ProposalRefreshRule, estimate_divergence, importance_weighted_mean
from distalign.train.batching import BatchPlan
from distalign.train.engine import Engine, iterate_steps
from distalign.train.online.evaluation import EvalLog, OnlineEvaluator, sample_monitors
from distalign.train.online.samplers import build_sampler
from distalign.train.online.scoring import (
    build_online_reward,
    build_target,
    fit_target_moments,
    restore_moments,
)
from distalign.train.online.setup import (
    BaseScorer,
    FrozenProposal,
    LoopState,
    Rollout,
    gather,
    gather_texts,
    load_prompts,
    repeat_prompts,
    shard,
)
from distalign.train.online.signal import (
    GlobalBatch,
    Signal,
    has_learning_signal,
    non_finite_inputs,
    non_finite_signal,
    samples_in_support,
)
from distalign.train.online.update import (
    policy_forward,
    policy_gradient_backward,
    update_forward_scores_policy,
)
from distalign.train.setup import load_policy, packing_layout, save_final, wrap_for_training
from distalign.train.timing import PhaseTimer, slowest_process

#: Phases of a step, logged as ``time/<phase>`` (seconds, the slowest process's): drawing the samples
#: (log q comes with them), log a under the base, a separate no-grad pass for log pi (off-policy only),
#: target scorers / rewards / monitors, gathering, the signal, and forward + backward + optimizer step.
STEP_PHASES = ("sample", "score_reference", "score_policy", "reward", "gather", "signal", "update")
#: Phases of a step with the vLLM sampler as well: pushing weights to the engine, and (off-policy) the
#: pass for log q under the kept proposal (the engine returns token ids only).
ENGINE_PHASES = ("sync",)
ENGINE_OFF_POLICY_PHASES = ("score_proposal",)


# --- the run ---------------------------------------------------------------------------------------------
#: Steps in a row without a sample satisfying the target, from the start, after which a warning is printed.
WARN_AFTER_STEPS = 3


class OnlineRun:
    """The parts of one online run (prompts, base, target or reward, proposal, state) and its step."""

    def __init__(self, config: RunConfig, engine: Engine, policy, tokenizer, generation_engine=None) -> None:
        cfg = self.cfg = config.online
        self.config, self.engine, self.tokenizer = config, engine, tokenizer
        samples_per_step = cfg.prompts_per_step * cfg.samples_per_prompt
        if samples_per_step % engine.world_size:
            raise SetupError(
                f"online.prompts_per_step x samples_per_prompt ({samples_per_step}) must be divisible by "
                f"the number of processes ({engine.world_size}): every process runs the same micro-batches"
            )
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
        # First: a missing vLLM or GPU is reported before anything slow is loaded.
        self.sampler = build_sampler(config, engine, policy, tokenizer, generation_engine)
        # The update's forward layout (data.packing: a prompt's samples share one copy of it); refuses
        # a model packing cannot be exact for.
        self.packing = packing_layout(policy, config)
        self.prompts = load_prompts(config, tokenizer, "train", engine)
        self.plan = BatchPlan(len(self.prompts), cfg.prompts_per_step, config.train.seed)
        scored_by = get_online_method(cfg.method).scored_by
        self.target = build_target(config) if scored_by == "target" else None
        self.reward = build_online_reward(config) if scored_by == "reward" else None
        self.base = BaseScorer(config, policy, tokenizer)  # before any step: the policy still is a
        proposal = None
        if cfg.proposal == "offline":
            proposal = FrozenProposal(policy, is_base=config.reference.model is None)
        self.state = LoopState(cfg.baseline_window, proposal)
        self.refresh_rule = ProposalRefreshRule(cfg.refresh_min_ess_fraction)
        self._update_scores_policy: bool | None = None
        phases = STEP_PHASES + (("refresh",) if proposal is not None else ())
        if not self.sampler.returns_logprobs:
            phases += ENGINE_PHASES + (ENGINE_OFF_POLICY_PHASES if proposal is not None else ())
        self.timer = PhaseTimer(engine.device, ("step", *phases))
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
                self.target, self.base, self.tokenizer, self.prompts, self.config, self.engine
            )
        if self.target is not None:
            restore_moments(self.target, self.state.moment_lambdas)

    def train_step(self, step: int) -> dict[str, float]:
        """One optimizer step; returns the step's globally reduced metrics, with its phases' seconds."""
        self.timer.reset()
        with self.timer("step"):
            metrics = self.run_step(step)
        metrics.update(slowest_process(self.engine, self.timer.metrics()))
        return metrics

    def run_step(self, step: int) -> dict[str, float]:
        engine, cfg, timer = self.engine, self.cfg, self.timer
        if not self.sampler.returns_logprobs:
            with timer("sync"):
                self.sampler.sync(*self.sampled_model(step))
        with timer("sample"):
            rollout = self.sample(step)  # 1. sample
        forwarded = None  # log pi from the update's own forward where that is exact, instead of a pass
        needs_policy_pass = self.state.proposal is not None or rollout.proposal_logps is None
        if needs_policy_pass and self.update_forward_scores_policy(len(rollout)):
            with timer("update"):
                pad_id = self.tokenizer.pad_token_id
                forwarded = policy_forward(engine, rollout, 0, len(rollout), pad_id, self.packing)
        batch = self.score_and_gather(rollout, forwarded)  # 2. score + 3. gather
        self.stop_if_not_finite(step, non_finite_inputs(batch))
        try:  # 3. log Z, (pseudo-)rewards, baseline, weights
            with timer("signal"):
                signal = self.state.step_signal(cfg, batch)
        except SetupError as err:  # an infinite pseudo-reward: the divergence is infinite at a sample
            raise TrainingStoppedError(f"step {step}: {err}") from None
        self.stop_if_not_finite(step, non_finite_signal(signal))
        offset = engine.rank * len(rollout)
        local = slice(offset, offset + len(rollout))
        local_weights = None if signal.weights is None else signal.weights[local]
        with timer("update"):
            surrogate = policy_gradient_backward(  # 4. loss -> backward, then one optimizer step
                engine,
                rollout,
                signal.advantages[local],
                local_weights,
                len(batch.texts),
                self.config.train.micro_batch_size,
                self.tokenizer.pad_token_id,
                forwarded,
                self.packing,
            )
            # Read before the step, so a non-finite loss is never applied; the same on every process:
            # all stop, or none. (The update's micro-batch loop itself reads nothing from the device.)
            surrogate = float(engine.reduce_sum(surrogate))
            if not math.isfinite(surrogate):
                raise self.non_finite(step, "the surrogate loss", surrogate, applied=False)
            norm = engine.optimizer_step()
            grad_norm = None if norm is None else float(norm)
        if grad_norm is not None and not math.isfinite(grad_norm):
            raise self.non_finite(step, "the gradient norm", grad_norm, applied=True)
        metrics = self.step_metrics(batch, signal)
        if grad_norm is not None:
            metrics["grad_norm"] = grad_norm
        metrics.update(self.watch(step, batch, signal, grad_norm))
        if self.state.proposal is not None:
            with timer("refresh"):
                metrics.update(self.maybe_refresh(step, batch, signal))
        return metrics

    def sampled_model(self, step: int) -> tuple[torch.nn.Module, tuple]:
        """The model q that step ``step`` samples from, and a version of its weights that changes when
        they do: the policy (updated every step) on-policy, the proposal (changed by refreshes) off-policy."""
        proposal = self.state.proposal
        if proposal is None:
            return self.policy, ("policy", step)
        return proposal.model, ("proposal", proposal.refreshes)

    def sample(self, step: int) -> Rollout:
        """This process's equal share of the step's prompts x samples_per_prompt samples, from q."""
        indices, groups = repeat_prompts(self.plan.global_batch(step), self.cfg.samples_per_prompt)
        return self.sampler.draw(
            self.sampled_model(step)[0],
            self.prompts,
            shard(indices, self.engine),
            shard(groups, self.engine),
            step=step,
            rank=self.engine.rank,
        )

    def update_forward_scores_policy(self, samples: int) -> bool:
        """Whether this run's update forward gives the exact log pi (decided once: it depends on the
        model, precision and micro-batch size, not on the step)."""
        if self._update_scores_policy is None:
            self._update_scores_policy = update_forward_scores_policy(
                self.engine, samples, self.config.train.micro_batch_size
            )
        return self._update_scores_policy

    def score(self, model: torch.nn.Module, rollout: Rollout) -> torch.Tensor:
        """[N] float64 teacher-forced log-probs of the rollout's completions under ``model`` (no grad)."""
        return score_completions(
            model,
            self.tokenizer,
            rollout.keys,
            rollout.completion_ids,
            self.cfg.sampling_batch_size,
            prompt_ids=rollout.prompt_ids,
        ).double()

    def policy_and_proposal_logps(
        self, rollout: Rollout, forwarded: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(log pi, log q) of the rollout's samples. log q: the sampler's, or (token-ids-only sampler)
        our head's under the model that sampled: the policy on-policy (then log q = log pi), the kept
        proposal off-policy - the weights the engine held, however stale. log pi: log q on-policy, else
        the update's forward (``forwarded``) or a no-grad pass under the current policy."""
        proposal, timer = self.state.proposal, self.timer
        log_q = rollout.proposal_logps
        if forwarded is not None:
            log_pi = forwarded.detach().double().cpu()
        elif proposal is not None or log_q is None:
            with timer("score_policy"):
                log_pi = self.score(self.policy, rollout)
        else:
            log_pi = log_q
        if log_q is None:
            if proposal is None:
                log_q = log_pi  # the engine held the current policy's weights (pushed this step)
            else:
                with timer("score_proposal"):
                    log_q = self.score(proposal.model, rollout)
        return log_pi, log_q

    @torch.no_grad()
    def score_and_gather(self, rollout: Rollout, forwarded: torch.Tensor | None = None) -> GlobalBatch:
        """log a, log P or r, monitors of this process's samples, gathered from every process.
        ``forwarded``: log pi from the update's forward, instead of a scoring pass."""
        engine, proposal, timer = self.engine, self.state.proposal, self.timer
        log_pi, log_q = self.policy_and_proposal_logps(rollout, forwarded)
        with timer("score_reference"):
            if proposal is not None and proposal.is_base:
                log_a = log_q  # q is still the base model itself
            else:
                log_a = self.base(rollout.prompt_ids, rollout.completion_ids, engine.device)
        local = {"log_pi": log_pi, "log_q": log_q, "log_a": log_a, "group": rollout.group.double()}
        if rollout.engine_logps is not None:  # the engine's own log-probs against our head's log q
            local["logprob_gap"] = rollout.engine_logps - log_q
        local["prompt"] = rollout.prompt_index.double()
        local["tokens"] = torch.tensor([float(len(c)) for c in rollout.completion_ids])
        local["eos"] = rollout.ended_with_eos.double()
        with timer("reward"):
            if self.target is not None:
                local["log_p"] = self.target.log_unnormalized(log_a, rollout.texts, rollout.contexts)
            monitors = sample_monitors(self.target, self.reward, rollout.texts, rollout.contexts)
        with timer("gather"):
            merged = {name: gather(engine, values.double()) for name, values in {**local, **monitors}.items()}
            texts = gather_texts(engine, self.tokenizer, rollout.completion_ids, rollout.texts)
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
            texts=texts,
            completion_tokens=merged["tokens"],
            ended_with_eos=merged["eos"],
            sampler_logprob_gap=merged.get("logprob_gap"),
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
        metrics.update(self.sampler_metrics(batch))
        return metrics

    def sampler_metrics(self, batch: GlobalBatch) -> dict[str, float]:
        """With a token-ids-only sampler: its weight pushes so far, and how far its own log-probs of the
        draws are from our head's log q (kernels, precision; NaN where it reported none)."""
        if self.sampler.returns_logprobs:
            return {}
        metrics = {"sampler/weight_pushes": float(self.sampler.weight_pushes)}
        gap = batch.sampler_logprob_gap
        if gap is not None and bool(torch.isfinite(gap).any()):
            gap = gap[torch.isfinite(gap)].abs()
            metrics["sampler/logprob_gap/mean_abs"] = float(gap.mean())
            metrics["sampler/logprob_gap/max_abs"] = float(gap.max())
        return metrics

    def maybe_refresh(self, step: int, batch: GlobalBatch, signal: Signal) -> dict[str, float]:
        """GDC's rule: q <- pi when pi is estimated closer to the target than q, or when ESS(pi/q) collapses.
        RLOO has no target to be closer to: only the ESS rule applies."""
        proposal, cfg = self.state.proposal, self.cfg
        divergences = [math.inf, math.inf]
        # Where no update happened since q was taken (step 1, and the step after a refresh), q holds the
        # very weights that scored this batch as pi: the two estimates differ by float rounding alone,
        # and a refresh decided on that would make a run depend on the hardware's rounding.
        comparable = proposal.last_refresh_step != step - 1
        log_z = self.state.log_z.log_z_for(batch.keys) if self.target is not None else None
        known = torch.isfinite(log_z) if log_z is not None else None  # contexts with target mass yet
        if comparable and known is not None and bool(known.any()):
            divergences = [
                estimate_divergence(
                    cfg.refresh_divergence,
                    logps[known],
                    batch.target_logps[known],
                    batch.proposal_logps[known],
                    log_z=log_z[known],
                ).value
                for logps in (batch.policy_logps, batch.proposal_logps)
            ]
        ess_fraction = signal.metrics["is/ess_fraction"] if comparable else 1.0
        refresh, _ = self.refresh_rule.should_refresh(*divergences, ess_fraction)
        sync_every = self.cfg.vllm.sync_every if self.cfg.sampler == "vllm" else None
        if refresh or (sync_every is not None and step % sync_every == 0):  # q <- pi, pushed next step
            proposal.refresh(self.policy, step)
        return {
            "proposal/refreshes": float(proposal.refreshes),
            "proposal/last_refresh_step": float(proposal.last_refresh_step),
        }

    # --- runs that cannot learn: stop (or warn) instead of looking like success ----------------------
    def watch(
        self, step: int, batch: GlobalBatch, signal: Signal, grad_norm: float | None
    ) -> dict[str, float]:
        """Count the step towards the stall limits; warn once when the first WARN_AFTER_STEPS steps all
        went without a sample satisfying the target (a rare target often misses a step or two)."""
        in_support = samples_in_support(batch)
        learning = has_learning_signal(signal) and grad_norm != 0.0
        stalls = self.state.stalls
        stalls.update(in_support, learning)
        if stalls.without_support == WARN_AFTER_STEPS and not stalls.support_seen:
            limit = self.cfg.max_steps_without_support
            stop = (
                f"the run stops after {limit} such steps in a row (online.max_steps_without_support)"
                if limit
                else "online.max_steps_without_support is 0: the run will not stop for this"
            )
            self.warn(
                f"step {step}: no sample has satisfied the target's constraints yet ({stalls.without_support} "
                f"steps of {len(batch.texts)} samples, alignment 0: P(x) = 0 under a hard constraint, so "
                f"log Z = -inf; these steps teach the policy nothing about the target); {stop}"
            )
        return self.state.stalls.metrics(self.target is not None)

    def check_stalls(self, step: int) -> None:
        """Stop with a TrainingStoppedError once a stall limit is reached (called after the step is logged)."""
        cfg, stalls = self.cfg, self.state.stalls
        samples = f"{cfg.prompts_per_step} prompts x {cfg.samples_per_prompt} samples"
        if cfg.max_steps_without_support and stalls.without_support >= cfg.max_steps_without_support:
            what = (
                "no sample has satisfied the target's constraints"
                if not stalls.support_seen
                else "the policy's samples have left the target: none satisfied its constraints"
            )
            raise TrainingStoppedError(
                f"step {step}: {what} in the last {stalls.without_support} steps ({samples} each; "
                "alignment 0, and under a hard constraint log Z = -inf and a zero gradient): nothing is "
                "being learned. Make the target reachable: more samples per step (online.samples_per_prompt, "
                "online.prompts_per_step; longer completions: online.max_new_tokens), a base model that "
                "satisfies the constraint now and then (model.name), or a constraint it can satisfy "
                "(online.target.scorers). A soft constraint (epsilon > 0) does not help until some sample "
                "satisfies it. online.max_steps_without_support (now "
                f"{cfg.max_steps_without_support}; 0 = never stop) sets this limit"
            )
        if cfg.max_steps_without_signal and stalls.without_signal >= cfg.max_steps_without_signal:
            cause = (
                "no sample satisfies the target more than another, e.g. a soft constraint none of them meets"
                if self.target is not None
                else "the reward is the same for every sample of each prompt"
            )
            raise TrainingStoppedError(
                f"step {step}: every advantage was zero in the last {stalls.without_signal} steps ({samples} "
                f"each), so the gradient was zero and the policy did not change: {cause}. More samples per "
                "prompt (online.samples_per_prompt), a target or reward the base model can reach, or a "
                "larger train.lr may help; online.max_steps_without_signal (now "
                f"{cfg.max_steps_without_signal}; 0 = never stop) sets this limit"
            )

    def stop_if_not_finite(self, step: int, problem: str | None) -> None:
        if problem is not None:
            raise TrainingStoppedError(
                f"step {step}: {problem}; training stopped before this step's update (the checkpoints "
                "saved so far are intact). Check the model's dtype (model.dtype=float32, "
                "train.mixed_precision=no), the reward, and lower train.lr if the weights diverged"
            )

    def non_finite(self, step: int, what: str, value: float, *, applied: bool) -> NonFiniteLossError:
        return NonFiniteLossError.at_step(
            step, what, value, applied=applied, checkpoints=self.engine.list_checkpoints()
        )

    def warn(self, message: str) -> None:
        """A warning on stderr, once (main process), above the progress bar."""
        if self.engine.is_main:
            tqdm.write(f"distalign: warning: {message}", file=sys.stderr)

    def evaluate(self) -> dict[str, float]:
        return self.evaluator(self.policy)

    def evaluates_at(self, step: int, total_steps: int) -> bool:
        return bool(self.cfg.eval_every) and (step % self.cfg.eval_every == 0 or step == total_steps)


@without_cudnn_attention
def train_online(config: RunConfig, *, stop_after_step: int | None = None, generation_engine=None) -> Path:
    """Train with the online loop (``config.online``); returns the run directory. Resumes from the newest
    checkpoint in ``output_dir`` when there is one; ``stop_after_step`` interrupts the run (for tests);
    ``generation_engine``: with ``online.sampler: vllm``, an engine to sample with instead of starting
    vLLM (a :class:`distalign.models.vllm_engine.GenerationEngine`; tests pass a CPU one)."""
    if config.online is None:
        raise SetupError("train_online needs an `online` section in the config")
    engine = Engine(config)
    if engine.accelerator.distributed_type.value in ("FSDP", "DEEPSPEED"):
        raise SetupError("the online loop samples with the unsharded model: run it with DDP or one process")
    policy, tokenizer = load_policy(config)
    run = OnlineRun(config, engine, policy, tokenizer, generation_engine)
    engine.open_run_dir()
    plan_steps = run.plan.steps_for_epochs(config.train.epochs)
    total_steps = config.train.max_steps or plan_steps
    engine.prepare(wrap_for_training(policy, config, packing=run.packing), total_steps)
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
    method = get_online_method(config.online.method)
    label = method.label(method.options_of(config.online))
    engine.start_progress(total_steps, first_step, label)
    engine.model.train()
    for step in iterate_steps(first_step, total_steps):
        try:
            metrics = run.train_step(step)
            if run.evaluates_at(step, total_steps):
                eval_timer = PhaseTimer(engine.device)
                with eval_timer("eval"):
                    evaluation = run.evaluate()
                eval_log.write(step, evaluation)
                metrics.update(evaluation)
                metrics.update(slowest_process(engine, eval_timer.metrics()))
            engine.log(step, metrics)
            run.check_stalls(step)
        except TrainingStoppedError:
            engine.close()  # the progress bar ends above the error line
            raise
        if config.train.save_every and step % config.train.save_every == 0 and step != total_steps:
            engine.save_checkpoint(step, run.state.state_dict())
        if stop_after_step is not None and step >= stop_after_step:
            engine.close()
            return engine.finish()
    engine.close()
    save_final(engine, tokenizer, config, run.prompts.record(config, total_steps, engine.world_size))
    return engine.finish()
