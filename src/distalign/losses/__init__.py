"""Pure loss functions and the loss registry.

Importing this package registers every built-in loss; ``distalign.losses.LOSSES`` lists them.
"""

from distalign.losses import aot, preference  # noqa: F401  (registration side effects)
from distalign.losses.base import (
    LOSSES,
    LossResult,
    LossSpec,
    PairedStats,
    UnpairedStats,
    get_loss,
    register_loss,
)

__all__ = ["LOSSES", "LossResult", "LossSpec", "PairedStats", "UnpairedStats", "get_loss", "register_loss"]
