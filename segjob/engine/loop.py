"""One worker's training loop: set up, resume, train, evaluate, checkpoint, report.

    loop.run(job, LocalSession())          # one plain process
    loop.run(job, RaySession(job))         # a Ray Train worker (segjob.cluster.worker)

The engine never imports Ray. Every rank runs this same function; rank 0 writes and
commits checkpoints to storage, and every rank calls `session.report` (and Ray's
`get_preemption_info`, through the session) the same number of times, from this thread.
Resume takes the newest committed checkpoint in storage, restores everything it holds
(weights, optimizer, schedule, scaler, RNG, epoch, step and the position in the epoch's
global sample order) and carries on mid-epoch if that is where it stopped, on any number
of workers: every optimizer step takes the same global batch. A preemption notice makes
it checkpoint at once and again before the deadline (segjob.engine.preemption.plan), never stop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from segjob.data import build_datasets
from segjob.data.base import mix_seed
from segjob.data.mixing import BatchMixer, build_mixer
from segjob.data.sampler import EvalBatchSampler, TrainBatchSampler
from segjob.data.scoring import ScoringView, collate_scoring
from segjob.data.transforms import padding_fill
from segjob.engine.committer import Committer
from segjob.engine.evaluation import Scorer, summary
from segjob.engine.inference import protocol_of
from segjob.engine.preemption import sigterm, watcher
from segjob.engine.preemption.plan import PreemptionPlan
from segjob.engine.previews import Previews
from segjob.engine.session import Session
from segjob.engine.step_flags import StepFlags
from segjob.engine.tracking import ProgressLine, Trackers
from segjob.errors import UserError
from segjob.job.schema import EMA_PREFIX, JobConfig
from segjob.learning.ema import WeightAverage
from segjob.learning.losses import binary_threshold, build_loss, output_channels
from segjob.learning.metrics import ConfusionMatrix
from segjob.learning.optim import Schedule, build_optimizer, current_lr
from segjob.models import create_model
from segjob.models.batchnorm import sync_batchnorm
from segjob.store import checkpoint, run_folder
from segjob.store.lease import Fence
from segjob.store.storage import Storage, open_storage

log = logging.getLogger("segjob")

RESTART_SLACK_S = 30.0  # past a preemption deadline (+ Ray's grace), when the group is still here


@dataclasses.dataclass
class Progress:
    epoch: int = 0  # the epoch being trained (== epochs once finished)
    step: int = 0  # optimizer steps so far, over the whole run
    position: int = 0  # samples of this epoch's global order already consumed (a multiple of the global batch)
    world_size: int = 0  # workers that trained the last step (0: a checkpoint from before this was kept)


@dataclasses.dataclass
class Worker:
    """Everything one rank trains with; built once, then mutated by the loop."""

    job: JobConfig
    session: Session
    storage: Storage
    run_path: str
    model: torch.nn.Module  # unwrapped: what checkpoints hold and evaluation runs
    train_model: torch.nn.Module  # DDP-wrapped when world_size > 1
    loss_fn: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    scaler: torch.amp.GradScaler
    train_set: Any
    val_set: Any
    progress: Progress
    history: list[dict[str, Any]]
    committer: Committer
    plan: PreemptionPlan
    flags: StepFlags
    watcher: watcher.PreemptionWatcher | None = None
    mixer: BatchMixer | None = None  # Mixup/CutMix, when the job asks for them
    trackers: Trackers | None = None  # rank 0's TensorBoard files and MLflow run
    ema: WeightAverage | None = None  # the moving average of the weights, when train.ema asks for it
    previews: Previews | None = None  # rank 0's prediction grids on fixed validation images

    @property
    def device(self) -> torch.device:
        return self.session.device

    @property
    def is_chief(self) -> bool:
        return self.session.rank == 0


def run(job: JobConfig, session: Session, fence: Fence | None = None) -> dict[str, Any]:
    """Train `job` to its last epoch (or from wherever storage says it stopped); under a driver lease's `fence`,
    commits carry its generation and the run stops once a newer driver holds the lease."""
    # a SIGTERM while this runs (the last upload and done.json included) waits out its grace period
    with sigterm.training_active():
        worker = setup(job, session, fence)
        final_metrics: dict[str, Any] = {}
        try:
            for epoch in range(worker.progress.epoch, job.train.epochs):
                final_metrics = train_one_epoch(worker, epoch)
        finally:
            worker.committer.close()
            if worker.trackers:
                worker.trackers.close(finished=worker.progress.epoch >= job.train.epochs)
            if worker.previews:
                worker.previews.close()
            if worker.watcher:
                worker.watcher.stop()
        if worker.is_chief and worker.progress.epoch >= job.train.epochs:
            if final_metrics and worker.committer.last_committed is None:
                # never call a run finished whose last checkpoint isn't in storage; Ray retries from the one before
                raise RuntimeError("the final checkpoint could not be committed to storage; the run is not finished")
            mark_done(worker, final_metrics or last_checkpoint_metrics(worker.history))
    return final_metrics


# --- setup ------------------------------------------------------------------------------


def setup(job: JobConfig, session: Session, fence: Fence | None = None) -> Worker:
    torch.set_num_threads(job.scaling.torch_threads or max(1, int(job.scaling.cpus_per_worker)))
    seed_everything(job.seed)
    if job.train.amp == "fp16" and session.device.type != "cuda":
        raise UserError("train.amp: fp16 needs a GPU; use bf16 (or off) on CPU")
    storage = open_storage(job.storage.uri, job.storage.endpoint_url)
    run_path = storage.path(job.name)
    if fence:
        fence.check(storage)  # a superseded driver's worker group, restarted by Ray, stops here
    train_set, val_set = build_datasets(job.data, job.seed)
    num_classes = len(train_set.class_names)

    model = create_model(job.model, train_set.in_channels, output_channels(job.loss, num_classes)).to(session.device)
    optimizer = build_optimizer(job.optim, model.parameters())
    # the schedule's length depends on the global batch only, never on how many workers run now
    steps_per_epoch = train_sampler(job, session, train_set, epoch=0).steps_per_epoch
    worker = Worker(
        job=job, session=session, storage=storage, run_path=run_path, model=model, train_model=model,
        loss_fn=build_loss(job.loss, num_classes, train_set).to(session.device), optimizer=optimizer,
        schedule=Schedule(job.optim.schedule, optimizer, total_steps=steps_per_epoch * job.train.epochs),
        scaler=torch.amp.GradScaler(session.device.type, enabled=job.train.amp == "fp16"),
        train_set=train_set, val_set=val_set, progress=Progress(), history=[],
        committer=Committer(job, session, storage, run_path, fence),
        plan=PreemptionPlan(job.preemption.deadline_margin_s), flags=StepFlags(session.world_size),
        mixer=build_mixer(job.data, num_classes),
        ema=WeightAverage(model, job.train.ema) if job.train.ema.enabled else None,
    )
    resume(worker)
    if fence and worker.is_chief:
        fence.record_start(storage, run_path, worker.progress.step)  # older generations' later commits: superseded
    note_world_size(worker)
    worker.watcher = watcher.PreemptionWatcher(job.preemption, drain=session.drain, announce=worker.is_chief)
    worker.watcher.start()
    if worker.is_chief:
        worker.trackers = Trackers.open(job, storage, run_path, resumed_step=worker.progress.step)
        worker.previews = Previews.open(job, storage, run_path, val_set, session.device)
    # build, load the state, convert BatchNorm, then wrap for DDP: every rank starts from the same weights
    worker.model = worker.train_model = sync_batchnorm(model, job.train.sync_batchnorm, session.device,
                                                       session.world_size, announce=worker.is_chief)
    if session.world_size > 1:
        device_ids = [session.device.index] if session.device.type == "cuda" else None
        worker.train_model = DistributedDataParallel(worker.model, device_ids=device_ids)
    return worker


def global_batch(job: JobConfig) -> int:
    """Samples per optimizer step, the same at every world size (elastic runs shrink and grow)."""
    return job.train.batch_size * job.train.grad_accum_steps * job.scaling.num_workers


def note_world_size(worker: Worker) -> None:
    """Say (log and history) when a resumed run trains on another number of workers than before, and why."""
    before, now = worker.progress.world_size, worker.session.world_size
    worker.progress.world_size = now
    if not before or before == now or not worker.is_chief:
        return
    last = next((r.get("checkpoint", "") for r in reversed(worker.history) if "checkpoint" in r), "")
    if now > before:
        why = "capacity came back"
    elif str(last).startswith("preemption"):
        why = "a node was preempted"
    else:
        why = "a node or worker was lost"
    log.warning("training on %d of %d workers (was %d): %s; same global batch, same sample order",
                now, worker.job.scaling.num_workers, before, why)
    worker.history.append({"step": worker.progress.step, "epoch": worker.progress.epoch, "event": "resized",
                           "world_size": now, "previous_world_size": before, "why": why})


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train_sampler(job: JobConfig, session: Session, train_set, epoch: int,
                  start_position: int = 0) -> TrainBatchSampler:
    try:
        return TrainBatchSampler(
            len(train_set), job.train.batch_size, session.rank, session.world_size, job.seed, epoch,
            global_batch=global_batch(job), start_position=start_position, max_steps=job.train.max_steps_per_epoch,
        )
    except ValueError as error:
        raise UserError(f"data: {error}") from None


def resume(worker: Worker) -> None:
    """Load the newest committed checkpoint that loads. Rank 0 moves the damaged ones newer than it (they
    don't verify) to quarantine, one log line each; with none that loads, nothing is moved."""
    committed = checkpoint.list_committed(worker.storage, worker.run_path)
    problems = []
    damaged: list[tuple[checkpoint.CheckpointInfo, Exception]] = []
    for info in reversed(committed):
        try:
            load_into(worker, info)
        except (UserError, FileNotFoundError) as error:  # FileNotFoundError: removed while we read it
            problems.append(str(error))
            # a checkpoint that fails for another reason (another run's, weights of another model) stays put
            if worker.is_chief and isinstance(error, UserError) and fails_verification(worker, info):
                damaged.append((info, error))  # said once it is quarantined, below
            else:
                log.warning("cannot resume from %s: %s; trying the one before", info.name, error)
            continue
        for bad, error in damaged:
            log.warning("cannot resume from %s: %s; %s, resuming from %s", bad.name, error,
                        move_to_quarantine(worker, bad, str(error)), info.name)
        if worker.is_chief:
            log.info("resumed %s from %s: epoch %d, step %d, %d samples into the epoch",
                     worker.job.name, info.name, worker.progress.epoch, worker.progress.step, worker.progress.position)
        return
    for bad, error in damaged:
        log.warning("cannot resume from %s: %s", bad.name, error)
    if problems:
        # never start over silently: retention would then delete the checkpoints that exist
        raise UserError(f"no usable checkpoint among {len(problems)} committed in {worker.run_path}; "
                        f"newest: {problems[0]}")


def fails_verification(worker: Worker, info: checkpoint.CheckpointInfo) -> bool:
    try:
        return checkpoint.verify(worker.storage, info) is not None
    except Exception:  # storage errors come in many types; unable to tell now, leave it where it is
        return False


def move_to_quarantine(worker: Worker, info: checkpoint.CheckpointInfo, why: str) -> str:
    """What became of a damaged checkpoint, for the log line."""
    try:
        where = checkpoint.quarantine(worker.storage, worker.run_path, info.step_path, info.meta_sha256, why)
    except Exception as error:  # the good checkpoint is loaded: a failed move must not stop the run
        return f"could not move it to quarantine ({type(error).__name__}: {error})"
    return f"moved it to {where}" if where else "it was moved meanwhile"


def load_into(worker: Worker, info: checkpoint.CheckpointInfo) -> None:
    loaded = checkpoint.load(worker.storage, info, expected_run=worker.job.name)
    try:
        worker.model.load_state_dict(loaded.model_state)
    except RuntimeError as error:
        first_line = str(error).strip().splitlines()[0]
        raise UserError(f"{info.path}: weights don't fit this job's model ({first_line})") from None
    state = loaded.train_state
    worker.optimizer.load_state_dict(state["optimizer"])
    worker.schedule.load_state_dict(state["schedule"])
    worker.scaler.load_state_dict(state["scaler"])
    restore_rng(state["rng"])
    worker.progress = Progress(**state["progress"])
    worker.history = loaded.history
    if worker.ema:
        load_average(worker, loaded, info)


def load_average(worker: Worker, loaded: checkpoint.LoadedCheckpoint, info: checkpoint.CheckpointInfo) -> None:
    """The EMA as checkpointed; a checkpoint from before train.ema was on starts it at the loaded weights."""
    if loaded.ema_state is None:
        worker.ema.restart_from(worker.model)
        if worker.is_chief:
            log.info("%s holds no EMA of the weights: the average starts at its weights", info.name)
        return
    try:
        worker.ema.load(loaded.ema_state, int(loaded.train_state.get("ema", {}).get("updates", 0)))
    except RuntimeError as error:
        first_line = str(error).strip().splitlines()[0]
        raise UserError(f"{info.path}: EMA weights don't fit this job's model ({first_line})") from None


# --- the loop ---------------------------------------------------------------------------


def train_one_epoch(worker: Worker, epoch: int) -> dict[str, Any]:
    job, session, progress = worker.job, worker.session, worker.progress
    start_position = progress.position if epoch == progress.epoch else 0  # mid-epoch only in the epoch resumed
    sampler = train_sampler(job, session, worker.train_set, epoch, start_position)
    loader = make_loader(worker, worker.train_set, sampler)
    progress.epoch = epoch
    micro_per_step = sampler.micro_per_step
    loss_sum = torch.zeros((), device=worker.device)
    samples_here = images_seen = 0  # loss_sum / samples_here: this rank's mean loss since the last report
    started = step_started = time.perf_counter()
    progress_line = ProgressLine(job.tracking.progress_every_s if worker.is_chief else 0, epoch, job.train.epochs,
                                 sampler.steps_per_epoch, sampler.global_batch, start_position // sampler.global_batch)
    worker.train_model.train()

    for index, (images, masks) in enumerate(loader):
        micro = index % micro_per_step
        size = sampler.sizes[micro]  # real samples in this micro-batch (0: a stand-in that must not count)
        images = images.to(worker.device, non_blocking=True)
        masks = masks.to(worker.device, non_blocking=True)
        if worker.mixer:
            # seeded by where this batch sits in the run, so a resumed run mixes it the same way
            position = progress.position + sampler.micro_offset(micro)
            images, masks = worker.mixer(images, masks, seed=mix_seed(job.seed, epoch, position, session.rank))
        steps_now = micro == micro_per_step - 1
        sync = contextlib.nullcontext() if steps_now or session.world_size == 1 else worker.train_model.no_sync()
        with sync:
            with autocast(worker):
                loss = training_loss(worker, worker.train_model(images), masks)
            worker.scaler.scale(weighted(loss, size, sampler)).backward()
        loss_sum += loss.detach() * size
        samples_here += size
        if not steps_now:
            continue

        worker.scaler.step(worker.optimizer)
        worker.scaler.update()
        worker.optimizer.zero_grad(set_to_none=True)
        worker.schedule.after_step()
        progress.step += 1
        if worker.ema:
            worker.ema.after_step(worker.model, progress.step)
        progress.position += sampler.global_batch
        images_seen += sampler.global_batch
        progress_line.after_step(progress.position // sampler.global_batch, lambda loss=loss: float(loss.detach()))
        if progress.step % job.train.log_every_steps == 0 and worker.is_chief:
            worker.history.append({"step": progress.step, "epoch": epoch_fraction(progress, sampler),
                                   "position": progress.position, "train/step_loss": float(loss.detach())})
        now = time.perf_counter()
        worker.plan.observe_step(now - step_started)  # from the last step's end: its checkpoint counts too
        step_started = now
        preempt = between_steps(worker)
        every = job.train.checkpoint_every_steps
        # while a preemption is under way the deadline checkpoint is the one that matters: no upload queued before it
        due = (every and progress.step % every == 0 and progress.position < sampler.epoch_samples
               and not worker.plan.under_way())
        if due or preempt:
            metrics = {"epoch": epoch, "step": progress.step, "train/loss": mean_across_ranks(loss_sum, samples_here),
                       "lr": current_lr(worker.optimizer)}
            loss_sum.zero_()
            samples_here = 0
            if preempt:
                checkpoint_for_preemption(worker, metrics, final=preempt == "deadline")
            else:
                save_and_report(worker, metrics, reason="steps")

    # every rank here: the flags in flight are dropped; what they said (a notice, a finished upload) is sent again
    worker.flags.finish()
    train_seconds = time.perf_counter() - started
    metrics: dict[str, Any] = {"epoch": epoch + 1, "step": progress.step, "lr": current_lr(worker.optimizer),
                               "workers": session.world_size}
    if samples_here:
        metrics["train/loss"] = mean_across_ranks(loss_sum, samples_here)
    if (epoch + 1) % job.train.eval_every_epochs == 0 or epoch + 1 == job.train.epochs:
        metrics.update(evaluate(worker))
        if worker.ema:
            worker.ema.broadcast_buffers()  # every rank scores (and rank 0 checkpoints) rank 0's average
            metrics.update(evaluate(worker, worker.ema.model, EMA_PREFIX))
        worker.schedule.after_eval(metrics)
    if worker.previews:
        shown = worker.ema.model if worker.ema else worker.model  # the weights pull and predict use
        worker.previews.after_epoch(shown, epoch + 1, metrics, precision=lambda: autocast(worker))
    worker.schedule.after_epoch()
    metrics["train/images_per_s"] = images_seen / max(train_seconds, 1e-9)
    progress.epoch, progress.position = epoch + 1, 0
    save_and_report(worker, metrics, reason="epoch", wait=epoch + 1 == job.train.epochs)
    if worker.is_chief:
        log.info(status_line(job, metrics, time.perf_counter() - started))
    return metrics


def weighted(loss: torch.Tensor, size: int, sampler: TrainBatchSampler) -> torch.Tensor:
    """This micro-batch's share of the step's loss: DDP averages over W ranks, so the gradient is the
    mean over the step's G samples however they were split (at full size: loss / grad_accum_steps)."""
    if size == 0:
        return loss * 0.0
    return loss / (sampler.global_batch / (size * sampler.world_size))


def training_loss(worker: Worker, outputs: torch.Tensor | dict[str, torch.Tensor],
                  targets: torch.Tensor) -> torch.Tensor:
    """The job's loss; a model with an auxiliary head (PSPNet) adds aux_weight x the same loss on it."""
    if not isinstance(outputs, dict):
        return worker.loss_fn(outputs, targets)
    loss = worker.loss_fn(outputs["out"], targets)
    if "aux" in outputs:  # only a model whose section has aux_weight builds an auxiliary head
        loss = loss + worker.job.model.aux_weight * worker.loss_fn(outputs["aux"], targets)
    return loss


def autocast(worker: Worker):
    amp = worker.job.train.amp
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(worker.device.type, dtype=dtype, enabled=amp != "off")


def make_loader(worker: Worker, dataset, batch_sampler, collate_fn=None) -> DataLoader:
    workers = worker.job.data.loader_workers
    return DataLoader(
        dataset, batch_sampler=batch_sampler, num_workers=workers, collate_fn=collate_fn,
        pin_memory=worker.device.type == "cuda", persistent_workers=False,
        multiprocessing_context="forkserver" if workers else None,
    )


def evaluate(worker: Worker, model: torch.nn.Module | None = None, prefix: str = "val") -> dict[str, float]:
    """Every validation sample exactly once across ranks; one all-reduce at the end. `model`: the trained
    one by default (the EMA's reports as val_ema/...)."""
    session = worker.session
    # the unwrapped model: DDP's forward may run collectives, and ranks see different batch counts here
    model = worker.model if model is None else model
    sampler = EvalBatchSampler(len(worker.val_set), worker.job.train.batch_size, session.rank, session.world_size)
    matrix = ConfusionMatrix(len(worker.val_set.class_names), device=worker.device)
    # scored on each label's own grid (job.eval.grid), by whole image or sliding window (data.crop)
    scorer = Scorer(model, worker.loss_fn, binary_threshold(worker.job.loss), worker.device,
                    precision=lambda: autocast(worker), protocol=protocol_of(worker.job),
                    fill=padding_fill(worker.job.data, worker.val_set.in_channels))
    was_training = model.training
    model.eval()
    view = ScoringView(worker.val_set, worker.job.data)
    for _, images, targets in make_loader(worker, view, sampler, collate_scoring):
        for labels, predicted in scorer.score(images, targets):
            matrix.update(labels, predicted)
    model.train(was_training)
    matrix.all_reduce()
    scorer.all_reduce()
    if scorer.samples != len(worker.val_set):
        raise RuntimeError(f"evaluated {scorer.samples} samples, the validation set has {len(worker.val_set)}")
    return summary(matrix, worker.val_set.class_names, prefix, scorer.loss)


def mean_across_ranks(loss_sum: torch.Tensor, count: int) -> float:
    """The mean over every rank's samples: loss_sum holds loss x samples per micro-batch."""
    count_here = torch.tensor(float(count), dtype=torch.float64, device=loss_sum.device)
    totals = torch.stack([loss_sum.detach().double(), count_here])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    return float(totals[0] / totals[1].clamp(min=1))


def epoch_fraction(progress: Progress, sampler: TrainBatchSampler) -> float:
    return round(progress.epoch + progress.position / sampler.epoch_samples, 4)


def status_line(job: JobConfig, metrics: dict[str, Any], seconds: float) -> str:
    parts = [f"epoch {metrics['epoch']}/{job.train.epochs}", f"step {metrics['step']}"]
    if metrics.get("workers", job.scaling.num_workers) != job.scaling.num_workers:
        parts.append(f"on {metrics['workers']}/{job.scaling.num_workers} workers")
    for key in ("train/loss", "val/loss", "val/miou", f"{EMA_PREFIX}/miou", "val/pixel_acc"):
        if key in metrics:
            parts.append(f"{key} {metrics[key]:.4f}")
    parts.append(f"{metrics['train/images_per_s']:.1f} img/s")
    parts.append(f"{seconds:.1f} s")
    return "  ".join(parts)


# --- checkpoints ------------------------------------------------------------------------


def between_steps(worker: Worker) -> str | None:
    """After every optimizer step, on every rank: report a finished upload, and say which
    preemption checkpoint to take now ('now', 'deadline' or None)."""
    job, progress = worker.job, worker.progress
    if job.preemption.ray_drain and progress.step % job.preemption.ray_check_every_steps == 0:
        # a barrier across ranks: called here, at a step every rank reaches, never from a side thread
        worker.plan.ray_notice = worker.session.preemption_info() or worker.plan.ray_notice
    here = worker.watcher.notice() if worker.watcher else None
    notice, due, deadline = worker.plan.local_view(here)
    agreed = worker.flags.exchange(notice, worker.committer.upload_finished_here(), due, deadline,
                                   here.source if here else None)
    if agreed is None:
        return None
    worker.plan.source_elsewhere = agreed.source
    if agreed.upload_done:
        worker.committer.flush()
    return worker.plan.decide(agreed)


def checkpoint_for_preemption(worker: Worker, metrics: dict[str, Any], final: bool) -> None:
    """Commit a checkpoint now and go on training: Ray restarts the group at the deadline. After the
    last one before the deadline, wait for that restart instead of training steps that would be lost."""
    notice = (worker.watcher.notice() if worker.watcher else None) or worker.plan.ray_notice
    if notice:
        why = f"{notice.source}: {notice.detail}"
    else:
        why = f"{worker.plan.source_elsewhere or 'a'} notice on another worker"
    left = worker.plan.seconds_left()
    if worker.is_chief:
        log.warning("preemption notice (%s) at step %d%s: checkpointing now", why, worker.progress.step,
                    f", {left:.0f} s to the deadline" if left is not None else "")
    started = time.perf_counter()
    save_and_report(worker, metrics, reason=f"preemption{' deadline' if final else ''} ({why})", wait=True)
    seconds = time.perf_counter() - started
    worker.plan.commit_seconds = max(worker.plan.commit_seconds, seconds)
    if worker.is_chief:
        log.warning("preemption checkpoint committed in %.1f s: %s", seconds,
                    worker.committer.last_committed or "FAILED")
    if final:
        wait_for_restart(worker)


def wait_for_restart(worker: Worker) -> None:
    """Every rank idles until Ray tears the group down at the deadline (+ its grace); if that never
    comes (no drain reached Ray), training goes on afterwards."""
    left = worker.plan.seconds_left() or 0.0
    until = time.time() + max(0.0, left) + worker.job.failure.preemption_grace_s + RESTART_SLACK_S
    if worker.is_chief:
        log.warning("waiting for the preemption: Ray restarts the group in about %.0f s", max(0.0, left))
    while time.time() < until:
        time.sleep(0.2)
    worker.plan.expired = True  # every rank, after the same step: regular checkpoints again
    if worker.is_chief:
        log.warning("no restart came %.0f s after the preemption deadline; training goes on", RESTART_SLACK_S)


def save_and_report(worker: Worker, metrics: dict[str, Any], reason: str, wait: bool = False) -> None:
    """Every rank: checkpoint now. Rank 0 writes it and commits it in the background; it is
    reported (by every rank) once committed, or at once when `wait`."""
    if worker.is_chief:
        worker.history.append({**metrics, "checkpoint": reason})
    progress = worker.progress
    worker.committer.save(metrics, progress.step, progress.epoch, reason, snapshot=lambda: snapshot(worker))
    if wait:
        worker.committer.flush()
    if worker.trackers and not reason.startswith("preemption"):  # a preemption's deadline waits for nothing else
        worker.trackers.update(worker.history)


def snapshot(worker: Worker) -> tuple[dict, dict, list, dict | None]:
    """Copies of everything a checkpoint holds, taken between steps; training may change the originals next."""
    train_state = {
        "optimizer": worker.optimizer.state_dict(),
        "schedule": worker.schedule.state_dict(),
        "scaler": worker.scaler.state_dict(),
        "rng": rng_state(),
        "progress": dataclasses.asdict(worker.progress),
    }
    ema_state = None
    if worker.ema:
        train_state["ema"] = {"updates": worker.ema.updates}
        ema_state = cpu_copy(worker.ema.model.state_dict())
    return cpu_copy(worker.model.state_dict()), cpu_copy(train_state), list(worker.history), ema_state


def cpu_copy(tree: Any) -> Any:
    if isinstance(tree, torch.Tensor):
        return tree.detach().to("cpu", copy=True)
    if isinstance(tree, dict):
        return {key: cpu_copy(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(cpu_copy(value) for value in tree)
    return tree


def last_checkpoint_metrics(history: list[dict[str, Any]]) -> dict[str, Any]:
    records = [r for r in history if "checkpoint" in r]
    return {k: v for k, v in records[-1].items() if k != "checkpoint"} if records else {}


def mark_done(worker: Worker, metrics: dict[str, Any]) -> None:
    """Only a run that completed all its epochs is 'finished' when submitted again."""
    run_folder.write_done(worker.storage, worker.run_path, worker.job.train.epochs, worker.progress.step, metrics)


def rng_state() -> dict[str, Any]:
    # numpy's state as plain lists/ints: torch.load(weights_only=True) refuses numpy objects
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
