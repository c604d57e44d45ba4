"""Deterministic global-batch plans.

A plan maps an optimizer step to the row indices of its *global* batch, independently of how many
processes or micro-batches execute it. That makes three things exact: resuming (step ``k`` always
gets the same rows), 1-process vs N-process equivalence (same rows, different split), and
batch-coupled losses (the coupled set is the global batch by construction).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


def _permutation(size: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(size, generator=generator).tolist()


@dataclass
class _Stream:
    """An endless stream of indices: epoch after epoch, each a fresh seeded permutation."""

    indices: list[int]
    seed: int
    _cache: dict[int, list[int]] = field(default_factory=dict)

    def take(self, start: int, count: int) -> list[int]:
        size = len(self.indices)
        taken = []
        for position in range(start, start + count):
            epoch, offset = divmod(position, size)
            if epoch not in self._cache:
                self._cache = {epoch: _permutation(size, self.seed, epoch)}  # keep one epoch in memory
            taken.append(self.indices[self._cache[epoch][offset]])
        return taken


class BatchPlan:
    """Global batches of ``batch_size`` rows drawn epoch by epoch in a seeded order.

    With ``labels`` (unpaired data), every batch is stratified so both sides are non-empty: it takes
    ``round(batch_size * share)`` positives (at least 1, at most ``batch_size - 1``) from a stream of
    positives and the rest from a stream of negatives, ``share`` being the positive fraction of the data.
    """

    def __init__(self, num_rows: int, batch_size: int, seed: int, labels: list[float] | None = None) -> None:
        if num_rows == 0:
            raise ValueError("no training rows left after loading and tokenisation")
        self.num_rows = num_rows
        self.batch_size = batch_size
        self.seed = seed
        self.positives_per_batch: int | None = None
        if labels is None:
            self._streams = [_Stream(list(range(num_rows)), seed)]
            return
        positives = [i for i, label in enumerate(labels) if label > 0.5]
        negatives = [i for i, label in enumerate(labels) if label <= 0.5]
        if not positives or not negatives:
            raise ValueError(
                f"unpaired training needs both positive and negative rows; got {len(positives)} positive "
                f"and {len(negatives)} negative"
            )
        if batch_size < 2:
            raise ValueError(
                "unpaired training needs train.batch_size >= 2 to hold a positive and a negative"
            )
        share = len(positives) / num_rows
        self.positives_per_batch = min(batch_size - 1, max(1, round(batch_size * share)))
        self._streams = [_Stream(positives, seed), _Stream(negatives, seed + 1)]

    def steps_for_epochs(self, epochs: float) -> int:
        return max(1, math.ceil(epochs * self.num_rows / self.batch_size))

    def global_batch(self, step: int) -> list[int]:
        """Row indices of optimizer step ``step`` (1-based)."""
        if self.positives_per_batch is None:
            return self._streams[0].take((step - 1) * self.batch_size, self.batch_size)
        n_pos = self.positives_per_batch
        n_neg = self.batch_size - n_pos
        rows = self._streams[0].take((step - 1) * n_pos, n_pos) + self._streams[1].take(
            (step - 1) * n_neg, n_neg
        )
        order = _permutation(len(rows), self.seed + 2, step)  # mix sides across processes and micro-batches
        return [rows[i] for i in order]


def split_for_process(
    rows: list[int],
    rank: int,
    world_size: int,
    micro_batch_size: int,
    lengths: list[int] | None = None,
) -> list[list[int]]:
    """This process's micro-batches of a global batch (contiguous shard, then consecutive chunks).

    With ``lengths`` (one per row: the longest sequence the row puts in a forward pass), the
    micro-batches are formed from rows of similar length instead: the global batch sorted longest
    first (ties in plan order) and cut into micro-batches, dealt to the processes in turn, so each
    process gets long and short ones alike. Either way the global batch keeps exactly its rows; only
    the split changes.

    Raises if the global batch does not divide into equal micro-batches on every process: every
    process must run the same number of backward passes for gradient synchronisation.
    """
    per_process, remainder = divmod(len(rows), world_size)
    if remainder or per_process % micro_batch_size:
        raise ValueError(
            f"train.batch_size ({len(rows)}) must be divisible by train.micro_batch_size ({micro_batch_size}) "
            f"x number of processes ({world_size})"
        )
    if lengths is not None:
        if len(lengths) != len(rows):
            raise ValueError(f"{len(lengths)} lengths for {len(rows)} rows")
        order = sorted(range(len(rows)), key=lambda i: -lengths[i])
        chunks = [
            [rows[i] for i in order[start : start + micro_batch_size]]
            for start in range(0, len(rows), micro_batch_size)
        ]
        return chunks[rank::world_size]
    shard = rows[rank * per_process : (rank + 1) * per_process]
    return [shard[i : i + micro_batch_size] for i in range(0, per_process, micro_batch_size)]
