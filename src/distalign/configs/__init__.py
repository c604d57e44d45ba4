"""Config sections owned by the online loop and the evaluation commands (assembled in ``distalign.config``),
and field types shared by several sections."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator


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
