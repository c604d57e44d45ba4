"""The whole run's config (:class:`RunConfig`), the checks across its sections, and loading it from YAML
plus dotted ``key=value`` overrides."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from distalign.config.base import OFFLINE_ONLY, RESUME_NEUTRAL, Section, marked_fields
from distalign.config.evaluation import EvalConfig
from distalign.config.online import OnlineConfig
from distalign.config.sections import (
    AggregatorConfig,
    DataConfig,
    DesignerConfig,
    LossConfig,
    ModelConfig,
    ReferenceConfig,
    TrainConfig,
)
from distalign.errors import ConfigError
from distalign.registry import typed_options

#: Sections only the offline loop reads: set in an online run, they would be ignored.
OFFLINE_ONLY_SECTIONS = ("loss", "aggregator")

#: Settings that moved to another section: (section, key) -> new section. A config or run directory
#: written before the move still loads, with a warning naming the new place.
MOVED_SETTINGS = {
    ("loss", "coupling_scope"): "train",
    ("loss", "global_strategy"): "train",
    ("loss", "sft_weight"): "train",
}


def move_renamed_settings(tree: Any, *, warn: bool = True) -> Any:
    """``tree`` (a raw config mapping) with every setting of :data:`MOVED_SETTINGS` at its new place; a
    setting given at both places with different values is refused. The input is not modified. ``warn``:
    a FutureWarning per moved setting (off for a config distalign wrote itself into a run directory:
    the user has nothing to update there)."""
    if not isinstance(tree, dict):
        return tree
    moved = {name: dict(section) if isinstance(section, dict) else section for name, section in tree.items()}
    for (old_section, key), new_section in MOVED_SETTINGS.items():
        old = moved.get(old_section)
        if not isinstance(old, dict) or key not in old:
            continue
        value = old.pop(key)
        new = moved.setdefault(new_section, {})
        if not isinstance(new, dict):
            continue  # the new section is malformed: its own validation names it
        if key in new and new[key] != value:
            raise ValueError(
                f"{old_section}.{key} ({value!r}) and {new_section}.{key} ({new[key]!r}): the setting moved "
                f"to {new_section}.{key}; give it there only"
            )
        new[key] = value
        if warn:
            warnings.warn(
                f"{old_section}.{key} is now {new_section}.{key}; read it from there (update the config)",
                FutureWarning,
                stacklevel=2,
            )
    return moved


class RunConfig(Section):
    """A whole training run."""

    output_dir: str = Field("runs/quickstart", json_schema_extra=RESUME_NEUTRAL)
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
    eval: EvalConfig = Field(EvalConfig(), json_schema_extra=RESUME_NEUTRAL)

    @field_validator("output_dir")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @model_validator(mode="before")
    @classmethod
    def _moved_settings(cls, data: Any) -> Any:
        return move_renamed_settings(data)

    @model_validator(mode="after")
    def _designer_is_offline(self) -> RunConfig:
        if self.online is not None and self.designer.enabled:
            raise ValueError(
                "designer: designer rewards feed offline losses (UPO, MODPO); the online loop optimises "
                'online.reward (a reward spec, or a "pkg.module:function" callable that combines several)'
            )
        return self

    @model_validator(mode="after")
    def _offline_sections_unset_online(self) -> RunConfig:
        """The online loop takes its objective from ``online.method``: a loss or aggregator setting
        would be ignored, so one that differs from its default is refused, naming it. (A saved run
        config writes these sections out with their defaults, and loads back.)"""
        if self.online is None:
            return self
        for path in marked_fields(RunConfig, OFFLINE_ONLY):
            section, key = path.split(".")
            value = getattr(getattr(self, section), key)
            if value != type(getattr(self, section)).model_fields[key].default:
                raise ValueError(
                    f"{path}: an offline-loop setting; this run has an online section, whose objective is "
                    f"online.method (remove the {path} setting)"
                )
        for name in OFFLINE_ONLY_SECTIONS:
            section = getattr(self, name)
            defaults = type(section)().model_dump()
            changed = [key for key, value in section.model_dump().items() if defaults.get(key) != value]
            if changed:
                raise ValueError(
                    f"{name}.{changed[0]}: the {name} section is for offline runs; this run has an online "
                    "section, whose objective is online.method (remove the "
                    f"{', '.join(f'{name}.{key}' for key in changed)} setting)"
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
        _check_aggregator(spec, self.aggregator, self.train.coupling_scope)
        _check_grouping(
            spec, self.loss, self.aggregator, self.train.coupling_scope, self.data.group_by_length
        )
        if self.train.grad_shares and not spec.terms and not self.train.sft_weight:
            raise ValueError(
                f"train.grad_shares: loss {spec.name!r} is a single term, whose gradient share is always 1; "
                "the shares need a loss that declares its terms (upo, upo_kto) or train.sft_weight > 0"
            )
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
            "batch only; set train.coupling_scope=global"
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


def _check_grouping(
    loss_spec, loss: LossConfig, section: AggregatorConfig, coupling_scope: str, group_by_length: bool
) -> None:
    """Grouping by length regroups the micro-batches; under micro-batch coupling those are the coupled
    sets, so the objective would change with the data's lengths."""
    from distalign.losses.aggregators import get_aggregator

    if not group_by_length or coupling_scope != "micro_batch":
        return
    if loss_spec.is_batch_coupled(loss.loss_options()) or get_aggregator(section.name).batch_coupled:
        raise ValueError(
            "data.group_by_length: with train.coupling_scope=micro_batch the micro-batches are the coupled "
            f"sets of {loss_spec.name!r} x {section.name!r}, and grouping by length would change which "
            "rows are coupled; use train.coupling_scope=global (exact over the whole batch) or turn "
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
