"""Differentiable sorting: the L2-regularised soft sort of Blondel et al. (2020).

Blondel, Teboul, Berthet, Djolonga, "Fast Differentiable Sorting and Ranking", ICML 2020. Hard sorting
of ``theta`` is a linear program over the permutahedron ``P(theta)`` (the convex hull of all
permutations of ``theta``); adding ``(eps / 2) ||y||^2`` turns it into a Euclidean projection:

    soft_sort_eps(theta) = argmin_{y in P(theta)} || y - rho / eps ||^2,    rho = (n, n-1, ..., 1)

which the paper reduces to one isotonic regression: with ``w`` = theta sorted descending,

    soft_sort_eps(theta) = rho / eps - isotonic_decreasing(rho / eps - w)

solved exactly in O(n) by pool-adjacent-violators (PAV). Reading the formula: a run of sorted values
whose consecutive gaps exceed ``1 / eps`` is pooled, and a pooled run comes out evenly spaced with step
``1 / eps`` around its mean; so ``eps`` caps how far apart sorted neighbours can be, and the output is
the hard sort *exactly* once ``eps <= 1 / (largest gap between neighbours)``.

We chose this relaxation over Sinkhorn-based soft sorts (Cuturi et al. 2019) because it is exact (no
inner iterations or tolerance), O(n log n), sum-preserving and order-preserving, and it reaches the
hard sort at a finite ``eps`` rather than only in the limit.

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
            last_sum, last_size = block_sums.pop(), block_sizes.pop()
            block_sums[-1] += last_sum
            block_sizes[-1] += last_size
    block_ids: list[int] = []
    for block_id, size in enumerate(block_sizes):
        block_ids.extend([block_id] * size)
    return block_ids


def _pav_block_ids(targets: torch.Tensor) -> torch.Tensor:
    """PAV blocks of the decreasing isotonic regression of ``targets`` [n], as a long tensor [n]."""
    return torch.tensor(
        _decreasing_isotonic_blocks(targets.detach().double().tolist()), device=targets.device
    )


def _block_means(values: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` [n] over each position's block, shape [n]; differentiable in ``values``."""
    num_blocks = int(block_ids[-1]) + 1
    block_sums = values.new_zeros(num_blocks).index_add(0, block_ids, values)
    block_sizes = torch.bincount(block_ids, minlength=num_blocks).to(values.dtype)
    return (block_sums / block_sizes)[block_ids]


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
    return _block_means(targets, _pav_block_ids(targets))


def soft_sort(values: torch.Tensor, *, strength: float = 1.0, descending: bool = False) -> torch.Tensor:
    """L2-regularised soft sort (Blondel et al. 2020, ``s_{eps Q}``).

    Args:
        values: shape [n], floating point (same units as the output).
        strength: regularisation strength ``eps > 0``, in inverse units of ``values``. Sorted
            neighbours further apart than ``1 / eps`` are pulled together; the output is exactly the
            hard sort once ``eps <= 1 / max_gap`` (so as ``eps -> 0``), and every entry tends to
            ``values.mean()`` as ``eps -> inf``.
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
    # rho = (n, ..., 1): the linear objective hard sorting maximises; the projection target is rho / eps.
    rho = torch.arange(n, 0, -1, device=values.device, dtype=torch.float64)
    block_ids = _pav_block_ids(rho / strength - sorted_descending.detach().double())
    # rho/eps - mean_B(rho/eps - w) rearranged as mean_B(w) + (rho - mean_B(rho)) / eps: the same value
    # without subtracting two numbers of size n / eps, which loses all precision for small eps.
    offsets = ((rho - _block_means(rho, block_ids)) / strength).to(values.dtype)
    result = _block_means(sorted_descending, block_ids) + offsets
    # The permutahedron is symmetric under permutations, so the ascending projection is the reversal.
    return result if descending else result.flip(0)
