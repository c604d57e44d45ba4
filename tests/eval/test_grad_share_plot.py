"""The report's gradient-share plot: drawn when a run logged ``*/grad_share_*`` (train.grad_shares),
kept out of the ordinary training curves, and absent otherwise."""

from __future__ import annotations

import json

from matplotlib.image import imread

from distalign.eval.plots import grad_share_keys, plot_grad_shares
from distalign.eval.report import write_report

SHARES = ("upo/grad_share_preference", "upo/grad_share_aux", "upo/grad_share_value")


def logged_shares(run, steps=(5, 10, 15, 20)):
    """Add shares on some steps of the run's metrics (as a run logging every 5 steps writes them)."""
    path = run / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for row in rows:
        if row["step"] in steps:
            aux = 0.1 + 0.02 * row["step"]
            row.update(zip(SHARES, (0.6 - aux / 2, aux, 0.4 - aux / 2)))
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return run


def test_grad_share_keys_and_plot(tmp_path, two_runs):
    run = logged_shares(two_runs[1])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert grad_share_keys(rows) == list(SHARES)
    png = plot_grad_shares(rows, tmp_path / "shares.png")
    assert imread(png).shape[1] > 400
    single = plot_grad_shares([r for r in rows if r["step"] == 5], tmp_path / "one.png")  # one logged step
    assert single is not None and imread(single).shape[0] > 100
    assert plot_grad_shares([{"step": 1, "loss": 0.5}], tmp_path / "none.png") is None


def test_the_report_draws_the_shares_of_a_run_that_logged_them(tmp_path, two_runs):
    dpo, logged = two_runs[0], logged_shares(two_runs[1])
    page = write_report([dpo, logged], tmp_path / "report.html")
    text = page.read_text()
    assert text.count("<h3>Gradient share per loss term</h3>") == 1
    assert (tmp_path / "report_files" / f"{logged.name}_grad_shares.png").exists()
    assert not (tmp_path / "report_files" / f"{dpo.name}_grad_shares.png").exists()
    assert "per loss term, per run" not in text  # one run with shares: nothing to compare


def test_runs_that_logged_shares_are_compared_side_by_side(tmp_path, two_runs):
    one, other = (logged_shares(run) for run in two_runs)
    page = write_report([one, other], tmp_path / "report.html")
    text = page.read_text()
    assert text.count("<h3>Gradient share per loss term, per run</h3>") == 1
    assert text.count("<h3>Gradient share per loss term</h3>") == 2  # and step by step in each run's section
    assert imread(tmp_path / "report_files" / "grad_shares.png").shape[1] > 400
