"""User errors on the command line, and training that cannot learn (issue 12, items 4 and 6).

Every command, given bad input, exits with status 2 and one line naming what and where, with no
traceback (unless `--debug` / DISTALIGN_DEBUG=1) and nothing written. Ctrl-C exits 130; a bug keeps its
traceback, ends with a line asking to report it, and exits 1. A run that learns nothing stops naming
the step and the setting to change: f-DPG without a sample that satisfies the target, steps whose
advantages are all zero, a NaN loss (online and offline; the last checkpoint stays intact).
"""

from __future__ import annotations

import errno
import math
from pathlib import Path

import pytest
import torch
import transformers  # noqa: F401  (its log handler binds sys.stderr now, not to one test's capsys)
import yaml
from distalign_testing.runs import TINY_BASE, read_metrics

from distalign.cli import main


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread(single_thread_torch):
    """Tiny-model runs only (see the root conftest)."""


@pytest.fixture(autouse=True)
def _no_debug_from_the_environment(monkeypatch):
    monkeypatch.delenv("DISTALIGN_DEBUG", raising=False)


def _fails_cleanly(capsys, argv: list[str], *expected: str) -> str:
    """Run ``distalign ARGV``: exit status 2, one ``distalign: error:`` line containing ``expected``,
    no traceback. Returns stderr."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = [x for x in err.splitlines() if x.startswith("distalign: error:")]
    assert len(line) == 1, err
    for text in expected:
        assert text in line[0], (text, line[0])
    return err


def _write_yaml(path: Path, tree) -> Path:
    path.write_text(yaml.safe_dump(tree))
    return path


# --- every command: user errors are one line, exit 2, nothing written ---------------------------------
def test_train_with_a_missing_config_file(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    _fails_cleanly(
        capsys, ["train", str(missing), f"output_dir={tmp_path / 'run'}"], str(missing), "No such file"
    )
    assert not (tmp_path / "run").exists()


def test_config_show_of_a_directory(tmp_path, capsys):
    _fails_cleanly(capsys, ["config", "show", str(tmp_path)], str(tmp_path), "Is a directory")


def test_train_with_a_yaml_list(tmp_path, capsys):
    config = tmp_path / "list.yaml"
    config.write_text("- model\n- data\n")
    _fails_cleanly(capsys, ["train", str(config), f"output_dir={tmp_path / 'run'}"], str(config), "mapping")
    assert not (tmp_path / "run").exists()


def test_train_with_a_binary_config(tmp_path, capsys):
    config = tmp_path / "model.yaml"
    config.write_bytes(b"model:\n  name: \xf0\x28\x8c\x28\n")
    _fails_cleanly(capsys, ["train", str(config)], str(config), "not UTF-8")


def test_data_check_of_a_directory_without_data(tmp_path, capsys):
    _fails_cleanly(capsys, ["data", "check", str(tmp_path)], str(tmp_path))


def test_data_make_with_an_unknown_task(tmp_path, capsys):
    output = tmp_path / "out.jsonl"
    _fails_cleanly(
        capsys, ["data", "make", "nosuchtask", "--model", "tiny", "--output", str(output)], "nosuchtask"
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case", ["missing", "no_config"])
def test_eval_of_something_that_is_not_a_run(tmp_path, capsys, case):
    run = tmp_path / "run"
    if case == "no_config":
        run.mkdir()
    _fails_cleanly(capsys, ["eval", str(run)], str(run))
    assert not (run / "eval").exists()


def test_report_of_a_directory_that_is_not_a_run(tmp_path, capsys):
    _fails_cleanly(capsys, ["report", str(tmp_path)], str(tmp_path), "config.yaml")
    assert not (tmp_path / "report.html").exists()
    _fails_cleanly(capsys, ["report", str(tmp_path / "missing")], "missing")


def test_data_make_into_an_unwritable_place_names_the_output(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    output = blocker / "out.jsonl"  # a path under a regular file: ENOTDIR, for root too
    argv = ["data", "make", "keyword", "--model", "tiny", "--num-prompts", "2", "--k", "2"]
    _fails_cleanly(capsys, [*argv, "--max-new-tokens", "4", "--output", str(output)], str(output))


def test_disk_full_without_a_filename_names_where_it_was_writing(tmp_path, capsys, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("distalign.tasks.sampler.make_task_dataset", full_disk)
    output = tmp_path / "out.jsonl"
    argv = ["data", "make", "keyword", "--model", "tiny", "--output", str(output)]
    _fails_cleanly(capsys, argv, "No space left on device", str(output))


def test_out_of_memory_is_a_setting_to_change(capsys, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore details")

    monkeypatch.setattr("distalign.train.run_training", out_of_memory)
    argv = ["train", "configs/quickstart.yaml", "output_dir=unused"]
    _fails_cleanly(
        capsys,
        argv,
        "out of memory (CUDA out of memory. Tried to allocate 2.00 GiB)",
        "train.micro_batch_size",
    )


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_debug_shows_the_traceback_of_a_user_error(tmp_path, capsys, monkeypatch, how):
    missing = str(tmp_path / "nope.yaml")
    if how == "flag":
        argv = ["--debug", "config", "show", missing]
    else:
        monkeypatch.setenv("DISTALIGN_DEBUG", "1")
        argv = ["config", "show", missing]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "ConfigError" in err
    assert err.rstrip().splitlines()[-1].startswith("distalign: error: cannot read config")


def test_ctrl_c_exits_130_with_one_line(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("distalign.cli.train.cmd_losses", interrupted)
    assert main(["losses"]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "distalign: interrupted" and "Traceback" not in err
    monkeypatch.setattr("distalign.train.run_training", interrupted)
    assert main(["train", "configs/quickstart.yaml", f"output_dir={tmp_path / 'run'}"]) == 130
    assert "resumes from the newest checkpoint" in capsys.readouterr().err


def test_a_bug_keeps_its_traceback_and_asks_to_be_reported(capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("an unexpected bug")

    monkeypatch.setattr("distalign.cli.train.cmd_losses", broken)
    assert main(["losses"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: an unexpected bug" in err
    assert err.rstrip().splitlines()[-1].startswith("distalign: internal error — please report it")


# --- training that learns nothing stops (or warns), naming the step and what to change ---------------
def _online_config(tmp_path: Path, **online) -> Path:
    """An unconditional f-DPG run on the tiny model, 8 samples of 8 tokens per step."""
    tree = {
        "output_dir": str(tmp_path / "run"),
        "model": {"name": "tiny"},
        "train": {
            "seed": 0,
            "batch_size": 8,
            "micro_batch_size": 8,
            "max_steps": 30,
            "lr": 1e-3,
            "log_every": 1,
            "progress": False,
        },
        "online": {
            "method": "fdpg",
            "target": {
                "scorers": [{"kind": "constraint", "feature": {"name": "contains_word", "word": "amazing"}}]
            },
            "prompts_per_step": 2,
            "samples_per_prompt": 4,
            "max_new_tokens": 8,
            **online,
        },
    }
    return _write_yaml(tmp_path / "online.yaml", tree)


def test_fdpg_without_any_sample_in_the_support_warns_once_then_stops(tmp_path, capsys):
    """The README's old example: the tiny model never writes "amazing"; alignment 0, log Z -inf."""
    config = _online_config(tmp_path, max_steps_without_support=4)
    err = _fails_cleanly(
        capsys,
        ["train", str(config)],
        "step 4",
        "no sample has satisfied",
        "online.samples_per_prompt",
        "online.max_steps_without_support",
    )
    assert err.count("distalign: warning: step 3: no sample has satisfied") == 1  # after 3 steps
    records = read_metrics(tmp_path / "run")
    assert [r["warnings/steps_without_support"] for r in records] == [1.0, 2.0, 3.0, 4.0]
    assert all(r["log_z"] == -math.inf and r["alignment"] == 0.0 for r in records)
    assert not (tmp_path / "run" / "final").exists()


def test_fdpg_without_support_limit_0_only_warns(tmp_path, capsys):
    config = _online_config(tmp_path, max_steps_without_support=0, max_steps_without_signal=0)
    assert main(["train", str(config), "train.max_steps=3"]) == 0
    err = capsys.readouterr().err
    assert err.count("distalign: warning:") == 1 and "will not stop" in err
    assert [r["warnings/steps_without_support"] for r in read_metrics(tmp_path / "run")] == [1.0, 2.0, 3.0]


def test_steps_whose_advantages_are_all_zero_stop_the_run(tmp_path, capsys):
    """REINFORCE on a reward no sample earns, without a KL term: every advantage is 0, so is the gradient."""
    config = _online_config(
        tmp_path,
        method="reinforce",
        target=None,
        reward={"name": "regex", "pattern": "amazing"},
        kl_coef=0.0,
        max_steps_without_signal=2,
    )
    _fails_cleanly(
        capsys,
        ["train", str(config)],
        "step 2",
        "every advantage was zero",
        "online.max_steps_without_signal",
    )
    records = read_metrics(tmp_path / "run")
    assert [r["warnings/steps_without_signal"] for r in records] == [1.0, 2.0]
    assert all(r["grad_norm"] == 0.0 for r in records)


def test_a_learning_run_counts_no_stall(tmp_path, capsys):
    """A letter the tiny model writes often: no warning, the counters stay at 0."""
    config = _online_config(
        tmp_path, target={"scorers": [{"kind": "constraint", "feature": {"name": "regex", "pattern": "e"}}]}
    )
    assert main(["train", str(config), "train.max_steps=2"]) == 0
    assert "warning" not in capsys.readouterr().err
    records = read_metrics(tmp_path / "run")
    assert all(
        r["warnings/steps_without_support"] == 0 and r["warnings/steps_without_signal"] == 0 for r in records
    )


def test_online_nan_loss_stops_before_the_update(tmp_path, capsys, monkeypatch):
    import distalign.train.online.update as online_update  # where the online update computes its loss

    real = online_update.fdpg_policy_gradient_loss

    def nan_loss(*args, **kwargs):
        result = real(*args, **kwargs)
        result.loss = result.loss * float("nan")
        return result

    monkeypatch.setattr(online_update, "fdpg_policy_gradient_loss", nan_loss)
    config = _online_config(
        tmp_path, target={"scorers": [{"kind": "constraint", "feature": {"name": "regex", "pattern": "e"}}]}
    )
    _fails_cleanly(
        capsys, ["train", str(config)], "step 1", "surrogate loss is nan", "not applied", "train.lr"
    )
    assert not (tmp_path / "run" / "final").exists()


def test_offline_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(
    tmp_path, capsys, monkeypatch, throwaway
):
    from distalign.losses.base import PerExampleLosses
    from distalign.losses.preference import dpo_loss, paired_inputs
    from distalign.train.engine import Engine

    poisoned = {"on": False}

    def nan_after_the_first_checkpoint(stats, *, beta: float = 0.1):
        chosen, rejected = paired_inputs(stats, "nan_dpo", "logratios")
        losses = dpo_loss(chosen, rejected, beta=beta)
        return PerExampleLosses(losses * torch.nan if poisoned["on"] else losses)

    throwaway.loss("nan_dpo", nan_after_the_first_checkpoint)
    save = Engine.save_checkpoint

    def save_then_poison(self, *args, **kwargs):
        path = save(self, *args, **kwargs)
        poisoned["on"] = True
        return path

    monkeypatch.setattr(Engine, "save_checkpoint", save_then_poison)
    run = tmp_path / "run"
    overrides = [
        *TINY_BASE,
        "loss.name=nan_dpo",
        "train.batch_size=8",
        "train.micro_batch_size=8",
        "train.log_every=1",
    ]
    argv = [
        "train",
        "configs/quickstart.yaml",
        *overrides,
        "train.max_steps=4",
        "train.save_every=1",
        f"output_dir={run}",
    ]
    _fails_cleanly(capsys, argv, "step 2", "the loss is nan", "step_1")
    assert [p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith(".")] == ["step_1"]
    assert [r["step"] for r in read_metrics(run)] == [1]
    assert not (run / "final").exists()
