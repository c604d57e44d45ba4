"""The ``online`` config section: sample -> score -> loss -> step (f-DPG, KL-regularised RL)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class OnlineConfig(BaseModel):
    """Settings of the online loop. Present in a run config => ``distalign train`` runs the online loop."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)
