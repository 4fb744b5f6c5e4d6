"""The engine's training step vs a hand-written PyTorch loop: same model, batch and data.

    .venv/bin/python bench/step_overhead.py [--steps 40] [--rounds 3] [--threads 1]

Single process, no Ray. Rounds alternate engine / hand loop so drift on a shared machine
hits both alike; the ratio of medians is what counts (goal: engine <= 1.02x the hand loop).
Both include data loading (same dataset objects, 0 DataLoader workers); the engine figure
is its own `train/images_per_s` over the training loop only (evaluation and the epoch-end
checkpoint are excluded, as they are not part of a step).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from segjob.data import build_datasets
from segjob.data.labels import IGNORE_INDEX
from segjob.engine import loop
from segjob.engine.session import LocalSession
from segjob.job.schema import JobConfig
from segjob.models import create_model


def job_for(steps: int, threads: int, storage: str) -> JobConfig:
    return JobConfig.model_validate({
        "name": "bench",
        "data": {"name": "synthetic", "num_classes": 4, "train_samples": 16 * steps, "val_samples": 16,
                 "image_size": 64},
        "model": {"name": "unet", "base_channels": 16, "depth": 3},
        "optim": {"name": "adam", "lr": 0.003},
        "train": {"epochs": 1, "batch_size": 16, "log_every_steps": 1000},
        "scaling": {"num_workers": 1, "torch_threads": threads},
        "storage": {"uri": storage},
    })


def engine_images_per_s(job: JobConfig) -> float:
    with tempfile.TemporaryDirectory() as storage:
        job = job.model_copy(update={"storage": job.storage.model_copy(update={"uri": storage})})
        return loop.run(job, LocalSession("cpu"))["train/images_per_s"]


def hand_loop_images_per_s(job: JobConfig) -> float:
    """What a user would write by hand: DataLoader, forward, CE, backward, Adam step."""
    torch.set_num_threads(job.scaling.torch_threads)
    torch.manual_seed(job.seed)
    train_set, _ = build_datasets(job.data, job.seed)
    model = create_model(job.model, train_set.in_channels, len(train_set.class_names))
    optimizer = torch.optim.Adam(model.parameters(), lr=job.optim.lr)
    loader = DataLoader(train_set, batch_size=job.train.batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(0))
    model.train()
    images = 0
    started = time.perf_counter()
    for image, mask in loader:
        loss = F.cross_entropy(model(image), mask, ignore_index=IGNORE_INDEX)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        images += image.shape[0]
    return images / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    job = job_for(args.steps, args.threads, storage="unused")
    # warm-up
    hand_loop_images_per_s(job.model_copy(update={"data": job.data.model_copy(update={"train_samples": 64})}))

    engine_runs, hand_runs = [], []
    for round_number in range(args.rounds):
        engine_runs.append(engine_images_per_s(job))
        hand_runs.append(hand_loop_images_per_s(job))
        print(f"round {round_number + 1}: engine {engine_runs[-1]:.1f} img/s, hand loop {hand_runs[-1]:.1f} img/s")
    engine_median, hand_median = statistics.median(engine_runs), statistics.median(hand_runs)
    print(f"median: engine {engine_median:.1f} img/s ({1000 * 16 / engine_median:.1f} ms/step), "
          f"hand loop {hand_median:.1f} img/s ({1000 * 16 / hand_median:.1f} ms/step)")
    print(f"engine step time / hand-loop step time = {hand_median / engine_median:.3f}  (goal <= 1.02)")


if __name__ == "__main__":
    main()
