"""Project-wide test isolation: a private distalign cache per session and an offline hub."""

from __future__ import annotations

import os

# Before anything imports torch: idle OpenMP threads sleep instead of spinning, which keeps the
# suite fast when other jobs share the cores (the CLI sets the same default).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_distalign_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Tests (and the subprocesses they start) never touch ~/.cache and never wait on the network.

    The cache is shared within the session so the tiny model is built once.
    """
    monkeypatch.setenv("DISTALIGN_CACHE", str(tmp_path_factory.getbasetemp() / "distalign-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def single_thread_torch():
    """One intra-op thread for a module of tiny-tensor tests: as fast, and it does not fight parallel
    test runs for the cores. Directories of such tests request it from an autouse fixture."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
