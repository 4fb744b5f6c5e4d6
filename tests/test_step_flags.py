"""The per-step agreement between ranks (two real gloo processes, no Ray): every rank reads the same
flags, one step after they were sent, from an all-reduce that never makes a step wait."""

import os

import torch.distributed as dist
import torch.multiprocessing as mp
from servers import free_port

from segjob.engine.step_flags import StepFlags

STEPS = 6


def _rank(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        flags = StepFlags(world_size=2)
        seen = []
        for step in range(STEPS):
            notice = rank == 1 and step >= 2  # rank 1's watcher sees an AWS notice from step 2 on
            deadline = 1000.0 + rank if step >= 2 else None
            got = flags.exchange(notice, upload_done=rank == 0 and step == 3, due=False, deadline=deadline,
                                 source="aws" if notice else None)
            seen.append(None if got is None else (got.notice, got.upload_done, got.deadline, got.source))
        last = flags.finish()
        seen.append((last.notice, last.upload_done, last.deadline, last.source))
        results[rank] = seen
    finally:
        dist.destroy_process_group()


def test_every_rank_reads_the_same_flags_one_step_late():
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank, args=(free_port(), results), nprocs=2, join=True)
        rank0, rank1 = results[0], results[1]
    assert rank0 == rank1, "the same decisions on every rank"
    assert rank0[0] is None  # nothing agreed before the first exchange finished
    assert rank0[1:] == [
        (False, False, None, None),  # step 0's flags
        (False, False, None, None),
        (True, False, 1000.0, "aws"),  # step 2: rank 1's notice, the earliest deadline, its source
        (True, True, 1000.0, "aws"),  # step 3: rank 0's upload finished
        (True, False, 1000.0, "aws"),
        (True, False, 1000.0, "aws"),  # the last exchange, read at the epoch's end
    ]


def test_one_process_agrees_at_once():
    flags = StepFlags(world_size=1)
    agreed = flags.exchange(True, False, True, 5.0, "sigterm")
    assert (agreed.notice, agreed.deadline_due, agreed.deadline, agreed.source) == (True, True, 5.0, "sigterm")
    assert flags.exchange(False, False, False, None, None).deadline is None
    assert flags.finish() is None
