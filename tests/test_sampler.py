"""The samplers that make resume exact: global order, any world size, no repeats, no gaps."""

import pytest

from segjob.data.sampler import EvalBatchSampler, TrainBatchSampler, epoch_order


def consumed(num_samples, batch_size, world_size, epoch=0, start=0, seed=7, **kwargs):
    """The samples each step consumes, in global order, across all ranks."""
    samplers = [
        TrainBatchSampler(num_samples, batch_size, rank, world_size, seed, epoch, start_position=start, **kwargs)
        for rank in range(world_size)
    ]
    steps = []
    for batches in zip(*samplers):
        steps.append([index for batch in batches for _, index in batch])
    assert all(len(s) == len(samplers[0]) for s in samplers), "every rank runs the same number of steps"
    return steps


def test_one_epoch_covers_the_global_order_once():
    steps = consumed(50, batch_size=4, world_size=2)
    flat = [i for step in steps for i in step]
    assert len(steps) == 50 // 8
    assert flat == epoch_order(50, 7, 0).tolist()[: len(flat)]
    assert len(set(flat)) == len(flat)


def test_resume_on_a_different_world_size_continues_the_same_order():
    uninterrupted = [i for step in consumed(96, batch_size=4, world_size=2) for i in step]
    before = [i for step in consumed(96, 4, 2)[:3] for i in step]  # 3 steps of 8 = position 24
    after = [i for step in consumed(96, 4, 3, start=24) for i in step]  # resumed on 3 workers
    assert before + after == uninterrupted[: len(before) + len(after)]
    assert len(set(before + after)) == len(before + after)


def test_keys_carry_the_epoch_and_orders_differ_per_epoch():
    sampler = TrainBatchSampler(20, 2, 0, 1, seed=1, epoch=3)
    assert all(epoch == 3 for batch in sampler for epoch, _ in batch)
    assert epoch_order(20, 1, 0).tolist() != epoch_order(20, 1, 1).tolist()


def test_max_steps_and_accumulation_multiple():
    assert len(TrainBatchSampler(100, 2, 0, 1, 0, 0, max_steps=5)) == 5
    assert TrainBatchSampler(100, 8, 0, 1, 0, 0, steps_multiple_of=5).steps_per_epoch == 10  # 12 -> 10


def test_too_small_a_dataset_is_a_clear_error():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        TrainBatchSampler(5, 4, 0, 2, 0, 0)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_evaluation_sees_every_sample_exactly_once(world_size):
    seen = [index for rank in range(world_size) for batch in EvalBatchSampler(10, 3, rank, world_size) for _, index in batch]
    assert sorted(seen) == list(range(10))
