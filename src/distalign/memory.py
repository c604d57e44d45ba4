"""Handing memory that a finished phase freed back to the operating system.

PyTorch's CPU tensors come from ``malloc``. glibc keeps what is freed for reuse: blocks above its mmap
threshold go straight back, but the threshold is dynamic (it rises to the size of each such block freed,
up to 32 MiB), so after a first training step most activations come from the heap, and a heap only
shrinks from its top. After SmolLM2's training the process kept 1-6 GB of freed activations resident
(``docs/benchmarks.md``, "Demo memory"). The next training run reuses that memory, but models loaded
afterwards (separate mappings) come on top of it.

:func:`release_freed_memory` returns every free page glibc holds (``malloc_trim(0)``, which also frees
whole pages inside the heap, not only at its top). Call it between phases, not inside a loop: pages
handed back are faulted in again when memory is next needed. Measured on SmolLM2 LoRA training (3 steps
of 16 pairs in micro-batches of 4, 2-core virtual machine): a trim after every step took 3.6x the CPU
time and did not lower the step's peak; a fixed 1 MiB mmap threshold (``mallopt``) lowered it (2.0 GB
instead of 3.2 GB) but took 20-50 % more CPU time, since every large tensor is then mapped and
faulted in afresh. Neither is used; smaller micro-batches lower the peak for much less.

On other C libraries (musl, macOS, Windows) only the garbage collection runs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """glibc's handle, or None when this process runs on another C library."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018 (only glibc has it)
        libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def release_freed_memory() -> bool:
    """Collect garbage (objects only reference cycles kept alive, such as a model and its hooks, are
    freed), then return the allocator's free pages to the operating system. Returns whether glibc did."""
    gc.collect()
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
