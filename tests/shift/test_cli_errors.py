"""User errors of ``distalign shift``: one line, exit status 2, nothing written (and nothing embedded:
every check runs before the embedding model loads)."""

from __future__ import annotations

import json

import pytest

from .conftest import paired_rows, write_jsonl


def _run(shift_main, tmp_path, rows, *extra, command="score", data=None):
    data = data or write_jsonl(tmp_path / "data.jsonl", rows)
    out = tmp_path / ("out.jsonl" if command == "score" else "fit_out")
    cache = tmp_path / "cache"
    argv = ["shift", command, str(data), "--output", str(out), "--cache-dir", str(cache), *extra]
    if "--target" not in extra:
        argv += ["--target", "human"]
    return shift_main(argv), out, cache


@pytest.mark.parametrize("command", ["fit", "score"])
def test_unknown_target(shift_main, tmp_path, capsys, command):
    code, out, cache = _run(shift_main, tmp_path, paired_rows(10), "--target", "golden", command=command)
    err = capsys.readouterr().err
    assert code == 2
    assert "--target 'golden' is not a source of the data; sources (rows): bot (10), human (10)" in err
    assert "Traceback" not in err and err.count("\n") == 1
    assert not out.exists() and not cache.exists()


def test_source_with_too_few_rows(shift_main, tmp_path, capsys):
    rows = paired_rows(10)
    rows = [r for r in rows if r["source"] == "human"] + [r for r in rows if r["source"] == "bot"][:3]
    code, out, cache = _run(shift_main, tmp_path, rows)
    err = capsys.readouterr().err
    assert code == 2 and "too few rows" in err and "bot (3)" in err and "--min-rows" in err
    assert not out.exists() and not cache.exists()


def test_only_the_target_source(shift_main, tmp_path, capsys):
    rows = [r for r in paired_rows(10) if r["source"] == "human"]
    code, out, _ = _run(shift_main, tmp_path, rows)
    assert code == 2 and "at least one other source" in capsys.readouterr().err
    assert not out.exists()


def test_missing_source_column_names_file_row_and_field(shift_main, tmp_path, capsys):
    rows = paired_rows(10)
    del rows[2]["source"]
    code, out, _ = _run(shift_main, tmp_path, rows)
    err = capsys.readouterr().err
    assert code == 2
    assert "data.jsonl: row 3: field 'source': missing source" in err
    assert not out.exists()


def test_no_source_column_at_all_lists_the_rows(shift_main, tmp_path, capsys):
    rows = [{k: v for k, v in r.items() if k != "source"} for r in paired_rows(10)]
    code, out, _ = _run(shift_main, tmp_path, rows)
    err = capsys.readouterr().err
    assert code == 2 and "invalid row(s)" in err and "field 'source'" in err
    assert not out.exists()


def test_malformed_data_row(shift_main, tmp_path, capsys):
    rows = paired_rows(10)
    rows[4]["chosen"] = 7
    code, out, _ = _run(shift_main, tmp_path, rows)
    err = capsys.readouterr().err
    assert code == 2 and "row 5" in err and "'chosen'" in err
    assert not out.exists()


def test_prompt_only_data(shift_main, tmp_path, capsys):
    rows = [{"prompt": f"p{i}", "source": "human" if i % 2 else "bot"} for i in range(20)]
    code, out, _ = _run(shift_main, tmp_path, rows)
    assert code == 2 and "prompt-only rows have no responses" in capsys.readouterr().err
    assert not out.exists()


def test_missing_file(shift_main, tmp_path, capsys):
    code, out, _ = _run(shift_main, tmp_path, None, data=tmp_path / "nope.jsonl")
    assert code == 2 and "nope.jsonl" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--proportions", "human=0.5,bot=0.6"], "sum to 1.1"),
        (["--proportions", "human=1"], "missing sources present in the data: bot"),
        (["--classifier", "hf:prajjwal1/bert-tiny"], "not a model in the local Hugging Face cache"),
        (["--classifier", "hf:minilm", "--epochs", "0"], "--epochs must be >= 1"),
        (["--classifier", "hf:minilm", "--learning-rate", "0"], "--learning-rate must be > 0"),
        (["--heldout-fraction", "1.5"], "--heldout-fraction must be in (0, 1)"),
        (["--C", "-1"], "--C must be > 0"),
        (["--C", "big"], "--C must be a number > 0 or 'auto'"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--embedding-model", "/no/such/model"], "/no/such/model does not exist"),
        (["--embedding-model", "/"], "/ is not a model directory (no config.json)"),
    ],
)
def test_bad_settings(shift_main, tmp_path, capsys, extra, message):
    code, out, cache = _run(shift_main, tmp_path, paired_rows(10), *extra)
    assert code == 2 and message in capsys.readouterr().err
    assert not out.exists() and not cache.exists()


def test_an_existing_output_is_left_untouched_by_a_failed_score(shift_main, tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"keep": True}) + "\n")
    code, _, _ = _run(shift_main, tmp_path, paired_rows(10), "--target", "golden")
    assert code == 2 and out.read_text() == json.dumps({"keep": True}) + "\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl", "out.jsonl"]
