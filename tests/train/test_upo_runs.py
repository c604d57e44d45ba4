"""UPO in the loop: designer rewards from the config or the data, the value head, exactness over
micro-batches and processes, and a tiny run that moves the designer score the right way while
held-out preference accuracy stays well above chance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from distalign_testing.runs import (
    gradients_close,
    largest_gradient,
    read_metrics,
    run_gradient,
    run_gradient_two_processes,
)

from distalign.data.loading import load_rows
from distalign.errors import SetupError

BREVITY = "designer.rewards=[{name: length, alias: brevity}]"
STEP = 3


@pytest.fixture(scope="module")
def split_pairs(tmp_path_factory) -> tuple[Path, list[dict]]:
    """The quickstart pairs: the first 200 to train on, the last 40 held out."""
    rows = load_rows("builtin:quickstart_pairs.jsonl").rows
    path = tmp_path_factory.mktemp("upo") / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows[:200]))
    return path, rows[200:]


def test_designer_rewards_are_saved_and_logged(run_tiny):
    args = ["loss.name=upo", BREVITY, "train.batch_size=16", "train.micro_batch_size=8", "train.max_steps=4"]
    run = run_tiny(*args, name="upo")
    saved = json.loads((run / "designer.json").read_text())
    (brevity,) = saved["rewards"]
    assert brevity["alias"] == "brevity" and brevity["normalization"]["kind"] == "zscore"
    records = read_metrics(run)
    assert {"upo/weight_ess", "upo/clipped_fraction", "designer/chosen", "upo/value_loss"} <= set(records[0])
    assert 0 < records[0]["upo/weight_ess"] <= 1


def test_a_loss_that_reads_no_designer_reward_says_so(run_tiny, capsys):
    """dpo with a designer section trains plain DPO (a sweep's baseline): the run says the designer
    reward does not enter training; upo does not say it."""
    run_tiny("loss.name=dpo", BREVITY, "train.max_steps=1", name="dpo")
    assert "loss 'dpo' reads no designer reward, so r_aux does not enter training" in capsys.readouterr().out
    run_tiny("loss.name=upo", BREVITY, "train.max_steps=1", name="upo")
    assert "reads no designer reward" not in capsys.readouterr().out


def test_the_value_head_learns_the_designer_reward_it_is_fitted_to(run_tiny, tmp_path):
    """A constant r_aux = 0.8 (a data column, not normalised): V(x) must reach it, so the expectile loss
    0.5 (r_aux - V)^2 falls from 0.32 at V = 0 towards 0 (the head's bias and weights learn it)."""
    rows = load_rows("builtin:quickstart_pairs.jsonl", limit=64).rows
    path = tmp_path / "constant.jsonl"
    with path.open("w") as handle:
        for row in rows:
            scores = {"chosen_rewards": {"house_style": 0.8}, "rejected_rewards": {"house_style": 0.8}}
            handle.write(
                json.dumps({**{k: row[k] for k in ("prompt", "chosen", "rejected")}, **scores}) + "\n"
            )
    args = ["loss.name=upo", f"data.path={path}", "designer.rewards=[{column: house_style}]"]
    args += [
        "designer.normalize=none",
        "train.batch_size=16",
        "train.micro_batch_size=16",
        "train.max_steps=40",
    ]
    args += ["train.head_lr=0.02", "train.scheduler=constant", "loss.lambda_aux=0.0"]
    records = read_metrics(run_tiny(*args, name="constant"))
    assert records[0]["upo/value_loss"] == pytest.approx(0.32)
    late = records[-8:]
    assert sum(r["upo/value_loss"] for r in late) / len(late) < 0.05  # a sixth of where it started
    assert sum(r["upo/value_mean"] for r in late) / len(late) == pytest.approx(0.8, abs=0.2)


def test_upo_without_designer_rewards_is_refused_before_training(run_tiny, tmp_path):
    with pytest.raises(SetupError, match="chosen_reward/designer"):
        run_tiny("loss.name=upo", "train.max_steps=1", name="no_designer")
    assert not (tmp_path / "no_designer" / "metrics.jsonl").exists()


def test_designer_reward_read_from_a_data_column(run_tiny, tmp_path):
    rows = load_rows("builtin:quickstart_pairs.jsonl", limit=32).rows
    path = tmp_path / "scored.jsonl"
    with path.open("w") as handle:
        for row in rows:
            scores = {"chosen_rewards": {"polite": 1.0}, "rejected_rewards": {"polite": -1.0}}
            handle.write(
                json.dumps({**{k: row[k] for k in ("prompt", "chosen", "rejected")}, **scores}) + "\n"
            )
    column = "designer.rewards=[{column: polite}]"
    run = run_tiny("loss.name=modpo", f"data.path={path}", column, "train.max_steps=2", name="column")
    assert read_metrics(run)[0]["designer/chosen"] == pytest.approx(1.0)  # z-scored +-1 stays +-1
    with pytest.raises(SetupError, match=r"designer.*chosen_rewards\['kind'\]"):
        run_tiny("loss.name=modpo", f"data.path={path}", "designer.rewards=[{column: kind}]", name="nope")


def test_bad_designer_entries_fail_naming_the_entry(run_tiny):
    with pytest.raises(SetupError, match=r"designer.rewards\[0\].*lenght"):
        run_tiny("loss.name=upo", "designer.rewards=[{name: lenght}]", name="typo")
    with pytest.raises(SetupError, match="reserved"):
        run_tiny("loss.name=upo", "designer.rewards=[{name: length, alias: designer}]", name="reserved")
    with pytest.raises(SetupError, match="weights names"):
        run_tiny("loss.name=upo", BREVITY, "designer.weights.brevty=2", name="weights")


def _heldout_accuracy(run: Path, rows: list[dict]) -> float:
    """Share of held-out pairs whose implicit reward margin (policy vs its initial weights) is positive."""
    from distalign.data.tokenize import tokenize_paired
    from distalign.models.loading import load_model_and_tokenizer
    from distalign.models.token_logprobs import sequence_logprobs
    from distalign.train.setup import OfflineData

    policy, tokenizer = load_model_and_tokenizer(str(run / "final"))
    reference, _ = load_model_and_tokenizer("tiny")
    items, _ = tokenize_paired(rows, tokenizer)
    batch = OfflineData("paired", items, tokenizer.pad_token_id).collate(list(range(len(items))))
    with torch.no_grad():
        inputs = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        ratios = sequence_logprobs(policy, *inputs).summed - sequence_logprobs(reference, *inputs).summed
    chosen, rejected = ratios.chunk(2)
    return float((chosen > rejected).float().mean())


@pytest.mark.slow
def test_upo_moves_the_designer_score_its_way_and_keeps_held_out_preference_accuracy(run_tiny, split_pairs):
    """Two runs differing only in the designer's direction (brevity vs verbosity): the brevity run's
    samples are shorter, and both rank held-out pairs well above chance."""
    from distalign.eval.run import evaluate_run

    train, heldout = split_pairs
    common = ["loss.name=upo", f"data.path={train}", "loss.lambda_aux=1.0", "train.max_steps=40"]
    common += ["train.batch_size=16", "train.micro_batch_size=16", "train.lr=2e-3"]
    evaluation = ["eval.num_prompts=32", "eval.samples_per_prompt=2", "eval.max_new_tokens=24"]
    words = {}
    for name, direction in (("brevity", "maximize"), ("verbosity", "minimize")):
        designer = f"designer.rewards=[{{name: length, alias: brevity, direction: {direction}}}]"
        run = run_tiny(*common, designer, *evaluation, name=name)
        assert _heldout_accuracy(run, heldout) >= 0.75
        result = json.loads(evaluate_run(run).read_text())
        words[name] = -result["designer"]["brevity"]["policy"]["value"]  # raw brevity = -word count
    assert words["brevity"] < words["verbosity"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "loss",
    [
        ["loss.name=upo", "loss.normalize_weights=true"],
        ["loss.name=upo_kto", "data.path=builtin:quickstart_unpaired.jsonl", "loss.weight_clip=1.5"],
    ],
    ids=["upo_normalized", "upo_kto"],
)
def test_upo_gradient_is_exact_across_micro_batches_and_processes(tmp_path, loss):
    """The value head included: its gradient is part of the applied gradient compared here."""
    common = [*loss, BREVITY, "train.batch_size=8", "model.dtype=float64", "train.lr=1e-2", "data.limit=32"]
    whole = run_gradient(tmp_path / "whole", *common, "train.micro_batch_size=8", step=STEP)
    micro = run_gradient(tmp_path / "micro", *common, "train.micro_batch_size=2", step=STEP)
    assert gradients_close(micro, whole, tol=1e-9)
    processes = run_gradient_two_processes(tmp_path / "two", *common, "train.micro_batch_size=2", step=STEP)
    assert largest_gradient(whole) > 0 and gradients_close(processes, whole, tol=1e-9)
    # The check can fail: the batch-coupled weights (normalised, or KTO's KL estimate) per micro-batch.
    local = ["train.micro_batch_size=2", "train.coupling_scope=micro_batch"]
    assert not gradients_close(run_gradient(tmp_path / "local", *common, *local, step=STEP), whole, tol=1e-3)
