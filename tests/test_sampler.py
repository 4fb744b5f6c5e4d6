"""The samplers that make resume exact: global order, any world size, no repeats, no gaps."""

import pytest

from segjob.data.sampler import EvalBatchSampler, TrainBatchSampler, epoch_order


def samplers(num_samples, batch_size, world_size, global_batch, epoch=0, start=0, seed=7, **kwargs):
    return [
        TrainBatchSampler(num_samples, batch_size, rank, world_size, seed, epoch, global_batch,
                          start_position=start, **kwargs)
        for rank in range(world_size)
    ]


def consumed(num_samples, batch_size, world_size, global_batch=None, **kwargs):
    """The real samples each optimizer step consumes, in global order, across all ranks."""
    ranks = samplers(num_samples, batch_size, world_size, global_batch or batch_size * world_size, **kwargs)
    assert len({len(sampler) for sampler in ranks}) == 1, "every rank runs the same number of micro-batches"
    micro = ranks[0].micro_per_step
    steps, step = [], []
    for position, batches in enumerate(zip(*ranks)):
        for sampler, batch in zip(ranks, batches):
            size = sampler.sizes[position % micro]
            assert len(batch) == max(size, 1) and size <= batch_size
            step.append((position % micro, sampler.rank, [index for _, index in batch[:size]]))
        if position % micro == micro - 1:
            # the global order of a step: micro-batch by micro-batch, rank by rank
            steps.append([index for _, _, indices in sorted(step, key=lambda s: (s[0], s[1])) for index in indices])
            step = []
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
    after = [i for step in consumed(96, 4, 3, global_batch=8, start=24) for i in step]  # resumed on 3 workers
    assert before + after == uninterrupted[: len(before) + len(after)]
    assert len(set(before + after)) == len(before + after)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5])
def test_every_world_size_takes_the_same_slice_per_step(world_size):
    """G = 4 x 2 accumulation x 4 workers = 32, whatever the number of workers left."""
    full = consumed(200, batch_size=4, world_size=4, global_batch=32)
    now = consumed(200, batch_size=4, world_size=world_size, global_batch=32)
    assert now == full
    assert all(len(step) == 32 for step in now)


def test_fewer_workers_take_more_micro_batches_of_at_most_batch_size():
    sampler = samplers(200, 4, 3, global_batch=32)[0]
    assert sampler.micro_per_step == 3  # ceil(32 / (3 x 4))
    assert [samplers(200, 4, 3, global_batch=32)[rank].sizes for rank in range(3)] == [[4, 4, 3], [4, 4, 3], [4, 4, 2]]
    assert samplers(200, 4, 4, global_batch=32)[0].sizes == [4, 4]  # full size: accumulation as configured


def test_a_rank_without_samples_gets_a_zero_weight_stand_in():
    ranks = samplers(40, 1, 3, global_batch=4)  # 4 samples over 3 ranks, one per micro-batch
    assert [sampler.sizes for sampler in ranks] == [[1, 1], [1, 0], [1, 0]]
    assert all(len(batch) == 1 for batch in ranks[2])


def test_keys_carry_the_epoch_and_orders_differ_per_epoch():
    sampler = TrainBatchSampler(20, 2, 0, 1, seed=1, epoch=3, global_batch=2)
    assert all(epoch == 3 for batch in sampler for epoch, _ in batch)
    assert epoch_order(20, 1, 0).tolist() != epoch_order(20, 1, 1).tolist()


def test_max_steps_counts_optimizer_steps():
    assert TrainBatchSampler(100, 2, 0, 1, 0, 0, global_batch=2, max_steps=5).steps_per_epoch == 5
    sampler = TrainBatchSampler(100, 8, 0, 1, 0, 0, global_batch=40)  # 5 micro-batches per step
    assert (sampler.steps_per_epoch, len(sampler)) == (2, 10)


def test_too_small_a_dataset_is_a_clear_error():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        TrainBatchSampler(5, 4, 0, 2, 0, 0, global_batch=8)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_evaluation_sees_every_sample_exactly_once(world_size):
    seen = [index for rank in range(world_size) for batch in EvalBatchSampler(10, 3, rank, world_size)
            for _, index in batch]
    assert sorted(seen) == list(range(10))
