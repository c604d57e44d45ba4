"""Bad settings fail before any heavy work: exit 2, the field path in one message, no traceback and
nothing written (issue: never a wrong model that looks right)."""

from __future__ import annotations

import os

import pytest

from distalign.cli import main

BASE = ["train", "configs/quickstart.yaml", "model.name=tiny", "train.max_steps=1", "train.progress=false"]


def _train(capsys, tmp_path, *overrides, output_dir=None):
    output_dir = output_dir or tmp_path / "run"
    code = main([*BASE, f"output_dir={output_dir}", *overrides])
    err = capsys.readouterr().err
    return code, err, output_dir


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(os.path.join(os.path.dirname(__file__), "..", ".."))


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["loss.beta=-1"], "loss.beta: beta must be > 0"),
        (["loss.beta=0"], "loss.beta"),
        (["loss.name=aot_paired", "loss.beta=0"], "loss.beta: AOT cost 'logistic' needs beta > 0"),
        (["loss.name=aot_paired", "loss.cost=squared_hinge", "loss.beta=-0.5"], "needs beta >= 0"),
        (["loss.name=simpo", "loss.beta=-2"], "loss.beta"),
        (["loss.name=ipo", "loss.beta=0"], "loss.beta"),
        (["loss.name=hinge", "loss.beta=-1"], "loss.beta"),
        (["loss.name=kto", "loss.beta=0", "data.path=builtin:quickstart_unpaired.jsonl"], "loss.beta"),
        (["loss.name=plackett_luce", "loss.beta=-1"], "loss.beta"),
        (["loss.label_smoothing=0.5"], "loss.label_smoothing"),
        (["loss.name=robust_dpo", "loss.eps=0.5"], "loss.eps"),
        (["loss.name=kto", "loss.desirable_weight=0"], "loss.desirable_weight"),
        (["loss.name=aot_paired", "loss.soft_sort_strength=0"], "loss.soft_sort_strength"),
        (["loss.gamma=1"], "loss.gamma is not an option of loss 'dpo'"),
        (["loss.betta=1"], "loss.betta: unknown field"),
        (["aggregator.name=cvar", "aggregator.alpha=2"], "alpha must lie in (0, 1]"),
        (["aggregator.name=cvar", "aggregator.alpha=-0.1"], "alpha must lie in (0, 1]"),
        (["aggregator.name=max"], "aggregator.name: unknown aggregator 'max'"),
        (["loss.name=aot_paired", "aggregator.name=cvar"], "composes only with mean"),
        (["train.batch_size=6", "train.micro_batch_size=4"], "multiple of"),
        (["train.lr=0"], "train.lr"),
        (["train.head_lr=-1"], "train.head_lr"),
    ],
)
def test_out_of_range_settings_fail_at_config_time(capsys, tmp_path, overrides, expected):
    code, err, output_dir = _train(capsys, tmp_path, *overrides)
    assert code == 2
    assert expected in err
    assert "Traceback" not in err
    assert not output_dir.exists()


def test_output_dir_that_is_a_file(capsys, tmp_path):
    target = tmp_path / "taken"
    target.write_text("not a directory")
    code, err, _ = _train(capsys, tmp_path, output_dir=target)
    assert code == 2 and f"output_dir {target}: exists and is not a directory" in err
    assert target.read_text() == "not a directory"


def test_output_dir_below_a_file(capsys, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    code, err, _ = _train(capsys, tmp_path, output_dir=blocker / "run")
    assert code == 2 and f"{blocker} is a file" in err and "Traceback" not in err


def test_output_dir_not_writable(capsys, tmp_path, monkeypatch):
    # As root every directory is writable, so the permission answer is simulated.
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda path, mode: False if str(path) == str(tmp_path) else real_access(path, mode)
    )
    code, err, output_dir = _train(capsys, tmp_path)
    assert code == 2 and "cannot be created" in err and "not writable" in err
    assert not output_dir.exists()


def test_valid_settings_still_train(capsys, tmp_path):
    code, _, output_dir = _train(
        capsys, tmp_path, "loss.beta=0.5", "aggregator.name=cvar", "aggregator.alpha=0.5"
    )
    assert code == 0 and (output_dir / "final").is_dir()
