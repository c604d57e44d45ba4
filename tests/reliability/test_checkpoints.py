"""Checkpoints carry checksums and the run directory carries its config (issue 12, items 1 and 8).

A damaged checkpoint (bytes changed at the same size, truncated, garbled, a file missing) is detected
before anything loads: `train` falls back to the newest intact one, or, when none is, exits 2 naming
them. Re-running `train` into a run directory trained with another config is refused unless
--overwrite-output-dir, which deletes the old run only once the new inputs validated; a finished run of
the same config is left as it is.
Every refusal: exit code 2, one message naming what and why, no traceback, nothing changed on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from distalign_testing.runs import TINY_BASE, final_weights, max_weight_difference, read_metrics

from distalign.cli import main
from distalign.config import load_config
from distalign.train.checkpoints import MANIFEST, config_differences, write_manifest
from distalign.train.offline import train_offline

ARGS = ["train.batch_size=8", "train.micro_batch_size=4", "train.max_steps=6", "train.save_every=2"]


def _config(run_dir: Path, *overrides: str):
    return load_config(None, [*TINY_BASE, f"output_dir={run_dir}", *ARGS, *overrides])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run, and the same run stopped after step 4 (checkpoints step_2 and step_4)."""
    root = tmp_path_factory.mktemp("checkpoint_runs")
    with pytest.MonkeyPatch.context() as patch:  # the isolation of tests/conftest.py (function-scoped there)
        patch.setenv("DISTALIGN_CACHE", str(tmp_path_factory.getbasetemp() / "distalign-cache"))
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("TOKENIZERS_PARALLELISM", "false")
        straight = train_offline(_config(root / "straight"))
        interrupted = train_offline(_config(root / "interrupted"), stop_after_step=4)
    return straight, interrupted


def _copy_run(source: Path, run_dir: Path) -> Path:
    """Copy a run directory, with the output_dir in its config.yaml moved along (as if trained there)."""
    shutil.copytree(source, run_dir)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    saved["output_dir"] = str(run_dir)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    return run_dir


@pytest.fixture
def interrupted(runs, tmp_path) -> Path:
    """A fresh copy of the interrupted run."""
    return _copy_run(runs[1], tmp_path / "run")


def _train(capsys, run_dir: Path, *overrides: str) -> tuple[int, str, str]:
    code = main(["train", *TINY_BASE, f"output_dir={run_dir}", *ARGS, *overrides])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out, captured.err


def _error(err: str) -> str:
    """The one ``distalign: error:`` line of stderr."""
    lines = [line for line in err.splitlines() if line.startswith("distalign: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def _snapshot(run_dir: Path) -> dict[str, str]:
    """Every file below ``run_dir`` with its sha256: equal snapshots = nothing written or removed."""
    return {
        p.relative_to(run_dir).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file()
    }


def _flip_bytes(path: Path) -> None:
    """Change tensor bytes of a safetensors file in place (same size, still a valid file)."""
    data = bytearray(path.read_bytes())
    header = int.from_bytes(data[:8], "little")
    for offset in range(8 + header + 64, 8 + header + 96):
        data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garble(path: Path) -> None:
    path.write_bytes(b"#" * path.stat().st_size)


DAMAGE = {
    "weights_flipped": ("model.safetensors", _flip_bytes, "model.safetensors: sha256 checksum mismatch"),
    "optimizer_truncated": ("optimizer.bin", _truncate, "optimizer.bin has"),
    "loop_state_garbled": ("loop_state.json", _garble, "loop_state.json: sha256 checksum mismatch"),
    "rng_missing": ("random_states_0.pkl", Path.unlink, "random_states_0.pkl is missing"),
    "scheduler_missing": ("custom_checkpoint_0.pkl", Path.unlink, "custom_checkpoint_0.pkl is missing"),
}


def test_every_checkpoint_file_is_in_its_manifest(interrupted):
    for checkpoint in (interrupted / "checkpoints" / "step_2", interrupted / "checkpoints" / "step_4"):
        files = json.loads((checkpoint / MANIFEST).read_text())["files"]
        on_disk = {p.name for p in checkpoint.iterdir()} - {MANIFEST}
        assert set(files) == on_disk >= {"model.safetensors", "optimizer.bin", "loop_state.json"}
        for name, entry in files.items():
            data = (checkpoint / name).read_bytes()
            assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    assert sorted(p.name for p in (interrupted / "checkpoints").iterdir()) == ["step_2", "step_4"]


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_to_the_intact_one(capsys, runs, interrupted, damage):
    name, corrupt, reason = DAMAGE[damage]
    corrupt(interrupted / "checkpoints" / "step_4" / name)
    code, out, err = _train(capsys, interrupted)
    assert code == 0
    assert f"{interrupted / 'checkpoints' / 'step_4'} is damaged" in err and reason in err
    assert f"resuming from {interrupted / 'checkpoints' / 'step_2'}, the newest intact checkpoint" in err
    assert "resumed from step 2" in out
    assert (interrupted / "checkpoints" / "damaged_step_4").is_dir()  # kept for inspection, never resumed
    straight = runs[0]
    assert max_weight_difference(final_weights(straight), final_weights(interrupted)) == 0.0
    assert [r["loss"] for r in read_metrics(interrupted)] == [r["loss"] for r in read_metrics(straight)]


def test_no_intact_checkpoint_exits_2_and_changes_nothing(capsys, interrupted):
    _flip_bytes(interrupted / "checkpoints" / "step_4" / "model.safetensors")
    (interrupted / "checkpoints" / "step_2" / "loop_state.json").write_text("{not json")  # another size
    before = _snapshot(interrupted)
    code, _, err = _train(capsys, interrupted)
    assert code == 2
    err = _error(err)
    assert err.startswith("distalign: error: no intact checkpoint to resume from")
    assert f"{interrupted / 'checkpoints' / 'step_4'} is damaged: model.safetensors: sha256" in err
    assert f"{interrupted / 'checkpoints' / 'step_2'} is damaged: loop_state.json has 9 bytes" in err
    assert "--overwrite-output-dir" in err and f"delete {interrupted / 'checkpoints'}" in err
    assert _snapshot(interrupted) == before


def test_unreadable_manifest_is_damage(capsys, interrupted):
    (interrupted / "checkpoints" / "step_4" / MANIFEST).write_text('{"files": ')
    code, _, err = _train(capsys, interrupted)
    assert code == 0 and f"{MANIFEST} is unreadable" in err and "resuming from" in err


def test_legacy_checkpoint_without_manifest_resumes_with_a_warning(capsys, runs, interrupted):
    for checkpoint in (interrupted / "checkpoints").iterdir():
        (checkpoint / MANIFEST).unlink()
    code, out, err = _train(capsys, interrupted)
    assert code == 0 and "resumed from step 4" in out
    assert f"checkpoint {interrupted / 'checkpoints' / 'step_4'} has no checksums.json" in err
    assert max_weight_difference(final_weights(runs[0]), final_weights(interrupted)) == 0.0


@pytest.mark.parametrize("manifest", ["none", "matching"])
def test_checkpoint_that_fails_to_load_is_a_user_error(capsys, interrupted, manifest):
    """Unloadable bytes the checksums cannot catch: no manifest (legacy), or one written over them."""
    step_4 = interrupted / "checkpoints" / "step_4"
    _truncate(step_4 / "model.safetensors")
    (step_4 / MANIFEST).unlink()
    if manifest == "matching":
        write_manifest(step_4)
    before = _snapshot(interrupted)
    code, _, err = _train(capsys, interrupted)
    assert code == 2
    err = _error(err)
    assert err.startswith(f"distalign: error: checkpoint {step_4} could not be loaded")
    assert ("may be damaged" if manifest == "none" else "passed its checksums") in err
    assert "Delete it to resume from the checkpoint before it" in err
    assert _snapshot(interrupted) == before


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["loss.name=ipo"], "loss.name: dpo -> ipo"),
        (["loss.beta=0.3"], "loss.beta: null -> 0.3"),
        (["aggregator.name=cvar", "aggregator.alpha=0.5"], "aggregator.name: mean -> cvar; aggregator.alpha"),
        (
            ["data.path=builtin:quickstart_listwise.jsonl"],
            "data.path: builtin:quickstart_pairs.jsonl -> builtin:",
        ),
        (["model.lora.enabled=true"], "model.lora.enabled: false -> true"),
        (["train.lr=0.01", "train.seed=1"], "train.seed: 0 -> 1; train.lr: 0.001 -> 0.01"),
        (["train.max_steps=8"], "train.max_steps: 6 -> 8"),
    ],
)
def test_rerun_with_another_config_is_refused_naming_the_fields(capsys, interrupted, overrides, expected):
    before = _snapshot(interrupted)
    code, _, err = _train(capsys, interrupted, *overrides)
    assert code == 2
    assert f"output_dir {interrupted} holds a run trained with a different config" in err
    assert expected in err and "choose a new output_dir, or pass --overwrite-output-dir" in err
    assert _snapshot(interrupted) == before  # config.yaml, checkpoints and metrics untouched


def test_bookkeeping_changes_resume(capsys, runs, interrupted):
    bookkeeping = [
        "train.log_every=3",
        "train.keep_checkpoints=3",
        "train.save_every=1",
        "eval.num_prompts=8",
    ]
    code, out, _ = _train(capsys, interrupted, *bookkeeping)
    assert code == 0 and "resumed from step 4" in out
    assert max_weight_difference(final_weights(runs[0]), final_weights(interrupted)) == 0.0
    saved = yaml.safe_load((interrupted / "config.yaml").read_text())
    assert saved["train"]["log_every"] == 3  # config.yaml records the latest invocation
    assert sorted(p.name for p in (interrupted / "checkpoints").iterdir()) == ["step_2", "step_4", "step_5"]


def test_finished_run_is_left_as_it_is_unless_overwritten(capsys, runs, tmp_path):
    finished = _copy_run(runs[0], tmp_path / "finished")
    before = _snapshot(finished)
    code, _, err = _train(capsys, finished)
    assert code == 0  # nothing to do: a retry of a run killed after it published final/ succeeds
    assert f"already holds the finished run of this config (final model: {finished / 'final'})" in err
    assert "nothing to train" in err and "--overwrite-output-dir" in err
    assert _snapshot(finished) == before
    code, _, err = _train(capsys, finished, "--overwrite-output-dir")
    assert code == 0 and "deleted the earlier run's" in err
    assert max_weight_difference(final_weights(runs[0]), final_weights(finished)) == 0.0


def test_finished_run_is_a_setup_error_through_the_python_api(runs, tmp_path):
    from distalign.errors import SetupError

    finished = _copy_run(runs[0], tmp_path / "finished")
    with pytest.raises(SetupError, match="already holds the finished run"):
        train_offline(_config(finished))


def test_overwrite_starts_a_fresh_run_and_keeps_foreign_files(capsys, interrupted):
    (interrupted / "notes.txt").write_text("mine")
    (interrupted / "checkpoints" / "step_4" / "optimizer.bin").unlink()  # damage does not matter then
    # the flag may stand among the overrides
    code, out, err = _train(
        capsys, interrupted, "loss.name=ipo", "--overwrite-output-dir", "train.max_steps=4"
    )
    assert code == 0 and "resumed" not in out
    assert f"deleted the earlier run's checkpoints, metrics.jsonl, config.yaml in {interrupted}" in err
    saved = yaml.safe_load((interrupted / "config.yaml").read_text())
    assert saved["loss"]["name"] == "ipo" and saved["train"]["overwrite_output_dir"] is False
    assert [r["step"] for r in read_metrics(interrupted)] == [1, 2, 3, 4]
    assert sorted(p.name for p in (interrupted / "checkpoints").iterdir()) == ["step_2"]
    assert (interrupted / "notes.txt").read_text() == "mine" and (interrupted / "final").is_dir()


def test_overwrite_with_bad_data_leaves_the_old_run_intact(capsys, interrupted, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": 3}\n')
    before = _snapshot(interrupted)
    code, _, err = _train(capsys, interrupted, f"data.path={bad}", "--overwrite-output-dir")
    assert code == 2 and "row 2" in err
    assert _snapshot(interrupted) == before


def test_run_files_without_config_yaml_are_refused(capsys, interrupted):
    (interrupted / "config.yaml").unlink()
    before = _snapshot(interrupted)
    code, _, err = _train(capsys, interrupted)
    assert (
        code == 2 and "holds files of an earlier run (checkpoints, metrics.jsonl) but no config.yaml" in err
    )
    assert _snapshot(interrupted) == before


def test_unreadable_config_yaml_is_refused(capsys, interrupted):
    (interrupted / "config.yaml").write_text("loss: [unclosed\n")
    before = _snapshot(interrupted)
    code, _, err = _train(capsys, interrupted)
    assert (
        code == 2
        and f"{interrupted / 'config.yaml'} (the config of the run in output_dir) is unreadable" in err
    )
    assert _snapshot(interrupted) == before


def test_config_differences_ignore_bookkeeping_and_new_fields_at_their_default():
    old = load_config(None, ["output_dir=a"]).model_dump(mode="json")
    new = load_config(
        None,
        [
            "output_dir=b",
            "train.log_every=5",
            "train.micro_batch_size=4",
            "eval.seed=3",
            "data.share_prompts=false",
        ],
    ).model_dump(mode="json")
    assert config_differences(old, new) == []
    del old["train"]["max_grad_norm"]  # as if written before the field existed
    assert config_differences(old, new) == []
    new["train"]["max_grad_norm"] = 0.5
    assert config_differences(old, new) == ["train.max_grad_norm: (not set) -> 0.5"]
    old["loss"]["length_penalty"] = 0.1  # an extra option of a user loss, dropped on the re-run
    assert "loss.length_penalty: 0.1 -> (not set)" in config_differences(old, new)



def test_a_run_saved_before_the_loop_settings_moved_resumes(tmp_path):
    """A run directory whose config.yaml still has coupling_scope / sft_weight under ``loss`` (written
    before they moved to ``train``) is the same run as the config that sets them under ``train``; a
    different value is still a different run."""
    from distalign.train.checkpoints import plan_run_dir

    settings = ["train.coupling_scope=micro_batch", "train.sft_weight=0.5"]
    config = load_config(None, [f"output_dir={tmp_path}", "loss.name=aot_paired", *settings])
    saved = config.model_dump(mode="json")
    for key in ("coupling_scope", "sft_weight"):
        saved["loss"][key] = saved["train"].pop(key)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    (tmp_path / "metrics.jsonl").write_text("")
    assert plan_run_dir(config).error is None
    other = load_config(None, [f"output_dir={tmp_path}", "loss.name=aot_paired", "train.sft_weight=0.5"])
    error = plan_run_dir(other).error
    assert "train.coupling_scope: micro_batch -> global" in error and "loss." not in error


KILL_DRIVER = """
import os, signal, sys
from distalign.cli import main
from distalign.train import engine

point, argv = sys.argv[1], sys.argv[2:]
saving = []
save, write_manifest, prune = engine.Engine.save_checkpoint, engine.write_manifest, engine.Engine._prune_checkpoints

def die_at(here):
    if here == point and saving[-1] == 4:
        os.kill(os.getpid(), signal.SIGKILL)

def save_checkpoint(self, step, loop_state=None):
    saving.append(step)
    return save(self, step, loop_state)

def manifest(directory):
    die_at("before_manifest")
    write_manifest(directory)
    die_at("after_manifest")

def prune_checkpoints(self):
    die_at("before_prune")
    prune(self)

engine.Engine.save_checkpoint, engine.write_manifest = save_checkpoint, manifest
engine.Engine._prune_checkpoints = prune_checkpoints
sys.exit(main(["train", *argv]))
"""


@pytest.mark.parametrize("point", ["before_manifest", "after_manifest", "before_prune"])
def test_killed_while_saving_a_checkpoint_resumes_exactly(capsys, runs, tmp_path, point):
    """kill -9 inside the save of step 4: before its checksums are written, after them but before the
    rename, after the rename but before pruning. The re-run resumes from an intact checkpoint and ends
    bitwise equal to the uninterrupted run."""
    run_dir = tmp_path / "run"
    argv = [*TINY_BASE, f"output_dir={run_dir}", *ARGS]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run(
        [sys.executable, "-c", KILL_DRIVER, point, *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (run_dir / "final").exists()
    code, out, err = _train(capsys, run_dir)
    assert code == 0, err
    resumed_from = 4 if point == "before_prune" else 2
    assert f"resumed from step {resumed_from}" in out and "damaged" not in err
    assert max_weight_difference(final_weights(runs[0]), final_weights(run_dir)) == 0.0
    assert [r["loss"] for r in read_metrics(run_dir)] == [r["loss"] for r in read_metrics(runs[0])]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_2", "step_4"]
