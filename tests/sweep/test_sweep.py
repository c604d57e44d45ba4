"""`distalign sweep`: expansion and validation of sweeps, a real tiny sweep that resumes, and the
designer-score vs win-rate Pareto view in the report."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest
import yaml

from distalign.cli import main
from distalign.config import ConfigError, parse_overrides
from distalign.eval.frontier_plots import non_dominated
from distalign.eval.pareto import is_plain_dpo, pareto_rows
from distalign.eval.report import write_report
from distalign.stats.metrics import Estimate, EvalResult
from distalign.sweep import grid_points, load_sweep, override_text, select_runs
from distalign.sweep_run import SWEEP_EVAL_KEY, eval_fingerprint, eval_is_current

#: A base config that trains the tiny model in a second or two.
TINY_BASE = {
    "model": {"name": "tiny"},
    "data": {"max_length": 64, "max_prompt_length": 32, "limit": 16},
    "loss": {"name": "dpo", "beta": 0.1},
    "train": {"max_steps": 2, "batch_size": 8, "micro_batch_size": 8, "progress": False, "lr": 1e-3},
}
FAST_EVAL = ["eval.num_prompts=4", "eval.samples_per_prompt=1", "eval.max_new_tokens=8", "eval.n_boot=50"]


def write_sweep(root: Path, runs: list, **extra) -> Path:
    (root / "base.yaml").write_text(yaml.safe_dump(TINY_BASE))
    sweep = {"base": "base.yaml", "output_dir": str(root / "out"), "runs": runs, **extra}
    path = root / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


# ------------------------------------------------------------------------------ expansion and names
def test_grid_points_are_the_cartesian_product_first_key_slowest():
    points = grid_points("upo", {"loss.lambda_aux": [0.5, 1.0], "train.seed": [0, 1]})
    assert [name for name, _ in points] == [
        "upo-lambda_aux=0.5-seed=0",
        "upo-lambda_aux=0.5-seed=1",
        "upo-lambda_aux=1.0-seed=0",
        "upo-lambda_aux=1.0-seed=1",
    ]
    assert points[1][1] == ["loss.lambda_aux=0.5", "train.seed=1"]
    assert grid_points("dpo", {}) == [("dpo", [])]


def test_grid_names_disambiguate_keys_and_stay_filesystem_safe():
    (name, _), *_ = grid_points("g", {"loss.beta": [0.1], "online.beta": [2], "data.path": ["a/b c.jsonl"]})
    assert name == "g-loss.beta=0.1-online.beta=2-path=a_b_c.jsonl"


@pytest.mark.parametrize("value", [0.5, 3, "dpo", "1.0", True, None, ["q_proj", "v_proj"], "a: b"])
def test_override_text_reads_back_the_same_value(value):
    assert parse_overrides([override_text("loss.x", value)]) == {"loss": {"x": value}}


def test_sweep_file_expands_with_overrides_in_order(tmp_path):
    runs = [
        {"name": "dpo", "set": {"loss.name": "dpo"}},
        {
            "name": "ipo",
            "set": {"loss": {"name": "ipo"}, "train.lr": 0.01},
            "grid": {"loss.beta": [0.1, 0.5]},
        },
    ]
    path = write_sweep(tmp_path, runs, overrides=["train.lr=0.002", "train.seed=3"])
    sweep = load_sweep(path, ["train.seed=4"])
    assert [r.name for r in sweep.runs] == ["dpo", "ipo-beta=0.1", "ipo-beta=0.5"]
    assert sweep.overrides == ("train.lr=0.002", "train.seed=3", "train.seed=4")
    dpo, ipo, _ = sweep.runs
    assert dpo.config.train.lr == 0.002 and ipo.config.train.lr == 0.01  # a run's own settings win
    assert dpo.config.train.seed == 4  # the command line's overrides come after the file's
    assert ipo.overrides == ("loss.name=ipo", "train.lr=0.01", "loss.beta=0.1")
    assert ipo.path == tmp_path / "out" / "ipo-beta=0.1" == Path(ipo.config.output_dir)
    assert [r.name for r in select_runs(sweep, ["ipo"])] == ["ipo-beta=0.1", "ipo-beta=0.5"]
    assert [r.name for r in select_runs(sweep, ["ipo-beta=0.5", "dpo"])] == ["dpo", "ipo-beta=0.5"]


def test_a_plain_config_with_grid_options_is_one_group(tmp_path):
    config = tmp_path / "my conf.yaml"
    config.write_text(yaml.safe_dump({**TINY_BASE, "output_dir": str(tmp_path / "runs")}))
    sweep = load_sweep(config, grid=["loss.beta=0.1,0.2", "train.seed=0,1"])
    assert [r.name for r in sweep.runs][:2] == ["my_conf-beta=0.1-seed=0", "my_conf-beta=0.1-seed=1"]
    assert len(sweep.runs) == 4 and sweep.output_dir == tmp_path / "runs"
    assert {r.config.loss.beta for r in sweep.runs} == {0.1, 0.2}
    assert load_sweep(config, output_dir=tmp_path / "x").runs[0].path == tmp_path / "x" / "my_conf"


@pytest.mark.parametrize(
    ("runs", "extra", "message"),
    [
        ([{"name": "a"}, {"name": "a"}], {}, "two runs are named 'a'"),
        ([{"name": "../up"}], {}, "not a safe directory name"),
        ([{"name": "report_files"}], {}, "reserved"),
        ([{"name": "a", "sett": {}}], {}, "unknown key 'sett'"),
        ([{"name": "a", "grid": {"loss.beta": 0.1}}], {}, "grid.loss.beta must be a non-empty list"),
        ([{"name": "a", "set": {"output_dir": "x"}}], {}, "output_dir is set by the sweep"),
        ([{"name": "a", "set": {"loss.beta": 1}, "grid": {"loss.beta": [2]}}], {}, "both in set and in grid"),
        ([{"name": "a"}], {"overrides": ["train.overwrite_output_dir=true"]}, "set by the sweep"),
        ([{"name": "a"}], {"outputdir": "x"}, "unknown key 'outputdir'"),
        ([], {}, "non-empty list of runs"),
        ([{"name": "a"}], {"overrides": "train.lr=1"}, "list of key=value strings"),
    ],
)
def test_malformed_sweep_files_fail_naming_the_problem(tmp_path, runs, extra, message):
    with pytest.raises(ConfigError, match="sweep.yaml") as caught:
        load_sweep(write_sweep(tmp_path, runs, **extra))
    assert message in str(caught.value)


def test_grid_option_errors(tmp_path):
    path = write_sweep(tmp_path, [{"name": "a"}])
    with pytest.raises(ConfigError, match="is a sweep file"):
        load_sweep(path, grid=["loss.beta=1,2"])
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(TINY_BASE))
    with pytest.raises(ConfigError, match="not of the form"):
        load_sweep(tmp_path / "c.yaml", grid=["loss.beta"])
    with pytest.raises(ConfigError, match="--only nope"):
        select_runs(load_sweep(path), ["nope"])
    with pytest.raises(SystemExit) as usage:
        main(["sweep", "--dry-run"])
    assert usage.value.code == 2


def test_a_bad_value_in_any_run_fails_before_anything_is_created(tmp_path, capsys):
    runs = [{"name": f"r{i}", "set": {"train.seed": i}} for i in range(4)]
    runs.append({"name": "r5", "set": {"loss.lambda_auxx": 1.0}})
    path = write_sweep(tmp_path, runs)
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err
    assert "run 'r5'" in err and "loss.lambda_auxx" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_dry_run_lists_the_runs_and_creates_nothing(tmp_path, capsys):
    path = write_sweep(tmp_path, [{"name": "dpo"}, {"name": "ipo", "set": {"loss.name": "ipo"}}])
    assert main(["sweep", str(path), "--dry-run", "train.seed=2"]) == 0
    out = capsys.readouterr().out
    assert "2 of 2 runs" in out and "every run: train.seed=2" in out
    assert "ipo: loss.name=ipo\n    -> train, evaluate" in out
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ a real tiny sweep
def _eval_stamps(out: Path) -> dict[str, int]:
    return {p.parent.parent.name: p.stat().st_mtime_ns for p in out.glob("*/eval/eval.json")}


def test_a_tiny_sweep_trains_evaluates_reports_and_resumes(tmp_path, capsys):
    runs = [{"name": "dpo"}, {"name": "ipo", "set": {"loss.name": "ipo", "loss.beta": 0.5}}]
    path = write_sweep(tmp_path, runs, overrides=FAST_EVAL)
    out = tmp_path / "out"

    # A sweep killed after its first run: only that run exists.
    assert main(["sweep", str(path), "--only", "dpo"]) == 0
    first = capsys.readouterr().out
    assert "[1/1] dpo: trained, evaluated; win rate" in first
    status = {r["name"]: r["status"] for r in json.loads((out / "sweep.json").read_text())["runs"]}
    assert status == {"dpo": "done", "ipo": "pending"}
    dpo_stamp = _eval_stamps(out)["dpo"]

    # Rerun: the finished run is skipped, the other trained and evaluated, the reference shared.
    assert main(["sweep", str(path)]) == 0
    second = capsys.readouterr().out
    assert "[1/2] dpo: up to date" in second and "[2/2] ipo: trained, evaluated" in second
    assert _eval_stamps(out)["dpo"] == dpo_stamp
    record = json.loads((out / "sweep.json").read_text())
    assert [r["status"] for r in record["runs"]] == ["done", "done"]
    assert record["runs"][1]["overrides"] == ["loss.name=ipo", "loss.beta=0.5"]
    assert record["runs"][1]["summary"]["win_rate"]["n"] == 4 and record["overrides"] == FAST_EVAL
    results = [EvalResult.load(out / name / "eval" / "eval.json") for name in ("dpo", "ipo")]
    assert results[0].gold_reward["reference"] == results[1].gold_reward["reference"]
    assert results[1].settings[SWEEP_EVAL_KEY]["eval"]["num_prompts"] == 4
    page = (out / "report.html").read_text()
    assert "Run: dpo" in page and "Run: ipo" in page and "Comparison" in page
    card = (out / "ipo" / "final" / "README.md").read_text()  # the model card shows the sweep's numbers
    assert "win rate against the reference" in card and "Not evaluated yet" not in card

    # A finished sweep redoes nothing, the report included.
    stamps, report_stamp = _eval_stamps(out), (out / "report.html").stat().st_mtime_ns
    assert main(["sweep", str(path)]) == 0
    third = capsys.readouterr().out
    assert "[1/2] dpo: up to date" in third and "[2/2] ipo: up to date" in third
    assert _eval_stamps(out) == stamps and (out / "report.html").stat().st_mtime_ns == report_stamp
    assert re.search(r"^ipo\s+done\s+0\.5", third, flags=re.M)  # the final table

    # Other eval settings: evaluated again, not trained again.
    assert main(["sweep", str(path), "eval.num_prompts=3", "--only", "ipo"]) == 0
    assert "[1/1] ipo: already trained, evaluated" in capsys.readouterr().out


def test_eval_is_current_only_if_newer_than_final_and_made_with_the_same_settings(tmp_path):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({**TINY_BASE, "output_dir": str(tmp_path / "runs")}))
    run = load_sweep(tmp_path / "c.yaml").runs[0]
    (run.path / "final").mkdir(parents=True)
    (run.path / "final" / "config.json").write_text("{}")
    result = EvalResult("t", "r", 1, {"policy": Estimate(0, 0, 0, 1)})
    result.settings[SWEEP_EVAL_KEY] = eval_fingerprint(run.config)
    eval_json = result.save(run.path / "eval" / "eval.json")
    assert eval_is_current(run.path, run.config)
    later = eval_json.stat().st_mtime_ns + 10**9
    for card in ("README.md", "adapter/README.md"):  # model cards the evaluation itself refreshes
        (run.path / "final" / card).parent.mkdir(exist_ok=True)
        (run.path / "final" / card).write_text("card")
        os.utime(run.path / "final" / card, ns=(later, later))
    assert eval_is_current(run.path, run.config)
    other = load_sweep(tmp_path / "c.yaml", ["eval.seed=5"]).runs[0]
    assert not eval_is_current(run.path, other.config)
    stamp = eval_json.stat().st_mtime_ns
    os.utime(run.path / "final" / "config.json", ns=(stamp + 10**9, stamp + 10**9))  # retrained since
    assert not eval_is_current(run.path, run.config)


# ------------------------------------------------------------------------------ the Pareto view
def test_non_dominated_maximises_both_on_point_estimates():
    points = [(0.0, 0.9), (0.5, 0.5), (0.4, 0.4), (1.0, 0.1), (0.5, 0.5), (0.2, float("nan")), (1.0, 0.05)]
    # (0.4, 0.4) is beaten by (0.5, 0.5); equal points are both on the front; NaN is never on it;
    # (1.0, 0.05) is beaten by (1.0, 0.1): equal on one axis, worse on the other.
    assert non_dominated(points) == [0, 1, 3, 4]
    assert non_dominated([]) == [] and non_dominated([(1.0, 1.0)]) == [0]


def test_plain_dpo_is_dpo_without_sft_or_designer_signals():
    assert is_plain_dpo({"loss": {"name": "dpo", "sft_weight": 0.0}})
    assert not is_plain_dpo({"loss": {"name": "dpo", "sft_weight": 0.5}})
    assert not is_plain_dpo({"loss": {"name": "ipo"}}) and not is_plain_dpo(None)


def _designer_run(root: Path, name: str, loss: str, designer: float, win: float) -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"loss": {"name": loss, "sft_weight": 0.0}}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.7}) + "\n")
    estimate = lambda v: Estimate(v, v - 0.1, v + 0.1, 8)  # noqa: E731
    result = EvalResult(
        "sentiment", "vader", 8, {"policy": estimate(0.2), "reference": estimate(0.0)}, win_rate=estimate(win)
    )
    result.designer = {
        "designer": {
            "policy": estimate(designer),
            "reference": estimate(0.0),
            "difference": estimate(designer),
        },
        "brevity": {"policy": estimate(-30.0), "reference": estimate(-40.0), "difference": estimate(10.0)},
    }
    result.save(run / "eval" / "eval.json")
    return run


def test_pareto_rows_mark_the_front_and_dpo(tmp_path):
    runs = [
        _designer_run(tmp_path, "dpo", "dpo", 0.1, 0.6),
        _designer_run(tmp_path, "upo-a", "ipo", 0.5, 0.55),
        _designer_run(tmp_path, "upo-b", "ipo", 0.4, 0.5),
    ]
    loaded = [
        (r.name, yaml.safe_load((r / "config.yaml").read_text()), EvalResult.load(r / "eval" / "eval.json"))
        for r in runs
    ]
    rows = pareto_rows(loaded + [("no-designer", None, None)])
    assert [(row.point.label, row.on_front, row.point.dpo) for row in rows] == [
        ("dpo", True, True),
        ("upo-a", True, False),
        ("upo-b", False, False),
    ]
    assert math.isclose(rows[1].difference.value, 0.5)


def test_the_report_shows_the_pareto_view_when_runs_have_designer_scores(tmp_path):
    runs = [
        _designer_run(tmp_path, "dpo", "dpo", 0.1, 0.6),
        _designer_run(tmp_path, "upo-lambda_aux=1.0", "ipo", 0.5, 0.55),
        _designer_run(tmp_path, "upo-lambda_aux=2.0", "ipo", 0.4, 0.5),
    ]
    page = write_report(runs, tmp_path / "report.html").read_text()
    assert "Designer score vs win rate (Pareto view)" in page
    assert (tmp_path / "report_files" / "designer_pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert (
        "<td>upo-lambda_aux=2.0</td><td>0.4 [0.3, 0.5]</td><td>0.4 [0.3, 0.5]</td><td>0.5 [0.4, 0.6]</td><td>no</td>"
        in page
    )
    assert "no reference point" not in page  # every run measured the same reference

    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.yaml").write_text("loss: {name: dpo}\n")
    EvalResult("t", "r", 2, {"policy": Estimate(0, 0, 0, 2)}, win_rate=Estimate(0.5, 0.4, 0.6, 2)).save(
        plain / "eval" / "eval.json"
    )
    assert "Pareto view" not in write_report([plain], tmp_path / "plain.html").read_text()


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).parents[2] / "configs" / "sweeps").glob("*.yaml")), ids=lambda p: p.name
)
def test_shipped_sweep_files_expand_and_validate(path):
    sweep = load_sweep(path)
    assert len(sweep.runs) >= 3
    assert any(run.config.loss.name == "upo" for run in sweep.runs)
    assert any(run.config.loss.name == "dpo" and not run.config.train.sft_weight for run in sweep.runs)
