"""The reward cache computes each (reward, text pair) once, in memory and across processes via disk."""

from __future__ import annotations

import pytest

from distalign.rewards import RewardCache, RewardFn, build_reward, text_key


class CountingScorer:
    """Records every batch it is asked to score; the score is the completion's length."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    def __call__(self, prompts, completions):
        self.batches.append(list(completions))
        return [float(len(c)) for c in completions]


def test_second_call_on_same_texts_computes_nothing():
    scorer = CountingScorer()
    reward = RewardFn("counting", scorer, cache=RewardCache())
    first = reward(["p", "q"], ["aa", "bbb"])
    second = reward(["p", "q"], ["aa", "bbb"])
    assert first.tolist() == second.tolist() == [2.0, 3.0]
    assert scorer.batches == [["aa", "bbb"]] and reward.scorer_calls == 1


def test_only_missing_pairs_are_scored_and_duplicates_once():
    scorer = CountingScorer()
    reward = RewardFn("counting", scorer, cache=RewardCache())
    reward(["p"], ["aa"])
    out = reward(["p", "p", "p", "q"], ["aa", "new", "new", "aa"])
    assert out.tolist() == [2.0, 3.0, 3.0, 2.0]
    # "aa" under prompt "q" is a different pair from "aa" under "p": the prompt is part of the key
    assert scorer.batches == [["aa"], ["new", "aa"]]


def test_without_cache_every_call_computes():
    scorer = CountingScorer()
    reward = RewardFn("counting", scorer, cache=None)
    reward(["p"], ["aa"])
    reward(["p"], ["aa"])
    assert len(scorer.batches) == 2


def test_text_key_separates_prompt_from_completion():
    assert text_key("ab", "c") != text_key("a", "bc")
    assert text_key("ab", "c") == text_key("ab", "c")


def test_disk_cache_survives_a_new_cache_object(tmp_path):
    RewardCache(tmp_path).store("fp", {"k1": 1.5, "k2": -2.0})
    fresh = RewardCache(tmp_path)
    assert len(fresh) == 0  # nothing in memory yet: the values below come from disk
    assert fresh.lookup("fp", ["k1", "k2", "k3"]) == {"k1": 1.5, "k2": -2.0}
    assert fresh.lookup("other", ["k1"]) == {}


def test_disk_cache_lookup_of_many_keys_spans_query_chunks(tmp_path):
    items = {f"key{i}": float(i) for i in range(1234)}
    RewardCache(tmp_path).store("fp", items)
    assert RewardCache(tmp_path).lookup("fp", list(items)) == items


def test_built_reward_reuses_disk_cache_after_memory_is_gone(tmp_path):
    spec = {"name": "length", "target": 2, "cache_dir": str(tmp_path)}
    first = build_reward(spec)
    first(["p"] * 3, ["a", "a b", "a b c"])
    assert first.scorer_calls == 1
    first.cache.clear_memory()
    second = build_reward(spec)
    assert second(["p"] * 3, ["a", "a b", "a b c"]).tolist() == [-1.0, 0.0, -1.0]
    assert second.scorer_calls == 0
    assert (tmp_path / "rewards.sqlite").is_file()


def test_direction_and_normalisation_reuse_cached_raw_scores(tmp_path):
    maximize = build_reward({"name": "length", "cache_dir": str(tmp_path)})
    maximize(["p"], ["a b c"])
    minimize = build_reward({"name": "length", "cache_dir": str(tmp_path), "direction": "minimize"})
    assert minimize(["p"], ["a b c"]).tolist() == [3.0]
    assert minimize.scorer_calls == 0


def test_fingerprint_depends_on_settings_not_on_how_defaults_are_spelled():
    implicit = build_reward({"name": "length", "target": 5})
    explicit = build_reward({"name": "length", "target": 5, "unit": "words"})
    other = build_reward({"name": "length", "target": 6})
    assert implicit.fingerprint == explicit.fingerprint != other.fingerprint
    assert build_reward("readability_flesch").fingerprint != build_reward("readability_grade").fingerprint


def test_settings_must_be_plain_data():
    with pytest.raises(ValueError, match="plain data"):
        build_reward({"name": "keyword", "keywords": [object()]})
