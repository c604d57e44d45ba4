"""The loss seams in the loop: aggregators over the global batch, weighted rows, per-row signals, model
heads, aggregator state across resume, and what is counted and summarised."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from distalign_testing.runs import (
    TINY_BASE,
    final_weights,
    gradients_close,
    largest_gradient,
    max_weight_difference,
    optimizer_steps_taken,
    read_metrics,
    run_gradient,
    run_gradient_two_processes,
    torchrun,
)

from distalign.config import ConfigError, load_config
from distalign.data.loading import load_rows

SUMMARY_PROBE = str(Path(__file__).with_name("summary_probe.py"))
STEP = 3  # at step 1 the policy is its reference: every DPO loss ties and CVaR's tail is arbitrary


@pytest.fixture
def weighted_pairs(tmp_path) -> Path:
    """32 quickstart pairs, most of weight 1 (so some micro-batches are all-ones and others are not),
    some of weight 3 or 0, with a designer reward per completion."""
    rows = load_rows("builtin:quickstart_pairs.jsonl", limit=32).rows
    path = tmp_path / "weighted.jsonl"
    with path.open("w") as handle:
        for i, row in enumerate(rows):
            weight = 3.0 if i % 5 == 0 else (0.0 if i % 7 == 3 else 1.0)
            record = {k: row[k] for k in ("prompt", "chosen", "rejected", "source")}
            record |= {
                "weight": weight,
                "chosen_reward_brevity": -len(row["chosen"]),
                "rejected_reward_brevity": 0,
            }
            handle.write(json.dumps(record) + "\n")
    return path


# ------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["loss.name=aot_paired", "aggregator.name=cvar"], "composes only with mean"),
        (["aggregator.name=worst"], "valid names: chi2_dro, cvar, dora"),
        (["aggregator.name=cvar", "aggregator.alfa=0.2"], "aggregator.alfa is not an option"),
        (["aggregator.name=cvar", "aggregator.alpha=0"], "alpha must lie in"),
        (["aggregator.alpha=0.2"], "not an option of aggregator 'mean'"),
    ],
)
def test_bad_aggregator_settings_fail_at_config_time(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


# ----------------------------------------------------------------------------------- exactness


@pytest.mark.slow
def test_coupled_aggregator_gradient_is_exact_across_micro_batches_and_processes(tmp_path):
    """DPO x CVaR: 1 x 8 == 1 x 4 micro-batches (both strategies) == 2 processes x 2, in float64."""
    common = ["loss.name=dpo", "aggregator.name=cvar", "aggregator.alpha=0.3", "train.batch_size=8"]
    common += ["model.dtype=float64", "train.lr=1e-2"]
    mb2 = "train.micro_batch_size=2"
    whole = run_gradient(tmp_path / "whole", *common, "train.micro_batch_size=8", step=STEP)
    recompute = run_gradient(
        tmp_path / "recompute", *common, mb2, "train.global_strategy=recompute", step=STEP
    )
    retain = run_gradient(tmp_path / "retain", *common, mb2, "train.global_strategy=retain", step=STEP)
    two_procs = run_gradient_two_processes(tmp_path / "ddp", *common, mb2, step=STEP)
    local = run_gradient(tmp_path / "local", *common, mb2, "train.coupling_scope=micro_batch", step=STEP)
    assert largest_gradient(whole) > 0
    for other in (recompute, retain, two_procs):
        assert gradients_close(other, whole, tol=1e-9)
    assert not gradients_close(local, whole, tol=1e-3)  # the check can fail: a per-micro-batch tail differs


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["dpo", "aot_paired"])
def test_weighted_rows_train_identically_however_the_batch_is_split(tmp_path, weighted_pairs, loss):
    """Mixed all-ones and weighted micro-batches: 1 x 8 == 1 x 4 micro-batches == 2 processes x 2."""
    common = [f"loss.name={loss}", "loss.beta=1.0", f"data.path={weighted_pairs}", "train.batch_size=8"]
    common += ["model.dtype=float64", "train.lr=1e-2"]
    whole = run_gradient(tmp_path / "whole", *common, "train.micro_batch_size=8", step=STEP)
    split = run_gradient(tmp_path / "split", *common, "train.micro_batch_size=2", step=STEP)
    two_procs = run_gradient_two_processes(tmp_path / "ddp", *common, "train.micro_batch_size=2", step=STEP)
    unweighted = run_gradient(
        tmp_path / "plain", *common[:2], "train.batch_size=8", *common[4:], "data.limit=32", step=STEP
    )
    assert largest_gradient(whole) > 0
    assert gradients_close(split, whole, tol=1e-9) and gradients_close(two_procs, whole, tol=1e-9)
    assert not gradients_close(unweighted, whole, tol=1e-3)  # the weights are honoured, not dropped


def test_sft_term_with_weights_is_independent_of_micro_batching(tmp_path, weighted_pairs):
    common = ["loss.name=dpo", "train.sft_weight=0.5", f"data.path={weighted_pairs}", "train.batch_size=8"]
    common += ["model.dtype=float64"]
    whole = run_gradient(tmp_path / "whole", *common, "train.micro_batch_size=8", step=2)
    split = run_gradient(tmp_path / "split", *common, "train.micro_batch_size=2", step=2)
    assert largest_gradient(whole) > 0 and gradients_close(split, whole, tol=1e-9)
    # The check can fail: the same split with the SFT term dropped (sft_weight 0) differs.
    no_sft = run_gradient(
        tmp_path / "no_sft", *common, "train.micro_batch_size=2", "train.sft_weight=0", step=2
    )
    assert not gradients_close(no_sft, whole, tol=1e-3)


def test_logged_loss_is_the_optimised_objective_on_the_global_batch():
    """Decomposable objectives are optimised as the weight-share sum of micro-batch values; what is
    logged (the objective on the gathered batch) must equal it, SFT term and weights included."""
    from distalign.losses.base import PairedStats
    from distalign.train.coupling import slice_stats
    from distalign.train.objective import build_objective

    config = load_config(None, ["loss.name=dpo", "train.sft_weight=0.7"])
    objective = build_objective(config)
    g = torch.Generator().manual_seed(0)
    r = lambda: torch.randn(8, generator=g, dtype=torch.float64)  # noqa: E731
    weights = torch.tensor([3.0, 1, 1, 0, 1, 2, 1, 1], dtype=torch.float64)
    lengths = torch.arange(1.0, 9.0, dtype=torch.float64)
    stats = PairedStats(r(), r(), lengths, lengths, r(), r(), weights=weights)
    optimised = sum(
        objective(slice_stats(stats, i, i + 2)).loss * weights[i : i + 2].sum() / weights.sum()
        for i in range(0, 8, 2)
    )
    torch.testing.assert_close(optimised, objective(stats).loss)


# ------------------------------------------------------------------------------ bookkeeping


def test_tokens_are_counted_once_per_training_forward(run_tiny):
    args = ["loss.name=aot_paired", "train.batch_size=8", "train.micro_batch_size=2", "train.max_steps=2"]
    retain = run_tiny(*args, "train.global_strategy=retain", name="retain")
    recompute = run_tiny(*args, "train.global_strategy=recompute", name="recompute")
    dpo = run_tiny(*args[1:], "loss.name=dpo", name="dpo")
    tokens = lambda run: [r["tokens"] for r in read_metrics(run)]  # noqa: E731
    assert tokens(recompute) == tokens(retain) == tokens(dpo)
    assert all(t > 0 for t in tokens(dpo))


@pytest.mark.slow
def test_dominance_summary_with_fewer_rows_than_processes(tmp_path):
    """Process 1 has no row to score; it must still enter the gathers (it used to return early, and
    process 0 waited for it for ever)."""
    out = tmp_path / "summary"
    args = [
        *TINY_BASE,
        f"output_dir={out}",
        "loss.name=dpo",
        "train.batch_size=4",
        "train.micro_batch_size=2",
    ]
    torchrun([SUMMARY_PROBE, *args, "train.max_steps=1"], timeout=300)
    assert json.loads((out / "dominance.json").read_text())["rows"] == 1


# ------------------------------------------------------------------------ signals, listwise


def test_listwise_reference_cache_equals_on_the_fly(run_tiny):
    args = ["loss.name=plackett_luce", "data.path=builtin:quickstart_listwise.jsonl", "train.max_steps=3"]
    args += ["train.batch_size=8", "train.micro_batch_size=4"]
    cached = run_tiny(*args, name="cached")
    online = run_tiny(*args, "reference.precompute=false", name="online")
    assert max_weight_difference(final_weights(cached), final_weights(online)) < 1e-6


def test_loss_declaring_a_missing_signal_is_refused_before_training(tmp_path, throwaway):
    throwaway.loss("needs_group", signals=("group",))
    with pytest.raises(Exception, match="needs the per-row signal\\(s\\) group"):
        from distalign.train.offline import train_offline

        train_offline(
            load_config(None, [*TINY_BASE, "loss.name=needs_group", f"output_dir={tmp_path / 'x'}"])
        )
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------- one registration: loss, aggregator


def _value_regression(stats, *, beta: float = 0.1, value_weight: float = 1.0):
    """A throwaway loss with a head and a signal: DPO + (V(x) - r(x, y_w) / 50)^2 per pair."""
    from distalign.losses.base import PerExampleLosses
    from distalign.losses.preference import dpo_loss, paired_inputs

    chosen, rejected = paired_inputs(stats, "value_regression", "logratios")
    target = stats.signals["chosen_reward/brevity"].to(chosen.dtype) / 50
    squared_error = (stats.heads["value"] - target) ** 2
    losses = dpo_loss(chosen, rejected, beta=beta) + value_weight * squared_error
    return PerExampleLosses(losses, {"value_mse": squared_error.detach().mean()})


def _ema_scaled(losses, *, weights, signals, state, decay: float = 0.5):
    """A throwaway stateful aggregator: the mean divided by 1 + a running mean of past batch means."""
    from distalign.losses.base import LossResult, weighted_mean

    batch_mean = weighted_mean(losses.detach(), weights)
    running = batch_mean if state is None else decay * state["running"][0] + (1 - decay) * batch_mean
    loss = weighted_mean(losses, weights) / (1 + running)
    return LossResult(loss, {"aggregate/running": running}, {"running": running.reshape(1)})


def test_a_loss_and_an_aggregator_added_by_one_registration_each(run_tiny, throwaway, weighted_pairs, capsys):
    from distalign.cli import main

    throwaway.loss("value_regression", _value_regression, heads=("value",), signals=("chosen_reward/*",))
    throwaway.aggregator("ema_scaled", _ema_scaled, stateful=True)
    assert main(["losses"]) == 0
    listed = capsys.readouterr().out
    assert "value_regression" in listed and "head value" in listed and "ema_scaled" in listed
    assert "stateful" in listed and "decay=0.5" in listed

    args = ["loss.name=value_regression", f"data.path={weighted_pairs}", "aggregator.name=ema_scaled"]
    args += ["train.batch_size=8", "train.micro_batch_size=4", "train.max_steps=8", "train.head_lr=0.05"]
    run = run_tiny(*args, name="value")
    records = read_metrics(run)
    assert records[-1]["value_mse"] < 0.5 * records[0]["value_mse"]  # the head learns its target
    assert records[1]["aggregate/running"] != records[0]["aggregate/running"]  # the state moves
    from safetensors.torch import load_file

    heads = load_file(str(run / "final" / "heads.safetensors"))
    assert heads["value.linear.bias"].abs().item() > 0


def test_resume_restores_aggregator_state_exactly(run_tiny, throwaway):
    throwaway.aggregator("ema_scaled", _ema_scaled, stateful=True)
    args = ["loss.name=dpo", "aggregator.name=ema_scaled", "aggregator.decay=0.2", "train.max_steps=6"]
    args += ["train.batch_size=8", "train.micro_batch_size=4"]
    with optimizer_steps_taken() as straight_steps:
        straight = run_tiny(*args, name="straight")
    run_tiny(*args, "train.save_every=3", name="resumed", stop_after_step=3)
    with optimizer_steps_taken() as resumed_steps:
        resumed = run_tiny(*args, "train.save_every=3", name="resumed")
    assert resumed_steps[0] * 2 == straight_steps[0] > 0  # steps 4-6 only: resumed, not restarted
    assert max_weight_difference(final_weights(straight), final_weights(resumed)) == 0.0
    key = "aggregate/running"
    assert [r[key] for r in read_metrics(resumed)] == [r[key] for r in read_metrics(straight)]


def test_head_gets_the_exact_gradient_through_the_coupled_path():
    """Head outputs are statistics like the log-probs: the linear surrogate over micro-batches gives
    the head's parameters the gradient of the global objective (checked by finite differences)."""
    from distalign.data.tokenize import tokenize_paired
    from distalign.losses.aggregators import get_aggregator
    from distalign.losses.base import LossSpec, PairedStats
    from distalign.models.heads import build_heads
    from distalign.models.loading import load_model_and_tokenizer
    from distalign.models.logprobs import SequenceLogprobModel
    from distalign.train.coupling import coupling_coefficients, detach_stats, linear_surrogate
    from distalign.train.objective import BatchObjective
    from distalign.train.setup import OfflineData

    model, tokenizer = load_model_and_tokenizer("tiny", dtype="float64")
    heads = build_heads(("value",), model.config.hidden_size, torch.float64)
    torch.manual_seed(0)
    torch.nn.init.normal_(heads["value"].linear.weight, std=0.1)
    module = SequenceLogprobModel(model, heads=heads)
    items, _ = tokenize_paired(load_rows("builtin:quickstart_pairs.jsonl", limit=6).rows, tokenizer)
    for item in items:
        item.signals["chosen_reward/brevity"] = float(-len(item.chosen_ids))
    data = OfflineData("paired", items, tokenizer.pad_token_id)
    reference = torch.randn(12, dtype=torch.float64)

    def stats_of(rows):
        batch = data.collate(rows)
        logps, counts, outputs = module(
            batch["input_ids"],
            batch["attention_mask"],
            batch["completion_mask"],
            head_positions=batch["prompt_lengths"] - 1,
        )
        n = len(rows)
        index = torch.tensor(rows)
        return PairedStats(
            logps[:n],
            logps[n:],
            counts[:n],
            counts[n:],
            reference[index],
            reference[index + 6],
            signals=data.signals(rows, "cpu"),
            heads={"value": outputs["value"][:n]},
        )

    spec = LossSpec("value_regression", _value_regression, "paired", True, False, "")
    objective = BatchObjective(spec, get_aggregator("cvar"), aggregator_options={"alpha": 0.5})
    with torch.no_grad():
        global_stats = detach_stats(stats_of(list(range(6))))
    coefficients, _ = coupling_coefficients(objective, global_stats)
    assert coefficients["heads.value"].abs().max() > 0  # not treated as a constant
    module.zero_grad()
    for start in (0, 3):
        linear_surrogate(stats_of(list(range(start, start + 3))), coefficients, start).backward()
    weight = heads["value"].linear.weight
    h = 1e-6
    for coordinate in torch.randperm(weight.numel(), generator=torch.Generator().manual_seed(1))[:4]:
        values = []
        for sign in (1, -1):
            with torch.no_grad():
                weight.view(-1)[coordinate] += sign * h
                values.append(float(objective(stats_of(list(range(6)))).loss))
                weight.view(-1)[coordinate] -= sign * h
        numeric = (values[0] - values[1]) / (2 * h)
        assert weight.grad.view(-1)[coordinate].item() == pytest.approx(numeric, rel=1e-5, abs=1e-9)
