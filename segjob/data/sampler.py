"""Batch samplers that make resume exact, at any world size.

An epoch's training order is one global permutation drawn from (seed, epoch). Optimizer
step k of the epoch consumes the global slice [k*G, (k+1)*G), where G (the global batch,
batch_size x grad_accum_steps x num_workers) is fixed for the run whatever the number of
workers W that is running now. W ranks take the slice in micro-batches of at most
batch_size: ceil(G / (W x batch_size)) micro-batches each, the slice split as evenly as
possible. At full size every micro-batch holds batch_size samples; on fewer workers
ranks take more (or uneven) micro-batches, and the engine weighs each micro-batch's loss
by its sample count, so a step's gradient is the mean over the same G samples.

The position saved in a checkpoint is a number of samples into the global order, always
a multiple of G, so a run resumed on another number of workers continues the same epoch
without repeating or skipping samples.

Samplers yield (epoch, index) keys so the dataset can seed per-sample augmentation from
them, whichever process loads the sample.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


def epoch_order(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_samples, generator=generator)


class TrainBatchSampler:
    """This rank's micro-batches for the rest of one epoch, starting `start_position` samples in.

    `max_steps` counts optimizer steps. The last global batch is dropped when incomplete, so
    every rank runs the same number of micro-batches (DDP needs that). `sizes` holds the
    number of real samples in each of this rank's micro-batches of a step (the same every
    step); a 0 there is a one-sample stand-in, which the engine weighs by zero (only when
    batch_size is smaller than the world size and the slice runs out).
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        epoch: int,
        global_batch: int,
        start_position: int = 0,
        max_steps: int | None = None,
    ):
        if global_batch < 1 or batch_size < 1:
            raise ValueError(f"global batch {global_batch} and batch size {batch_size} must be positive")
        self.global_batch = global_batch
        if num_samples < global_batch:
            raise ValueError(
                f"the training set has {num_samples} samples, fewer than one global batch ({global_batch}: "
                "batch_size x grad_accum_steps x num_workers); lower train.batch_size, train.grad_accum_steps "
                "or scaling.num_workers"
            )
        self.num_samples, self.batch_size = num_samples, batch_size
        self.rank, self.world_size, self.seed, self.epoch = rank, world_size, seed, epoch
        self.start_position = start_position
        self.steps_per_epoch = num_samples // global_batch
        if max_steps is not None:
            self.steps_per_epoch = min(self.steps_per_epoch, max_steps)
        self.micro_per_step = -(-global_batch // (world_size * batch_size))
        self.slots = [micro_slots(global_batch, batch_size, world_size, micro) for micro in range(self.micro_per_step)]
        self.sizes = [slots[rank][1] for slots in self.slots]

    @property
    def epoch_samples(self) -> int:
        """Samples one full epoch consumes across all ranks."""
        return self.steps_per_epoch * self.global_batch

    def micro_offset(self, micro: int) -> int:
        """Where micro-batch `micro` of a step starts in the step's slice (the same for every rank)."""
        return micro * self.world_size * self.batch_size

    def __len__(self) -> int:
        return max(0, self.epoch_samples - self.start_position) // self.global_batch * self.micro_per_step

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = epoch_order(self.num_samples, self.seed, self.epoch).tolist()
        for begin in range(self.start_position, self.epoch_samples - self.global_batch + 1, self.global_batch):
            for slots in self.slots:
                start, size = slots[self.rank]
                picked = order[begin + start : begin + start + size] or [order[begin]]  # a zero-weight stand-in
                yield [(self.epoch, index) for index in picked]


def micro_slots(global_batch: int, batch_size: int, world_size: int, micro: int) -> list[tuple[int, int]]:
    """(start in the step's slice, sample count) of every rank's piece of one micro-batch."""
    chunk_start = micro * world_size * batch_size
    chunk = max(0, min(world_size * batch_size, global_batch - chunk_start))
    share, extra = divmod(chunk, world_size)
    return [(chunk_start + rank * share + min(rank, extra), share + (rank < extra)) for rank in range(world_size)]


class EvalBatchSampler:
    """Every evaluation sample exactly once across ranks (rank r takes r, r+W, ...), no padding.

    Ranks may get different batch counts; evaluation uses no collective per batch, only
    one all-reduce at the end, so that is safe. The summed count is checked against the
    dataset length.
    """

    def __init__(self, num_samples: int, batch_size: int, rank: int, world_size: int):
        self.indices = list(range(rank, num_samples, world_size))
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for begin in range(0, len(self.indices), self.batch_size):
            yield [(0, index) for index in self.indices[begin : begin + self.batch_size]]
