"""Per-term gradient-norm shares (train/grad_shares.py): checked by hand against torch.autograd on the
tiny model, accumulated over micro-batches, zero for a switched-off term, and logged by the loop
without changing the run."""

from __future__ import annotations

import contextlib

import pytest
import torch
from distalign_testing.runs import TINY_BASE, final_weights, max_weight_difference, read_metrics, torchrun

from distalign.losses.aggregators import get_aggregator
from distalign.losses.base import PairedStats, get_loss
from distalign.losses.upo import CHOSEN_DESIGNER, REJECTED_DESIGNER
from distalign.models.tiny import build_tiny_model
from distalign.train.grad_shares import grad_share_metric, gradient_shares
from distalign.train.objective import BatchObjective

SHARES = ("upo/grad_share_preference", "upo/grad_share_aux", "upo/grad_share_value")
BREVITY = "designer.rewards=[{name: length, alias: brevity}]"


class OneProcess:
    """What gradient_shares asks of the engine, for one process."""

    world_size, rank, device = 1, 0, torch.device("cpu")

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def sync_context(self, sync: bool):
        return contextlib.nullcontext()

    def gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach()

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach().clone()


class TinyPairs:
    """8 pairs of random token sequences scored by the tiny Llama (float64) and a linear value head on a
    fixed feature per prompt: statistics of any rows, with gradient to both."""

    def __init__(self, pairs: int = 8, length: int = 12) -> None:
        torch.manual_seed(0)
        model, _ = build_tiny_model(seed=0)
        self.model = torch.nn.ModuleDict({"policy": model.double(), "value": torch.nn.Linear(4, 1).double()})
        self.ids = torch.randint(3, 500, (2 * pairs, length))
        self.mask = torch.ones_like(self.ids)
        self.completion = torch.zeros_like(self.ids)
        self.completion[:, length // 2 :] = 1
        self.features = torch.randn(pairs, 4, dtype=torch.float64)
        self.ref = torch.randn(2 * pairs, dtype=torch.float64) - 30.0
        self.designer = torch.randn(2 * pairs, dtype=torch.float64)
        self.pairs = pairs

    def __call__(self, rows: list[int], with_kl: bool = True, count_tokens: bool = True) -> PairedStats:
        from distalign_testing.naive_logprobs import naive_sequence_logprobs

        index = torch.tensor(rows + [r + self.pairs for r in rows])
        logps, counts = naive_sequence_logprobs(
            self.model["policy"], self.ids[index], self.mask[index], self.completion[index]
        )
        n = len(rows)
        designer = self.designer[index]
        return PairedStats(
            logps[:n],
            logps[n:],
            counts[:n],
            counts[n:],
            self.ref[index][:n],
            self.ref[index][n:],
            weights=torch.ones(n, dtype=torch.float64),
            signals={CHOSEN_DESIGNER: designer[:n], REJECTED_DESIGNER: designer[n:]},
            heads={"value": self.model["value"](self.features[rows]).squeeze(-1)},
        )


def upo_objective(**options) -> BatchObjective:
    return BatchObjective(get_loss("upo"), get_aggregator("mean"), {"beta": 0.5, **options})


def direct_shares(data: TinyPairs, options: dict) -> dict[str, float]:
    """The shares computed the plain way: UPO's loss is linear in (lambda_aux, value_weight), so each
    term's gradient is torch.autograd's gradient of the whole-batch loss with the other terms switched off
    (the preference term: both off; the auxiliary: value off, minus the preference term's)."""
    params = [p for p in data.model.parameters()]

    def gradient(**switches) -> torch.Tensor:
        loss = upo_objective(**{**options, **switches})(data(list(range(data.pairs)))).loss
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])

    preference = gradient(lambda_aux=0.0, value_weight=0.0)
    parts = {
        "preference": preference,
        "aux": gradient(value_weight=0.0) - preference,
        "value": gradient(lambda_aux=0.0) - preference,
    }
    norms = {name: float(g.norm()) for name, g in parts.items()}
    return {f"upo/grad_share_{name}": norm / sum(norms.values()) for name, norm in norms.items()}


@pytest.mark.parametrize("normalize", [False, True], ids=["per_example", "batch_normalised"])
@pytest.mark.parametrize("micro_batches", [1, 4])
def test_shares_equal_the_terms_own_gradients(normalize, micro_batches):
    """Over 1 or 4 micro-batches, with per-example weights or batch-normalised ones (batch-coupled):
    each share equals the one from the term's own autograd gradient, and the shares sum to 1."""
    data = TinyPairs()
    options = {"lambda_aux": 0.3, "normalize_weights": normalize}
    rows = list(range(data.pairs))
    size = data.pairs // micro_batches
    split = [rows[i : i + size] for i in range(0, data.pairs, size)]
    shares = gradient_shares(OneProcess(data.model), upo_objective(**options), data, split)
    expected = direct_shares(data, options)
    assert set(shares) == set(SHARES)
    for name in SHARES:
        assert float(shares[name]) == pytest.approx(expected[name], rel=1e-7)
    assert sum(float(v) for v in shares.values()) == pytest.approx(1.0, abs=1e-12)
    assert min(expected.values()) > 0.01  # every term contributes: the comparison can fail
    assert all(p.grad is None for p in data.model.parameters())  # the step's backward starts clean


def test_a_switched_off_term_has_share_zero_and_the_check_can_fail():
    data = TinyPairs()
    rows = list(range(data.pairs))
    off = gradient_shares(OneProcess(data.model), upo_objective(lambda_aux=0.0), data, [rows])
    assert float(off["upo/grad_share_aux"]) == 0.0
    assert float(off["upo/grad_share_preference"]) + float(off["upo/grad_share_value"]) == pytest.approx(1.0)
    on = gradient_shares(OneProcess(data.model), upo_objective(lambda_aux=0.05), data, [rows])
    assert float(on["upo/grad_share_aux"]) > 0.01


def test_the_micro_batch_coupling_scope_splits_each_micro_batch_objective():
    """coupling_scope=micro_batch: each micro-batch's own (batch-normalised) objective, weighted 1/2."""
    data = TinyPairs()
    options = {"lambda_aux": 0.3, "normalize_weights": True}
    objective = upo_objective(**options)
    halves = [[0, 1, 2, 3], [4, 5, 6, 7]]
    shares = gradient_shares(OneProcess(data.model), objective, data, halves, coupling_scope="micro_batch")
    params = list(data.model.parameters())
    parts = {}
    for name, switches in {
        "preference": {"lambda_aux": 0.0, "value_weight": 0.0},
        "aux": {"value_weight": 0.0},
        "value": {"lambda_aux": 0.0},
    }.items():
        loss = sum(upo_objective(**{**options, **switches})(data(rows)).loss for rows in halves) / 2
        parts[name] = torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])
    parts["aux"] = parts["aux"] - parts["preference"]
    parts["value"] = parts["value"] - parts["preference"]
    total = sum(float(g.norm()) for g in parts.values())
    for name, gradient in parts.items():
        assert float(shares[f"upo/grad_share_{name}"]) == pytest.approx(
            float(gradient.norm()) / total, rel=1e-7
        )
    global_scope = gradient_shares(OneProcess(data.model), objective, data, halves)
    assert abs(float(global_scope["upo/grad_share_aux"]) - float(shares["upo/grad_share_aux"])) > 1e-6


def test_metric_names():
    assert grad_share_metric("upo/aux") == "upo/grad_share_aux"
    assert grad_share_metric("sft") == "grad_share_sft"


def test_the_loop_logs_shares_on_logged_steps_and_trains_the_same(run_tiny):
    """train.grad_shares=true: shares on every logged step (log_every=2: steps 2, 4 and the last, 5),
    summing to 1, equal over 1 and 2 micro-batches at the first logged step; the final weights equal a
    run without them (the extra passes draw no randomness the step uses and leave no gradient)."""
    common = ["loss.name=upo", BREVITY, "train.batch_size=8", "train.max_steps=5", "train.log_every=2"]
    common += ["loss.lambda_aux=0.5", "model.dtype=float64"]
    plain = run_tiny(*common, "train.micro_batch_size=8", name="plain")
    shared = run_tiny(*common, "train.micro_batch_size=8", "train.grad_shares=true", name="shares")
    split = run_tiny(*common, "train.micro_batch_size=4", "train.grad_shares=true", name="split")
    records = read_metrics(shared)
    assert [r["step"] for r in records] == [2, 4, 5]
    for record in records:
        assert set(SHARES) <= set(record)
        assert sum(record[k] for k in SHARES) == pytest.approx(1.0, abs=1e-9)
        assert min(record[k] for k in SHARES) > 0
    assert not any(k.rpartition("/")[2].startswith("grad_share_") for k in read_metrics(plain)[0])
    first_split = read_metrics(split)[0]
    for name in SHARES:
        assert first_split[name] == pytest.approx(records[0][name], rel=1e-6)
    assert max_weight_difference(final_weights(plain), final_weights(shared)) == 0.0


def test_lambda_aux_zero_logs_auxiliary_share_zero(run_tiny):
    args = ["loss.name=upo", BREVITY, "train.batch_size=8", "train.micro_batch_size=4", "train.max_steps=1"]
    (record,) = read_metrics(run_tiny(*args, "loss.lambda_aux=0", "train.grad_shares=true", name="off"))
    assert record["upo/grad_share_aux"] == 0.0
    assert record["upo/grad_share_preference"] + record["upo/grad_share_value"] == pytest.approx(1.0)


@pytest.mark.slow
def test_two_processes_log_the_one_process_shares(run_tiny, tmp_path):
    """DDP over gloo: each process's per-term gradients are summed over processes before the norms, so
    two processes (2 micro-batches each) log the shares one process logs, with batch-normalised weights
    (coupled over the global batch)."""
    common = ["loss.name=upo", BREVITY, "loss.normalize_weights=true", "loss.lambda_aux=0.5"]
    common += [
        "train.batch_size=8",
        "train.micro_batch_size=2",
        "train.max_steps=2",
        "train.grad_shares=true",
    ]
    common += ["model.dtype=float64"]
    one = read_metrics(run_tiny(*common, name="one"))
    torchrun(["-m", "distalign", "train", *TINY_BASE, *common, f"output_dir={tmp_path / 'two'}"])
    two = read_metrics(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2]
    for a, b in zip(one, two):
        for name in SHARES:
            assert b[name] == pytest.approx(a[name], rel=1e-7)


def test_a_single_term_loss_is_refused_naming_the_setting():
    from distalign.config import load_config

    with pytest.raises(Exception, match="train.grad_shares: loss 'dpo' is a single term"):
        load_config(None, [*TINY_BASE, "loss.name=dpo", "train.grad_shares=true"])
    with_sft = load_config(
        None, [*TINY_BASE, "loss.name=dpo", "train.grad_shares=true", "train.sft_weight=0.5"]
    )
    assert with_sft.train.grad_shares


def test_the_sft_term_is_a_term_of_its_own(run_tiny):
    args = ["loss.name=dpo", "train.sft_weight=0.5", "train.grad_shares=true", "train.max_steps=1"]
    (record,) = read_metrics(run_tiny(*args, "train.batch_size=4", "train.micro_batch_size=4", name="sft"))
    assert record["grad_share_loss"] + record["grad_share_sft"] == pytest.approx(1.0)
    assert min(record["grad_share_loss"], record["grad_share_sft"]) > 0.01


def test_upo_kto_logs_its_shares_over_micro_batches(run_tiny):
    """UPO on unpaired rows (KTO's batch anchor: coupled): the same shares over 1 and 2 micro-batches."""
    args = [
        "loss.name=upo_kto",
        "data.path=builtin:quickstart_unpaired.jsonl",
        BREVITY,
        "model.dtype=float64",
    ]
    args += ["train.batch_size=8", "train.max_steps=1", "train.grad_shares=true"]
    (whole,) = read_metrics(run_tiny(*args, "train.micro_batch_size=8", name="whole"))
    (split,) = read_metrics(run_tiny(*args, "train.micro_batch_size=4", name="split"))
    assert sum(whole[k] for k in SHARES) == pytest.approx(1.0)
    assert min(whole[k] for k in SHARES) > 0
    for name in SHARES:
        assert split[name] == pytest.approx(whole[name], rel=1e-6)
