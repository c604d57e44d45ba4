"""Global-batch plans are deterministic, cover the data, and keep unpaired batches two-sided."""

import pytest

from distalign.train.batching import BatchPlan, split_for_process


def test_each_epoch_is_a_permutation_and_plan_is_deterministic():
    plan = BatchPlan(num_rows=10, batch_size=5, seed=3)
    first_epoch = plan.global_batch(1) + plan.global_batch(2)
    assert sorted(first_epoch) == list(range(10))
    again = BatchPlan(num_rows=10, batch_size=5, seed=3)
    assert [again.global_batch(s) for s in range(1, 7)] == [plan.global_batch(s) for s in range(1, 7)]
    assert BatchPlan(10, 5, seed=4).global_batch(1) != plan.global_batch(1)


def test_batches_straddle_epochs_without_losing_rows():
    plan = BatchPlan(num_rows=7, batch_size=3, seed=0)
    stream = [row for step in range(1, 8) for row in plan.global_batch(step)]  # 21 rows = 3 epochs
    for epoch in range(3):
        assert sorted(stream[epoch * 7 : (epoch + 1) * 7]) == list(range(7))


def test_unpaired_batches_always_hold_both_sides():
    labels = [1.0] * 9 + [0.0] * 2  # very unbalanced
    plan = BatchPlan(num_rows=11, batch_size=4, seed=1, labels=labels)
    for step in range(1, 30):
        rows = plan.global_batch(step)
        sides = {labels[r] for r in rows}
        assert sides == {0.0, 1.0}
        assert len(rows) == 4


def test_unpaired_plan_rejects_one_sided_data():
    with pytest.raises(ValueError, match="both positive and negative"):
        BatchPlan(num_rows=3, batch_size=2, seed=0, labels=[1.0, 1.0, 1.0])


def test_split_for_process_covers_the_global_batch_in_order():
    rows = list(range(8))
    parts = [split_for_process(rows, rank, 2, 2) for rank in range(2)]
    assert parts == [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]
    with pytest.raises(ValueError, match="divisible"):
        split_for_process(rows, 0, 3, 1)
