"""Pure loss functions and the loss registry.

Importing this package registers every built-in loss and aggregator; ``distalign.losses.LOSSES`` and
``distalign.losses.AGGREGATORS`` list them.
"""

from distalign.losses import aggregators, aot, kto, listwise, preference, robust, upo  # noqa: F401  (registration side effects)
from distalign.losses.aggregators import AGGREGATORS, get_aggregator, register_aggregator
from distalign.losses.base import (
    LOSSES,
    ListwiseStats,
    LossResult,
    LossSpec,
    PairedStats,
    PerExampleLosses,
    UnpairedStats,
    get_loss,
    register_loss,
)

__all__ = [
    "AGGREGATORS",
    "LOSSES",
    "ListwiseStats",
    "LossResult",
    "LossSpec",
    "PairedStats",
    "PerExampleLosses",
    "UnpairedStats",
    "get_aggregator",
    "get_loss",
    "register_aggregator",
    "register_loss",
]
