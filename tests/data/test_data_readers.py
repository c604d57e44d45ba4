"""Readers: encodings, byte-order marks, duplicate keys, containers we do not read, directories, hub
subsets; and the loader's hints on formats and whitespace."""

from __future__ import annotations

import json

import datasets
import pytest

from distalign.cli import main
from distalign.data.check import nothing_kept_reason
from distalign.data.formats import DataError
from distalign.data.loading import load_rows
from distalign.data.readers import conversion_hint, sniff
from distalign.data.tokenize import apply_length_policy, encode_rows
from distalign.data.tokenized import TokenizationSettings
from distalign.losses.base import format_mismatch

PAIRS = [
    {"prompt": "Review: soup.", "chosen": " Lovely.", "rejected": " Awful."},
    {"prompt": "Review: tea.", "chosen": " Great.", "rejected": " Bland."},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("head", "kind"),
    [
        (b"", "empty"),
        (b"PAR1\x15\x04", "parquet"),
        (b"PK\x03\x04\x14\x00", "spreadsheet"),
        (b"\x1f\x8b\x08\x00", "gzip"),
        ("prompt,chosen\n".encode("utf-16"), "utf16"),
        ("prompt,chosen\n".encode("utf-16-be"), "utf16"),
        (b'[{"prompt": "a"}]', "json_array"),
        (b'\xef\xbb\xbf{"prompt": "a"}\n', "jsonl"),
        (b"prompt\tchosen\n", "tsv"),
        (b"prompt,chosen\n", "csv"),
        (b"Write a poem.\n", "text"),
    ],
)
def test_sniff(head, kind):
    assert sniff(head)[0] == kind


def test_conversion_hints_never_overwrite_their_input():
    assert conversion_hint("json_array", "rows.json").endswith("> rows.jsonl")
    assert conversion_hint("json_array", "rows.jsonl").endswith("> rows.fixed.jsonl")


def test_utf8_error_in_a_csv_header_has_no_row(tmp_path):
    path = tmp_path / "h.csv"
    path.write_bytes("pr\xe9mpt,chosen,rejected\na,b,c\n".encode("latin1"))
    with pytest.raises(DataError, match=r"not UTF-8 \(byte 0xe9 at offset 2, line 1\)") as info:
        load_rows(path)
    assert info.value.row is None and info.value.file == str(path)


def test_utf8_error_in_a_json_array_reports_the_line(tmp_path):
    path = tmp_path / "rows.json"
    path.write_bytes(b'[\n {"prompt": "a", "chosen": "b", "rejected": "c"},\n {"prompt": "\xe9"}\n]')
    with pytest.raises(DataError, match=r"byte 0xe9 at offset \d+, line 3\)") as info:
        load_rows(path)
    assert info.value.row is None  # rows of a JSON array are elements, not lines


def test_utf8_error_after_the_limit_is_not_read(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(write_jsonl(tmp_path / "x.jsonl", PAIRS).read_bytes() + b'{"prompt": "\xe9"}\n')
    assert load_rows(path, limit=2).num_rows == 2


def test_bom_fingerprint_equals_the_plain_file(tmp_path):
    plain = write_jsonl(tmp_path / "plain.jsonl", PAIRS)
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    assert load_rows(bom).fingerprint == load_rows(plain).fingerprint


def test_duplicate_keys_in_a_json_array_and_in_a_nested_message(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(
        '[{"prompt": "a", "chosen": "b", "rejected": "c"},\n'
        ' {"prompt": [{"role": "user", "content": "x", "role": "system"}], "chosen": "b", "rejected": "c"}]'
    )
    with pytest.raises(DataError, match="key 'role' appears twice") as info:
        load_rows(path)
    assert (info.value.row, info.value.field) == (2, "role")


def test_csv_header_names_are_stripped_and_a_jsonl_named_csv_is_recognised(tmp_path):
    spaced = tmp_path / "spaced.csv"
    spaced.write_text("prompt, chosen, rejected\nReview: soup., Lovely., Awful.\n")
    assert load_rows(spaced).format == "paired"
    disguised = tmp_path / "rows.csv"
    write_jsonl(disguised, PAIRS)
    with pytest.raises(
        DataError, match="this is JSON objects .JSON lines., not CSV; rename it to rows.jsonl"
    ):
        load_rows(disguised)


def test_a_single_line_json_object_is_one_row(tmp_path):
    path = tmp_path / "one.json"
    path.write_text(json.dumps(PAIRS[0]))
    assert load_rows(path).num_rows == 1


def test_tsv_equals_csv(tmp_path):
    tsv = tmp_path / "rows.tsv"
    tsv.write_text(
        "prompt\tchosen\trejected\n"
        + "".join(f"{r['prompt']}\t{r['chosen']}\t{r['rejected']}\n" for r in PAIRS)
    )
    assert load_rows(tsv).fingerprint == load_rows(write_jsonl(tmp_path / "rows.jsonl", PAIRS)).fingerprint


def test_corrupt_parquet_body(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(PAIRS * 50), path)
    data = bytearray(path.read_bytes())
    data[8:200] = bytes(192)  # zero the first data page, keep header and footer
    path.write_bytes(bytes(data))
    with pytest.raises(DataError) as info:
        load_rows(path)
    assert info.value.file == str(path) and "Parquet" in str(info.value)


def test_directory_of_jsonl_files_is_read_and_a_damaged_saved_dataset_is_a_data_error(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")  # not ~/.cache
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", PAIRS)
    assert load_rows(folder).num_rows == 2
    with pytest.raises(DataError, match="no split 'test'"):
        load_rows(folder, split="test")
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(PAIRS).save_to_disk(str(saved))
    with pytest.raises(DataError, match="saved `datasets` directory, which has no subsets"):
        load_rows(saved, subset="en")
    for arrow in saved.glob("*.arrow"):
        arrow.write_bytes(b"not arrow")
    with pytest.raises(DataError, match="cannot read this saved `datasets` directory") as info:
        load_rows(saved)
    assert info.value.file == str(saved)


def test_hub_id_with_subset_and_split_goes_through_datasets_load_dataset(tmp_path, monkeypatch, capsys):
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(PAIRS).save_to_disk(str(saved))
    calls = []

    def load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return datasets.load_from_disk(str(saved))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    data = load_rows("someone/prefs", subset="en", split="test")
    assert data.num_rows == 2 and calls == [("someone/prefs", "en", "test")]
    assert main(["data", "check", "someone/prefs", "--subset", "fr", "--split", "dev"]) == 0
    assert calls[-1] == ("someone/prefs", "fr", "dev") and "2 rows, format paired" in capsys.readouterr().out
    load_rows("someone/prefs")
    assert calls[-1] == ("someone/prefs", None, "train")


def test_train_passes_data_subset_to_the_hub_call(tmp_path, monkeypatch, capsys):
    unpaired = [{"prompt": "Review: soup.", "completion": " Lovely.", "label": True}] * 2
    calls = []

    def load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return datasets.Dataset.from_list(unpaired)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    run_dir = tmp_path / "run"
    args = [
        "train",
        "configs/quickstart.yaml",
        "data.path=someone/prefs",
        "data.subset=en",
        "data.split=test",
    ]
    assert main([*args, f"output_dir={run_dir}"]) == 2  # dpo on unpaired rows: refused after the load
    assert calls == [("someone/prefs", "en", "test")]
    assert "holds unpaired rows" in capsys.readouterr().err and not run_dir.exists()


def test_whitespace_warning_counts_only_plain_text_prompts(tmp_path):
    rows = [{**row, "prompt": row["prompt"] + "\n"} for row in PAIRS]
    data = load_rows(write_jsonl(tmp_path / "nl.jsonl", rows))
    assert len(data.warnings) == 1 and data.warnings[0].startswith("2 of 2 prompts end in whitespace")
    assert load_rows(write_jsonl(tmp_path / "ok.jsonl", PAIRS)).warnings == []
    chat = [
        {
            "prompt": [{"role": "user", "content": "Soup? "}],
            "chosen": [{"role": "assistant", "content": "Yes."}],
            "rejected": [{"role": "assistant", "content": "No."}],
        }
    ]
    assert load_rows(write_jsonl(tmp_path / "chat.jsonl", chat)).warnings == []
    assert load_rows(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Write: "}])).warnings == []


def test_format_mismatch_names_the_losses_that_fit():
    assert "aot_unpaired, kto" in format_mismatch("dpo", "paired", "d.jsonl", "unpaired")
    assert "data.unpair=true" in format_mismatch("kto", "unpaired", "d.jsonl", "paired")
    assert "plackett_luce" in format_mismatch("dpo", "paired", "d.jsonl", "listwise")
    assert "online loop" in format_mismatch("dpo", "paired", "d.jsonl", "prompt")


def test_nothing_kept_reason_gives_the_limits_that_keep_every_row(tmp_path, word_tokenizer, words):
    raw = [
        {"prompt": words(0, 6), "chosen": words(10, 3), "rejected": words(20, 5)},
        {"prompt": words(0, 4), "chosen": words(10, 2), "rejected": words(20, 2)},
    ]
    rows = load_rows(write_jsonl(tmp_path / "r.jsonl", raw)).rows
    settings = TokenizationSettings(max_length=4, max_prompt_length=3, truncation="drop")
    _, report = apply_length_policy(encode_rows(rows, word_tokenizer, settings, "paired"), settings)
    assert report.rows_kept == 0
    reason = nothing_kept_reason(rows, "paired", word_tokenizer, settings, report)
    # prompts of 6 and 4 tokens; the longest row is 6 + 5 words + EOS = 12 tokens
    assert "2 prompts are longer than data.max_prompt_length=3" in reason
    assert "2 rows are longer than data.max_length=4" in reason
    assert "raise data.max_prompt_length to 6 and data.max_length to 12" in reason
    roomy = TokenizationSettings(max_length=5, max_prompt_length=4, truncation="drop")
    _, report = apply_length_policy(encode_rows(rows[1:], word_tokenizer, roomy, "paired"), roomy)
    assert "raise data.max_length to 7" in nothing_kept_reason(
        rows[1:], "paired", word_tokenizer, roomy, report
    )
