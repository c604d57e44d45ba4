"""Monitors of the online loop: per-sample target / reward values, and the periodic evaluation.

An evaluation draws ``eval_samples_per_prompt`` samples from the current policy for a fixed, seeded set
of prompts (the same prompts and sampling seed at every evaluation) and estimates, with the policy as
the importance-sampling proposal (fdpg.md, "Monitors"):

* divergences to the target: KL(p || pi), KL(pi || p), TV(pi, p) and JS (``jensen_shannon``, the
  unscaled generator: 2 x the textbook JS, in [0, 2 log 2]), each with a CI and the ESS of P / pi;
  Z is self-normalised on the evaluation samples (per prompt for a conditional target);
* alignment E_pi[b] (all pointwise constraints hold), feature moments E_pi[phi], mean reward;
* KL(pi || a); diversity (distinct-1/2, self-BLEU, token entropy);
* optionally, quasi-rejection sampling with the policy as proposal: the beta giving each requested
  acceptance rate and the resulting TV(p_beta, p).

Results go to ``RUN_DIR/evals.jsonl`` (one record per evaluation, step 0 = before training) and, with an
``eval/`` prefix, into that step's metrics.jsonl record.

Not called by the loop: :func:`sample_constraint_target` and :func:`kl_target_to_policy` estimate
KL(p || pi) from exact samples of a constraint target (rejection from the base), free of the ESS collapse
of the importance-sampled ``kl_p_pi``. benchmarks/fdpg_divergences.py draws those samples once for all of
its runs (the "exact-p" column of docs/benchmarks.md); drawing them costs about num_samples / Z base
samples, and the estimate pools contexts, so it holds for unconditional targets only.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

import torch

from distalign.errors import SetupError
from distalign.models.sampling import score_completions
from distalign.stats.diversity import diversity_stats
from distalign.targets import (
    BooleanConstraint,
    Estimate,
    MomentTilt,
    RewardTilt,
    Target,
    estimate_divergence,
    estimate_kl_to_base,
    importance_weighted_mean,
    log_beta_for_acceptance_rate,
    qrs_diagnostics,
    qrs_sample,
)
from distalign.targets.features import as_feature_values, evaluate_features
from distalign.train.online.setup import (
    BaseScorer,
    PromptSet,
    draw_rollout,
    gather,
    gather_texts,
    repeat_prompts,
    seeded_generator,
    shard,
)

#: Reported name -> registered f-divergence.
DIVERGENCE_MONITORS = {
    "kl_p_pi": "forward_kl",
    "kl_pi_p": "reverse_kl",
    "tv": "total_variation",
    "js": "jensen_shannon",
}


def sample_monitors(
    target: Target | None, reward, texts: list[str], contexts: list[str]
) -> dict[str, torch.Tensor]:
    """Per-sample values whose mean under pi is worth watching, each [N] float64.

    ``alignment``: 1 when every pointwise constraint of the target holds (soft ones included);
    ``moment/<k>``: the k-th moment-constrained feature; ``reward``: a reward tilt's or RLOO's reward.
    """
    values: dict[str, torch.Tensor] = {}
    if reward is not None:
        values["reward"] = as_feature_values(reward(contexts, texts), len(texts), "reward")
    if target is None:
        return values
    constraints = [s for s in target.scorers if isinstance(s, BooleanConstraint)]
    if constraints:
        satisfied = torch.stack([c.satisfied(texts, contexts) for c in constraints]).all(dim=0)
        values["alignment"] = satisfied.double()
    features = [f for s in target.scorers if isinstance(s, MomentTilt) for f in s.features]
    if features:
        for k, column in enumerate(evaluate_features(features, texts, contexts).T):
            values[f"moment/{k}"] = column
    for scorer in target.scorers:
        if isinstance(scorer, RewardTilt):
            values["reward"] = as_feature_values(scorer.reward(contexts, texts), len(texts), "reward")
    return values


def divergence_metrics(
    policy_logps: torch.Tensor,
    target_log_unnormalized: torch.Tensor,
    prompt_index: torch.Tensor | None,
    generator: torch.Generator,
    prefix: str = "eval/",
) -> dict[str, float]:
    """The four divergences to the target from samples of pi, Z self-normalised (per prompt when
    ``prompt_index`` is given; prompts whose samples all have P = 0 carry no estimate and are dropped)."""
    keep = torch.ones_like(policy_logps, dtype=torch.bool)
    metrics: dict[str, float] = {}
    if prompt_index is not None:
        has_mass = torch.zeros(int(prompt_index.max()) + 1, dtype=torch.bool)
        has_mass[prompt_index[torch.isfinite(target_log_unnormalized)]] = True
        keep = has_mass[prompt_index]
        metrics[f"{prefix}contexts_without_target_mass"] = float(
            len(set(prompt_index.tolist())) - len(set(prompt_index[keep].tolist()))
        )
    metrics[f"{prefix}target_mass_samples"] = float(torch.isfinite(target_log_unnormalized).sum())
    if not bool(torch.isfinite(target_log_unnormalized[keep]).any()):
        return metrics  # no sample of pi has P > 0: nothing to weight
    for label, name in DIVERGENCE_MONITORS.items():
        estimate = estimate_divergence(
            name,
            policy_logps[keep],
            target_log_unnormalized[keep],
            policy_logps[keep],
            context_index=None if prompt_index is None else prompt_index[keep],
            generator=generator,
        )
        metrics.update(estimate.as_dict(f"{prefix}{label}"))
    return metrics


def qrs_metrics(
    policy_logps: torch.Tensor,
    target_log_unnormalized: torch.Tensor,
    rates: list[float],
    prefix: str = "eval/",
) -> dict[str, float]:
    """For each acceptance rate: log beta of QRS with pi as proposal, and TV(p_beta, p) there."""
    metrics: dict[str, float] = {}
    if not rates or not bool(torch.isfinite(target_log_unnormalized).any()):
        return metrics
    for rate in rates:
        log_beta = log_beta_for_acceptance_rate(target_log_unnormalized, policy_logps, rate)
        diagnostics = qrs_diagnostics(target_log_unnormalized, policy_logps, [log_beta])
        metrics[f"{prefix}qrs/{rate:g}/log_beta"] = log_beta
        metrics[f"{prefix}qrs/{rate:g}/tv_to_target"] = float(diagnostics["tv_to_target"][0])
    return metrics


@dataclass
class TargetSamples:
    """Exact samples of a target p whose P <= a (pointwise constraints, hard or soft), with Z's estimate.

    ``target_logps`` [n] float64: log P of the accepted samples; ``log_z`` = log(accepted / proposals),
    ``log_z_variance`` its delta-method variance (1 - Z) / (N Z); contexts drawn uniformly from the prompts.
    """

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    target_logps: torch.Tensor
    log_z: float
    log_z_variance: float
    num_proposals: int

    def __len__(self) -> int:
        return len(self.completion_ids)


def sample_constraint_target(
    base_model,
    tokenizer,
    prompts: PromptSet,
    target: Target,
    *,
    num_samples: int,
    max_proposals: int = 100_000,
    max_new_tokens: int = 32,
    batch_size: int = 64,
    seed: int = 0,
) -> TargetSamples:
    """Rejection sampling of p = P / Z from the base: x ~ a (prompt uniform), accepted with probability
    P(x)/a(x) <= 1, i.e. QRS with beta = 1, which is exact here. Raises if some P(x) > a(x)."""
    device = next(base_model.parameters()).device
    prompt_generator = seeded_generator(torch.device("cpu"), seed, "target-prompts")
    sample_generator = seeded_generator(device, seed, "target-samples")

    def propose(count: int):
        chosen = torch.randint(len(prompts), (count,), generator=prompt_generator).tolist()
        rollout = draw_rollout(
            base_model,
            tokenizer,
            prompts,
            chosen,
            [0] * count,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            generator=sample_generator,
        )
        log_p = target.log_unnormalized(rollout.proposal_logps, rollout.texts, rollout.contexts)
        if bool((log_p > rollout.proposal_logps + 1e-9).any()):
            raise ValueError("P(x) > a(x) for some x: rejection from a is exact only for constraint targets")
        return list(zip(rollout.prompt_ids, rollout.completion_ids)), log_p, rollout.proposal_logps

    result = qrs_sample(
        propose,
        log_beta=0.0,
        num_samples=num_samples,
        batch_size=batch_size,
        max_proposals=max_proposals,
        generator=seeded_generator(torch.device("cpu"), seed, "target-accept"),
    )
    if result.num_accepted == 0:
        raise ValueError(f"no sample of the base satisfied the target in {result.num_proposals} proposals")
    z = result.num_accepted / result.num_proposals
    return TargetSamples(
        prompt_ids=[item[0] for item in result.samples],
        completion_ids=[item[1] for item in result.samples],
        target_logps=result.target_log_unnormalized.double(),
        log_z=math.log(z),
        log_z_variance=(1 - z) / (result.num_proposals * z),
        num_proposals=result.num_proposals,
    )


def kl_target_to_policy(
    samples: TargetSamples, policy_model, tokenizer, *, batch_size: int = 32, confidence: float = 0.95
) -> Estimate:
    """KL(p || pi) = E_p[log P - log pi] - log Z from exact target samples (no importance weights, so no
    ESS collapse as pi moves away from a); the CI adds Z's delta-method variance. ESS = samples."""
    log_pi = score_completions(
        policy_model,
        tokenizer,
        [""] * len(samples),
        samples.completion_ids,
        batch_size,
        prompt_ids=samples.prompt_ids,
    ).double()
    terms = samples.target_logps - log_pi
    value = float(terms.mean()) - samples.log_z
    variance = (float(terms.var()) / len(samples) if len(samples) > 1 else math.inf) + samples.log_z_variance
    half = NormalDist().inv_cdf(0.5 + confidence / 2) * math.sqrt(variance)
    return Estimate(value, math.sqrt(variance), value - half, value + half, float(len(samples)), len(samples))


class OnlineEvaluator:
    """Periodic evaluation of the policy on a fixed seeded prompt set (see the module docstring)."""

    def __init__(
        self, config, engine, tokenizer, prompts: PromptSet, base: BaseScorer, target, reward
    ) -> None:
        self.cfg = config.online
        self.seed = config.train.seed
        self.engine = engine
        self.tokenizer = tokenizer
        self.prompts = prompts
        self.base = base
        self.target = target
        self.reward = reward
        order = torch.randperm(
            len(prompts), generator=seeded_generator(torch.device("cpu"), self.seed, "eval")
        )
        indices, groups = repeat_prompts(
            order[: self.cfg.eval_prompts].tolist(), self.cfg.eval_samples_per_prompt
        )
        if len(indices) < engine.world_size:
            raise SetupError(
                f"evaluation draws {len(indices)} samples (online.eval_prompts x eval_samples_per_prompt), "
                f"fewer than the {engine.world_size} processes"
            )
        self.local_indices, self.local_groups = shard(indices, engine), shard(groups, engine)

    @torch.no_grad()
    def __call__(self, policy_model) -> dict[str, float]:
        """Evaluate ``policy_model`` (the plain HF model); returns globally reduced ``eval/...`` metrics."""
        engine = self.engine
        local = self._local_samples(policy_model)
        merged = {name: gather(engine, values) for name, values in local.items() if name != "ids"}
        texts = gather_texts(engine, self.tokenizer, local["ids"])
        log_q, log_a = merged.pop("log_q"), merged.pop("log_a")
        log_p, prompt_index = merged.pop("log_p", None), merged.pop("prompt_index").long()
        metrics: dict[str, float] = {}
        for name, values in merged.items():
            metrics.update(importance_weighted_mean(values).as_dict(f"eval/{name}"))
        metrics.update(estimate_kl_to_base(log_q, log_a).as_dict("eval/kl_pi_a"))
        metrics.update({f"eval/{k}": v for k, v in diversity_stats(texts, seed=self.seed).items()})
        if log_p is not None:
            conditional = self.target.conditional
            generator = seeded_generator(torch.device("cpu"), self.seed, "eval-bootstrap")
            metrics.update(divergence_metrics(log_q, log_p, prompt_index if conditional else None, generator))
            if not conditional:  # QRS is per context; pooled over contexts it would mix Z_c's
                metrics.update(qrs_metrics(log_q, log_p, self.cfg.qrs_acceptance_rates))
        return metrics

    def _local_samples(self, policy_model) -> dict:
        engine = self.engine
        rollout = draw_rollout(
            policy_model,
            self.tokenizer,
            self.prompts,
            self.local_indices,
            self.local_groups,
            max_new_tokens=self.cfg.max_new_tokens,
            batch_size=self.cfg.sampling_batch_size,
            generator=seeded_generator(engine.device, self.seed, "eval", engine.rank),
        )
        log_a = self.base(rollout.prompt_ids, rollout.completion_ids, engine.device)
        local = {
            "ids": rollout.completion_ids,
            "log_q": rollout.proposal_logps,
            "log_a": log_a,
            "prompt_index": rollout.prompt_index.double(),
            **sample_monitors(self.target, self.reward, rollout.texts, rollout.contexts),
        }
        if self.target is not None:
            local["log_p"] = self.target.log_unnormalized(log_a, rollout.texts, rollout.contexts)
        return local


class EvalLog:
    """``RUN_DIR/evals.jsonl``: one JSON record per evaluation ({"step": k, ...}), written by rank 0."""

    def __init__(self, run_dir: Path, is_main: bool) -> None:
        self.path = Path(run_dir) / "evals.jsonl"
        self.is_main = is_main

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if self.is_main:
            with self.path.open("a") as handle:
                handle.write(json.dumps({"step": step, **metrics}) + "\n")

    def reset(self) -> None:
        if self.is_main:
            self.path.unlink(missing_ok=True)

    def truncate_after(self, step: int) -> None:
        """On resume, drop evaluations past the checkpoint (they will be redone)."""
        if not self.is_main or not self.path.exists():
            return
        kept = [
            line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step
        ]
        self.path.write_text("".join(line + "\n" for line in kept))

    def read(self) -> list[dict[str, float]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]
