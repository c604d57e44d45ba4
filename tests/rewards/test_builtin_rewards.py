"""Built-in rewards on hand-made texts, spec validation, direction and normalisation."""

from __future__ import annotations

import math
import uuid

import numpy as np
import pytest
import torch

from distalign.registry import UnknownNameError
from distalign.rewards import REWARDS, Normalization, RewardFn, build_reward


def score(spec, completions, prompts=None):
    reward = build_reward(spec)
    prompts = prompts if prompts is not None else ["p"] * len(completions)
    return reward(prompts, completions).tolist()


def test_output_is_float32_tensor_of_batch_size():
    out = build_reward("vader_sentiment")(["a", "b", "c"], ["good", "bad", "meh"])
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == (3,)


def test_vader_positive_beats_negative():
    pos, neutral, neg = score(
        "vader_sentiment",
        ["I love this, it is wonderful!", "The box is on the table.", "This is terrible, I hate it."],
    )
    assert -1.0 <= neg < 0.0 == neutral < pos <= 1.0


def test_vader_proportion_fields_sum_to_one():
    text = ["Great food but awful service."]
    parts = [score({"name": "vader_sentiment", "field": f}, text)[0] for f in ("pos", "neg", "neu")]
    assert math.isclose(sum(parts), 1.0, abs_tol=2e-3)  # VADER rounds each share to 3 decimals


def test_flesch_matches_hand_computed_formula():
    # 6 words, 1 sentence, 6 one-syllable words: 206.835 - 1.015 * 6 - 84.6 * 1
    (value,) = score("readability_flesch", ["The cat sat on the mat."])
    assert value == pytest.approx(206.835 - 1.015 * 6 - 84.6, abs=1e-3)


def test_readability_ordering_and_grade_direction():
    simple = "The dog ran. It was fun."
    hard = "Notwithstanding considerable institutional reluctance, comprehensive reorganization proceeded."
    flesch = score("readability_flesch", [simple, hard])
    grade = score("readability_grade", [simple, hard])
    easier_is_better = score({"name": "readability_grade", "direction": "minimize"}, [simple, hard])
    assert flesch[0] > flesch[1]
    assert grade[0] < grade[1]
    assert easier_is_better == pytest.approx([-g for g in grade])


def test_length_target_and_brevity():
    texts = ["one two three", "x", "a b c d e"]
    assert score({"name": "length", "target": 3}, texts) == [0.0, -2.0, -2.0]
    assert score({"name": "length"}, texts) == [-3.0, -1.0, -5.0]
    assert score({"name": "length", "unit": "characters", "target": 1}, texts) == [-12.0, 0.0, -8.0]


def test_keyword_whole_word_versus_substring():
    texts = ["I like to concatenate strings.", "My Cat sleeps.", "A dog."]
    assert score({"name": "keyword", "keywords": "cat"}, texts) == [0.0, 1.0, 0.0]
    assert score({"name": "keyword", "keywords": "cat", "whole_word": False}, texts) == [1.0, 1.0, 0.0]
    assert score({"name": "keyword", "keywords": "cat", "case_sensitive": True}, texts) == [0.0, 0.0, 0.0]
    assert score({"name": "keyword", "keywords": "cat", "mode": "absence"}, texts) == [1.0, 0.0, 1.0]


def test_keyword_match_modes():
    texts = ["cat and dog", "cat only", "nothing"]
    words = ["cat", "dog"]
    assert score({"name": "keyword", "keywords": words, "match": "all"}, texts) == [1.0, 0.0, 0.0]
    assert score({"name": "keyword", "keywords": words, "match": "any"}, texts) == [1.0, 1.0, 0.0]
    assert score({"name": "keyword", "keywords": words, "match": "fraction"}, texts) == [1.0, 0.5, 0.0]


def test_keyword_with_punctuation_edges_matches_whole_token():
    assert score({"name": "keyword", "keywords": "c++"}, ["I write c++ daily", "I write c++x"]) == [1.0, 0.0]


def test_regex_modes_and_flags():
    texts = ["a1b22c333", "no digits", "ABC"]
    assert score({"name": "regex", "pattern": r"\d+", "mode": "count"}, texts) == [3.0, 0.0, 0.0]
    assert score({"name": "regex", "pattern": r"\d"}, texts) == [1.0, 0.0, 0.0]
    assert score({"name": "regex", "pattern": r"\d", "mode": "absence"}, texts) == [0.0, 1.0, 1.0]
    assert score({"name": "regex", "pattern": "abc", "flags": "i"}, texts) == [0.0, 0.0, 1.0]


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"name": "regex", "pattern": "("}, "not a valid regular expression"),
        ({"name": "regex", "pattern": "a", "flags": "q"}, "unknown letters"),
        ({"name": "length", "unit": "tokens"}, "unit='tokens'"),
        ({"name": "length", "target": -1}, "non-negative"),
        ({"name": "keyword", "keywords": []}, "non-empty"),
        ({"name": "vader_sentiment", "field": "joy"}, "field='joy'"),
        ({"name": "length", "targt": 3}, "its settings: target, unit"),
        ({"name": "keyword"}, "needs setting(s) ['keywords']"),
        ({"name": "length", "direction": "up"}, "direction='up'"),
        ({"name": "length", "normalize": {"kind": "zscore", "scale": 2}}, "unknown keys ['scale']"),
        ({"path": "x"}, "'name' key"),
    ],
)
def test_bad_settings_raise_clear_errors(spec, message):
    with pytest.raises(ValueError) as info:
        build_reward(spec)
    assert message in str(info.value)


def test_unknown_reward_name_lists_valid_names():
    with pytest.raises(UnknownNameError) as info:
        build_reward("sentimint")
    for name in REWARDS.names():
        assert name in str(info.value)
    assert {"vader_sentiment", "readability_flesch", "length", "keyword", "regex", "callable"} <= set(
        REWARDS.names()
    )


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """An importable module with reward functions; a unique name so imports never collide across tests."""
    name = f"user_rewards_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        "def batched(prompts, completions, bonus=0.0):\n"
        "    return [len(p) + len(c) + bonus for p, c in zip(prompts, completions)]\n"
        "def single(prompt, completion):\n"
        "    return float(completion.count('!'))\n"
        "NOT_CALLABLE = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_callable_import_path_batched_and_per_pair(user_module):
    assert score(f"{user_module}:batched", ["ab", "c"], prompts=["x", "yz"]) == [3.0, 3.0]
    with_kwargs = {"name": "callable", "path": f"{user_module}:batched", "kwargs": {"bonus": 10}}
    assert score(with_kwargs, ["ab"], prompts=["x"]) == [13.0]
    per_pair = {"name": "callable", "path": f"{user_module}:single", "batched": False}
    assert score(per_pair, ["wow!!", "ok"]) == [2.0, 0.0]


@pytest.mark.parametrize(
    "path, message",
    [
        ("no_colon_here", "must look like"),
        ("surely_missing_module_xyz:f", "cannot import module"),
        ("{mod}:missing", "has no attribute"),
        ("{mod}:NOT_CALLABLE", "is not callable"),
    ],
)
def test_callable_bad_paths(user_module, path, message):
    with pytest.raises(ValueError) as info:
        build_reward({"name": "callable", "path": path.format(mod=user_module)})
    assert message in str(info.value)


def test_scorer_returning_wrong_count_or_nan_is_rejected():
    short = RewardFn("short", lambda p, c: [1.0])
    with pytest.raises(ValueError, match="returned 1 scores for 2"):
        short(["a", "b"], ["c", "d"])
    nan = RewardFn("nan", lambda p, c: [1.0, float("nan")])
    with pytest.raises(ValueError, match="non-finite score at batch index 1"):
        nan(["a", "b"], ["c", "d"])
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        nan(["a", "b"], ["c"])


def test_zscore_normalisation_fitted_on_a_dataset():
    reward = build_reward({"name": "length", "normalize": "zscore", "cache": False})
    texts = ["a", "a b", "a b c"]  # brevity rewards -1, -2, -3: mean -2, population std sqrt(2/3)
    with pytest.raises(ValueError, match="no statistics"):
        reward(["p"] * 3, texts)
    norm = reward.fit_normalization(["p"] * 3, texts)
    assert norm.mean == pytest.approx(-2.0) and norm.std == pytest.approx(math.sqrt(2 / 3))
    expected = np.array([1.0, 0.0, -1.0]) / math.sqrt(2 / 3)
    assert reward(["p"] * 3, texts).numpy() == pytest.approx(expected, rel=1e-6)


def test_minmax_normalisation_given_in_spec_with_clipping():
    spec = {"name": "length", "target": 0, "normalize": {"kind": "minmax", "low": -4, "high": 0}}
    assert score(spec, ["", "a b", "a b c d e f"]) == pytest.approx([1.0, 0.5, -0.5])
    clipped = {**spec, "normalize": {**spec["normalize"], "clip": True}}
    assert score(clipped, ["", "a b", "a b c d e f"]) == pytest.approx([1.0, 0.5, 0.0])


def test_minmax_after_minimize_maps_best_to_one():
    reward = RewardFn("len", lambda p, c: [float(len(t)) for t in c], direction="minimize")
    reward.normalization = Normalization(kind="minmax")
    reward.fit_normalization(["p"] * 3, ["a", "aaa", "aaaaa"])
    assert reward(["p"] * 3, ["a", "aaa", "aaaaa"]).tolist() == pytest.approx([1.0, 0.5, 0.0])


def test_spec_round_trip_rebuilds_equivalent_reward():
    reward = build_reward({"name": "keyword", "keywords": ["sun"], "alias": "sunny", "direction": "minimize"})
    rebuilt = build_reward(reward.spec())
    texts = ["the sun is out", "rain"]
    assert rebuilt.fingerprint == reward.fingerprint and rebuilt.alias == "sunny"
    assert rebuilt(["p", "p"], texts).tolist() == reward(["p", "p"], texts).tolist() == [-1.0, 0.0]


def test_no_builtin_setting_is_shadowed_by_a_wrapper_key():
    import inspect

    from distalign.rewards.build import WRAPPER_KEYS

    for name in REWARDS.names():
        settings = set(inspect.signature(REWARDS.get(name)).parameters)
        assert not settings & set(WRAPPER_KEYS), name
