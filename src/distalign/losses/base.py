"""The contract every offline loss meets, and the loss registry.

A registered loss is an *objective*: a pure function from per-sequence statistics of a batch to a
scalar loss over that batch plus a dict of scalar metrics. It never sees a model or a config object.

* Decomposable losses (DPO, IPO, ...) return the mean of per-example losses; the training loop may
  call them on any micro-batch and weight by its share of the global batch.
* Batch-coupled losses (AOT sorts across the batch, KTO anchors on a batch KL estimate, DRO
  aggregates across it) declare ``batch_coupled=True``. The loop then evaluates them on the *global*
  optimizer batch: it gathers the detached statistics of every micro-batch and rank, differentiates the
  objective with respect to those scalars, and back-propagates the per-sample surrogate
  ``sum_i dL/ds_i * s_i`` whose parameter gradient equals that of the global objective exactly.

Keyword-only parameters of an objective are its options; their defaults are the single source of
truth and the config forwards only the options the user set (an option the loss does not take is a
config error naming the field).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from distalign.registry import Registry

DataKind = Literal["paired", "unpaired"]


@dataclass
class PairedStats:
    """Per-pair sequence statistics; every tensor has shape [N].

    ``*_logps`` are log-probabilities summed over completion tokens (natural log, nats);
    ``*_lengths`` are completion token counts (float). ``ref_*`` are ``None`` for reference-free losses.
    ``weights`` are optional per-row weights (default 1).
    """

    policy_chosen_logps: torch.Tensor
    policy_rejected_logps: torch.Tensor
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor
    ref_chosen_logps: torch.Tensor | None = None
    ref_rejected_logps: torch.Tensor | None = None
    weights: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.policy_chosen_logps.shape[0]


@dataclass
class UnpairedStats:
    """Per-sequence statistics of unpaired (prompt, completion, label) rows; tensors of shape [N].

    ``labels`` is 1.0 for desirable / positive completions and 0.0 for undesirable / negative ones.
    ``kl_policy_logps`` / ``kl_ref_logps`` ([M], detached) are log-probs of *mismatched* prompt and
    completion pairs, used by KTO's reference point; ``None`` when the loss does not need them.
    """

    policy_logps: torch.Tensor
    lengths: torch.Tensor
    labels: torch.Tensor
    ref_logps: torch.Tensor | None = None
    kl_policy_logps: torch.Tensor | None = None
    kl_ref_logps: torch.Tensor | None = None
    weights: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.policy_logps.shape[0]


Stats = PairedStats | UnpairedStats

#: Fields through which gradients flow (the policy's own log-probs); everything else is constant.
GRAD_FIELDS = ("policy_chosen_logps", "policy_rejected_logps", "policy_logps")


def stats_fields(stats: Stats) -> dict[str, torch.Tensor]:
    """The non-``None`` tensor fields of ``stats`` by name."""
    return {
        f.name: getattr(stats, f.name)
        for f in dataclasses.fields(stats)
        if getattr(stats, f.name) is not None
    }


@dataclass
class LossResult:
    """``loss``: scalar objective over the batch given. ``metrics``: scalar tensors, detached."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


Objective = Callable[..., LossResult]


@dataclass(frozen=True)
class LossSpec:
    """A registered loss and the capabilities the training loop must honour."""

    name: str
    objective: Objective
    data_kind: DataKind
    needs_reference: bool
    batch_coupled: bool
    paper: str

    @property
    def options(self) -> dict[str, Any]:
        """Option names and their defaults (the objective's keyword-only parameters)."""
        params = inspect.signature(self.objective).parameters.values()
        return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}

    def __call__(self, stats: Stats, **options: Any) -> LossResult:
        return self.objective(stats, **options)


LOSSES: Registry[LossSpec] = Registry("loss")


def register_loss(
    name: str,
    *,
    data_kind: DataKind,
    needs_reference: bool,
    batch_coupled: bool = False,
    paper: str = "",
) -> Callable[[Objective], Objective]:
    """Register an objective ``fn(stats, *, option=default, ...) -> LossResult`` under ``name``."""

    def decorator(fn: Objective) -> Objective:
        LOSSES.add(
            name,
            LossSpec(
                name=name,
                objective=fn,
                data_kind=data_kind,
                needs_reference=needs_reference,
                batch_coupled=batch_coupled,
                paper=paper,
            ),
        )
        return fn

    return decorator


def get_loss(name: str) -> LossSpec:
    """The registered loss ``name`` (imports the built-in losses first)."""
    import distalign.losses  # noqa: F401  (registers built-ins)

    return LOSSES.get(name)
