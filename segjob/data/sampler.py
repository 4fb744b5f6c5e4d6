"""Batch samplers that make resume exact.

An epoch's training order is one global permutation drawn from (seed, epoch). Step k of
the epoch consumes the global slice [k*G, (k+1)*G) with G = batch_size * world_size, and
rank r takes its own batch_size-long piece of that slice. The position saved in a
checkpoint is therefore a number of samples into the global order, not a per-rank
cursor: a run resumed with a different number of workers continues the same epoch
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
    """This rank's batches for the rest of one epoch, starting `start_position` samples in.

    `max_steps` and `steps_multiple_of` count micro-batches. The last global batch is dropped when incomplete, so every rank runs the same number
    of steps (DDP needs that).
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        epoch: int,
        start_position: int = 0,
        max_steps: int | None = None,
        steps_multiple_of: int = 1,
    ):
        self.global_batch = batch_size * world_size
        if num_samples < self.global_batch:
            raise ValueError(
                f"the training set has {num_samples} samples, fewer than one global batch "
                f"({batch_size} per worker x {world_size} workers); lower train.batch_size or scaling.num_workers"
            )
        self.num_samples, self.batch_size = num_samples, batch_size
        self.rank, self.seed, self.epoch = rank, seed, epoch
        self.start_position = start_position
        self.steps_per_epoch = num_samples // self.global_batch
        if max_steps is not None:
            self.steps_per_epoch = min(self.steps_per_epoch, max_steps)
        # gradient accumulation: an epoch ends on an optimizer step
        self.steps_per_epoch -= self.steps_per_epoch % steps_multiple_of
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"an epoch would have no optimizer step: {num_samples} samples, global batch {self.global_batch}, "
                f"{steps_multiple_of} micro-batches per step; lower train.batch_size or train.grad_accum_steps"
            )

    @property
    def epoch_samples(self) -> int:
        """Samples one full epoch consumes across all ranks."""
        return self.steps_per_epoch * self.global_batch

    def __len__(self) -> int:
        return max(0, self.epoch_samples - self.start_position) // self.global_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = epoch_order(self.num_samples, self.seed, self.epoch).tolist()
        for begin in range(self.start_position, self.epoch_samples - self.global_batch + 1, self.global_batch):
            mine = begin + self.rank * self.batch_size
            yield [(self.epoch, index) for index in order[mine : mine + self.batch_size]]


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
