"""The HTML report renders for constructed run directories; every PNG it makes is a valid image."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from matplotlib.image import imread

from distalign.eval.frontier_plots import FrontierPoint, pareto_front, plot_frontier
from distalign.eval.plots import (
    curve_keys,
    plot_quantile_curves,
    plot_training_curves,
    plot_win_rates,
    read_metrics_jsonl,
)
from distalign.eval.report import flatten, report_paths, write_report
from distalign.eval.run_dir import load_run
from distalign.stats.metrics import Estimate, evaluate_samples

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_valid_png(path):
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50


def make_run(root, name, *, loss="dpo", shift=0.0, with_eval=True, with_plot=False):
    run = root / name
    run.mkdir(parents=True)
    config = {"model": {"name": "tiny"}, "loss": {"name": loss, "beta": 0.1}, "train": {"lr": 1e-5}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    lines = [
        json.dumps({"step": s, "loss": 0.7 - 0.01 * s, "rewards/margins": 0.02 * s, "lr": 1e-5})
        for s in range(30)
    ]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if with_eval:
        rng = np.random.default_rng(0)
        reference = rng.normal(size=40)
        policy = reference + shift + rng.normal(scale=0.2, size=40)
        texts = [f"text number {i} with words" for i in range(40)]
        result = evaluate_samples(
            texts,
            policy,
            texts[::-1],
            reference,
            policy_logprobs=-np.full(40, 5.0),
            reference_logprobs=-np.full(40, 5.0 + shift),
            task="sentiment",
            reward="vader",
            n_boot=100,
        )
        result.save(run / "eval" / "eval.json")
    if with_plot:
        plot_win_rates(["x"], [Estimate(0.6, 0.5, 0.7, 10)], run / "plots" / "dominance.png")
    return run


def test_report_for_several_runs(tmp_path):
    runs = [
        make_run(tmp_path, "dpo_run", loss="dpo", shift=0.2, with_plot=True),
        make_run(tmp_path, "aot_run", loss="aot", shift=0.5),
        make_run(tmp_path, "ipo_run", loss="ipo", with_eval=False),
    ]
    page = write_report(runs, tmp_path / "out" / "report.html")
    text = page.read_text(encoding="utf-8")
    for name in ("dpo_run", "aot_run", "ipo_run"):
        assert f"Run: {name}" in text
    assert "Comparison" in text and ">aot<" in text and "no eval/eval.json" in text
    assets = sorted((tmp_path / "out" / "report_files").glob("*.png"))
    names = {p.name for p in assets}
    assert {"gold_reward.png", "win_rate.png", "frontier.png", "dpo_run_training.png"} <= names
    assert "dpo_run_plots_dominance.png" in names  # a PNG the loop left in RUN_DIR/plots/
    for png in assets:
        assert_valid_png(png)
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', text)
    assert len(embedded) == text.count("<img ") == len(assets)
    for data in embedded:
        assert base64.b64decode(data)[:8] == PNG_SIGNATURE
    assert 'src="http' not in text and "<script" not in text  # self-contained, nothing fetched


def test_report_escapes_names_and_survives_missing_pieces(tmp_path):
    weird = tmp_path / "run<script>"
    weird.mkdir()
    (weird / "metrics.jsonl").write_text(
        '{"step": 0, "loss": 1.0}\n{"step": 1, "loss": 0.5}\n{"step": 2, "lo'
    )
    with pytest.warns(UserWarning, match="1 malformed"):
        page = write_report([weird, tmp_path / "does_not_exist"], tmp_path / "out")
    text = page.read_text(encoding="utf-8")
    assert page == tmp_path / "out" / "report.html"
    assert "run&lt;script&gt;" in text and "<script>" not in text
    assert "no config.yaml" in text and "is not a directory" in text
    assert_valid_png(tmp_path / "out" / "report_files" / "run_script_training.png")


def test_duplicate_run_names_are_disambiguated(tmp_path):
    a = make_run(tmp_path / "a", "run", with_eval=False)
    b = make_run(tmp_path / "b", "run", with_eval=False)
    text = write_report([a, b], tmp_path / "r.html").read_text()
    assert "Run: run<" in text and "Run: b/run<" in text


def test_load_run_reads_every_piece(tmp_path):
    run = load_run(make_run(tmp_path, "x", loss="aot"))
    assert run.method == "aot" and len(run.metrics) == 30 and run.eval is not None and run.problems == []


def test_report_paths_and_flatten():
    assert report_paths("out/r.html") == (Path("out/r.html"), Path("out/r_files"))
    assert report_paths("out/R.HTM") == (Path("out/R.HTM"), Path("out/R_files"))
    assert report_paths("out") == (Path("out/report.html"), Path("out/report_files"))
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": {}}) == {"a.b": 1, "a.c.d": 2, "e": {}}


def test_training_curves_pick_numeric_keys_with_loss_first(tmp_path):
    rows = [{"step": 1, "rewards/acc": 0.5, "loss": 1.0, "flag": True, "name": "x", "epoch": 0}]
    assert curve_keys(rows) == ["loss", "rewards/acc"]
    assert plot_training_curves([{"step": 1, "note": "x"}], tmp_path / "none.png") is None
    many = [{"step": s, "loss": 1.0 / (s + 1)} for s in range(100)]
    assert_valid_png(plot_training_curves(many, tmp_path / "c.png", keys=["loss"]))


def test_read_metrics_jsonl_skips_only_bad_lines(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 0, "loss": 1}\n\n[1, 2]\n{"step": 1, "loss": 2}\n')
    with pytest.warns(UserWarning, match="1 malformed"):
        assert [r["step"] for r in read_metrics_jsonl(path)] == [0, 1]


def test_pareto_front_by_hand():
    points = [
        FrontierPoint("a", 1.0, 0.5),
        FrontierPoint("b", 2.0, 0.4),  # dominated by a: more KL, less reward
        FrontierPoint("c", 3.0, 0.9),
        FrontierPoint("d", 0.0, 0.1),
    ]
    assert [p.label for p in pareto_front(points)] == ["d", "a", "c"]


def test_standalone_plots_are_valid_pngs(tmp_path):
    assert_valid_png(
        plot_frontier([FrontierPoint("dpo", 1.0, 0.2, (0.8, 1.2), (0.1, 0.3))], tmp_path / "f.png")
    )
    curves = {"policy": [0.0, 0.5, 1.0], "reference": [-1.0, 0.0, 0.5]}
    assert_valid_png(plot_quantile_curves([0.0, 0.5, 1.0], curves, tmp_path / "q.png"))
