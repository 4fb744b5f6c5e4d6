"""What checkpointing costs training, with storage on a local S3 server (moto, 127.0.0.1).

    .venv/bin/python bench/checkpoint.py [--base-channels 64] [--steps 20]

1. Time the training loop is blocked per checkpoint (an in-memory copy handed to the
   background committer) vs a synchronous save + upload of the same checkpoint
   (goal <= 0.10x).
2. Step time while an upload runs vs with no upload (goal <= 1.05x).
3. Preemption latency: notice -> committed checkpoint, i.e. write + upload + commit while
   waiting (goal <= 10 s, inside GCP's 30 s window).
No Ray: this is the engine's own path (segjob.engine.committer), one process; the S3 server runs
in a process of its own, as a remote bucket would.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from servers import create_s3_bucket, start_moto_process, stop_process  # noqa: E402  (the tests' S3 server)

from segjob.data.labels import IGNORE_INDEX  # noqa: E402
from segjob.engine.committer import Committer  # noqa: E402
from segjob.engine.loop import cpu_copy  # noqa: E402
from segjob.engine.session import LocalSession  # noqa: E402
from segjob.job.schema import JobConfig  # noqa: E402
from segjob.models import create_model  # noqa: E402
from segjob.store import checkpoint  # noqa: E402
from segjob.store.storage import open_storage  # noqa: E402


def snapshotter(model, optimizer):
    def snapshot():
        state = {"optimizer": optimizer.state_dict(), "progress": {"epoch": 0, "step": 0, "position": 0}}
        return cpu_copy(model.state_dict()), cpu_copy(state), []
    return snapshot


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-channels", type=int, default=64, help="U-Net width: 64 -> 31 M parameters")
    parser.add_argument("--steps", type=int, default=20, help="training steps timed per condition")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)

    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    url, server = start_moto_process()  # its own process, like a remote bucket: no GIL shared with training
    # a remote bucket costs this machine no CPU; the local stand-in runs at the lowest priority
    os.setpriority(os.PRIO_PROCESS, server.pid, 19)
    create_s3_bucket(url, "segjob-bench")
    storage = open_storage("s3://segjob-bench/runs", endpoint_url=url)
    job = JobConfig.model_validate({"name": "bench", "model": {"name": "unet", "base_channels": args.base_channels},
                                    "storage": {"uri": "s3://segjob-bench/runs", "endpoint_url": url, "keep_best": 1}})
    model = create_model(job.model, 3, 4)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(1, 3, 64, 64)).sum().backward()
    optimizer.step()  # Adam state exists: a checkpoint as large as a real one
    parameters = sum(p.numel() for p in model.parameters())
    snapshot = snapshotter(model, optimizer)
    committer = Committer(job, LocalSession("cpu"), storage, storage.path("bench"))

    blocked, synchronous, preemption, size = [], [], [], 0
    for repeat in range(args.repeats):
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint.write_local(Path(tmp), *snapshot())
            size = sum(f.stat().st_size for f in Path(tmp).iterdir())
            meta = checkpoint.build_meta(Path(tmp), job={"name": "bench"}, step=1000 + repeat, epoch=0, metrics={},
                                         reason="sync")
            checkpoint.commit(storage, storage.path("bench"), Path(tmp), meta)
        synchronous.append(time.perf_counter() - started)

        started = time.perf_counter()
        committer.save({"step": repeat}, step=repeat * 2 + 1, epoch=0, reason="bench", snapshot=snapshot)
        blocked.append(time.perf_counter() - started)
        committer.flush()

        started = time.perf_counter()  # the preemption path: save and wait until committed
        committer.save({"step": repeat}, step=repeat * 2 + 2, epoch=0, reason="preemption", snapshot=snapshot)
        committer.flush()
        preemption.append(time.perf_counter() - started)

    # step time with and without an upload in flight (a small model trains; the big checkpoint uploads)
    small_job = JobConfig.model_validate({"name": "s", "model": {"name": "unet", "base_channels": 16, "depth": 3}})
    small = create_model(small_job.model, 3, 4)
    small_optimizer = torch.optim.Adam(small.parameters())
    images, masks = torch.randn(16, 3, 64, 64), torch.randint(0, 4, (16, 64, 64))

    def step_times(n: int) -> list[float]:
        times = []
        for _ in range(n):
            started = time.perf_counter()
            loss = F.cross_entropy(small(images), masks, ignore_index=IGNORE_INDEX)
            small_optimizer.zero_grad()
            loss.backward()
            small_optimizer.step()
            times.append(time.perf_counter() - started)
        return times

    step_times(3)
    quiet, busy = [], []
    for repeat in range(args.repeats):
        quiet += step_times(args.steps)
        committer.save({"step": 0}, step=5000 + repeat, epoch=0, reason="bench", snapshot=snapshot)
        busy += step_times(args.steps)  # while the upload runs (it takes longer than these steps)
        committer.flush()
    committer.close()
    stop_process(server)

    median = statistics.median
    print(f"model: U-Net base {args.base_channels}, {parameters / 1e6:.1f} M parameters; "
          f"checkpoint {size / 2**20:.0f} MiB")
    print(f"synchronous save+upload: median {median(synchronous):.2f} s  {[f'{t:.2f}' for t in synchronous]}")
    print(f"blocked per checkpoint (in-memory copy + hand-off): median {median(blocked):.2f} s  "
          f"{[f'{t:.2f}' for t in blocked]}")
    print(f"  ratio blocked / synchronous = {median(blocked) / median(synchronous):.3f}  (goal <= 0.10)")
    print(f"preemption notice -> committed: median {median(preemption):.2f} s, max {max(preemption):.2f} s  "
          "(goal <= 10 s)")
    print(f"step time: quiet median {1000 * median(quiet):.1f} ms, during upload {1000 * median(busy):.1f} ms")
    print(f"  ratio during upload / quiet = {median(busy) / median(quiet):.3f}  (goal <= 1.05)")


if __name__ == "__main__":
    main()
