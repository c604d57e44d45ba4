"""The ``eval`` config section: how ``distalign eval`` generates and scores."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class EvalConfig(BaseModel):
    """Settings of ``distalign eval`` for a run."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)
