"""load_rows from every container, in every format; errors located by file, row and field."""

from __future__ import annotations

import csv
import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distalign.data.formats import DataError
from distalign.data.loading import MAX_COLLECTED_ERRORS, load_rows, resource_path

RAW = {
    "paired": [
        {
            "prompt": "Review: soup.",
            "chosen": " Lovely.",
            "rejected": " Awful.",
            "source": "a",
            "weight": 2.0,
        },
        {"prompt": "Review: tea.", "chosen": " Great.", "rejected": " Bland.", "source": "b", "weight": 0.5},
    ],
    "unpaired": [
        {"prompt": "Review: soup.", "completion": " Lovely.", "label": True, "group": "g1"},
        {"prompt": "Review: tea.", "completion": " Bland.", "label": False, "group": "g2"},
        {"prompt": "Review: pie.", "completion": " Superb.", "label": True, "group": "g1"},
    ],
    "listwise": [
        {"prompt": "Review: soup.", "responses": [" Good.", " Bad.", " Okay."], "scores": [2.0, 0.0, 1.0]},
        {"prompt": "Review: tea.", "responses": [" Fine.", " Poor."], "scores": [1.5, -1.0]},
    ],
    "prompt": [{"prompt": "Review: soup."}, {"prompt": ""}, {"prompt": "Review: pie."}],
}
CONVERSATIONAL = [
    {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Soup?"}],
        "chosen": [{"role": "assistant", "content": "Lovely."}],
        "rejected": [{"role": "assistant", "content": "Awful."}],
    },
    {
        "prompt": [{"role": "user", "content": "Tea?"}],
        "chosen": [{"role": "assistant", "content": "Great."}],
        "rejected": [{"role": "assistant", "content": "Bland."}],
    },
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_csv(path, rows):
    columns = sorted({key for row in rows for key in row})
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            cells = {}
            for key, value in row.items():
                if isinstance(value, (list, dict)):
                    cells[key] = json.dumps(value)
                elif isinstance(value, bool):
                    cells[key] = str(value).lower()
                else:
                    cells[key] = value
            writer.writerow(cells)
    return path


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_saved_dataset(path, rows):
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


WRITERS = {
    "data.jsonl": write_jsonl,
    "data.csv": write_csv,
    "data.parquet": write_parquet,
    "saved": write_saved_dataset,
}


@pytest.mark.parametrize("fmt", list(RAW))
def test_every_container_gives_identical_rows(tmp_path, fmt):
    loaded = {name: load_rows(writer(tmp_path / name, RAW[fmt])) for name, writer in WRITERS.items()}
    jsonl = loaded["data.jsonl"]
    assert jsonl.format == fmt and jsonl.num_rows == len(RAW[fmt]) and not jsonl.conversational
    for name, data in loaded.items():
        assert data.rows == jsonl.rows, name
        assert data.fingerprint == jsonl.fingerprint, name
        assert data.format == fmt


def test_normalised_values(tmp_path):
    data = load_rows(write_csv(tmp_path / "u.csv", RAW["unpaired"]))
    assert [r["label"] for r in data.rows] == [True, False, True]
    assert [r["group"] for r in data.rows] == ["g1", "g2", "g1"]
    assert all(r["weight"] == 1.0 and r["source"] is None for r in data.rows)
    listwise = load_rows(write_csv(tmp_path / "l.csv", RAW["listwise"]))
    assert listwise.rows[1]["scores"] == [1.5, -1.0]


@pytest.mark.parametrize("name", ["data.jsonl", "data.csv", "data.parquet", "saved"])
def test_conversational_in_every_container(tmp_path, name):
    data = load_rows(WRITERS[name](tmp_path / name, CONVERSATIONAL))
    assert data.conversational and data.format == "paired"
    assert data.rows[0]["prompt"] == CONVERSATIONAL[0]["prompt"]
    assert data.rows[1]["rejected"] == [{"role": "assistant", "content": "Bland."}]


def test_fingerprint_tracks_content(tmp_path):
    first = load_rows(write_jsonl(tmp_path / "a.jsonl", RAW["paired"]))
    changed = [dict(RAW["paired"][0], chosen=" Lovely!"), RAW["paired"][1]]
    second = load_rows(write_jsonl(tmp_path / "b.jsonl", changed))
    assert first.fingerprint != second.fingerprint
    assert len(first.fingerprint) == 64 and int(first.fingerprint, 16) >= 0


def test_dataset_dict_split_and_limit(tmp_path):
    splits = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(RAW["prompt"]),
            "test": datasets.Dataset.from_list(RAW["prompt"][:1]),
        }
    )
    splits.save_to_disk(str(tmp_path / "dd"))
    assert load_rows(tmp_path / "dd").num_rows == 3
    assert load_rows(tmp_path / "dd", split="test").num_rows == 1
    assert load_rows(tmp_path / "dd", limit=2).num_rows == 2
    with pytest.raises(DataError, match="available splits: test, train"):
        load_rows(tmp_path / "dd", split="validation")


def test_limit_on_files(tmp_path):
    assert load_rows(write_jsonl(tmp_path / "u.jsonl", RAW["unpaired"]), limit=2).num_rows == 2
    assert load_rows(write_csv(tmp_path / "u.csv", RAW["unpaired"]), limit=1).num_rows == 1
    assert load_rows(write_parquet(tmp_path / "u.parquet", RAW["unpaired"]), limit=2).num_rows == 2


def test_bad_json_line_reports_line_number(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = json.dumps(RAW["prompt"][0])
    path.write_text(f"{good}\n\n{good}\n{{not json\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_rows(path)
    assert (info.value.file, info.value.row) == (str(path), 4)  # the blank line 2 still counts
    assert "invalid JSON" in str(info.value)


@pytest.mark.parametrize(
    ("bad_row", "field", "words"),
    [
        ({"prompt": "p", "chosen": "a"}, "rejected", "missing"),
        ({"prompt": "p", "chosen": 7, "rejected": "b"}, "chosen", "got int"),
        ({"prompt": 1.5, "chosen": "a", "rejected": "b"}, "prompt", "got float"),
    ],
)
def test_bad_row_is_located(tmp_path, bad_row, field, words):
    rows = [RAW["paired"][0], RAW["paired"][1], bad_row]
    path = write_jsonl(tmp_path / "x.jsonl", rows)
    with pytest.raises(DataError) as info:
        load_rows(path, format="paired")
    error = info.value
    assert (error.file, error.row, error.field) == (str(path), 3, field)
    assert words in str(error)


@pytest.mark.parametrize("writer", [write_parquet, write_saved_dataset])
def test_null_cell_is_located_in_typed_containers(tmp_path, writer):
    rows = [RAW["paired"][0], {**RAW["paired"][1], "rejected": None}]
    path = writer(tmp_path / ("x.parquet" if writer is write_parquet else "saved"), rows)
    with pytest.raises(DataError) as info:
        load_rows(path)
    assert (info.value.file, info.value.row, info.value.field) == (str(path), 2, "rejected")


def test_csv_errors_use_data_row_numbers(tmp_path):
    rows = [RAW["unpaired"][0], {**RAW["unpaired"][1], "label": "maybe"}]
    path = write_csv(tmp_path / "u.csv", rows)
    with pytest.raises(DataError) as info:
        load_rows(path)
    assert (info.value.row, info.value.field) == (2, "label")


def test_scores_mismatch_and_bad_role(tmp_path):
    rows = [RAW["listwise"][0], {"prompt": "p", "responses": ["a", "b"], "scores": [1.0]}]
    with pytest.raises(DataError) as info:
        load_rows(write_jsonl(tmp_path / "l.jsonl", rows))
    assert (info.value.row, info.value.field) == (2, "scores")
    bad_role = [CONVERSATIONAL[0], {**CONVERSATIONAL[1], "prompt": [{"role": "human", "content": "Tea?"}]}]
    with pytest.raises(DataError) as info:
        load_rows(write_jsonl(tmp_path / "c.jsonl", bad_role))
    assert (info.value.row, info.value.field) == (2, "prompt") and "'human'" in str(info.value)


def test_errors_are_collected_and_capped(tmp_path):
    rows = [{"prompt": "p", "completion": "c", "label": "x"}] * (MAX_COLLECTED_ERRORS + 5)
    rows = [RAW["unpaired"][0], *rows]
    with pytest.raises(DataError) as info:
        load_rows(write_jsonl(tmp_path / "u.jsonl", rows))
    error = info.value
    assert len(error.errors) == MAX_COLLECTED_ERRORS
    assert (error.row, error.field) == (2, "label")
    assert [e.row for e in error.errors] == list(range(2, 2 + MAX_COLLECTED_ERRORS))
    text = str(error)
    assert "row 2: field 'label'" in text and "row 21: field 'label'" in text and "there may be more" in text


def test_mixed_plain_and_conversational_rows_fail(tmp_path):
    rows = [RAW["paired"][0], CONVERSATIONAL[1]]
    with pytest.raises(DataError) as info:
        load_rows(write_jsonl(tmp_path / "m.jsonl", rows))
    assert (info.value.row, info.value.field) == (2, "prompt") and "mix" in str(info.value)


def test_format_errors(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", RAW["prompt"])
    with pytest.raises(DataError, match="needs columns chosen, rejected"):
        load_rows(path, format="paired")
    with pytest.raises(DataError, match="unknown data format"):
        load_rows(path, format="pairs")
    assert load_rows(write_jsonl(tmp_path / "q.jsonl", RAW["paired"]), format="prompt").format == "prompt"
    with pytest.raises(DataError, match="unrecognised data format"):
        load_rows(write_jsonl(tmp_path / "n.jsonl", [{"text": "x"}]))
    with pytest.raises(DataError, match="no data rows"):
        load_rows(write_jsonl(tmp_path / "e.jsonl", []))


def test_ignored_columns_are_reported(tmp_path):
    rows = [{**row, "id": i, "reward_len": 1.0} for i, row in enumerate(RAW["unpaired"])]
    data = load_rows(write_jsonl(tmp_path / "u.jsonl", rows))
    assert data.ignored_columns == ["id"]
    assert data.rows[0]["rewards"] == {"len": 1.0}


def test_missing_paths(tmp_path):
    for missing in (tmp_path / "nope.jsonl", "data/nope.csv", "./nope"):
        with pytest.raises(DataError, match="file not found") as info:
            load_rows(missing)
        assert info.value.file == str(missing)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="unsupported file type"):
        load_rows(tmp_path / "notes.txt")


def test_hub_id_failure_is_a_clear_data_error(monkeypatch):
    calls = []

    def offline(name, split=None, **kwargs):
        calls.append((name, split))
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as info:
        load_rows("someone/prefs", split="test")
    assert calls == [("someone/prefs", "test")]
    assert info.value.file == "someone/prefs" and "hub" in str(info.value) and "offline" in str(info.value)


def test_hub_id_rows_are_validated(monkeypatch):
    monkeypatch.setattr(
        datasets, "load_dataset", lambda name, split=None: datasets.Dataset.from_list(RAW["paired"])
    )
    data = load_rows("someone/prefs")
    assert data.format == "paired" and data.num_rows == 2


def test_builtin_resources():
    assert resource_path("quickstart_pairs.jsonl").is_file()
    data = load_rows("builtin:quickstart_pairs.jsonl")
    assert data.format == "paired" and data.path == "builtin:quickstart_pairs.jsonl"
    with pytest.raises(DataError, match="quickstart_pairs.jsonl"):
        load_rows("builtin:missing.jsonl")
