"""summarize_dataset numbers on small hand-built files, and the shipped quickstart datasets."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from distalign.data.check import summarize_dataset
from distalign.data.loading import load_rows, resource_path
from distalign.data.tokenized import TokenizationSettings

REPO = Path(__file__).resolve().parents[2]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture
def unpaired_file(tmp_path, words):
    # prompt lengths 1, 2, 3, 4, 10 tokens; completion lengths 1, 1, 2, 3, 5 words (+ EOS)
    shapes = [(1, 1, True), (2, 1, False), (3, 2, True), (4, 3, False), (10, 5, True)]
    rows = [{"prompt": words(0, p), "completion": words(20, c), "label": label} for p, c, label in shapes]
    rows[0].update(source="a", reward_len=2.0)
    rows[1].update(source="a", weight=3.0)
    rows[2].update(source="b", rewards={"tox": 0.1})
    return write_jsonl(tmp_path / "u.jsonl", rows)


def test_summary_without_tokenizer(unpaired_file):
    summary = summarize_dataset(unpaired_file)
    assert (summary.num_rows, summary.format, summary.conversational) == (5, "unpaired", False)
    assert summary.labels == {"positive": 3, "negative": 2}
    assert summary.sources == {"a": 2, "b": 1} and summary.groups == {}
    assert summary.weights == (1.0, 1.4, 3.0)
    assert summary.reward_names == ["len", "tox"]
    assert summary.token_lengths == {} and summary.tokenization is None
    text = summary.to_text()
    assert "5 rows, format unpaired, plain text" in text
    assert "labels: 3 positive (60.0%), 2 negative" in text and "sources: a 2, b 1" in text


def test_summary_token_lengths_and_truncation(unpaired_file, word_tokenizer):
    settings = TokenizationSettings(max_length=8, max_prompt_length=4)
    summary = summarize_dataset(unpaired_file, word_tokenizer, settings)
    prompt, completion = summary.token_lengths["prompt"], summary.token_lengths["completion"]
    # numpy's linear percentiles of [1, 2, 3, 4, 10] and of [2, 2, 3, 4, 6]
    assert (prompt.p50, prompt.p90, prompt.p99, prompt.max) == pytest.approx((3.0, 7.6, 9.76, 10))
    assert (completion.p50, completion.p90, completion.p99, completion.max) == pytest.approx(
        (3.0, 5.2, 5.92, 6)
    )
    report = summary.tokenization
    # only the last row is too long: its prompt is cut to 4, then 4 + 6 > 8 cuts its completion
    assert (report.rows_kept, report.prompt_truncated, report.completion_truncated, report.eos_lost) == (
        5,
        1,
        1,
        1,
    )
    assert "tokens prompt: p50 3, p90 7.6, p99 9.76, max 10" in summary.to_text()
    dropped = summarize_dataset(
        unpaired_file, word_tokenizer, TokenizationSettings(**settings.as_dict() | {"truncation": "drop"})
    )
    assert (dropped.tokenization.rows_kept, dropped.tokenization.dropped_too_long) == (4, 1)
    assert "truncation=drop" in dropped.to_text()


def test_summary_paired_and_listwise_fields(tmp_path, word_tokenizer, words):
    pairs = write_jsonl(
        tmp_path / "p.jsonl", [{"prompt": words(0, 2), "chosen": words(5, 1), "rejected": words(6, 3)}]
    )
    summary = summarize_dataset(pairs, word_tokenizer)
    assert {k: v.max for k, v in summary.token_lengths.items()} == {"prompt": 2, "chosen": 2, "rejected": 4}
    listwise = write_jsonl(
        tmp_path / "l.jsonl",
        [
            {"prompt": words(0, 1), "responses": [words(1, 1), words(2, 2)], "scores": [1, 0], "group": "x"},
            {
                "prompt": words(0, 1),
                "responses": [words(1, 4), words(2, 1), words(3, 1)],
                "scores": [1, 0, 2],
            },
        ],
    )
    summary = summarize_dataset(listwise, word_tokenizer)
    assert summary.token_lengths["responses"].count == 5 and summary.token_lengths["responses"].max == 5
    assert summary.groups == {"x": 1} and summary.labels is None


def test_summary_accepts_loaded_data(unpaired_file):
    data = load_rows(unpaired_file)
    assert summarize_dataset(data).fingerprint == data.fingerprint


def test_quickstart_datasets_shape():
    pairs = load_rows("builtin:quickstart_pairs.jsonl")
    unpaired = load_rows("builtin:quickstart_unpaired.jsonl")
    prompts = load_rows("builtin:quickstart_prompts.jsonl")
    assert (pairs.format, pairs.num_rows) == ("paired", 240)
    assert (unpaired.format, unpaired.num_rows, prompts.format, prompts.num_rows) == (
        "unpaired",
        240,
        "prompt",
        64,
    )
    assert sum(row["label"] for row in unpaired.rows) == 140
    assert len({row["prompt"] for row in unpaired.rows}) == 240  # every unpaired row has its own prompt
    texts = [r[k] for r in pairs.rows for k in ("chosen", "rejected")] + [
        r["completion"] for r in unpaired.rows
    ]
    assert all(5 <= len(text.split()) <= 15 and text.startswith(" ") for text in texts)
    assert all(row["chosen"] != row["rejected"] for row in pairs.rows)
    for name in ("quickstart_pairs.jsonl", "quickstart_unpaired.jsonl", "quickstart_prompts.jsonl"):
        assert resource_path(name).stat().st_size < 100_000


def test_quickstart_files_are_reproducible(tmp_path):
    script = REPO / "scripts" / "make_quickstart_data.py"
    subprocess.run([sys.executable, str(script), "--out-dir", str(tmp_path)], check=True, capture_output=True)
    for name in ("quickstart_pairs.jsonl", "quickstart_unpaired.jsonl", "quickstart_prompts.jsonl"):
        assert (tmp_path / name).read_bytes() == resource_path(name).read_bytes(), name
