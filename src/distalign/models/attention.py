"""Which scaled-dot-product-attention kernels the training loops let PyTorch use on a GPU.

PyTorch prefers cuDNN's attention kernel on recent NVIDIA GPUs (Hopper). cuDNN builds an execution
graph for every new combination of tensor shapes, and training batches change shape with nearly every
micro-batch (mixed lengths, padded or packed). Profiled on an H200 (``benchmarks/profile_step.py``:
Qwen2-0.5B shape, mixed-length pairs up to 2048 tokens, micro-batches of 2 pairs, transformers' SDPA
attention), the host spent 3.1 ms in each cuDNN attention forward and 2.5 ms in each backward, about
0.5 s of a 0.9 s DPO step, with the GPU idle meanwhile; TRL's DPOTrainer paid the same. The flash and
memory-efficient kernels need no per-shape set-up, so the loops run with those (and the math kernel
as the last resort) and cuDNN's is left out.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch

P = ParamSpec("P")
R = TypeVar("R")


def without_cudnn_attention(function: Callable[P, R]) -> Callable[P, R]:
    """Run ``function`` with cuDNN's SDPA kernel disabled on CUDA (flash, memory-efficient and math
    stay available); the previous kernel settings are restored afterwards. No effect without CUDA or
    on a torch too old to choose kernels (< 2.3, which did not prefer cuDNN's)."""

    @functools.wraps(function)
    def wrapped(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel
        except ImportError:
            return function(*args, **kwargs)
        if not torch.cuda.is_available():
            return function(*args, **kwargs)
        kernels = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
        with sdpa_kernel(kernels):
            return function(*args, **kwargs)

    return wrapped
