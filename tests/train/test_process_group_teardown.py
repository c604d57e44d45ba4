"""The engine tears a process group down before interpreter finalisation (see its docstring)."""

from __future__ import annotations

import torch.distributed as dist

from distalign.train.distributed import destroy_process_group_if_initialized


def test_destroys_an_initialized_group_and_is_idempotent():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    assert dist.is_initialized()
    destroy_process_group_if_initialized()
    assert not dist.is_initialized()
    destroy_process_group_if_initialized()  # nothing left to destroy: a no-op, not an error
