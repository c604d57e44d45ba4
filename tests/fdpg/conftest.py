"""Shared settings for the f-DPG tests."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread(single_thread_torch):
    """Every module here runs on tiny tensors or the tiny model (see the root conftest)."""
