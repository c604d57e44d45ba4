"""Shared settings for the f-DPG tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def single_thread_torch():
    """Tensors here are tiny: one intra-op thread is as fast and does not fight parallel test runs."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
