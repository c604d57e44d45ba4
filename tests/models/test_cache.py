"""Build-once cache directories: reuse, atomicity, races, incomplete leftovers."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from distalign.cache import COMPLETE_MARKER, build_once, cache_root, is_complete, settings_key


def test_cache_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTALIGN_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "explicit") == tmp_path / "explicit"
    monkeypatch.delenv("DISTALIGN_CACHE")
    assert cache_root() == Path.home() / ".cache" / "distalign"


def test_settings_key_ignores_order_and_sees_values():
    assert settings_key({"a": 1, "b": 2}) == settings_key({"b": 2, "a": 1})
    assert settings_key({"a": 1}) != settings_key({"a": 2})


def test_builds_once_then_reuses(tmp_path):
    calls = []

    def build(directory: Path) -> None:
        calls.append(directory)
        (directory / "payload.txt").write_text("hello")

    target = tmp_path / "artifact"
    assert build_once(target, build) == target
    assert build_once(target, build) == target
    assert len(calls) == 1 and calls[0] != target  # built in a staging directory, then renamed
    assert (target / "payload.txt").read_text() == "hello" and is_complete(target)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["artifact"]


def test_failed_build_leaves_nothing_behind(tmp_path):
    def failing_build(directory: Path) -> None:
        (directory / "half.txt").write_text("partial")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        build_once(tmp_path / "artifact", failing_build)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_incomplete_directory_is_rebuilt(tmp_path):
    target = tmp_path / "artifact"
    target.mkdir()
    (target / "stale.txt").write_text("left by an interrupted copy")
    build_once(target, lambda directory: (directory / "fresh.txt").write_text("new"))
    assert not (target / "stale.txt").exists() and (target / "fresh.txt").exists() and is_complete(target)


def test_concurrent_callers_build_once(tmp_path):
    calls = []

    def slow_build(directory: Path) -> None:
        calls.append(1)
        time.sleep(0.2)
        (directory / "payload.txt").write_text("done")

    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(build_once(tmp_path / "artifact", slow_build)))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and len(set(results)) == 1 and len(results) == 4
    assert (tmp_path / "artifact" / "payload.txt").read_text() == "done"


def test_losing_a_rename_race_keeps_the_winner(tmp_path):
    """Where locks do not work, a writer that finishes second discards its copy and uses the winner's."""
    target = tmp_path / "artifact"

    def build_while_another_process_publishes(directory: Path) -> None:
        (directory / "payload.txt").write_text("mine")
        target.mkdir()
        (target / "payload.txt").write_text("theirs")
        (target / COMPLETE_MARKER).write_text("ok\n")

    assert build_once(target, build_while_another_process_publishes) == target
    assert (target / "payload.txt").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == ["artifact"]


def test_a_model_build_that_wrote_no_weights_is_never_marked_complete(tmp_path):
    """What transformers leaves when it declines to save (not rank 0 of a process group): a tokenizer
    and no model. The build fails, naming the reason, and nothing is cached."""
    from distalign.cache import require_saved_model

    def tokenizer_only(staging: Path) -> None:
        (staging / "tokenizer.json").write_text("{}")
        require_saved_model(staging)

    with pytest.raises(RuntimeError, match="only on rank 0 of a torch.distributed process group"):
        build_once(tmp_path / "model", tokenizer_only)
    assert not (tmp_path / "model").exists()


@pytest.mark.slow
def test_two_processes_build_the_tiny_model_whole_whichever_loads_first(tmp_path, monkeypatch):
    """Rank 1 reaches the policy load 3 s before rank 0 on an empty cache. Built there, under the
    process group, the cached model would have no weights (transformers saves on rank 0 only): the
    engine builds it before the group starts."""
    from distalign_testing.runs import TINY_BASE, torchrun

    monkeypatch.setenv("DISTALIGN_CACHE", str(tmp_path / "cache"))
    probe = str(Path(__file__).parents[1] / "train" / "cache_build_probe.py")
    torchrun([probe, *TINY_BASE, f"output_dir={tmp_path / 'run'}"], timeout=300)
    (built,) = [path for path in (tmp_path / "cache" / "tiny").iterdir() if not path.name.startswith(".")]
    assert (built / "model.safetensors").is_file()
