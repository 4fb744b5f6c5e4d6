"""A hand-written PyTorch DDP training loop on segjob's own dataset, model, loss and optimizer.

    .venv/bin/python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        bench/ddp_reference_loop.py jobs/quickstart.yaml --set train.epochs=3 [--out figures.json]

The baseline that bench/ddp_overhead.py sets segjob's Ray Train run against: what a user
would write by hand under torchrun. It takes from segjob only the objects a job builds
(`build_datasets`, `create_model`, `build_loss`, `build_optimizer`, loaded from the same job
file as `python -m segjob.train`), and none of its loop: gloo, one torch thread per process
(as the engine sets from scaling.cpus_per_worker), a DistributedSampler split of the same
size (drop_last, batch_size per rank), the same DataLoader settings, DDP with its defaults,
and per step only forward, loss, backward (DDP's gradient all-reduce), optimizer step,
zero_grad and the job's per-step lr schedule. No evaluation, no checkpoints, no other
collective. Each epoch's training loop is timed on rank 0 the way the engine times it
(`train/images_per_s` = global images / seconds of the loop), and rank 0 writes the
figures (wall-clock times included) as JSON to --out.

--with-agree is a diagnostic, not the baseline: each step then also does the per-step collective
of segjob's engine up to commit 45e723d (`engine.agree()`: a synchronous MAX all-reduce of a few
flags, then `.tolist()`; here two int32, there five float64, the same one round trip on gloo),
so the two loops differ by exactly that.
"""

from __future__ import annotations

import time

PROCESS_STARTED = time.time()  # before the heavy imports: they are part of start-up

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler  # noqa: E402

from segjob.data import build_datasets  # noqa: E402
from segjob.job.load import load_job, resolve_local_paths  # noqa: E402
from segjob.learning.losses import build_loss, output_channels  # noqa: E402
from segjob.learning.optim import build_optimizer  # noqa: E402
from segjob.models import create_model  # noqa: E402

IMPORTS_DONE = time.time()


class KeyedDistributedSampler(DistributedSampler):
    """torch's DistributedSampler, yielding the (epoch, index) keys segjob's datasets take, so a
    sample gets the same per-(epoch, index) augmentation draw (and cost) as under the engine."""

    def __iter__(self):
        return ((self.epoch, index) for index in super().__iter__())


def lr_scheduler(job, optimizer: torch.optim.Optimizer, total_steps: int):
    """The job's per-step schedule written with torch's own schedulers (None: nothing per step)."""
    schedule = job.optim.schedule
    if getattr(schedule, "warmup_steps", 0):
        raise SystemExit("ddp_reference_loop: optim.schedule.warmup_steps is not mirrored here")
    if schedule.name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps, eta_min=schedule.min_lr)
    if schedule.name == "poly":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: (1 - min(step, total_steps) / total_steps) ** schedule.power)
    return None  # constant, or a schedule that moves per epoch / evaluation: no per-step work


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("job", nargs="?", default="jobs/quickstart.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", help="rank 0 writes its figures here as JSON")
    parser.add_argument("--with-agree", action="store_true",
                        help="diagnostic: add the engine's per-step flag all-reduce (engine.agree) to every step")
    args = parser.parse_args()

    dist.init_process_group("gloo")  # env:// from torchrun
    rank, world_size = dist.get_rank(), dist.get_world_size()
    process_group_ready = time.time()

    job = resolve_local_paths(load_job(args.job, args.overrides))
    if world_size != job.scaling.num_workers:
        print(f"[rank {rank}] note: {world_size} processes, "
              f"the job asks for scaling.num_workers={job.scaling.num_workers}")
    threads = job.scaling.torch_threads or max(1, int(job.scaling.cpus_per_worker))
    torch.set_num_threads(threads)
    random.seed(job.seed)
    np.random.seed(job.seed % 2**32)
    torch.manual_seed(job.seed)

    train_set, _ = build_datasets(job.data, job.seed)  # the validation set is built too (unused: no evaluation)
    num_classes = len(train_set.class_names)
    model = create_model(job.model, train_set.in_channels, output_channels(job.loss, num_classes))
    loss_fn = build_loss(job.loss, num_classes, train_set)
    optimizer = build_optimizer(job.optim, model.parameters())
    ddp_model = DistributedDataParallel(model)

    batch_size, epochs = job.train.batch_size, job.train.epochs
    sampler = KeyedDistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=job.seed,
                                      drop_last=True)
    workers = job.data.loader_workers
    loader = DataLoader(train_set, batch_size=batch_size, sampler=sampler, drop_last=True, num_workers=workers,
                        pin_memory=False, persistent_workers=False,
                        multiprocessing_context="forkserver" if workers else None)
    steps_per_epoch = len(loader)
    scheduler = lr_scheduler(job, optimizer, steps_per_epoch * epochs)
    ready = time.time()

    figures = {
        "world_size": world_size, "torch_threads": torch.get_num_threads(), "batch_size_per_rank": batch_size,
        "steps_per_epoch": steps_per_epoch, "loader_workers": workers,
        "schedule": type(scheduler).__name__ if scheduler else None, "with_agree": args.with_agree,
        "t_process_started": PROCESS_STARTED, "t_imports_done": IMPORTS_DONE,
        "t_process_group_ready": process_group_ready, "t_ready": ready, "epochs": [],
    }
    first_step_done = None
    ddp_model.train()
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        steps = 0
        loop_started_wall, started = time.time(), time.perf_counter()
        for images, masks in loader:
            outputs = ddp_model(images)
            loss = loss_fn(outputs["out"] if isinstance(outputs, dict) else outputs, masks)
            loss.backward()  # DDP all-reduces the gradients here
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if scheduler:
                scheduler.step()
            if args.with_agree:  # as engine.agree() did: no notice, no finished upload, on every rank
                flags = torch.tensor([False, False], dtype=torch.int32)
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
                _preempt, _upload_done = (bool(flag) for flag in flags.tolist())
            steps += 1
            if first_step_done is None:
                first_step_done = time.time()
        seconds = time.perf_counter() - started
        images_per_s = steps * batch_size * world_size / seconds
        figures["epochs"].append({"epoch": epoch + 1, "steps": steps, "seconds": seconds, "images_per_s": images_per_s,
                                  "t_loop_started": loop_started_wall, "t_loop_ended": loop_started_wall + seconds})
        if rank == 0:
            print(f"reference: epoch {epoch + 1}/{epochs}  {steps} steps  loss {loss.detach().item():.4f}  "
                  f"{images_per_s:.1f} img/s  {seconds:.1f} s", flush=True)
    figures["t_first_step_done"] = first_step_done
    if not all(math.isfinite(p.detach().sum().item()) for p in model.parameters()):
        raise SystemExit("ddp_reference_loop: the weights are not finite")
    dist.destroy_process_group()
    if rank == 0 and args.out:
        Path(args.out).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
