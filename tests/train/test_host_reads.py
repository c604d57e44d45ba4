"""No host synchronisation inside the micro-batch loop: a step of the offline loop reads the device
once (its global loss and metrics, together), whatever the loss, coupling or layout; the mask checks
of the log-prob forward read nothing from a device. Reads are counted on the CPU by ``device_reads``
(tests/conftest.py): the calls that, on an accelerator, would wait for it."""

from __future__ import annotations

import pytest
import torch
from distalign_testing.runs import TINY_BASE

import distalign.train.offline as offline_module
from distalign.config import load_config
from distalign.models.packed_logprobs import packed_sequence_logprobs
from distalign.models.token_logprobs import sequence_logprobs
from distalign.train.offline import train_offline

STEPS = 3


def _reads_per_step(tmp_path, monkeypatch, device_reads, *overrides: str) -> list[dict[str, int]]:
    """Train STEPS steps of 4 micro-batches; the reads of each step's body, by where they were made."""
    per_step: list[dict[str, int]] = []
    iterate = offline_module.iterate_steps

    def counted_steps(first: int, total: int):
        for step in iterate(first, total):
            device_reads.where.clear()
            device_reads.counting = True
            yield step
            device_reads.counting = False
            per_step.append(dict(device_reads.where))

    monkeypatch.setattr(offline_module, "iterate_steps", counted_steps)
    common = [*TINY_BASE, "train.batch_size=8", "train.micro_batch_size=2", f"train.max_steps={STEPS}"]
    train_offline(
        load_config(None, [*common, "train.max_grad_norm=1.0", f"output_dir={tmp_path}", *overrides])
    )
    assert len(per_step) == STEPS
    return per_step


def _by_layer(reads: dict[str, int]) -> dict[str, int]:
    layers: dict[str, int] = {}
    for where, n in reads.items():
        layer = where.split("/")[0] if "/" in where else where  # train, models, or a library's name
        layers[layer] = layers.get(layer, 0) + n
    return layers


@pytest.mark.parametrize(
    "overrides",
    [
        ["loss.name=dpo"],
        ["loss.name=dpo", "aggregator.name=cvar", "train.coupling_scope=micro_batch"],
        ["loss.name=aot_paired"],  # coupled over the global batch: recompute strategy
        ["loss.name=aot_paired", "train.global_strategy=retain"],
        ["loss.name=kto", "data.path=builtin:quickstart_unpaired.jsonl"],
        ["loss.name=dpo", "data.packing=true"],
    ],
    ids=["dpo", "cvar-micro-batch", "aot-recompute", "aot-retain", "kto", "dpo-packed"],
)
def test_the_loop_reads_the_device_once_per_step(tmp_path, monkeypatch, device_reads, overrides):
    """The loop's own code (distalign/train/, the batch plan's host-side shuffle aside) reads once:
    the step's global loss and metrics together."""
    for reads in _reads_per_step(tmp_path, monkeypatch, device_reads, *overrides):
        loop = {w: n for w, n in reads.items() if w.startswith("train/") and "(_permutation)" not in w}
        assert loop == {next(w for w in reads if "(read_scalars)" in w): 1}, reads


HOST_ONLY = (
    "(_check_masks)",
    "(_check_packed)",
    "(_check_predictors)",
    "(attention_spans)",
)  # skipped on a device: below


def test_the_packed_forward_reads_nothing_a_device_would_wait_for(tmp_path, monkeypatch, device_reads):
    """The packer computes the predictor positions on the host; the number of sequences comes from a
    shape. Left out: the checks (CPU only) and the CPU path's spans (on a GPU: one FlexAttention call
    over a block mask)."""
    overrides = ["loss.name=dpo", "data.packing=true"]
    for reads in _reads_per_step(tmp_path, monkeypatch, device_reads, *overrides):
        forward = {
            w: n for w, n in reads.items() if w.startswith(("models/", "data/")) and not w.endswith(HOST_ONLY)
        }
        assert forward == {}, reads
        # The CPU path gives transformers position ids without a mask: it reads them once per forward
        # to detect packed sequences (its own code; the GPU path hands it the block mask instead, and
        # it reads nothing: tests/models/test_span_attention.py).
        assert reads.get("transformers", 0) == 4, reads


def test_the_padded_forward_reads_nothing_of_its_own(tmp_path, monkeypatch, device_reads):
    """distalign's padded forward (distalign/models/) reads nothing; transformers' causal-mask builder
    reads the padding mask (to decide whether SDPA may skip it: its own code, two reads a forward).
    (The packed CPU path, span attention, derives its spans on the host; the GPU packed path is
    issue 23's FlexAttention / varlen work.)"""
    for reads in _reads_per_step(tmp_path, monkeypatch, device_reads, "loss.name=dpo"):
        # The mask checks run on the CPU only (a device skips them: the last test)
        forward = {w: n for w, n in reads.items() if w.startswith("models/") and "(_check_masks)" not in w}
        assert forward == {}, reads
        assert _by_layer(reads)["transformers"] == 2 * 4, reads


def test_the_counter_sees_a_read_in_the_micro_batch_loop(tmp_path, monkeypatch, device_reads):
    """The control: a metric read per micro-batch (what the loop did before) is counted."""
    computer = offline_module.StatsComputer.__call__

    def reads_each_micro_batch(self, rows, *args, **kwargs):
        stats = computer(self, rows, *args, **kwargs)
        float(stats.policy_chosen_logps.detach().sum())
        return stats

    monkeypatch.setattr(offline_module.StatsComputer, "__call__", reads_each_micro_batch)
    for reads in _reads_per_step(tmp_path, monkeypatch, device_reads, "loss.name=dpo"):
        assert _by_layer(reads)["train"] - reads.get("train/batching.py:19 (_permutation)", 0) == 1 + 4, reads


def test_the_mask_checks_read_nothing_from_a_device(device_reads):
    """On a device the forward's mask checks are skipped (each would wait for it); on the CPU they
    run. A meta tensor stands in for a device one: reading it would raise. (The predicting positions
    come with the batch, found on the host by the collate.)"""
    model = torch.nn.Linear(1, 1)  # never called: the meta forward stops at the model
    ids = torch.zeros(2, 5, dtype=torch.long, device="meta")
    device_reads.counting = True
    with pytest.raises(Exception) as failure:
        positions = torch.zeros(3, dtype=torch.long, device="meta")  # the collate's, computed on the host
        sequence_logprobs(
            model, ids, torch.ones_like(ids), torch.zeros_like(ids), predictor_positions=positions
        )
    device_reads.counting = False
    assert "completion_mask" not in str(failure.value)
    assert device_reads.total == 0
    with pytest.raises(ValueError, match="completion_mask"):  # on the CPU, a bad mask is refused
        cpu = torch.zeros(2, 5, dtype=torch.long)
        sequence_logprobs(model, cpu, torch.ones_like(cpu), torch.ones_like(cpu))


def test_the_packed_checks_read_nothing_from_a_device(device_reads):
    model = torch.nn.Linear(1, 1)
    ids = torch.zeros(1, 6, dtype=torch.long, device="meta")
    positions = torch.zeros(3, dtype=torch.long, device="meta")
    device_reads.counting = True
    with pytest.raises(Exception) as failure:
        packed_sequence_logprobs(
            model,
            ids,
            ids,
            ids,
            ids,
            target_positions=positions,
            predictor_positions=positions,
            num_sequences=1,
        )
    device_reads.counting = False
    assert "packed sequence" not in str(failure.value) and device_reads.total == 0
    with pytest.raises(ValueError, match="starts a packed sequence"):  # on the CPU, checked
        cpu = torch.ones(1, 6, dtype=torch.long)
        packed_sequence_logprobs(model, cpu, cpu, cpu, cpu)
