"""Built-in tasks and the datasets built from them: determinism, pairing, Bradley-Terry noise, provenance."""

from __future__ import annotations

import hashlib
import json
import math

import pytest

from distalign.registry import UnknownNameError
from distalign.rewards import build_reward
from distalign.tasks import (
    TASKS,
    Task,
    bt_flip_probability,
    build_preference_dataset,
    expand_templates,
    get_task,
    make_dataset,
    prompt_only_rows,
    provenance_path,
    read_jsonl,
    split_prompts,
    to_conversational,
    unpaired_rows,
    write_jsonl_with_provenance,
)

RESPONSES = ["I love it, wonderful!", "It was fine.", "Terrible, I hate it.", "Okay I guess."]


def fake_sampler(prompts, k):
    """Deterministic stand-in for the base model: k canned responses rotated by the prompt's length."""
    return [[RESPONSES[(len(p) + i) % len(RESPONSES)] for i in range(k)] for p in prompts]


@pytest.mark.parametrize("name", ["sentiment", "readability", "keyword"])
def test_builtin_tasks_have_hundreds_of_disjoint_prompts(name):
    task = get_task(name)
    assert len(task.train_prompts) + len(task.heldout_prompts) >= 250
    assert not set(task.train_prompts) & set(task.heldout_prompts)
    assert 0.1 < len(task.heldout_prompts) / (len(task.train_prompts) + len(task.heldout_prompts)) < 0.3
    assert get_task(name).train_prompts == task.train_prompts


def test_gold_rewards_of_builtin_tasks_point_the_right_way():
    sentiment = get_task("sentiment").gold_reward
    assert sentiment.scores(["p", "p"], ["What a great day!", "What an awful day."]).tolist()[0] > 0.5
    keyword = get_task("keyword", topic="science").gold_reward
    assert keyword(["p", "p"], ["The scientist ran tests.", "Nice weather."]).tolist() == [1.0, 0.0]
    custom = get_task("keyword", keywords=["zebra"]).gold_reward
    assert custom(["p", "p"], ["A zebra!", "A zebras!"]).tolist() == [1.0, 0.0]
    brevity = get_task("readability", objective="brevity").gold_reward
    assert brevity(["p", "p"], ["short one", "a much longer answer here"]).tolist() == [-2.0, -5.0]


def test_task_registry_errors_list_valid_names_and_settings():
    with pytest.raises(UnknownNameError, match="keyword, readability, sentiment"):
        get_task("sentimental")
    with pytest.raises(ValueError, match="has no setting"):
        get_task("sentiment", objective="flesch")
    with pytest.raises(ValueError, match="objective='fun'"):
        get_task("readability", objective="fun")
    with pytest.raises(ValueError, match="not built in"):
        get_task("keyword", topic="cars")
    assert set(TASKS.names()) == {"sentiment", "readability", "keyword"}


def test_expand_templates_by_hand():
    prompts = expand_templates(["Rate {a}.", "{a} or {b}?", "Fixed."], {"a": ["x", "y"], "b": ["z"]})
    assert prompts == ["Rate x.", "Rate y.", "x or z?", "y or z?", "Fixed."]


def test_split_is_per_prompt_and_independent_of_order_and_neighbours():
    prompts = [f"prompt {i}" for i in range(300)]
    train, heldout = split_prompts(prompts, 0.25)
    _, heldout_reversed = split_prompts(prompts[::-1], 0.25)
    _, heldout_subset = split_prompts(prompts[:100], 0.25)
    assert set(heldout_reversed) == set(heldout)
    assert set(heldout_subset) == set(heldout) & set(prompts[:100])
    assert sorted(train + heldout) == sorted(prompts)
    assert split_prompts(prompts, 0.0)[1] == [] and split_prompts(prompts, 1.0)[0] == []


def test_messages_include_system_prompt():
    task = get_task("sentiment", system_prompt="Be kind.")
    assert task.messages("Hi") == [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi"},
    ]
    assert get_task("sentiment").messages("Hi") == [{"role": "user", "content": "Hi"}]


def test_pairs_are_deterministic_under_a_seed_and_change_with_it():
    task = get_task("sentiment")
    first = build_preference_dataset(task, fake_sampler, k=4, seed=3, num_prompts=40, bt_noise=0.5).rows
    again = build_preference_dataset(task, fake_sampler, k=4, seed=3, num_prompts=40, bt_noise=0.5).rows
    other = build_preference_dataset(task, fake_sampler, k=4, seed=4, num_prompts=40, bt_noise=0.5).rows
    assert first == again
    assert first != other
    assert set(first[0]) == {"prompt", "chosen", "rejected", "chosen_reward", "rejected_reward"}


def test_noise_free_pairs_are_best_versus_worst_by_gold_reward():
    task = get_task("sentiment")
    result = build_preference_dataset(task, fake_sampler, k=4, seed=0, num_prompts=30)
    reward = task.gold_reward
    for row, listwise in zip(result.rows, result.samples):
        scores = reward.scores([row["prompt"]] * 4, listwise["responses"]).tolist()
        assert row["chosen_reward"] == max(scores) and row["rejected_reward"] == min(scores)
        assert row["chosen"] == listwise["responses"][scores.index(max(scores))]
    assert result.counts == {"prompts": 30, "samples": 120, "pairs": 30, "ties_skipped": 0, "flipped": 0}


def test_ties_are_skipped_and_counted():
    task = get_task("sentiment")

    def sampler(prompts, k):  # every other prompt gets k identical completions
        return [["Same."] * k if i % 2 else RESPONSES[:k] for i, p in enumerate(prompts)]

    result = build_preference_dataset(task, sampler, k=3, seed=0, num_prompts=20, batch_size=20)
    assert result.counts["ties_skipped"] == 10 and len(result.rows) == 10


def constant_gap_task(num_prompts: int) -> Task:
    brevity = build_reward({"name": "length", "cache": False})
    prompts = [f"q{i}" for i in range(num_prompts)]
    return Task("gap", "brevity toy", prompts, [], brevity)


def test_bt_noise_flip_rate_matches_its_probability():
    # Completions "a" and "a a a": brevity rewards -1 and -3, gap 2; with T = 2 the flip probability
    # is sigmoid(-1) = 0.2689. 20000 pairs: standard error 0.0031, tolerance is 4 standard errors.
    task = constant_gap_task(20000)
    result = build_preference_dataset(
        task, lambda prompts, k: [["a", "a a a"] for _ in prompts], k=2, seed=7, bt_noise=2.0, batch_size=5000
    )
    expected = 1 / (1 + math.exp(1.0))
    rate = result.counts["flipped"] / result.counts["pairs"]
    assert abs(rate - expected) < 4 * math.sqrt(expected * (1 - expected) / 20000)
    assert result.counts["flipped"] == sum(row["chosen"] == "a a a" for row in result.rows)


def test_bt_flip_probability_by_hand():
    assert bt_flip_probability(0.0, 1.0) == 0.5
    assert bt_flip_probability(2.0, 2.0) == pytest.approx(1 / (1 + math.e))
    assert bt_flip_probability(50.0, 1.0) < 1e-20


def test_bad_builder_arguments():
    task = get_task("sentiment")
    with pytest.raises(ValueError, match="at least 2"):
        build_preference_dataset(task, fake_sampler, k=1)
    with pytest.raises(ValueError, match="positive temperature"):
        build_preference_dataset(task, fake_sampler, bt_noise=0.0)
    with pytest.raises(ValueError, match="num_prompts"):
        build_preference_dataset(task, fake_sampler, num_prompts=100000)
    with pytest.raises(ValueError, match="lists of 2 completions"):
        build_preference_dataset(task, lambda prompts, k: [["x"] for _ in prompts], k=2, num_prompts=3)


def test_unpaired_prompt_only_and_conversational_exports():
    pairs = [{"prompt": "p", "chosen": "c", "rejected": "r", "chosen_reward": 1.0, "rejected_reward": 0.0}]
    assert unpaired_rows(pairs) == [
        {"prompt": "p", "completion": "c", "label": True, "reward": 1.0},
        {"prompt": "p", "completion": "r", "label": False, "reward": 0.0},
    ]
    task = get_task("keyword")
    rows = prompt_only_rows(task, split="heldout", num_prompts=5, seed=1)
    assert len(rows) == 5 and all(r["prompt"] in task.heldout_prompts for r in rows)
    assert rows == prompt_only_rows(task, split="heldout", num_prompts=5, seed=1)
    chat = to_conversational(task, pairs)[0]
    assert chat["prompt"] == [{"role": "user", "content": "p"}]
    assert chat["chosen"] == [{"role": "assistant", "content": "c"}] and chat["chosen_reward"] == 1.0


def test_jsonl_with_provenance_round_trips(tmp_path):
    rows = [
        {"prompt": "Ünïcode ✓", "chosen": "a", "rejected": "b"},
        {"prompt": "2", "chosen": "c", "rejected": "d"},
    ]
    path = tmp_path / "out" / "pairs.jsonl"
    path.parent.mkdir()
    path.write_text("old content\n")
    written = write_jsonl_with_provenance(rows, path, {"model": "tiny", "seed": 3, "counts": {"pairs": 2}})
    assert written == path and read_jsonl(path) == rows
    record = json.loads(provenance_path(path).read_text())
    assert provenance_path(path).name == "pairs.provenance.json"
    assert record["model"] == "tiny" and record["seed"] == 3 and record["rows"] == 2
    assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert {"python", "torch", "distalign"} <= set(record["versions"]) and record["created_at"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["pairs.jsonl", "pairs.provenance.json"]


def test_read_jsonl_names_the_bad_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_jsonl(path)


@pytest.mark.parametrize("kind, fields", [
    ("paired", {"prompt", "chosen", "rejected", "chosen_reward", "rejected_reward"}),
    ("unpaired", {"prompt", "completion", "label", "reward"}),
    ("listwise", {"prompt", "responses", "scores"}),
    ("prompt", {"prompt"}),
])  # fmt: skip
def test_make_dataset_writes_rows_and_provenance(tmp_path, kind, fields):
    task = get_task("sentiment")
    path = make_dataset(
        task,
        tmp_path / f"{kind}.jsonl",
        sample_fn=fake_sampler,
        kind=kind,
        k=3,
        seed=2,
        num_prompts=6,
        model="fake",
    )
    rows = read_jsonl(path)
    assert rows and all(set(r) == fields for r in rows)
    record = json.loads(provenance_path(path).read_text())
    assert record["task"] == "sentiment" and record["model"] == "fake" and record["seed"] == 2
    assert record["gold_reward"]["name"] == "vader_sentiment" and record["settings"]["k"] == 3
    assert record["counts"]["prompts"] == 6 and record["rows"] == len(rows)


def test_make_dataset_needs_a_sampler_except_for_prompts(tmp_path):
    with pytest.raises(ValueError, match="pass sample_fn"):
        make_dataset(get_task("sentiment"), tmp_path / "x.jsonl", kind="paired")
    with pytest.raises(ValueError, match="kind='pairs'"):
        make_dataset(get_task("sentiment"), tmp_path / "x.jsonl", kind="pairs")
