"""Cross-check against TRL's DPOTrainer loss types "aot" and "aot_unpaired" (logistic cost, n == m).

We run TRL's own ``DPOTrainer._compute_loss`` rather than re-typing its formula. Building a real trainer
needs a model, tokenizer and dataset pipeline; instead we create the object without ``__init__`` and set
only the attributes ``_compute_loss`` reads, with a stand-in policy whose forward returns the per-token
log-probs we choose (one completion token per row, so the sequence log-prob is that token's value) and
precomputed reference log-probs. TRL then computes its loss from those log-probs exactly as in training.
"""

from __future__ import annotations

import collections
from types import SimpleNamespace

import pytest
import torch

from distalign.losses import PairedStats, UnpairedStats, get_loss
from distalign.losses.aot import aot_paired_loss, aot_unpaired_loss

pytestmark = pytest.mark.trl
trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")


class _LogProbPolicy(torch.nn.Module):
    """Stands in for a causal LM called with TRL's fused LM head: returns fixed per-token log-probs."""

    def __init__(self, sequence_logps: torch.Tensor) -> None:
        super().__init__()
        self.sequence_logps = sequence_logps  # [2N]: chosen rows, then rejected rows

    def forward(self, input_ids=None, labels=None, fused_lm_head=False, **unused):
        rows = self.sequence_logps.shape[0]
        return SimpleNamespace(
            log_probs=self.sequence_logps[:, None],
            entropy=torch.zeros(rows, 1),
            mean_logits=torch.zeros(rows, 1),
            is_top1=torch.zeros(rows, 1, dtype=torch.bool),
        )


class _SingleProcessAccelerator:
    device = torch.device("cpu")

    def gather(self, tensor):
        return tensor

    gather_for_metrics = gather


def _trl_loss(
    loss_type: str, logps: torch.Tensor, ref_logps: torch.Tensor, beta: float, label_smoothing: float
):
    if not hasattr(trl_dpo.DPOTrainer, "_compute_loss"):
        pytest.skip("this TRL version has no DPOTrainer._compute_loss")
    trainer = trl_dpo.DPOTrainer.__new__(trl_dpo.DPOTrainer)
    attributes = dict(
        model=_LogProbPolicy(logps),
        accelerator=_SingleProcessAccelerator(),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    for name, value in attributes.items():
        setattr(trainer, name, value)
    rows, pairs = logps.shape[0], logps.shape[0] // 2
    # Two tokens per row: the first is the prompt's last token, TRL scores the shifted completion token.
    inputs = {
        "input_ids": torch.zeros(rows, 2, dtype=torch.long),
        "attention_mask": torch.ones(rows, 2, dtype=torch.long),
        "completion_mask": torch.ones(rows, 2, dtype=torch.long),
        "ref_chosen_logps": ref_logps[:pairs],
        "ref_rejected_logps": ref_logps[pairs:],
    }
    return trainer._compute_loss(trainer.model, inputs, return_outputs=False)


def _random_logps(seed: int, pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logps = (torch.randn(2 * pairs, generator=generator, dtype=torch.float64) * 5 - 20).requires_grad_()
    ref_logps = torch.randn(2 * pairs, generator=generator, dtype=torch.float64) * 5 - 20
    return logps, ref_logps


@pytest.mark.parametrize(("beta", "label_smoothing"), [(0.1, 0.0), (0.01, 0.0), (0.5, 0.2)])
def test_paired_matches_trl_aot(beta, label_smoothing):
    logps, ref_logps = _random_logps(0, 8)
    trl_loss = _trl_loss("aot", logps, ref_logps, beta, label_smoothing)
    (trl_grad,) = torch.autograd.grad(trl_loss, logps)

    chosen, rejected = logps[:8], logps[8:]
    ours = aot_paired_loss(
        chosen - rejected, ref_logps[:8] - ref_logps[8:], beta=beta, label_smoothing=label_smoothing
    )
    torch.testing.assert_close(ours, trl_loss)
    torch.testing.assert_close(torch.autograd.grad(ours, logps)[0], trl_grad)

    stats = PairedStats(
        policy_chosen_logps=chosen,
        policy_rejected_logps=rejected,
        chosen_lengths=torch.ones(8),
        rejected_lengths=torch.ones(8),
        ref_chosen_logps=ref_logps[:8],
        ref_rejected_logps=ref_logps[8:],
    )
    objective = get_loss("aot_paired")(stats, beta=beta, label_smoothing=label_smoothing)
    torch.testing.assert_close(objective.loss, trl_loss)


@pytest.mark.parametrize(("beta", "label_smoothing"), [(0.1, 0.0), (0.01, 0.0), (0.5, 0.2)])
def test_unpaired_matches_trl_aot_unpaired(beta, label_smoothing):
    logps, ref_logps = _random_logps(1, 8)
    trl_loss = _trl_loss("aot_unpaired", logps, ref_logps, beta, label_smoothing)
    (trl_grad,) = torch.autograd.grad(trl_loss, logps)

    log_ratios = logps - ref_logps
    ours = aot_unpaired_loss(log_ratios[:8], log_ratios[8:], beta=beta, label_smoothing=label_smoothing)
    torch.testing.assert_close(ours, trl_loss)
    torch.testing.assert_close(torch.autograd.grad(ours, logps)[0], trl_grad)

    # The same rows as unpaired data: chosen rows labelled 1, rejected rows 0, in an interleaved order.
    order = torch.randperm(16, generator=torch.Generator().manual_seed(2))
    stats = UnpairedStats(
        policy_logps=logps[order],
        ref_logps=ref_logps[order],
        lengths=torch.ones(16),
        labels=(order < 8).double(),
    )
    objective = get_loss("aot_unpaired")(stats, beta=beta, label_smoothing=label_smoothing)
    torch.testing.assert_close(objective.loss, trl_loss)
