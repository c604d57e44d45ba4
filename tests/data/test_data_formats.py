"""Format detection, row validation (types, errors with row/field) and unpair_rows."""

from __future__ import annotations

import pytest

from distalign.data.formats import DataError, detect_format, known_columns, unpair_rows, validate_row


def check(row, fmt, row_number=1):
    return validate_row(row, fmt, file="f.jsonl", row_number=row_number)


def error_of(row, fmt, row_number=1) -> DataError:
    with pytest.raises(DataError) as info:
        check(row, fmt, row_number)
    return info.value


@pytest.mark.parametrize(
    ("columns", "expected"),
    [
        ({"prompt", "chosen", "rejected"}, "paired"),
        ({"prompt", "chosen", "rejected", "weight", "source", "id"}, "paired"),
        ({"prompt", "completion", "label"}, "unpaired"),
        ({"prompt", "responses", "scores", "group"}, "listwise"),
        ({"prompt"}, "prompt"),
        ({"prompt", "source", "meta"}, "prompt"),
    ],
)
def test_detect_format(columns, expected):
    assert detect_format(columns) == expected


@pytest.mark.parametrize(
    ("columns", "words"),
    [
        ({"prompt", "chosen", "rejected", "completion", "label"}, "ambiguous"),
        ({"chosen", "rejected"}, "unrecognised"),
        ({"prompt", "chosen"}, "unrecognised"),  # incomplete pair must not be read as prompts
        ({"prompt", "completion"}, "unrecognised"),
        (set(), "unrecognised"),
    ],
)
def test_detect_format_errors_list_recognised_sets(columns, words):
    with pytest.raises(DataError) as info:
        detect_format(columns)
    message = str(info.value)
    assert words in message
    assert "prompt, chosen, rejected" in message and "prompt, completion, label" in message


def test_error_message_names_file_row_field_reason():
    error = DataError(
        "expected a string or a list of messages, got int", file="data/train.jsonl", row=17, field="chosen"
    )
    assert (
        str(error)
        == "data/train.jsonl: row 17: field 'chosen': expected a string or a list of messages, got int"
    )
    assert (error.file, error.row, error.field) == ("data/train.jsonl", 17, "chosen")


def test_wrong_type_error_fields():
    error = error_of({"prompt": "p", "chosen": 3, "rejected": "r"}, "paired", row_number=17)
    assert (error.file, error.row, error.field) == ("f.jsonl", 17, "chosen")
    assert str(error) == "f.jsonl: row 17: field 'chosen': expected a string or a list of messages, got int"


def test_paired_row_normalised_with_defaults():
    row = check({"prompt": "", "chosen": " yes", "rejected": " no", "extra": 1}, "paired")
    assert row == {
        "prompt": "",
        "chosen": " yes",
        "rejected": " no",
        "chosen_rewards": {},
        "rejected_rewards": {},
        "weight": 1.0,
        "source": None,
        "group": None,
    }


@pytest.mark.parametrize("field", ["prompt", "chosen", "rejected"])
def test_missing_or_null_field(field):
    row = {"prompt": "p", "chosen": "a", "rejected": "b"}
    for broken in ({k: v for k, v in row.items() if k != field}, {**row, field: None}):
        error = error_of(broken, "paired")
        assert error.field == field and "missing" in error.reason


@pytest.mark.parametrize("completion", ["", "   \n", [{"role": "assistant", "content": " "}]])
def test_empty_completion_is_an_error(completion):
    prompt = [{"role": "user", "content": "hi"}] if isinstance(completion, list) else "p"
    error = error_of({"prompt": prompt, "completion": completion, "label": True}, "unpaired")
    assert error.field == "completion" and "empty" in error.reason


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (True, True),
        (False, False),
        (1, True),
        (0, False),
        (1.0, True),
        ("true", True),
        ("FALSE", False),
        (" 1 ", True),
    ],
)
def test_label_forms(raw, expected):
    assert check({"prompt": "p", "completion": "c", "label": raw}, "unpaired")["label"] is expected


@pytest.mark.parametrize("raw", [2, -1, 0.5, "maybe", "", [1]])
def test_bad_label(raw):
    error = error_of({"prompt": "p", "completion": "c", "label": raw}, "unpaired", row_number=4)
    assert (error.row, error.field) == (4, "label")


def test_listwise_scores():
    row = check({"prompt": "p", "responses": ["a", "b", "c"], "scores": [1, "2.5", 0.0]}, "listwise")
    assert row["scores"] == [1.0, 2.5, 0.0]
    mismatch = error_of({"prompt": "p", "responses": ["a", "b", "c"], "scores": [1, 2]}, "listwise")
    assert mismatch.field == "scores" and "2 scores for 3 responses" in mismatch.reason
    assert (
        error_of({"prompt": "p", "responses": ["a", "b"], "scores": [1, "x"]}, "listwise").field
        == "scores[1]"
    )
    assert (
        error_of({"prompt": "p", "responses": ["a", "b"], "scores": [1, True]}, "listwise").field
        == "scores[1]"
    )
    assert error_of({"prompt": "p", "responses": ["a"], "scores": [1]}, "listwise").field == "responses"
    assert (
        error_of({"prompt": "p", "responses": ["a", ""], "scores": [1, 2]}, "listwise").field
        == "responses[1]"
    )


def test_conversational_rows():
    prompt = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"}]
    row = check(
        {"prompt": prompt, "chosen": "hello", "rejected": [{"role": "assistant", "content": "go"}]}, "paired"
    )
    assert row["chosen"] == [{"role": "assistant", "content": "hello"}]
    assert row["rejected"] == [{"role": "assistant", "content": "go"}]
    assert row["prompt"] == prompt


def test_message_errors():
    bad_role = [{"role": "robot", "content": "hi"}]
    error = error_of({"prompt": bad_role}, "prompt", row_number=9)
    assert (error.row, error.field) == (9, "prompt") and "'robot'" in error.reason
    assert "content" in error_of({"prompt": [{"role": "user", "content": 5}]}, "prompt").reason
    assert error_of({"prompt": ["hi"]}, "prompt").field == "prompt"
    assert error_of({"prompt": []}, "prompt").field == "prompt"
    not_assistant = {
        "prompt": [{"role": "user", "content": "q"}],
        "completion": [{"role": "user", "content": "a"}],
    }
    assert error_of({**not_assistant, "label": 1}, "unpaired").field == "completion"
    plain_prompt_with_messages = {
        "prompt": "q",
        "completion": [{"role": "assistant", "content": "a"}],
        "label": 1,
    }
    assert error_of(plain_prompt_with_messages, "unpaired").field == "completion"


def test_null_message_keys_are_dropped():
    # arrow fills absent struct fields with None
    row = check({"prompt": [{"role": "user", "content": "hi", "name": None}]}, "prompt")
    assert row["prompt"] == [{"role": "user", "content": "hi"}]


def test_optional_columns():
    row = check(
        {"prompt": "p", "completion": "c", "label": 0, "weight": "0.5", "source": "web", "group": 3},
        "unpaired",
    )
    assert (row["weight"], row["source"], row["group"]) == (0.5, "web", "3")
    assert (
        error_of({"prompt": "p", "completion": "c", "label": 0, "weight": -1}, "unpaired").field == "weight"
    )
    assert (
        error_of({"prompt": "p", "completion": "c", "label": 0, "weight": "nan"}, "unpaired").field
        == "weight"
    )
    assert (
        error_of({"prompt": "p", "completion": "c", "label": 0, "source": 1.5}, "unpaired").field == "source"
    )


def test_rewards_dict_and_columns():
    row = check(
        {"prompt": "p", "completion": "c", "label": 1, "rewards": {"len": 3}, "reward_tox": "0.25"},
        "unpaired",
    )
    assert row["rewards"] == {"len": 3.0, "tox": 0.25}
    twice = {"prompt": "p", "completion": "c", "label": 1, "rewards": {"tox": 1}, "reward_tox": 2}
    assert error_of(twice, "unpaired").field == "reward_tox"
    bad = {"prompt": "p", "completion": "c", "label": 1, "reward_tox": "high"}
    assert error_of(bad, "unpaired").field == "reward_tox"
    pair = check(
        {
            "prompt": "p",
            "chosen": "a",
            "rejected": "b",
            "chosen_reward_len": 1,
            "rejected_rewards": {"len": 2},
        },
        "paired",
    )
    assert (pair["chosen_rewards"], pair["rejected_rewards"]) == ({"len": 1.0}, {"len": 2.0})
    ambiguous = {"prompt": "p", "chosen": "a", "rejected": "b", "rewards": {"len": 1}}
    assert error_of(ambiguous, "paired").field == "rewards"
    listwise = check(
        {"prompt": "p", "responses": ["a", "b"], "scores": [1, 2], "rewards": {"len": [1, 2]}}, "listwise"
    )
    assert listwise["rewards"] == {"len": [1.0, 2.0]}


def test_known_columns():
    columns = {"prompt", "completion", "label", "reward_x", "rewards", "id", "chosen_reward_y"}
    assert known_columns("unpaired", columns) == {"prompt", "completion", "label", "reward_x", "rewards"}


def test_unpair_rows():
    pairs = [
        check({"prompt": "p0", "chosen": "a0", "rejected": "b0", "weight": 2, "group": "g"}, "paired"),
        check({"prompt": "p1", "chosen": "a1", "rejected": "b1", "rejected_reward_len": 4}, "paired"),
    ]
    rows = unpair_rows(pairs)
    assert [(r["prompt"], r["completion"], r["label"], r["pair_index"]) for r in rows] == [
        ("p0", "a0", True, 0),
        ("p0", "b0", False, 0),
        ("p1", "a1", True, 1),
        ("p1", "b1", False, 1),
    ]
    assert [r["weight"] for r in rows] == [2.0, 2.0, 1.0, 1.0]
    assert [r["group"] for r in rows] == ["g", "g", None, None]
    assert rows[3]["rewards"] == {"len": 4.0} and rows[2]["rewards"] == {}
    # every unpaired row is itself valid
    for number, row in enumerate(rows, start=1):
        check(row, "unpaired", row_number=number)
