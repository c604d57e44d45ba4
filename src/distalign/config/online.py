"""The ``online`` config section: sample -> score -> loss -> step (f-DPG, KL-regularised REINFORCE / RLOO).

Present in a run config => ``distalign train`` runs the online loop (``distalign.train.online``). The
sections ``model``, ``train`` (optimiser, steps, micro-batches, checkpoints) and ``reference`` keep
their meaning; ``data`` and ``loss`` are not used (prompts come from ``online.prompts``).

Names that live in registries (f-divergences, target scorer kinds, tasks) are checked here, so a typo
fails at load with the field path; the full target / reward specs are built, and checked, when the run
starts (building a reward may load a classifier).
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from distalign.config.base import ChatTemplateMode, Section


class PromptsConfig(Section):
    """Where the contexts come from: a task's prompts, a data file's prompts, or none (unconditional)."""

    task: str | None = None
    """A registered task (e.g. "keyword"): its train prompts for training, its held-out prompts for
    evaluation (see eval_split)."""
    task_settings: dict[str, Any] = {}
    """Settings of the task factory (e.g. {"topic": "food"})."""
    path: str | None = None
    """A data file / `datasets` directory / builtin:NAME whose rows have a `prompt` (any row format)."""
    split: str = "train"
    """Split to read from a `datasets` dataset."""
    limit: int | None = Field(None, gt=0)
    """Use only the first N prompts."""
    chat_template: ChatTemplateMode = "auto"
    """Render prompts with the tokenizer's chat template: "auto" = task prompts iff the tokenizer has a
    template, file prompts iff the rows are conversational. With neither task nor path, generation is
    unconditional (from the BOS token) and the template is never used."""
    max_prompt_length: int = Field(128, gt=0)
    """Prompt tokens at most (cut from the left, keeping BOS)."""

    @model_validator(mode="after")
    def _one_source(self) -> PromptsConfig:
        if self.task is not None and self.path is not None:
            raise ValueError("set either online.prompts.task or online.prompts.path, not both")
        if self.task is not None:
            from distalign.tasks import TASKS

            if self.task not in TASKS.names():
                raise ValueError(
                    f"task: unknown task {self.task!r}; registered tasks: {', '.join(TASKS.names())}"
                )
        return self

    @property
    def unconditional(self) -> bool:
        return self.task is None and self.path is None


class TargetConfig(Section):
    """The f-DPG target P(x|c) = a(x|c) x prod of scorers; a = the initial policy (the base model)."""

    scorers: list[dict[str, Any]] = Field(min_length=1)
    """Factors, each {"kind": ..., **settings}: "constraint" (pointwise, e.g. {"kind": "constraint",
    "feature": {"name": "contains_word", "word": "park"}, "epsilon": 0}), "moments" (distributional:
    features + target moments, fitted on base samples at start), "tilt" (fixed exp(lambda . phi)),
    "reward_tilt" (exp(r / beta), the RLHF target)."""
    conditional: bool = False
    """One partition function Z_c per prompt (CDPG) instead of one Z for the prompt distribution."""
    fit_samples_per_prompt: int = Field(4, gt=0)
    """Moment fitting: base samples per prompt."""
    fit_prompts: int = Field(64, gt=0)
    """Moment fitting: prompts sampled (at most all of them)."""

    @field_validator("scorers")
    @classmethod
    def _known_kinds(cls, scorers: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from distalign.targets import SCORERS

        for i, spec in enumerate(scorers):
            if "kind" not in spec:
                raise ValueError(f"scorers[{i}] needs a 'kind' (one of {', '.join(SCORERS.names())})")
            if spec["kind"] not in SCORERS.names():
                raise ValueError(
                    f"scorers[{i}].kind: unknown scorer {spec['kind']!r}; known: {', '.join(SCORERS.names())}"
                )
        return scorers


#: The baselines an online method may subtract (online.baseline), and what each is.
BASELINE_NAMES = {
    "loo": "leave-one-out: the mean of the other samples of the prompt",
    "window": "the mean of the last baseline_window rewards",
    "none": "no baseline",
}


#: vLLM sampling settings that change the distribution drawn from, with the value that leaves it alone
#: (top_k: vLLM reads both 0 and -1 as "off"). The loop needs samples from the model itself, with the
#: model's own log-probs: see VLLMConfig.
DISTRIBUTION_CHANGING_SETTINGS: dict[str, tuple[float, ...]] = {
    "top_p": (1.0,),
    "top_k": (0, -1),
    "min_p": (0.0,),
    "temperature": (1.0,),
    "repetition_penalty": (1.0,),
    "presence_penalty": (0.0,),
    "frequency_penalty": (0.0,),
}


class VLLMConfig(Section):
    """The vLLM sampler (``online.sampler: vllm``, extra ``distalign[vllm]``, one CUDA GPU).

    vLLM only draws token ids. Every log-prob the estimator uses (log q of the draw, log pi, log a) is
    computed by distalign's own exact head, so vLLM's log-probs (renormalised over the kept tokens
    under top-p / top-k) never enter an importance ratio. The engine holds the weights of the model
    sampled from: the policy, pushed before every step (``proposal: on_policy``), or the proposal q,
    pushed whenever q is refreshed (``proposal: offline``). Untruncated ancestral sampling only:
    top_p, top_k, min_p, temperature and the penalties are refused unless they are the identity
    (top_p 1, top_k 0 or -1, min_p 0, temperature 1, repetition_penalty 1, presence/frequency 0).
    """

    sync_every: int | None = Field(None, gt=0)
    """Steps between weight pushes. null: whenever the weights sampled from change (every step
    on-policy; at each refresh of q off-policy). On-policy only 1 is allowed: with k > 1 the engine
    would sample from weights up to k - 1 steps old while the loop treats the samples as the policy's.
    Off-policy (proposal: offline) q is also refreshed to the policy, and pushed, every k steps (the
    refresh rule may refresh it sooner); its kept copy gives the exact log q of the stale weights."""
    gpu_memory_utilization: float = Field(0.3, gt=0.0, le=1.0)
    """Share of the GPU's memory vLLM takes (weights + KV cache); the rest stays with training."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """vLLM's weight dtype; "auto" = the policy's. A lower precision than the policy's samples from a
    slightly different distribution than the one log q is computed for (see sampler/logprob_gap)."""
    enforce_eager: bool = False
    """Disable CUDA graphs (slower decoding, faster start, less memory)."""
    engine_args: dict[str, Any] = {}
    """Further keyword arguments of ``vllm.LLM`` (e.g. {"max_num_seqs": 64}), passed as given."""

    @model_validator(mode="before")
    @classmethod
    def _untruncated_only(cls, data: Any) -> Any:
        """Refuse a setting that changes the distribution sampled from (accept its identity value, so a
        config written for vLLM elsewhere that spells out top_p: 1.0 still loads)."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for name, identity in DISTRIBUTION_CHANGING_SETTINGS.items():
            if name not in data:
                continue
            value = data.pop(name)
            if value is None or (isinstance(value, (int, float)) and value in identity):
                continue
            raise ValueError(
                f"online.vllm.{name}={value!r} is refused: it makes vLLM sample from a distribution other "
                "than the model's (top-p / top-k / min-p truncate it, temperature and penalties reshape "
                "it), while log q in the importance ratios, log Z and the pseudo-rewards is the model's "
                "own. Truncation cannot be corrected: tokens outside the kept set have q = 0 but pi > 0, "
                "so no importance weight reaches them (and vLLM's log-probs are renormalised over the "
                f"kept tokens: at top-p 0.8 the mean ratio was 0.896, not 1). Remove online.vllm.{name} "
                "(the loop samples untruncated, temperature 1)"
            )
        return data


class OnlineConfig(Section):
    """Settings of the online loop. Present in a run config => ``distalign train`` runs the online loop.

    Each step draws ``prompts_per_step`` prompts and ``samples_per_prompt`` completions of each by exact
    ancestral sampling (no temperature / top-k / top-p), scores them, and takes one optimizer step on
    the REINFORCE surrogate (micro-batches of ``train.micro_batch_size`` sequences). ``train.batch_size``
    is not used: the global batch is prompts_per_step x samples_per_prompt sequences.
    """

    method: str = "fdpg"
    """A registered online method (distalign.online_methods): "fdpg": minimise D_f(pi || p) to
    `target`; "rloo": maximise E[r] - kl_coef KL(pi || a) with the leave-one-out baseline;
    "reinforce": the same objective with `baseline`."""
    divergence: str = "jensen_shannon"
    """f-DPG divergence (forward_kl, reverse_kl, total_variation, jensen_shannon, pearson_chi2,
    neyman_chi2, alpha)."""
    divergence_params: dict[str, float] = {}
    """Parameters of the divergence (alpha: {"alpha": 0.5})."""
    target: TargetConfig | None = None
    """The f-DPG target (required for method=fdpg)."""
    reward: str | dict[str, Any] | None = None
    """RLOO / REINFORCE reward: a registered reward name, "pkg.module:function", or a spec dict
    ({"name": "keyword", "keywords": ["park"]}); see distalign.rewards.build_reward."""
    kl_coef: float = Field(0.05, ge=0.0)
    """RLOO / REINFORCE: beta of the penalty beta x (log pi - log a) per sequence."""
    prompts: PromptsConfig = PromptsConfig()
    prompts_per_step: int = Field(4, gt=0)
    """Prompts per optimizer step, over all processes (prompts_per_step x samples_per_prompt must divide
    by the number of processes, which share the samples equally)."""
    samples_per_prompt: int = Field(4, gt=0)
    """Completions per prompt (>= 2 for the leave-one-out baseline)."""
    sampler: Literal["hf", "vllm"] = "hf"
    """What draws the training samples: "hf" = distalign's own KV-cached exact ancestral sampling
    (any device), "vllm" = a vLLM engine in this process (extra distalign[vllm], one CUDA GPU, one
    process; settings in online.vllm). Evaluation and moment fitting always sample with "hf"."""
    vllm: VLLMConfig = VLLMConfig()
    """The vLLM sampler's settings (online.sampler: vllm)."""
    max_new_tokens: int = Field(32, gt=0)
    """Completion tokens at most; a completion cut there is scored as that prefix (no EOS)."""
    sampling_batch_size: int = Field(32, gt=0)
    """Sequences generated together."""
    baseline: Literal["loo", "window", "none"] = "loo"
    """Subtracted from the (pseudo-)rewards: per-prompt leave-one-out mean, mean of the last
    baseline_window rewards, or nothing."""
    baseline_window: int = Field(1024, gt=0)
    """Rewards remembered by the windowed baseline."""
    proposal: Literal["on_policy", "offline"] = "on_policy"
    """Sample from the current policy, or from a frozen copy q (initially the base) refreshed by the
    rule below, with importance weights pi / q clipped at max_importance_weight."""
    max_importance_weight: float | None = Field(10.0, gt=0.0)
    """Clip pi / q at this value (off-policy only); null = no clipping (unbiased, unbounded variance)."""
    refresh_min_ess_fraction: float = Field(0.1, gt=0.0, le=1.0)
    """Off-policy: refresh q when ESS(pi / q) / N falls below this."""
    refresh_divergence: str = "forward_kl"
    """Off-policy: also refresh q when this divergence of pi to the target is estimated below q's
    (GDC's rule uses KL(p || pi), i.e. forward_kl)."""
    eval_every: int = Field(0, ge=0)
    """Steps between evaluations (and at the last step); 0 = no evaluation. Must be a multiple of
    train.log_every, so every evaluation lands in metrics.jsonl."""
    eval_at_start: bool = True
    """Also evaluate the initial policy (step 0, in evals.jsonl only) when eval_every > 0."""
    eval_prompts: int = Field(16, gt=0)
    """Prompts per evaluation (a fixed seeded subset; at most all of them)."""
    eval_samples_per_prompt: int = Field(8, gt=0)
    """Policy samples per evaluation prompt."""
    eval_split: Literal["heldout", "train"] = "heldout"
    """Task prompts to evaluate on (file prompts and unconditional runs use their only set)."""
    qrs_acceptance_rates: list[float] = []
    """Evaluation: for each rate, the QRS beta giving it with the policy as proposal and the resulting
    TV(p_beta, p) (e.g. [0.5, 0.1])."""
    max_steps_without_support: int = Field(20, ge=0)
    """f-DPG: stop (exit status 2) after this many steps in a row in which no sample satisfies the
    target's constraints (a hard constraint: no sample in the target's support, P(x) = 0 for all, log Z
    -inf, zero gradient; a soft one: samples that all violate it say nothing about the target either).
    When the first 3 steps all go without such a sample, a warning is printed. Logged as
    `warnings/steps_without_support`; 0 = never stop."""
    max_steps_without_signal: int = Field(20, ge=0)
    """Stop (exit status 2) after this many steps in a row whose advantages are all zero (every sample of
    each prompt got the same (pseudo-)reward, or the gradient norm is 0), so the policy does not change.
    Logged as `warnings/steps_without_signal`; 0 = never stop."""

    @field_validator("method")
    @classmethod
    def _registered_method(cls, method: str) -> str:
        from distalign.online_methods import ONLINE_METHODS

        if method not in ONLINE_METHODS:
            raise ValueError(
                f"unknown online method {method!r}; valid names: {', '.join(ONLINE_METHODS.names())}"
            )
        return method

    @field_validator("qrs_acceptance_rates")
    @classmethod
    def _rates_in_range(cls, rates: list[float]) -> list[float]:
        for rate in rates:
            if not 0.0 < rate <= 1.0:
                raise ValueError(f"acceptance rate {rate} must be in (0, 1]")
        return rates

    @model_validator(mode="after")
    def _consistent(self) -> OnlineConfig:
        _check_divergence("divergence", self.divergence, self.divergence_params)
        _check_divergence("refresh_divergence", self.refresh_divergence, {})
        from distalign.online_methods import ONLINE_METHODS

        spec = ONLINE_METHODS.get(self.method)
        scored_by = {name: ONLINE_METHODS.get(name).scored_by for name in ONLINE_METHODS}
        if spec.scored_by == "target":
            if self.target is None:
                raise ValueError(
                    f"method {self.method!r} needs online.target (the scorers of the target distribution)"
                )
            if self.reward is not None:
                by_reward = "/".join(name for name, kind in scored_by.items() if kind == "reward")
                raise ValueError(
                    f"online.reward is for the methods scored by a reward ({by_reward}); {self.method!r} "
                    "is scored by its target: put a reward in a reward_tilt scorer"
                )
            _check_support(self.divergence, self.divergence_params, self.target.scorers)
        else:
            if self.reward is None:
                raise ValueError(f"method {self.method!r} needs online.reward")
            if self.target is not None:
                by_target = " or ".join(repr(name) for name, kind in scored_by.items() if kind == "target")
                raise ValueError(
                    f"online.target is for method {by_target} (scored by a target), not {self.method!r}"
                )
        if spec.baselines is not None and self.baseline not in spec.baselines:
            allowed = " or ".join(f"{name} ({BASELINE_NAMES[name]})" for name in spec.baselines)
            raise ValueError(
                f"method {self.method!r} allows online.baseline {allowed}, not {self.baseline!r}"
            )
        if self.baseline == "loo" and self.samples_per_prompt < 2:
            raise ValueError("baseline 'loo' needs samples_per_prompt >= 2 (one sample has no others)")
        self._check_sampler()
        return self

    def _check_sampler(self) -> None:
        if self.sampler != "vllm":
            # Differences from the defaults, not fields set: a saved run config writes every default out.
            if self.vllm.model_dump() != VLLMConfig().model_dump():
                raise ValueError("online.vllm is used only with online.sampler: vllm (now 'hf')")
            return
        stale = self.vllm.sync_every is not None and self.vllm.sync_every > 1
        if stale and self.proposal == "on_policy":
            raise ValueError(
                f"online.vllm.sync_every={self.vllm.sync_every} with online.proposal=on_policy: between "
                "pushes vLLM samples from weights up to sync_every - 1 steps old, but on-policy the loop "
                "takes the samples as the current policy's (no importance weights), which biases the "
                "gradient. Set online.proposal=offline (the engine then holds the proposal q, whose kept "
                "copy gives the exact log q of those weights, and pi/q corrects for them) or sync_every=1"
            )


def _check_divergence(field: str, name: str, params: dict[str, float]) -> None:
    from distalign.losses.fdivergence import F_DIVERGENCES

    if name not in F_DIVERGENCES.names():
        raise ValueError(f"{field}: unknown f-divergence {name!r}; known: {', '.join(F_DIVERGENCES.names())}")
    expected = F_DIVERGENCES.get(name).parameters
    if set(params) != set(expected):
        wanted = ", ".join(expected) or "no parameters"
        raise ValueError(f"divergence_params: {name!r} takes {wanted}, got {sorted(params) or 'none'}")


def _check_support(name: str, params: dict[str, float], scorers: list[dict[str, Any]]) -> None:
    """Refuse, before any sampling, a divergence that is infinite wherever the policy samples x with
    P(x) = 0 (its pseudo-reward at log(pi/p) = +inf is -inf) together with a hard constraint, which
    gives exactly such x zero mass: the run would stop at its first violating sample."""
    import torch

    from distalign.losses.fdivergence import pseudo_reward

    at_zero_target_mass = pseudo_reward(name, torch.tensor([math.inf], dtype=torch.float64), **params)
    if not bool(torch.isneginf(at_zero_target_mass).all()):
        return
    for index, scorer in enumerate(scorers):
        if scorer.get("kind") == "constraint" and not scorer.get("epsilon"):
            raise ValueError(
                f"divergence {name!r} is infinite when the policy samples what the target excludes, and "
                f"target.scorers[{index}] is a hard constraint: give it an epsilon > 0 (a soft constraint, "
                "e.g. 1.0e-3) or use forward_kl, jensen_shannon or total_variation"
            )
