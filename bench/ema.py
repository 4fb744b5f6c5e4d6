"""What train.ema costs per training step: the update alone next to a step, and the engine with EMA vs without.

    .venv/bin/python bench/ema.py [--steps 20] [--rounds 3] [--threads 1] [--models small resnet50]

Single process, no Ray, on the CPU (or the GPU with --device cuda). For each model:
- update: WeightAverage.update alone, median ms per call over 50 calls, next to the median ms of a
  training step (forward, the job's loss, backward, Adam) on the same model and batch: the share of a
  step the update adds (goal: <= 2 %).
- engine: train/images_per_s of loop.run on the same job with train.ema (decay 0.999) and without;
  each round runs both, in turns of order (ABBA), so drift on a shared machine and whatever the
  first run of a pair gains or loses hit both alike; the ratio of medians.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from segjob.data import build_datasets
from segjob.engine import loop
from segjob.engine.session import LocalSession
from segjob.job.schema import EmaConfig, JobConfig
from segjob.learning.ema import WeightAverage
from segjob.learning.losses import build_loss
from segjob.models import create_model

MODELS = {  # name: (model section, image size, batch)
    "small": ({"name": "unet", "base_channels": 16, "depth": 3}, 64, 16),  # bench/step_overhead.py's
    "resnet50": ({"name": "unet", "encoder": "resnet50"}, 128, 8),  # many weights per pixel: the update's worst case
}


def job_for(model: str, steps: int, threads: int, ema: bool) -> JobConfig:
    section, size, batch = MODELS[model]
    return JobConfig.model_validate({
        "name": "bench",
        "data": {"name": "synthetic", "num_classes": 4, "train_samples": batch * steps, "val_samples": batch,
                 "image_size": size},
        "model": section,
        "optim": {"name": "adam", "lr": 0.003},
        "train": {"epochs": 1, "batch_size": batch, "log_every_steps": 1000,
                  "ema": {"decay": 0.999 if ema else 0.0}},
        "scaling": {"num_workers": 1, "torch_threads": threads},
        "preemption": {"aws_metadata_url": None, "gcp_metadata_url": None},
    })


def engine_images_per_s(job: JobConfig, device: str) -> float:
    with tempfile.TemporaryDirectory() as storage:
        job = job.model_copy(update={"storage": job.storage.model_copy(update={"uri": storage})})
        return loop.run(job, LocalSession(device))["train/images_per_s"]


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median ms of fn() over `repeats` calls (synchronised on a GPU)."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(1000 * (time.perf_counter() - started))
    return statistics.median(times)


def update_and_step_ms(job: JobConfig, device: torch.device, steps: int) -> tuple[float, float, int]:
    """(ms per update, ms per training step, parameters) on one batch of the job's data."""
    torch.manual_seed(0)
    train_set, _ = build_datasets(job.data, job.seed)
    model = create_model(job.model, train_set.in_channels, len(train_set.class_names)).to(device).train()
    loss_fn = build_loss(job.loss, len(train_set.class_names), train_set).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=job.optim.lr)
    batch = [train_set[i] for i in range(job.train.batch_size)]
    images = torch.stack([image for image, _ in batch]).to(device)
    masks = torch.stack([mask for _, mask in batch]).to(device)

    def step() -> None:
        loss = loss_fn(model(images), masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    average = WeightAverage(model, EmaConfig(decay=0.999))
    step()  # warm-up: Adam's state, the average's tensor lists
    average.update(model)
    step_ms = timed(step, steps, device)
    update_ms = timed(lambda: average.update(model), 50, device)
    return update_ms, step_ms, sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    for model in args.models:
        update_ms, step_ms, parameters = update_and_step_ms(job_for(model, args.steps, args.threads, True), device,
                                                            args.steps)
        print(f"{model}: {parameters / 1e6:.2f} M parameters; update {update_ms:.2f} ms, step {step_ms:.1f} ms: "
              f"update / step = {100 * update_ms / step_ms:.2f} %  (goal <= 2 %)")
        with_ema, without = [], []
        for round_number in range(args.rounds):
            for ema in (False, True) if round_number % 2 == 0 else (True, False):  # ABBA: order effects cancel
                images_per_s = engine_images_per_s(job_for(model, args.steps, args.threads, ema), args.device)
                (with_ema if ema else without).append(images_per_s)
            print(f"  round {round_number + 1}: engine without EMA {without[-1]:.1f} img/s, "
                  f"with EMA {with_ema[-1]:.1f} img/s")
        ratio = statistics.median(without) / statistics.median(with_ema)
        print(f"  median: without {statistics.median(without):.1f} img/s, with {statistics.median(with_ema):.1f} "
              f"img/s: step time with / without = {ratio:.3f}")


if __name__ == "__main__":
    main()
