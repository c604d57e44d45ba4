"""The command line: help texts, config show, and user errors as one line with exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from distalign.cli import main


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "distalign", *args], capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("command", [[], ["train"], ["config", "show"], ["data", "check"], ["losses"]])
def test_help_explains_each_command(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: distalign" in capsys.readouterr().out


def test_config_show_prints_the_resolved_config(capsys):
    assert main(["config", "show", "configs/quickstart.yaml", "loss.name=ipo", "loss.beta=0.3"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["loss"]["name"] == "ipo"
    assert shown["loss"]["beta"] == 0.3
    assert shown["train"]["max_steps"] == 60  # from the file
    assert shown["model"]["lora"]["r"] == 8  # a default


def test_bad_config_exits_2_naming_the_field(capsys):
    assert main(["config", "show", "configs/quickstart.yaml", "train.lrr=1"]) == 2
    assert "train.lrr: unknown field" in capsys.readouterr().err


def test_bad_data_row_exits_2_and_writes_nothing(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": 3, "rejected": "b"}\n'
    )
    run_dir = tmp_path / "run"
    result = _run("train", "configs/quickstart.yaml", f"data.path={bad}", f"output_dir={run_dir}")
    assert result.returncode == 2
    assert "row 2" in result.stderr and "'chosen'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not run_dir.exists()


def test_loss_and_data_mismatch_is_a_clear_error(tmp_path):
    run_dir = tmp_path / "run"
    result = _run("train", "configs/quickstart.yaml", "loss.name=kto", f"output_dir={run_dir}")
    assert result.returncode == 2
    assert "data.unpair=true" in result.stderr
    assert not run_dir.exists()


def test_data_check_summarises_and_reports_bad_rows(tmp_path, capsys):
    assert main(["data", "check", "builtin:quickstart_unpaired.jsonl"]) == 0
    out = capsys.readouterr().out
    assert "240 rows" in out and "unpaired" in out
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,completion,label\nhi,there,maybe\n")
    assert main(["data", "check", str(bad)]) == 2
    assert "label" in capsys.readouterr().err


def test_losses_lists_every_registered_loss(capsys):
    from distalign.losses import LOSSES

    assert main(["losses"]) == 0
    out = capsys.readouterr().out
    for name in LOSSES:
        assert name in out
