"""Messy data through the command line: every case is one `distalign: error:` line naming the file (and
the row and field where there is one) with what to do, exit status 2, no traceback, nothing written.

Issue 12, items 3, 5, 7 and the data cases of 8; plus datasets as users really have them."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distalign.cli import main

PAIR = {"prompt": "Review: soup.", "chosen": " Lovely.", "rejected": " Awful."}
TRAIN = ["train", "configs/quickstart.yaml", "model.name=tiny", "train.max_steps=1", "train.progress=false"]


def jsonl(rows) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    return code, captured.err


def data_check(path: Path, capsys, *flags: str) -> str:
    code, err = run_cli(["data", "check", str(path), *flags], capsys)
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[0].startswith("distalign: error: "), err
    return err


def train(tmp_path: Path, capsys, *overrides: str) -> str:
    run_dir = tmp_path / "run"
    code, err = run_cli([*TRAIN, f"output_dir={run_dir}", *overrides], capsys)
    assert code == 2, err
    assert "distalign: error: " in err
    assert not run_dir.exists(), "a refused run must not write its run directory"
    return err


# -- item 3 / 7: files that cannot be read as they are ---------------------------------------------


def test_jsonl_that_is_not_utf8_names_row_offset_and_encoding(tmp_path, capsys):
    path = tmp_path / "reviews.jsonl"
    good = jsonl([PAIR] * 6).encode()
    path.write_bytes(
        good + '{"prompt": "Caf\xe9?", "chosen": " Yes.", "rejected": " No."}\n'.encode("latin1")
    )
    err = data_check(path, capsys)
    offset = len(good) + len('{"prompt": "Caf')
    assert f"{path}: row 7: not UTF-8 (byte 0xe9 at offset {offset})" in err
    assert "iconv -f latin1 -t utf-8 reviews.jsonl" in err


def test_csv_that_is_not_utf8_names_the_data_row_through_a_quoted_newline(tmp_path, capsys):
    path = tmp_path / "pairs.csv"
    text = 'prompt,chosen,rejected\nSoup?,Yes,No\n"Two\nlines",Yes,No\n\u201cTea\u201d?,Yes,No\n'
    path.write_bytes(text.encode("cp1252"))
    err = data_check(path, capsys)
    assert f"{path}: row 3: not UTF-8 (byte 0x93" in err and "line 5" in err
    assert "iconv -f cp1252 -t utf-8 pairs.csv" in err  # curly quotes: Windows-1252, not latin1


def test_train_refuses_non_utf8_data_before_writing_anything(tmp_path, capsys):
    path = tmp_path / "reviews.jsonl"
    path.write_bytes(jsonl([PAIR]).encode() + b'{"prompt": "\xff"}\n')
    err = train(tmp_path, capsys, f"data.path={path}")
    assert "row 2: not UTF-8 (byte 0xff" in err


def test_corrupt_and_non_parquet_files(tmp_path, capsys):
    table_path = tmp_path / "full.parquet"
    pq.write_table(pa.Table.from_pylist([PAIR] * 3), table_path)
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(table_path.read_bytes()[:-20])
    err = data_check(truncated, capsys)
    assert f"{truncated}: truncated or corrupt Parquet file" in err and "download or export it again" in err
    text = tmp_path / "pairs.parquet"
    text.write_text("prompt,chosen,rejected\nSoup?,Yes,No\n")
    err = data_check(text, capsys)
    assert f"{text}: not a Parquet file" in err and "comma-separated values: rename it to pairs.csv" in err


def test_directory_without_data_files(tmp_path, capsys):
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "README.md").write_text("my data")
    (folder / "notes.txt").write_text("x")
    err = data_check(folder, capsys)
    assert f"{folder}: directory with no data files (it holds README.md, notes.txt)" in err
    assert "datasets.save_to_disk" in err


def test_duplicate_key_in_a_json_row(tmp_path, capsys):
    path = tmp_path / "dup.jsonl"
    path.write_text(
        jsonl([PAIR]) + '{"prompt": "Tea?", "chosen": " Yes.", "rejected": " No.", "chosen": " Hm."}\n'
    )
    err = data_check(path, capsys)
    assert f"{path}: row 2: field 'chosen': key 'chosen' appears twice in one JSON object" in err


def test_duplicate_column_in_a_csv_header(tmp_path, capsys):
    path = tmp_path / "dup.csv"
    path.write_text("prompt,chosen,rejected,chosen\nSoup?,Yes,No,Hm\n")
    err = data_check(path, capsys)
    assert f"{path}: field 'chosen': column 'chosen' appears twice in the header" in err


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("notes.txt", "Write a haiku.\nName a colour.\n", "jq -R -c '{prompt: .}' notes.txt > notes.jsonl"),
        ("sheet.xlsx", b"PK\x03\x04" + bytes(60), "pd.read_excel('sheet.xlsx').to_csv('sheet.csv'"),
        ("rows.json", json.dumps({"data": [PAIR, PAIR]}, indent=2), "jq -c '.data[]' rows.json > rows.jsonl"),
        ("one.json", json.dumps(PAIR, indent=2), "jq -c . one.json > one.jsonl"),
        ("array.jsonl", json.dumps([PAIR, PAIR], indent=2), "jq -c '.[]' array.jsonl > array.fixed.jsonl"),
        ("data.gz", b"\x1f\x8b\x08" + bytes(20), "gunzip -k data.gz"),
    ],
)
def test_a_format_we_do_not_read_says_what_it_looks_like(tmp_path, capsys, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    err = data_check(path, capsys)
    assert f"{path}: " in err and expected in err


def test_json_arrays_and_tsv_files_are_read(tmp_path, capsys):
    (tmp_path / "rows.json").write_text(json.dumps([PAIR, PAIR], indent=2))
    (tmp_path / "rows.tsv").write_text("prompt\tchosen\trejected\nSoup?\t Yes.\t No.\n")
    for name in ("rows.json", "rows.tsv"):
        code, _ = run_cli(["data", "check", str(tmp_path / name)], capsys)
        assert code == 0


def test_byte_order_marks_are_skipped(tmp_path, capsys):
    csv_path = tmp_path / "excel.csv"
    csv_path.write_bytes(b"\xef\xbb\xbfprompt,chosen,rejected\nSoup?, Yes., No.\n")
    jsonl_path = tmp_path / "notepad.jsonl"
    jsonl_path.write_bytes(b"\xef\xbb\xbf" + jsonl([PAIR]).encode())
    for path in (csv_path, jsonl_path):
        code = main(["data", "check", str(path)])
        assert code == 0 and "format paired" in capsys.readouterr().out


def test_utf16_file_is_refused_with_iconv(tmp_path, capsys):
    path = tmp_path / "excel.csv"
    path.write_bytes("prompt,chosen,rejected\nSoup?,Yes,No\n".encode("utf-16"))
    err = data_check(path, capsys)
    assert f"{path}: not CSV: the file holds UTF-16 encoded text" in err and "iconv -f utf-16" in err


# -- item 8: length limits ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--max-length", "0"], "--max-length 0"),
        (["--max-prompt-length", "0"], "--max-prompt-length 0"),
        (["--max-length", "64", "--max-prompt-length", "64"], "--max-prompt-length 64 must be smaller"),
        (["--limit", "0"], "--limit 0"),
    ],
)
def test_invalid_length_flags_on_data_check(capsys, flags, named):
    err = data_check(Path("builtin:quickstart_pairs.jsonl"), capsys, *flags)
    assert named in err


def test_all_rows_dropped_for_length_names_the_limits_to_raise(tmp_path, capsys):
    err = train(tmp_path, capsys, "data.truncation=drop", "data.max_length=8", "data.max_prompt_length=4")
    assert "builtin:quickstart_pairs.jsonl: all 240 rows are dropped for length" in err
    assert "raise data.max_prompt_length to" in err and "data.max_length to" in err
    assert "data.truncation=truncate" in err


def test_data_check_warns_when_every_row_would_be_dropped(capsys):
    code = main(
        ["data", "check", "builtin:quickstart_pairs.jsonl", "--model", "tiny", "--truncation", "drop"]
        + ["--max-length", "8", "--max-prompt-length", "4"]
    )
    out = capsys.readouterr().out
    assert code == 0 and "warning: all 240 rows are dropped for length" in out
    assert "raise --max-prompt-length to" in out


# -- item 8 / 5: the loss and the data disagree ----------------------------------------------------


def test_unpaired_rows_under_a_paired_loss_name_the_losses_that_fit(tmp_path, capsys):
    err = train(tmp_path, capsys, "data.path=builtin:quickstart_unpaired.jsonl")
    assert "loss 'dpo' trains on paired rows but builtin:quickstart_unpaired.jsonl holds unpaired rows" in err
    assert "aot_unpaired, kto" in err


def test_paired_rows_under_kto_and_listwise_rows_under_dpo(tmp_path, capsys):
    err = train(tmp_path, capsys, "loss.name=kto")
    assert "data.unpair=true" in err and "aot_paired, dpo" in err
    listwise = tmp_path / "lists.jsonl"
    listwise.write_text(jsonl([{"prompt": "Soup?", "responses": [" Yes.", " No."], "scores": [1, 0]}] * 2))
    err = train(tmp_path, capsys, f"data.path={listwise}")
    assert "holds listwise rows" in err and "plackett_luce" in err


# -- messy datasets --------------------------------------------------------------------------------


def test_csv_missing_a_column_names_it(tmp_path, capsys):
    path = tmp_path / "pairs.csv"
    path.write_text("prompt,chosen\nSoup?,Yes\n")
    err = data_check(path, capsys)
    assert f"{path}: field 'rejected': unrecognised data format" in err
    assert "look like the paired format, which also needs rejected" in err


def test_capitalised_column_names(tmp_path, capsys):
    path = tmp_path / "pairs.csv"
    path.write_text("Prompt,Chosen,Rejected\nSoup?,Yes,No\n")
    err = data_check(path, capsys)
    assert "column names are case-sensitive: rename 'Prompt' -> 'prompt'" in err


def test_mixed_paired_and_unpaired_rows_name_the_first_odd_row(tmp_path, capsys):
    path = tmp_path / "mixed.jsonl"
    path.write_text(jsonl([PAIR, PAIR, {"prompt": "Tea?", "completion": " Fine.", "label": True}]))
    err = data_check(path, capsys)
    assert f"{path}: row 3: this row is unpaired" in err and "row 1 is paired" in err


def test_label_maybe_and_nan_weight(tmp_path, capsys):
    labels = tmp_path / "labels.csv"
    labels.write_text("prompt,completion,label\nSoup?,Yes,true\nTea?,No,maybe\n")
    assert f"{labels}: row 2: field 'label': expected a boolean label" in data_check(labels, capsys)
    weights = tmp_path / "weights.jsonl"
    weights.write_text(jsonl([PAIR]) + '{"prompt": "a", "chosen": "b", "rejected": "c", "weight": NaN}\n')
    assert f"{weights}: row 2: field 'weight': expected a finite number, got nan" in data_check(
        weights, capsys
    )


def test_empty_file_and_a_row_that_is_a_list(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert f"{empty}: no data rows" in data_check(empty, capsys)
    listed = tmp_path / "listed.jsonl"
    listed.write_text(jsonl([PAIR]) + json.dumps([PAIR]) + "\n")
    err = data_check(listed, capsys)
    assert f"{listed}: row 2: this line is a JSON array" in err


def test_implicit_prompt_rows_without_a_shared_prefix(tmp_path, capsys):
    path = tmp_path / "hh.jsonl"
    rows = [
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."},
        {"chosen": "Yes.", "rejected": "No."},
    ]
    path.write_text(jsonl(rows))
    err = data_check(path, capsys)
    assert f"{path}: row 2: field 'prompt': implicit prompt: chosen and rejected share no prefix" in err


def test_subset_on_a_local_file_is_refused(capsys):
    err = data_check(Path("builtin:quickstart_pairs.jsonl"), capsys, "--subset", "en")
    assert "subset 'en' given, but this is a single file" in err


# -- warnings (not failures) -----------------------------------------------------------------------


def test_prompts_ending_in_whitespace_warn_once(tmp_path, capsys):
    path = tmp_path / "spaces.jsonl"
    path.write_text(jsonl([{"prompt": "Q: Soup? A: ", "chosen": "Yes", "rejected": "No"}] * 3 + [PAIR]))
    code = main(["data", "check", str(path)])
    out = capsys.readouterr().out
    assert code == 0
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "3 of 4 prompts end in whitespace (first: row 1)" in warnings[0]


# -- the demo's output directory -------------------------------------------------------------------


def test_demo_output_dir_may_be_an_existing_empty_directory(tmp_path):
    from distalign.demo import MARKER, prepare_output_dir
    from distalign.errors import SetupError

    empty = tmp_path / "empty"
    empty.mkdir()
    prepare_output_dir(empty)
    assert (empty / MARKER).exists()
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(SetupError, match="is a file, not a directory"):
        prepare_output_dir(a_file)
