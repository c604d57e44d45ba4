"""The contract every offline loss meets, and the loss registry.

A registered loss is a pure function from per-sequence statistics of a batch to **per-example
losses** ``[N]`` plus a dict of scalar metrics (:class:`PerExampleLosses`). It never sees a model, a
config object or a reduction: reducing ``[N] -> []`` is the job of a registered *aggregator*
(:mod:`distalign.losses.aggregators`: weighted mean, CVaR, ...), so any loss composes with any
aggregator (verl keeps ``agg_loss`` apart from its losses; torchtune's DPO loss returns per-example
losses).

* Decomposable combinations (a per-example loss under the weighted mean) may be evaluated on any
  micro-batch and weighted by its share of the global batch.
* Batch-coupled combinations (AOT sorts across the batch, KTO anchors on a batch KL estimate, CVaR and
  DRO aggregators reweight across it) are evaluated on the *global* optimizer batch: the loop gathers
  the detached statistics of every micro-batch and rank, differentiates the objective with respect to
  those statistics, and back-propagates the per-sample surrogate ``sum_i dL/ds_i * s_i`` whose
  parameter gradient equals that of the global objective exactly (``train/coupling.py``).

Statistics carry, besides the log-probs, three kinds of declared per-row data: ``weights`` (always a
tensor inside the training loop, ones by default), ``signals`` (data columns such as designer rewards,
``source`` or ``group`` codes; constants) and ``heads`` (outputs of model heads such as a value head;
they carry gradient like the log-probs). A loss declares the signals and heads it needs; the loop
checks them before the first step.

Keyword-only parameters of a loss function are its options; their defaults are the single source of
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

DataKind = Literal["paired", "unpaired", "listwise"]

#: Flattened names of the per-row dict fields: ``signals.<name>`` and ``heads.<name>``.
SIGNAL_PREFIX = "signals."
HEAD_PREFIX = "heads."


def check_positive(name: str, value: float) -> None:
    """Raise ValueError naming the option ``name`` unless ``value`` > 0 (a loss or aggregator option)."""
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def checked_weights(losses: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``weights`` detached, in the losses' dtype, after checking both are [N] of one shape."""
    if losses.dim() != 1 or weights.shape != losses.shape:
        raise ValueError(
            f"expected per-example losses [N] and weights [N], got {tuple(losses.shape)} and "
            f"{tuple(weights.shape)}"
        )
    return weights.detach().to(losses.dtype)


def weighted_mean(losses: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum(w l) / sum(w)``; [N], [N] -> []. All-zero weights give 0 (with zero gradient), not NaN."""
    weights = checked_weights(losses, weights)
    total = weights.sum().clamp(min=torch.finfo(losses.dtype).tiny)
    return (weights * losses).sum() / total


@dataclass
class PairedStats:
    """Per-pair sequence statistics; every tensor has shape [N].

    ``*_logps`` are log-probabilities summed over completion tokens (natural log, nats);
    ``*_lengths`` are completion token counts (float). ``ref_*`` are ``None`` for reference-free losses.
    ``weights`` are optional per-row weights (None = all 1); ``signals`` / ``heads``: see the module
    docstring.
    """

    policy_chosen_logps: torch.Tensor
    policy_rejected_logps: torch.Tensor
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor
    ref_chosen_logps: torch.Tensor | None = None
    ref_rejected_logps: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    signals: dict[str, torch.Tensor] = field(default_factory=dict)
    heads: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.policy_chosen_logps.shape[0]


@dataclass
class UnpairedStats:
    """Per-sequence statistics of unpaired (prompt, completion, label) rows; tensors of shape [N].

    ``labels`` is 1.0 for desirable / positive completions and 0.0 for undesirable / negative ones.
    ``kl_policy_logps`` / ``kl_ref_logps`` ([N], detached) are log-probs of *mismatched* prompt and
    completion pairs, used by KTO's reference point; ``None`` when the loss does not need them.
    """

    policy_logps: torch.Tensor
    lengths: torch.Tensor
    labels: torch.Tensor
    ref_logps: torch.Tensor | None = None
    kl_policy_logps: torch.Tensor | None = None
    kl_ref_logps: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    signals: dict[str, torch.Tensor] = field(default_factory=dict)
    heads: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.policy_logps.shape[0]


@dataclass
class ListwiseStats:
    """Statistics of listwise rows (a prompt with up to K scored responses); tensors [N, K].

    Rows with fewer than K responses are padded: ``present`` is 1.0 for a real response and 0.0 for
    padding (whose log-probs, lengths and scores are 0 and must be ignored). ``scores`` are the data's
    scores (higher is better). ``weights`` / ``signals`` / ``heads`` are per row, [N].
    """

    policy_logps: torch.Tensor
    lengths: torch.Tensor
    scores: torch.Tensor
    present: torch.Tensor
    ref_logps: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    signals: dict[str, torch.Tensor] = field(default_factory=dict)
    heads: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.policy_logps.shape[0]


Stats = PairedStats | UnpairedStats | ListwiseStats

#: Fields through which gradients flow (the policy's own log-probs, and every head output);
#: everything else is a constant.
GRAD_FIELDS = ("policy_chosen_logps", "policy_rejected_logps", "policy_logps")


def carries_gradient(flat_name: str) -> bool:
    """Whether the flattened field ``flat_name`` (see :func:`stats_fields`) depends on the parameters."""
    return flat_name in GRAD_FIELDS or flat_name.startswith(HEAD_PREFIX)


def stats_fields(stats: Stats) -> dict[str, torch.Tensor]:
    """Every non-``None`` per-row tensor of ``stats`` by flat name (``signals.x`` and ``heads.y`` for
    the dict fields): the form in which statistics are concatenated, gathered and linearised."""
    flat: dict[str, torch.Tensor] = {}
    for f in dataclasses.fields(stats):
        value = getattr(stats, f.name)
        if isinstance(value, dict):
            flat.update({f"{f.name}.{key}": tensor for key, tensor in value.items()})
        elif value is not None:
            flat[f.name] = value
    return flat


def stats_from_fields(kind: type, flat: dict[str, torch.Tensor]) -> Stats:
    """Inverse of :func:`stats_fields` for statistics of type ``kind``."""
    plain = {name: tensor for name, tensor in flat.items() if "." not in name}
    signals = {n.removeprefix(SIGNAL_PREFIX): t for n, t in flat.items() if n.startswith(SIGNAL_PREFIX)}
    heads = {n.removeprefix(HEAD_PREFIX): t for n, t in flat.items() if n.startswith(HEAD_PREFIX)}
    return kind(**plain, signals=signals, heads=heads)


def row_weights(stats: Stats) -> torch.Tensor:
    """``stats.weights``, or ones when they are None; shape [N], dtype of the log-probs."""
    reference = stats.policy_chosen_logps if isinstance(stats, PairedStats) else stats.policy_logps
    if stats.weights is None:
        return torch.ones(len(stats), dtype=reference.dtype, device=reference.device)
    return stats.weights.to(reference.dtype)


@dataclass
class PerExampleLosses:
    """What a registered loss returns. ``losses``: [N], one value per row of the batch (gradient flows
    through it); ``metrics``: detached scalar tensors. ``terms``: for a loss that is a sum of named
    parts (declared with ``register_loss(terms=...)``), each part per row, [N] with gradient, summing to
    ``losses``; empty for a loss of one part. The loop reads them only to split the gradient by part
    (``train.grad_shares``)."""

    losses: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    terms: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class LossResult:
    """A reduced objective: ``loss`` scalar over the batch given, ``metrics`` detached scalars and, for
    stateful aggregators, the aggregator ``state`` after this batch (``None`` otherwise).
    ``per_example`` ([N]) is what the aggregator reduced and ``terms`` its named parts per row (they sum
    to it); both are set by the training objective and carry gradient."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    state: dict[str, torch.Tensor] | None = None
    per_example: torch.Tensor | None = None
    terms: dict[str, torch.Tensor] = field(default_factory=dict)


LossFunction = Callable[..., PerExampleLosses]


@dataclass(frozen=True)
class LossSpec:
    """A registered loss and the capabilities the training loop must honour.

    ``aggregators``: the aggregators this loss composes with (``None`` = every one); a coupled loss
    whose per-example values only mean something under the weighted mean lists ``("mean",)`` and says
    why in ``aggregator_note``. ``signals`` / ``heads``: per-row signals and model heads it reads.
    ``coupled_by``: options that, when set, make an otherwise per-example loss batch-coupled.
    ``needs_kl_pairs``: the loss reads ``kl_policy_logps`` / ``kl_ref_logps`` (KTO's mismatched pairs).
    ``terms``: the names of the parts the loss returns per row (:attr:`PerExampleLosses.terms`), each
    ``family/part`` (UPO: ``upo/preference``, ``upo/aux``, ``upo/value``); empty for a loss of one part.
    """

    name: str
    function: LossFunction
    data_kind: DataKind
    needs_reference: bool
    batch_coupled: bool
    paper: str
    aggregators: tuple[str, ...] | None = None
    aggregator_note: str = ""
    signals: tuple[str, ...] = ()
    heads: tuple[str, ...] = ()
    coupled_by: tuple[str, ...] = ()
    needs_kl_pairs: bool = False
    terms: tuple[str, ...] = ()

    def is_batch_coupled(self, options: dict[str, Any]) -> bool:
        """Whether the loss couples the batch with these options: always when ``batch_coupled``, else
        when one of the ``coupled_by`` options is set (e.g. UPO's batch-normalised weights)."""
        return self.batch_coupled or any(options.get(name) for name in self.coupled_by)

    @property
    def options(self) -> dict[str, Any]:
        """Option names and their defaults (the function's keyword-only parameters)."""
        params = inspect.signature(self.function).parameters.values()
        return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}

    def accepts_aggregator(self, name: str) -> bool:
        return self.aggregators is None or name in self.aggregators

    def per_example(self, stats: Stats, **options: Any) -> PerExampleLosses:
        """The per-example losses of ``stats``, the loss's metrics and its declared terms."""
        result = self.function(stats, **options)
        if set(result.terms) != set(self.terms):
            raise ValueError(
                f"loss {self.name!r} declares the terms {list(self.terms)} but returned {list(result.terms)}"
            )
        return result

    def __call__(self, stats: Stats, **options: Any) -> LossResult:
        """The loss reduced by the default aggregator, the (weighted) mean: a convenience for callers
        with their own loop. The training loop composes with the configured aggregator instead."""
        result = self.function(stats, **options)
        return LossResult(weighted_mean(result.losses, row_weights(stats)), result.metrics)


def example_stats(spec: LossSpec) -> Stats:
    """Two rows of made-up float64 statistics of ``spec``'s data kind (with its declared heads and its
    exactly named numeric signals), for checking option values at config time by calling the loss once."""
    values = torch.tensor([-1.5, -2.5], dtype=torch.float64)
    lengths = torch.tensor([3.0, 4.0], dtype=torch.float64)
    extra = {
        "heads": {name: torch.zeros(2, dtype=torch.float64) for name in spec.heads},
        "signals": {
            name: torch.tensor([0.5, -0.5], dtype=torch.float64)
            for name in spec.signals
            if not name.endswith("*") and name not in ("source", "group")
        },
    }
    if spec.data_kind == "paired":
        return PairedStats(values, values - 1, lengths, lengths, values - 0.5, values - 0.5, **extra)
    if spec.data_kind == "unpaired":
        labels = torch.tensor([1.0, 0.0], dtype=torch.float64)
        return UnpairedStats(values, lengths, labels, values - 0.5, values.flip(0), values.flip(0), **extra)
    grid = torch.stack([values, values - 1], dim=1)
    ones = torch.ones(2, 2, dtype=torch.float64)
    return ListwiseStats(grid, ones, torch.tensor([[1.0, 0.0], [0.0, 1.0]]), ones, grid - 0.5, **extra)


LOSSES: Registry[LossSpec] = Registry("loss")


def register_loss(
    name: str,
    *,
    data_kind: DataKind,
    needs_reference: bool,
    batch_coupled: bool = False,
    paper: str = "",
    aggregators: tuple[str, ...] | None = None,
    aggregator_note: str = "",
    signals: tuple[str, ...] = (),
    heads: tuple[str, ...] = (),
    coupled_by: tuple[str, ...] = (),
    needs_kl_pairs: bool = False,
    terms: tuple[str, ...] = (),
) -> Callable[[LossFunction], LossFunction]:
    """Register ``fn(stats, *, option=default, ...) -> PerExampleLosses`` under ``name``."""

    def decorator(fn: LossFunction) -> LossFunction:
        LOSSES.add(
            name,
            LossSpec(
                name=name,
                function=fn,
                data_kind=data_kind,
                needs_reference=needs_reference,
                batch_coupled=batch_coupled,
                paper=paper,
                aggregators=aggregators,
                aggregator_note=aggregator_note,
                signals=signals,
                heads=heads,
                coupled_by=coupled_by,
                needs_kl_pairs=needs_kl_pairs,
                terms=terms,
            ),
        )
        return fn

    return decorator


def get_loss(name: str) -> LossSpec:
    """The registered loss ``name`` (imports the built-in losses first)."""
    import distalign.losses  # noqa: F401  (registers built-ins)

    return LOSSES.get(name)


def format_mismatch(loss: str, loss_kind: str, path: str, fmt: str) -> str:
    """Why ``loss`` (which trains on ``loss_kind`` rows) cannot train on ``path`` (``fmt`` rows), and the
    losses that can."""
    fitting = [name for name in LOSSES if LOSSES.get(name).data_kind == fmt]
    reason = f"loss {loss!r} trains on {loss_kind} rows but {path} holds {fmt} rows"
    options = []
    if fmt == "paired" and loss_kind == "unpaired":
        options.append("set data.unpair=true to split each pair into a positive and a negative")
    if fitting:
        options.append(f"pick a loss for {fmt} rows (loss.name): {', '.join(fitting)}")
    elif fmt == "prompt":
        options.append(
            "prompt-only rows are for the online loop (an `online` section), which samples completions"
        )
    else:
        options.append(f"no registered loss trains on {fmt} rows")
    return f"{reason}; {'; or '.join(options)}"
