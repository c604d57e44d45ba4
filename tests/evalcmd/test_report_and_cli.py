"""`distalign report` over evaluated tiny runs, `distalign data make`, and the commands' user errors."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest

from distalign.cli import main
from distalign.cli.evaluate import default_report_path

from .test_eval_run import PNG_SIGNATURE, assert_valid_png


def test_report_compares_two_evaluated_runs_with_a_frontier(evaluated_runs, capsys):
    near, far = evaluated_runs["near"], evaluated_runs["far"]
    assert main(["report", str(near), str(far)]) == 0
    page = near.parent / "report.html"  # default: the runs' common parent
    assert f"report: {page}" in capsys.readouterr().out
    text = page.read_text()
    assert "Comparison" in text and "Run: near" in text and "Run: far" in text
    assert ">reference<" in text and ">aot_paired<" in text  # shared reference row, methods
    assets = {p.name: p for p in (near.parent / "report_files").glob("*.png")}
    expected = {"gold_reward.png", "win_rate.png", "frontier.png", "quantiles.png"}
    assert expected <= set(assets)
    # eval/gold_reward_quantiles.png is redrawn from the samples in the run's colour, not copied
    assert {"near_quantiles.png", "far_training.png"} <= set(assets)
    assert "near_eval_gold_reward_quantiles.png" not in assets
    for png in assets.values():
        assert_valid_png(png)
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', text)
    assert len(embedded) == text.count("<img ") == len(assets)
    assert all(base64.b64decode(data)[:8] == PNG_SIGNATURE for data in embedded)
    assert "dominance: share of quantile levels" in text


def test_report_output_option_and_default_paths(evaluated_runs, tmp_path):
    out = tmp_path / "custom.html"
    assert main(["report", str(evaluated_runs["far"]), "--output", str(out)]) == 0
    assert out.is_file() and (tmp_path / "custom_files").is_dir()
    assert default_report_path([Path("runs/a")]) == Path("runs/a/report.html")
    assert default_report_path([Path("/x/runs/a"), Path("/x/runs/b")]) == Path("/x/runs/report.html")
    assert default_report_path([Path("/a"), Path("/b")]) == Path("report.html")


def _make(tmp_path: Path, name: str, seed: int) -> Path:
    output = tmp_path / name
    args = ["data", "make", "sentiment", "--model", "tiny", "--k", "3", "--num-prompts", "6"]
    args += ["--seed", str(seed), "--max-new-tokens", "8", "--output", str(output), "--kind", "listwise"]
    assert main(args) == 0
    return output


def test_data_make_is_deterministic_under_a_seed_and_records_provenance(tmp_path):
    first, again, other = (
        _make(tmp_path, "a.jsonl", 0),
        _make(tmp_path, "b.jsonl", 0),
        _make(tmp_path, "c.jsonl", 1),
    )
    assert first.read_bytes() == again.read_bytes()
    assert first.read_bytes() != other.read_bytes()
    rows = [json.loads(line) for line in first.read_text().splitlines()]
    assert len(rows) == 6 and all(len(r["responses"]) == len(r["scores"]) == 3 for r in rows)
    assert rows[0]["prompt"][-1]["role"] == "user"  # sampled with the chat template -> conversational rows
    provenance = json.loads((tmp_path / "a.provenance.json").read_text())
    assert provenance["model"] == "tiny" and provenance["seed"] == 0 and provenance["kind"] == "listwise"
    assert provenance["sampling"]["max_new_tokens"] == 8 and provenance["sampling"]["chat_template"] is True
    assert provenance["counts"]["samples"] == 18 and provenance["gold_reward"]["name"] == "vader_sentiment"


def test_data_make_paired_rows_train(tmp_path):
    output = tmp_path / "pairs.jsonl"
    args = ["data", "make", "sentiment", "--model", "tiny", "--k", "6", "--num-prompts", "12", "--seed", "3"]
    assert main([*args, "--max-new-tokens", "24", "--output", str(output)]) == 0
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert rows and all(r["chosen_reward"] > r["rejected_reward"] for r in rows)
    assert main(["data", "check", str(output), "--model", "tiny"]) == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["eval", "/nonexistent/run"], "no such run directory or config file"),
        (["report", "/nonexistent/run"], "not a distalign run directory: no such directory /nonexistent/run"),
        (["data", "make", "nosuchtask", "--model", "tiny"], "unknown task 'nosuchtask'"),
        (["data", "make", "sentiment", "--model", "tiny", "--num-prompts", "100000"], "--num-prompts 100000"),
        (["data", "make", "sentiment", "--model", "tiny", "--k", "1"], "--k 1"),
        (["data", "make", "readability", "--task-setting", "colour=red"], "no setting(s) ['colour']"),
        (["demo", "--steps", "0"], "--steps 0 must be at least 1"),
    ],
)
def test_user_errors_exit_2_with_one_clear_line(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("distalign: error: ") and message in err and "Traceback" not in err


def test_eval_of_a_directory_without_a_trained_model(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    assert main(["eval", str(run)]) == 2
    assert "has no config.yaml" in capsys.readouterr().err
    (run / "config.yaml").write_text("model: {name: tiny}\n")
    assert main(["eval", str(run)]) == 2
    assert "no trained model in final/" in capsys.readouterr().err
    (run / "final").mkdir()
    (run / "final" / "config.json").write_text("{}")
    assert main(["eval", str(run), "eval.task=nosuch"]) == 2
    err = capsys.readouterr().err
    assert "eval.task" in err and "unknown task 'nosuch'" in err


def test_eval_setting_errors_name_the_field(evaluated_runs, capsys):
    assert main(["eval", str(evaluated_runs["near"]), "eval.num_prompts=1000"]) == 2
    assert "eval.num_prompts=1000" in capsys.readouterr().err
    assert main(["eval", str(evaluated_runs["near"]), "eval.task_settings={colour: red}"]) == 2
    assert "eval.task_settings" in capsys.readouterr().err


def test_report_refuses_a_folder_that_is_not_a_distalign_run_and_writes_nothing(tmp_path, capsys):
    """Any folder with a config.yaml used to get report.html and report_files/ written into it, the
    file shown as the run's resolved config."""
    folder = tmp_path / "other_project"
    folder.mkdir()
    (folder / "config.yaml").write_text("learning_rate: 0.1\nlayers: [64, 64]\n")
    assert main(["report", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "not a distalign run directory" in err and "not a distalign run config" in err
    assert sorted(p.name for p in folder.iterdir()) == ["config.yaml"]
    (folder / "config.yaml").write_text("- a list\n")
    assert main(["report", str(folder)]) == 2


def test_report_of_a_run_that_has_only_just_started(tmp_path, capsys):
    """A run writes its resolved config before its first step: the report of it then has no metrics
    yet, and is written."""
    from distalign.config import dump_config, load_config

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(dump_config(load_config(None, [f"output_dir={run}"])))
    assert main(["report", str(run)]) == 0
    assert (run / "report.html").is_file()
