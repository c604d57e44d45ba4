"""TRL's implicit-prompt preference format: the prompt is the shared start of chosen and rejected."""

from __future__ import annotations

import json

import datasets
import pytest

from distalign.data.formats import DataError
from distalign.data.implicit_prompt import ImplicitPromptError, extract_prompt, has_implicit_prompt
from distalign.data.loading import load_rows


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


HH_CHOSEN = "\n\nHuman: Name a colour.\n\nAssistant: Blue, like the sky."
HH_REJECTED = "\n\nHuman: Name a colour.\n\nAssistant: No."


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_messages_split_at_the_first_differing_message():
    chosen = [user("Sky?"), assistant("Blue.")]
    rejected = [user("Sky?"), assistant("Green.")]
    assert extract_prompt(chosen, rejected) == ([user("Sky?")], [assistant("Blue.")], [assistant("Green.")])


def test_multi_turn_conversations_share_every_turn_before_the_answers():
    shared = [{"role": "system", "content": "Be brief."}, user("Hi"), assistant("Hello."), user("Sky?")]
    prompt, chosen, rejected = extract_prompt([*shared, assistant("Blue.")], [*shared, assistant("Red.")])
    assert prompt == shared and chosen == [assistant("Blue.")] and rejected == [assistant("Red.")]


def test_plain_text_keeps_the_space_with_the_completions():
    # TRL's rule: the common character prefix, moved one left when it ends in a space
    assert extract_prompt(HH_CHOSEN, HH_REJECTED) == (
        "\n\nHuman: Name a colour.\n\nAssistant:",
        " Blue, like the sky.",
        " No.",
    )
    assert extract_prompt("The sky is blue", "The sky is green") == ("The sky is", " blue", " green")
    # a difference inside a word splits inside it (the character prefix, as TRL does)
    assert extract_prompt("Answer: cat", "Answer: car") == ("Answer: ca", "t", "r")


@pytest.mark.parametrize(
    ("chosen", "rejected", "match"),
    [
        ("Yes.", "No.", "share no prefix"),
        (" a", " b", "share no prefix"),  # the shared space moves to the completions: no prompt left
        ([assistant("A")], [assistant("B")], "share no prefix"),
        ("Same text", "Same text", "identical"),
        ("Q: x? A: yes", "Q: x? A: yes, because", "chosen is the start of the other side"),
        ([user("Q")], [user("Q"), assistant("A")], "chosen is the start of the other side"),
        ("text", [assistant("A")], "both be text or both lists"),
        ("text", 3, "rejected is int"),
    ],
)
def test_rows_without_a_usable_shared_prefix_are_refused(chosen, rejected, match):
    with pytest.raises(ImplicitPromptError, match=match):
        extract_prompt(chosen, rejected)


def test_which_rows_have_an_implicit_prompt():
    conversation = [user("Q"), assistant("A")]
    assert has_implicit_prompt({"chosen": "a", "rejected": "b"})
    assert has_implicit_prompt({"prompt": None, "chosen": "a", "rejected": "b"})
    # ultrafeedback_binarized: a text prompt beside whole conversations (TRL extracts these too)
    assert has_implicit_prompt({"prompt": "Q", "chosen": conversation, "rejected": conversation})
    assert not has_implicit_prompt({"prompt": "Q", "chosen": "a", "rejected": "b"})
    assert not has_implicit_prompt({"prompt": [user("Q")], "chosen": conversation, "rejected": conversation})
    # completions that are one assistant turn are not conversations holding the prompt
    assert not has_implicit_prompt({"prompt": "Q", "chosen": [assistant("A")], "rejected": [assistant("B")]})
    assert not has_implicit_prompt({"chosen": "a"})


def test_load_rows_reads_implicit_prompt_files_as_paired(tmp_path):
    implicit = [
        {"chosen": [user("Sky?"), assistant("Blue.")], "rejected": [user("Sky?"), assistant("Green.")]},
        {"chosen": [user("Sun?"), assistant("Hot.")], "rejected": [user("Sun?"), assistant("Cold.")]},
    ]
    explicit = [
        {"prompt": [user("Sky?")], "chosen": [assistant("Blue.")], "rejected": [assistant("Green.")]},
        {"prompt": [user("Sun?")], "chosen": [assistant("Hot.")], "rejected": [assistant("Cold.")]},
    ]
    data = load_rows(write_jsonl(tmp_path / "implicit.jsonl", implicit))
    reference = load_rows(write_jsonl(tmp_path / "explicit.jsonl", explicit))
    assert data.format == "paired" and data.conversational and data.implicit_prompt_rows == 2
    assert data.rows == reference.rows and data.fingerprint == reference.fingerprint
    assert reference.implicit_prompt_rows == 0
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(implicit).save_to_disk(str(saved))
    assert load_rows(saved).fingerprint == reference.fingerprint


def test_hh_style_text_and_ultrafeedback_style_rows(tmp_path):
    data = load_rows(write_jsonl(tmp_path / "hh.jsonl", [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}]))
    assert data.rows[0]["prompt"] == "\n\nHuman: Name a colour.\n\nAssistant:"
    assert (data.rows[0]["chosen"], data.rows[0]["rejected"]) == (" Blue, like the sky.", " No.")
    ultrafeedback = {
        "prompt": "Sky?",
        "prompt_id": "x1",
        "chosen": [user("Sky?"), assistant("Blue.")],
        "rejected": [user("Sky?"), assistant("Green.")],
    }
    data = load_rows(write_jsonl(tmp_path / "uf.jsonl", [ultrafeedback]))
    assert data.rows[0]["prompt"] == [user("Sky?")] and data.rows[0]["chosen"] == [assistant("Blue.")]
    assert data.ignored_columns == ["prompt_id"]


def test_a_row_without_a_shared_prefix_is_located(tmp_path):
    rows = [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}, {"chosen": "Yes.", "rejected": "No."}]
    with pytest.raises(DataError, match="share no prefix") as info:
        load_rows(write_jsonl(tmp_path / "hh.jsonl", rows))
    assert (info.value.row, info.value.field) == (2, "prompt")


def test_an_explicit_other_format_is_not_rewritten(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"chosen": "ab", "rejected": "ac"}])
    with pytest.raises(DataError, match="needs columns prompt"):
        load_rows(path, format="prompt")


@pytest.mark.trl
def test_matches_trl_extract_prompt():
    trl_data_utils = pytest.importorskip("trl.data_utils")
    examples = [
        (HH_CHOSEN, HH_REJECTED),
        ("The sky is blue", "The sky is green"),
        ("Answer: cat", "Answer: car"),
        ([user("Sky?"), assistant("Blue.")], [user("Sky?"), assistant("Green.")]),
        ([user("Hi"), assistant("Hello."), user("Sky?"), assistant("Blue.")], [user("Hi"), assistant("Yo.")]),
    ]
    for chosen, rejected in examples:
        expected = trl_data_utils.extract_prompt({"chosen": chosen, "rejected": rejected})
        prompt, chosen_rest, rejected_rest = extract_prompt(chosen, rejected)
        assert (prompt, chosen_rest, rejected_rest) == (
            expected["prompt"],
            expected["chosen"],
            expected["rejected"],
        )
