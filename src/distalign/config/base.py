"""The one base class of every config section, and field types several sections share."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict


def _yaml_on_off(value: Any) -> Any:
    # YAML reads a bare on/off as true/false; for a three-way switch they can only mean "on"/"off".
    if isinstance(value, bool):
        return "on" if value else "off"
    return value


#: "auto" | "on" | "off", accepting YAML's on/off booleans.
ChatTemplateMode = Annotated[Literal["auto", "on", "off"], BeforeValidator(_yaml_on_off)]


def _yaml_no(value: Any) -> Any:
    # YAML reads a bare `no` as false: `train.mixed_precision=no` means "no" mixed precision.
    return "no" if value is False else value


#: "auto" | "no" | "bf16" | "fp16", accepting YAML's `no` (false).
MixedPrecisionMode = Annotated[Literal["auto", "no", "bf16", "fp16"], BeforeValidator(_yaml_no)]


class Section(BaseModel):
    """A config section: unknown keys are refused (naming the field path), assignments are validated,
    and each field's docstring is its documentation."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


#: Marks a field (``Field(..., json_schema_extra=RESUME_NEUTRAL)``) that may differ between a run's
#: checkpoints and the run resuming them: bookkeeping that never enters a computation (where the run
#: lives, logging, checkpoint cadence, the ``eval`` section), or a knob that trades memory for compute
#: while computing the same objective (micro-batches, packing, length grouping, gradient
#: checkpointing, compilation, the coupling strategy, reference precomputation). Every other field
#: changes the result and must match on resume (``distalign.train.checkpoints``).
RESUME_NEUTRAL = {"resume_neutral": True}


#: Marks a field that only the offline loop reads (how a loss's batch is coupled, the SFT term): an
#: online run, whose objective is ``online.method``, refuses it when it is not at its default.
OFFLINE_ONLY = {"offline_only": True}


def marked_fields(model: type[BaseModel], marker: dict[str, bool], prefix: str = "") -> tuple[str, ...]:
    """The dotted paths of the fields in ``model`` and its sections whose ``json_schema_extra`` carries
    ``marker`` (:data:`RESUME_NEUTRAL`, :data:`OFFLINE_ONLY`)."""
    (key,) = marker
    found: list[str] = []
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        extra = info.json_schema_extra
        if isinstance(extra, dict) and extra.get(key):
            found.append(path)
            continue
        for section in _section_classes(info.annotation):
            found.extend(marked_fields(section, marker, f"{path}."))
    return tuple(found)


def resume_neutral_fields(model: type[BaseModel], prefix: str = "") -> tuple[str, ...]:
    """The dotted paths of the fields marked :data:`RESUME_NEUTRAL` in ``model`` and its sections."""
    return marked_fields(model, RESUME_NEUTRAL, prefix)


def _section_classes(annotation: Any) -> list[type[BaseModel]]:
    """The config sections a field's type names (``LoraConfig``, ``OnlineConfig | None``, ...)."""
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [c for arg in typing.get_args(annotation) for c in _section_classes(arg)]
