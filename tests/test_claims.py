"""The controlled-claims scripts (benchmarks/claims/): their exact evaluation, checked by hand on cases
whose answer is known, and one short training run through the library's objective per kind of data."""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

import pytest
import torch

CLAIMS = Path(__file__).resolve().parents[1] / "benchmarks" / "claims"


def load(name: str):
    """A claims script as a module (the scripts import their shared ``common`` by path, as run)."""
    if str(CLAIMS) not in sys.path:
        sys.path.insert(0, str(CLAIMS))
    return importlib.import_module(name)


common = load("common")


def test_the_reference_against_itself_is_neutral():
    world = common.World.draw(0, contexts=3, responses=4)
    metrics = common.evaluate(world, world.ref_logp)
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-12)
    assert metrics["win_rate"] == pytest.approx(0.5, abs=1e-12)  # sigma(d) + sigma(-d) = 1, pairs symmetric
    assert metrics["true_reward_gain"] == pytest.approx(0.0, abs=1e-12)
    assert metrics["violation_rate"] == pytest.approx(0.0, abs=1e-12)


def test_the_best_response_policy_by_hand():
    """One prompt, rewards (0, 1), pi_ref uniform, pi = the better response: KL = log 2, win rate =
    (1/2) sigma(0) + (1/2) sigma(1), reward gain 1/2, and pi's reward distribution (all mass on 1)
    dominates pi_ref's (half on 0): no violation. Flipping them is a violation at every level below 1/2."""
    world = common.World(
        1, 2, torch.tensor([[0.0, 1.0]], dtype=torch.float64), torch.zeros(1, 2, dtype=torch.float64)
    )
    best = torch.log(torch.tensor([[1e-300, 1.0]], dtype=torch.float64))
    metrics = common.evaluate(world, best)
    assert metrics["kl"] == pytest.approx(math.log(2))
    assert metrics["win_rate"] == pytest.approx(0.5 * 0.5 + 0.5 * (1 / (1 + math.exp(-1))))
    assert metrics["true_reward_gain"] == pytest.approx(0.5)
    assert metrics["violation_rate"] == pytest.approx(0.0, abs=1e-12)
    worst = torch.log(torch.tensor([[1.0, 1e-300]], dtype=torch.float64))
    assert common.evaluate(world, worst)["violation_rate"] == pytest.approx(0.5)
    assert common.evaluate(world, worst)["w1_violation"] == pytest.approx(0.5)


def test_pairs_flip_exactly_the_asked_share_and_intervals_are_student_t():
    world = common.World.draw(1)
    pairs = common.draw_pairs(world, 200, torch.Generator().manual_seed(0), flip=0.2)
    assert int(pairs.flipped.sum()) == round(0.2 * len(pairs)) and bool(
        (pairs.chosen != pairs.rejected).all()
    )
    interval = common.mean_interval([1.0, 2.0, 3.0])
    assert interval.mean == 2.0 and interval.high - interval.mean == pytest.approx(4.303 * 1.0 / math.sqrt(3))
    clear = common.mean_interval([0.2, 0.3, 0.25, 0.22, 0.28])
    assert common.verdict(clear, +1) == "reproduced" and common.verdict(clear, -1) == "reversed"
    assert common.verdict(common.mean_interval([-0.1, 0.2, 0.3]), +1).startswith("inconclusive")


def test_dpo_on_clean_pairs_gains_true_reward():
    aot = load("aot")
    result = aot.run_paired(0, "dpo", 0.1, 0.0)
    assert result["true_reward_gain"] > 0.3 and result["pair_accuracy"] > 0.7


def test_the_upo_front_helpers():
    upo = load("upo")
    assert upo.hypervolume([(1.0, 0.6), (0.5, 0.7)]) == pytest.approx(0.5 * 0.2 + 0.5 * 0.1)
    assert upo.hypervolume([(-0.1, 0.9), (0.2, 0.4)]) == 0.0
    assert upo.win_at_gain([(0.0, 0.7), (1.0, 0.5)], 0.5) == pytest.approx(0.6)
    assert upo.win_at_gain([(0.0, 0.7)], 0.5) is None


def test_the_exact_density_ratio_of_the_shifted_world_averages_one_over_the_mixture():
    """E_P[h] = 1 for h = dQ_0/dP: checked over many pairs drawn from the training mixture."""
    dora = load("dora")
    shifted = dora.ShiftedWorld(0)
    pairs = shifted.draw(20000, torch.Generator().manual_seed(1), flip=0.0)
    h = shifted.exact_ratio(pairs)
    assert float(h.mean()) == pytest.approx(1.0, abs=0.05)
    assert float(h[pairs.source == 0].mean()) > 1.0 > float(h[pairs.source != 0].mean())


def test_the_upo_gradient_shares_equal_the_terms_switched_on_one_at_a_time():
    """The claims script splits UPO's gradient as train.grad_shares does; checked against the plain way:
    the loss is linear in (lambda_aux, value_weight), so a term's gradient is the loss's with the others
    switched off. A 2-step run with shares traced is the script's smoke."""
    upo = load("upo")
    world = common.World.draw(0)
    aux = upo.designer_reward(world, 0)
    pairs = common.draw_pairs(world, 64, torch.Generator().manual_seed(1))
    signals = {
        upo.CHOSEN_DESIGNER: aux[pairs.context, pairs.chosen],
        upo.REJECTED_DESIGNER: aux[pairs.context, pairs.rejected],
    }
    build = common.paired_stats(world, pairs, signals=signals)
    logits = world.ref_logits + 0.3 * torch.randn(world.ref_logits.shape, dtype=common.DTYPE)
    value = 0.2 * torch.randn(world.contexts, dtype=common.DTYPE)
    method = common.Method("upo", {"beta": 0.1, "lambda_aux": 0.25, "normalize_weights": True})

    def gradient(**switches) -> torch.Tensor:
        leaves = [logits.clone().requires_grad_(True), value.clone().requires_grad_(True)]
        objective = common.Method("upo", {**method.loss_options, **switches}).objective()
        loss = objective(build(torch.log_softmax(leaves[0], -1), leaves[1])).loss
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, leaves)])

    preference = gradient(lambda_aux=0.0, value_weight=0.0)
    parts = [preference, gradient(value_weight=0.0) - preference, gradient(lambda_aux=0.0) - preference]
    norms = [float(g.norm()) for g in parts]
    shares = upo.gradient_shares(method, build, logits, value)
    assert list(shares) == upo.SHARES
    assert list(shares.values()) == pytest.approx([n / sum(norms) for n in norms], rel=1e-9)
    traced = upo.run(0, method, shares=True, steps=2)
    assert sum(traced["grad_share"].values()) == pytest.approx(1.0)


def test_the_shift_classifier_table_reads_every_fit(tmp_path, monkeypatch):
    """benchmarks/claims/shift_classifiers.py on a small mixture whose ``loud`` source writes in capitals
    of another vocabulary (easy to tell from golden) and whose ``twin`` source is golden itself (not
    separable): one row per classifier, scheme and source; the easy source is told apart far better;
    a second call reads the cached fits back."""
    import json

    script = load("shift_classifiers")
    rng = __import__("random").Random(0)
    calm, loud = ["quiet", "pleasant", "fine", "gentle", "cozy"], ["explosive", "blazing", "thunder", "roar"]
    rows = []
    for source in ("golden", "twin", "loud") * 40:
        words = loud if source == "loud" else calm
        chosen = " ".join(rng.choice(words) for _ in range(8))
        rows.append({"prompt": "Say something.", "chosen": chosen, "rejected": "no", "source": source})
    data = tmp_path / "mixture.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "fits"
    monkeypatch.setattr(sys, "argv", ["x", str(data), "--out", str(out), "--classifiers", "logistic"])
    assert script.main() == 0
    lines = (out / "table.md").read_text().splitlines()[2:]
    cells = {(line.split("|")[2].strip(), line.split("|")[3].strip()): line.split("|") for line in lines}
    assert sorted(cells) == sorted((s, src) for s in script.SCHEMES for src in ("loud", "twin"))
    for scheme in script.SCHEMES:
        assert float(cells[(scheme, "loud")][4]) > 0.9 > float(cells[(scheme, "twin")][4])
    assert script.main() == 0  # from the saved summaries
    assert (out / "table.md").read_text().splitlines()[2:] == lines
