"""Wall-clock seconds per phase of a training step, logged as ``time/<phase>``.

Kernels on a CUDA device run asynchronously: a phase's clock would stop while its work is still queued
and the next phase would be billed for it. The timer therefore synchronises the device before reading
the clock, on CUDA only (elsewhere the work is done when the call returns, and a synchronisation would
cost for nothing).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from distalign.train.engine import Engine


class PhaseTimer:
    """Accumulates seconds per named phase; ``with timer("sample"): ...`` adds that block's wall time.

    A phase entered several times in one step sums; :meth:`reset` starts the next step. Nested phases
    are allowed (an outer ``step`` around inner phases).
    """

    def __init__(self, device: torch.device | str, phases: tuple[str, ...] = ()) -> None:
        self.device = torch.device(device)
        self.phases = phases
        self.seconds: dict[str, float] = {}
        self.reset()

    def reset(self) -> None:
        """Forget the previous step; ``phases`` start at 0 s so they are logged even when they do not run."""
        self.seconds = dict.fromkeys(self.phases, 0.0)

    def _clock(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = self._clock()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + self._clock() - start

    def metrics(self, prefix: str = "time/") -> dict[str, float]:
        """``{prefix + phase: seconds}`` of the current step."""
        return {prefix + phase: seconds for phase, seconds in self.seconds.items()}


def slowest_process(engine: Engine, seconds: dict[str, float]) -> dict[str, float]:
    """Per key, the largest value over the processes (every process passes the same keys, in order):
    a step's phase takes as long as its slowest process, which the others wait for at the next gather."""
    if engine.world_size == 1:
        return seconds
    values = engine.gather_varlen(
        torch.tensor(list(seconds.values()), dtype=torch.float64, device=engine.device)
    )
    return dict(zip(seconds, values.cpu().view(engine.world_size, -1).amax(dim=0).tolist()))
