"""`distalign report --watch`: the report is rewritten when a run's inputs change, and only then; the
loop stops on its stop condition or on Ctrl-C (exit status 0 from the command)."""

from __future__ import annotations

import json

import pytest

import distalign.eval.watch as watch_module
from distalign.cli import main
from distalign.eval.watch import input_signature, regenerate_if_changed, watch


def append_metrics(run, step):
    with (run / "metrics.jsonl").open("a") as out:
        out.write(json.dumps({"step": step, "loss": 0.1}) + "\n")


def test_regenerates_once_per_change(two_runs, tmp_path):
    page_path = tmp_path / "live.html"
    signature, page = regenerate_if_changed(two_runs, page_path, None, refresh_seconds=5)
    assert page == page_path and '<meta http-equiv="refresh" content="5">' in page.read_text()
    assert regenerate_if_changed(two_runs, page_path, signature) == (signature, None)  # nothing changed

    append_metrics(two_runs[0], 21)
    changed, page = regenerate_if_changed(two_runs, page_path, signature, refresh_seconds=5)
    assert page == page_path and changed != signature
    # A new evaluation appearing counts too; a missing file is part of the signature.
    (two_runs[1] / "eval" / "samples.jsonl").unlink()
    assert regenerate_if_changed(two_runs, page_path, changed)[1] == page_path
    assert None in input_signature(two_runs)


def test_a_failed_write_is_reported_and_retried_at_the_next_change(two_runs, tmp_path, monkeypatch):
    real = watch_module.write_report
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(watch_module, "write_report", flaky)
    errors, polls = [], []

    def sleep(seconds):
        polls.append(seconds)
        if len(polls) == 2:
            append_metrics(two_runs[0], 21)

    writes = watch(
        two_runs,
        tmp_path,
        interval=1,
        on_error=errors.append,
        should_stop=lambda: len(polls) >= 3,
        sleep=sleep,
    )
    assert [str(e) for e in errors] == ["disk full"] and writes == 1 and len(calls) == 2
    calls.clear()
    with pytest.raises(OSError, match="disk full"):  # without on_error the error is the caller's
        regenerate_if_changed(two_runs, tmp_path, None)


def test_a_report_without_watch_does_not_refresh(two_runs, tmp_path):
    from distalign.eval.report import write_report

    assert "http-equiv" not in write_report(two_runs, tmp_path / "r.html").read_text()


def test_the_loop_writes_on_change_and_stops(two_runs, tmp_path):
    polls = []

    def sleep(seconds):
        polls.append(seconds)
        if len(polls) == 2:
            append_metrics(two_runs[1], 13)  # the run logs a step between two polls

    written = []
    writes = watch(
        two_runs,
        tmp_path / "out",
        interval=0.01,
        on_write=written.append,
        should_stop=lambda: len(polls) >= 4,
        sleep=sleep,
    )
    assert writes == 2 and written == [tmp_path / "out" / "report.html"] * 2 and polls == [0.01] * 4
    with pytest.raises(ValueError, match="positive"):
        watch(two_runs, tmp_path / "out", interval=0)


def test_the_command_stops_cleanly_on_ctrl_c(two_runs, tmp_path, capsys, monkeypatch):
    real_watch = watch_module.watch

    def interrupted_after_one_poll(*args, **kwargs):
        def sleep(seconds):
            raise KeyboardInterrupt

        return real_watch(*args, **kwargs, sleep=sleep)

    monkeypatch.setattr(watch_module, "watch", interrupted_after_one_poll)
    page = tmp_path / "live.html"
    argv = ["report", *map(str, two_runs), "--output", str(page), "--watch", "--interval", "0.5"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"report: {page}" in out and "Ctrl-C" in out and "report updated" in out
    assert "stopped watching" in out and 'content="1"' in page.read_text()

    assert main(["report", str(two_runs[0]), "--interval", "3"]) == 2
    assert "add --watch" in capsys.readouterr().err
