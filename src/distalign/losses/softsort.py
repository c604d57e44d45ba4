"""Differentiable sorting: the L2-regularised soft sort of Blondel et al. (2020).

Blondel, Teboul, Berthet, Djolonga, "Fast Differentiable Sorting and Ranking", ICML 2020. Hard sorting
of ``theta`` is a linear program over the permutahedron ``P(theta)`` (the convex hull of all
permutations of ``theta``); adding ``(eps / 2) ||y||^2`` turns it into a Euclidean projection:

    soft_sort_eps(theta) = argmin_{y in P(theta)} || y - rho / eps ||^2,    rho = (n, n-1, ..., 1)

which the paper reduces to one isotonic regression (their Prop. 3): with ``w`` = theta sorted
descending,

    soft_sort_eps(theta) = rho / eps - isotonic_decreasing(rho / eps - w)

solved exactly in O(n) by pool-adjacent-violators (PAV). We chose this relaxation over
Sinkhorn-based soft sorts (Cuturi et al. 2019) because it is exact (no inner iterations or
tolerance), O(n log n), and becomes the hard sort *exactly* once ``eps`` is below the smallest
gap scale of the input, not just in the limit.

Gradients: PAV fixes a partition of the positions into blocks, and the isotonic solution is the
block mean of its input; we compute that mean with differentiable torch ops on a partition found from
detached values, so autograd yields the paper's block-averaging Jacobian (exact almost everywhere).
"""

from __future__ import annotations

import torch


def _decreasing_isotonic_blocks(targets: list[float]) -> list[int]:
    """Block id of each position in the decreasing isotonic regression of ``targets`` (PAV).

    Blocks are maximal runs that share one fitted value (their mean); ids are 0, 1, ... left to right.
    """
    block_sums: list[float] = []
    block_sizes: list[int] = []
    for value in targets:
        block_sums.append(value)
        block_sizes.append(1)
        # A decreasing fit needs mean(previous block) >= mean(last block); pool while violated.
        while len(block_sums) > 1 and block_sums[-2] * block_sizes[-1] < block_sums[-1] * block_sizes[-2]:
            block_sums[-2] += block_sums.pop()
            block_sizes[-2] += block_sizes.pop()
    block_ids: list[int] = []
    for block_id, size in enumerate(block_sizes):
        block_ids.extend([block_id] * size)
    return block_ids


def decreasing_isotonic_regression(targets: torch.Tensor) -> torch.Tensor:
    """``argmin_{v_1 >= ... >= v_n} ||v - targets||^2``, differentiable in ``targets``.

    Args:
        targets: shape [n], floating point.

    Returns:
        shape [n], non-increasing; each entry is the mean of ``targets`` over its PAV block.
    """
    if targets.dim() != 1:
        raise ValueError(f"isotonic regression expects a 1-D tensor, got shape {tuple(targets.shape)}")
    if targets.numel() == 0:
        return targets.clone()
    block_ids = torch.tensor(
        _decreasing_isotonic_blocks(targets.detach().double().tolist()), device=targets.device
    )
    num_blocks = int(block_ids[-1]) + 1
    block_sums = targets.new_zeros(num_blocks).index_add(0, block_ids, targets)
    block_sizes = torch.bincount(block_ids, minlength=num_blocks).to(targets.dtype)
    return (block_sums / block_sizes)[block_ids]


def soft_sort(values: torch.Tensor, *, strength: float = 1.0, descending: bool = False) -> torch.Tensor:
    """L2-regularised soft sort (Blondel et al. 2020, soft sort with Q regularisation).

    Args:
        values: shape [n], floating point (same units as the output).
        strength: regularisation strength ``eps > 0``, in the units of ``values``. Values closer than
            about ``eps`` are pooled towards their mean; as ``eps -> 0`` the output is the hard sort
            (exactly, once ``eps`` is small against the gaps), as ``eps -> inf`` every entry tends to
            ``values.mean()``.
        descending: order of the output; ascending by default, like ``torch.sort``.

    Returns:
        shape [n]: sorted (weakly) in the requested order, with the same sum as ``values``
        (the output lies in the permutahedron of ``values``). Differentiable almost everywhere.
    """
    if values.dim() != 1:
        raise ValueError(f"soft_sort expects a 1-D tensor, got shape {tuple(values.shape)}")
    if not strength > 0:
        raise ValueError(f"soft_sort strength must be > 0 (use a hard sort for 0), got {strength}")
    n = values.numel()
    if n == 0:
        return values.clone()
    sorted_descending = torch.sort(values, descending=True).values
    # rho / eps, rho = (n, ..., 1): the linear objective that hard sorting maximises, scaled by 1/eps.
    anchor = torch.arange(n, 0, -1, device=values.device, dtype=values.dtype) / strength
    result = anchor - decreasing_isotonic_regression(anchor - sorted_descending)
    # The permutahedron is symmetric under permutations, so the ascending projection is the reversal.
    return result if descending else result.flip(0)
