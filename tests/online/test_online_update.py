"""Off-policy, the update's forward supplies log pi of q's samples (no separate scoring pass) exactly
where that is the same number: the training it gives equals the two-pass training, and it is not used
with dropout, autocast or several micro-batches."""

from __future__ import annotations

import pytest
from distalign_testing.runs import final_weights, read_metrics

import distalign.train.online.loop as online_module
from distalign.models import sampling
from distalign.models.loading import LoraSettings, load_model_and_tokenizer
from distalign.train.online.loop import OnlineRun, train_online
from distalign.train.online.update import has_active_dropout

OFF_POLICY = {"proposal": "offline", "baseline": "window", "baseline_window": 40}


def _policy_scoring_passes(monkeypatch) -> list[int]:
    """Sizes of the loop's separate no-grad scoring passes of the policy (the base is scored elsewhere)."""
    calls: list[int] = []

    def counting(model, tokenizer, prompts, *args, **kwargs):
        calls.append(len(prompts))
        return sampling.score_completions(model, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(online_module, "score_completions", counting)
    return calls


def final_weights_of_base() -> dict:
    model, _ = load_model_and_tokenizer("tiny")
    return {name: tensor.detach() for name, tensor in model.state_dict().items()}


def weight_distance(a: dict, b: dict) -> float:
    """The Euclidean distance between two models' weights (the names both have)."""
    return sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in a if k in b) ** 0.5


def test_off_policy_update_forward_gives_the_two_pass_training(tmp_path, online_config, monkeypatch):
    train = {"max_steps": 4, "micro_batch_size": 32}  # the 32 samples of a step fit one micro-batch
    passes = _policy_scoring_passes(monkeypatch)
    fused = train_online(online_config(tmp_path / "fused", train=train, online=OFF_POLICY))
    assert passes == []  # log pi came from the update's forward
    monkeypatch.setattr(OnlineRun, "update_forward_scores_policy", lambda self, samples: False)
    two_pass = train_online(online_config(tmp_path / "two_pass", train=train, online=OFF_POLICY))
    assert passes == [32] * 4  # the separate no-grad pass, once per step
    # Equal up to float rounding. Adam's first steps move every weight by about lr whatever the size of
    # its gradient, so a weight with a near-zero gradient can move either way on rounding alone: the
    # gap is measured against how far the weights moved, over the whole model (measured: 6e-5; a
    # different log pi would give order 1).
    start = final_weights_of_base()
    fused_weights, two_pass_weights = final_weights(fused), final_weights(two_pass)
    assert weight_distance(fused_weights, two_pass_weights) < 1e-3 * weight_distance(fused_weights, start)
    fused_records, two_pass_records = read_metrics(fused), read_metrics(two_pass)
    assert abs(fused_records[0]["kl_pi_a"]) < 1e-5  # step 1: pi = q = a, so log pi = log q to rounding
    assert fused_records[0]["is/ess_fraction"] == pytest.approx(1.0, abs=1e-6)
    for a, b in zip(fused_records, two_pass_records):
        assert a["time/score_policy"] == 0.0 and b["time/score_policy"] > 0.0
        for key in ("loss", "is/ess_fraction", "kl_pi_a", "pseudo_reward/mean"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key


def test_several_micro_batches_keep_the_separate_pass(tmp_path, online_config, monkeypatch):
    passes = _policy_scoring_passes(monkeypatch)
    config = online_config(tmp_path, train={"max_steps": 1, "micro_batch_size": 16}, online=OFF_POLICY)
    train_online(config)
    assert passes == [32]


def test_dropout_is_seen_in_modules_and_in_configs():
    model, _ = load_model_and_tokenizer("tiny")
    assert not has_active_dropout(model)
    model.config.attention_dropout = 0.1  # a functional dropout, applied in training mode only
    assert has_active_dropout(model)
    model.config.attention_dropout = 0.0
    lora, _ = load_model_and_tokenizer("tiny", lora=LoraSettings(dropout=0.1))
    assert has_active_dropout(lora)


def test_off_policy_rloo_refreshes_on_the_ess_rule_alone(tmp_path, online_config):
    """RLOO has no target (no log Z, no divergence to it): the refresh rule falls back to the ESS."""
    online = {"method": "rloo", "target": None, "reward": {"name": "regex", "pattern": "s"}, "kl_coef": 0.05}
    online |= {"proposal": "offline", "refresh_min_ess_fraction": 0.99}
    records = read_metrics(train_online(online_config(tmp_path, train={"max_steps": 3}, online=online)))
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[-1]["proposal/refreshes"] >= 1  # lr 3e-3 moves pi off q: the ESS falls below 99%


def test_the_refresh_rule_waits_for_an_update_since_q_was_taken(tmp_path, online_config):
    """At step 1, and on the step after a refresh, q holds the weights that scored the batch as pi: the
    rule has nothing to compare (the estimates differ by rounding alone, which decided refreshes
    before) and q is kept. So no refresh at step 1 and never two on consecutive steps."""
    config = online_config(tmp_path, train={"max_steps": 6, "micro_batch_size": 32}, online=OFF_POLICY)
    records = read_metrics(train_online(config))
    refreshed = [r["step"] for r, before in zip(records, [{"proposal/refreshes": 0.0}, *records])
                 if r["proposal/refreshes"] > before["proposal/refreshes"]]  # fmt: skip
    assert refreshed and 1 not in refreshed
    assert all(later - earlier >= 2 for earlier, later in zip(refreshed, refreshed[1:]))
