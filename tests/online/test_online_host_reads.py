"""The online update's micro-batch loop reads nothing from the device (tests/conftest.py's
``device_reads``); the step reads its summed surrogate loss once, before the optimizer step, so that a
non-finite loss is never applied."""

from __future__ import annotations

import distalign.train.online.loop as online_module
from distalign.train.online import train_online


def test_the_update_micro_batch_loop_reads_nothing(tmp_path, online_config, monkeypatch, device_reads):
    config = online_config(tmp_path, train={"micro_batch_size": 8, "max_grad_norm": 1.0})  # 4 per step
    update = online_module.policy_gradient_backward
    per_update: list[dict[str, int]] = []

    def counted_update(*args, **kwargs):
        device_reads.where.clear()
        device_reads.counting = True
        try:
            return update(*args, **kwargs)
        finally:
            device_reads.counting = False
            per_update.append(dict(device_reads.where))

    monkeypatch.setattr(online_module, "policy_gradient_backward", counted_update)
    train_online(config)
    assert len(per_update) == 4
    for reads in per_update:
        ours = {w: n for w, n in reads.items() if w.startswith("train/")}
        assert ours == {}, reads
        forward = {w: n for w, n in reads.items() if w.startswith("models/") and "(_check_masks)" not in w}
        assert forward == {}, reads
