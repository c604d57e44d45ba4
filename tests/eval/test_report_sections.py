"""The report's new sections on constructed runs: the verdict first, the settings in the comparison
table, example generations (choice of prompts, escaping), one colour per run."""

from __future__ import annotations

import json
import re

import yaml

from distalign.eval.generations import by_prompt, generations_section, pick_prompts
from distalign.eval.overview import data_rows_label, lora_label, steps_label
from distalign.eval.plots import REFERENCE_COLOR, panel_title, run_colors
from distalign.eval.report import write_report
from distalign.eval.run_dir import load_run


def samples(changes, per_prompt=2):
    """samples.jsonl rows whose prompt i has a policy-minus-reference change of ``changes[i]``."""
    rows = []
    for i, change in enumerate(changes):
        for j in range(per_prompt):
            rows.append(
                {"model": "policy", "prompt": f"p{i}", "completion": f"pol {i}.{j}", "gold_reward": change}
            )
            rows.append(
                {"model": "reference", "prompt": f"p{i}", "completion": f"ref {i}.{j}", "gold_reward": 0.0}
            )
    return rows


def test_pick_prompts_best_median_worst():
    runs = {"a": by_prompt(samples([0.1, 0.9, -0.5, 0.3, 0.0]))}
    picked = pick_prompts(runs)
    assert [(e.kind, e.prompt) for e in picked] == [
        ("best change", "p1"),
        ("median change", "p0"),
        ("worst change", "p2"),
    ]
    many = {"a": by_prompt(samples([float(i) for i in range(12)]))}
    assert [e.prompt for e in pick_prompts(many)] == ["p11", "p10", "p6", "p1", "p0"]  # 2 per end from 10 on


def test_pick_prompts_average_over_runs_and_skip_prompts_a_run_lacks():
    a = by_prompt(samples([1.0, 0.0, -1.0]))
    b = by_prompt(samples([-3.0, 0.5, 2.0, 9.0]))  # p3 only in b: left out
    picked = pick_prompts({"a": a, "b": b, "no samples": {}})
    assert [(e.kind, e.prompt, e.change) for e in picked] == [
        ("best change", "p2", 0.5),
        ("median change", "p1", 0.25),
        ("worst change", "p0", -1.0),
    ]
    assert set(picked[0].runs) == {"a", "b"}


def test_generations_are_escaped_and_side_by_side():
    rows = samples([0.5])
    rows[0]["completion"] = "<script>alert(1)</script> \x02 & <b>"
    for row in rows:
        row["prompt"] = "<i>prompt</i>"
    text = generations_section({"run<1>": by_prompt(rows)}, run_colors(["run<1>"]))
    assert "<script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt; \u2402 &amp; &lt;b&gt;" in text
    assert "&lt;i&gt;prompt&lt;/i&gt;" in text and "run&lt;1&gt;" in text
    assert text.count('class="gen"') == 2 and 'id="generations"' in text
    assert generations_section({"a": {}}, {}) == ""


def test_run_settings_labels(tmp_path, two_runs):
    dpo, ipo = (load_run(r) for r in two_runs)
    assert (lora_label(dpo.config), lora_label(ipo.config), lora_label(None)) == ("full", "r=16", "")
    assert steps_label(dpo) == "20" and data_rows_label(dpo) == "240"
    dpo.metrics = dpo.metrics[:8]
    assert steps_label(dpo) == "8/20"  # still training
    (dpo.path / "dominance.json").write_text(json.dumps({"rows": 512}))
    assert data_rows_label(dpo) == "≥ 512"  # the trainer scores at most 512 rows
    (dpo.path / "dominance.json").unlink()
    dpo.config["data"]["limit"] = 100
    assert data_rows_label(dpo) == "≤ 100"
    from distalign.train.record import TrainingRecord

    (dpo.path / "final").mkdir(exist_ok=True)
    TrainingRecord("data.jsonl", "paired", 1234, "f" * 64, 20).save(dpo.path / "final")
    assert data_rows_label(dpo) == "1234"  # the exact count saved with the model wins


def test_the_page_answers_first_and_shows_settings(two_runs, tmp_path):
    text = write_report(two_runs, tmp_path / "report.html").read_text()
    headings = re.findall(r"<h2[^>]*>([^<]*)", text)
    assert headings[:3] == ["Verdict", "Comparison", "Example generations"]
    verdicts = re.findall(r'<div class="verdict (\w+)">.*?<p>(.*?)</p>', text)
    assert [kind for kind, _ in verdicts] == ["dominates", "does_not_beat"]
    assert verdicts[0][1].startswith("dominates the reference: gold reward +0.")
    for header in ("beta", "lr", "steps", "batch", "LoRA", "data rows"):
        assert f"<th>{header}</th>" in text
    assert "<th>aggregator</th>" not in text  # both use the plain mean
    assert "<td>r=16</td>" in text and "<td>full</td>" in text and "<td>240</td>" in text
    assert "http-equiv" not in text


def test_the_aggregator_column_appears_when_one_is_not_the_mean(two_runs, tmp_path):
    config = yaml.safe_load((two_runs[1] / "config.yaml").read_text())
    config["aggregator"] = {"name": "cvar"}
    (two_runs[1] / "config.yaml").write_text(yaml.safe_dump(config))
    text = write_report(two_runs, tmp_path / "report.html").read_text()
    assert "<th>aggregator</th>" in text and "<td>cvar</td>" in text and "<td>mean</td>" in text


def test_one_colour_per_run_and_implicit_reward_titles():
    colors = run_colors(["a", "b", "reference-like"])
    assert (
        colors["reference"] == REFERENCE_COLOR and len({colors["a"], colors["b"], colors["reference"]}) == 3
    )
    assert REFERENCE_COLOR not in [colors[n] for n in ("a", "b", "reference-like")]
    assert "not the gold reward" in panel_title("rewards/margins") and panel_title("loss") == "loss"
