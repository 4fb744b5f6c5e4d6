"""Training-sample throughput per DataLoader worker: segjob's datasets vs torchvision's reference preset.

    .venv/bin/python bench/loader.py [--datasets camvid pets leaf] [--passes 2] [--rounds 3]

Decode + augment + normalise + collate of training samples from ../shared/data (or
$SEGJOB_SHARED_DATA), no model. Both sides do the same augmentation: zoom uniform in
[0.5, 2.0] of the base size, horizontal flip, random crop (or pad) to a square, ImageNet
normalisation. segjob: `data.resize: fit` with image_size = the crop, `augment.scale:
[0.5, 2.0]` at strength 1, rotation and photometric steps off. Baseline
(bench/reference_segmentation.py): torchvision's references/segmentation training preset with
base_size = the crop x shorter/longer side, so both resize to the same sizes.

What a DataLoader worker does per batch (load, transform, collate) runs here in one process
with one torch thread, as in a worker. The figure is samples per CPU-second of that process:
a worker's throughput when it has a core to itself, and, unlike wall time, hardly moved by
other jobs on a shared machine (wall-clock figures are printed too). Rounds alternate the
two so drift hits both alike; the ratio of medians counts (goal >= 1.0).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_segmentation import ReferenceDataset, SegmentationPresetTrain  # noqa: E402

from segjob.data import build_datasets  # noqa: E402
from segjob.job.schema import AugmentConfig, CamVidData, LeafData, PetsData  # noqa: E402

SAME_AUGMENTATION = AugmentConfig(strength=1.0, scale=(0.5, 2.0), rotation=0, brightness=0, contrast=0,
                                  saturation=0, hue=0, blur=0, sharpness=0)
# name -> (shared folder, config factory, crop size, the photos' shorter / longer side)
DATASETS = {
    "camvid": ("camvid", lambda root, size: CamVidData(root=root, image_size=size, augment=SAME_AUGMENTATION),
               480, 360 / 480),
    "pets": ("oxford-iiit-pet",
             lambda root, size: PetsData(root=root, image_size=size, resize="fit", augment=SAME_AUGMENTATION),
             320, 375 / 500),
    "leaf": ("soybean-rust-asrdnet",
             lambda root, size: LeafData(root=root, image_size=size, augment=SAME_AUGMENTATION), 256, 960 / 1280),
}


def shared_data(folder: str) -> Path:
    base = Path(os.environ.get("SEGJOB_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    if not (base / folder).is_dir():
        raise SystemExit(f"no {folder} at {base}; set SEGJOB_SHARED_DATA to the folder holding the sample data")
    return base / folder


def samples_per_s(loader: DataLoader) -> tuple[float, float]:
    """(samples per CPU-second, samples per wall-second) after the first batch (first-call costs excluded)."""
    batches = iter(loader)
    next(batches)
    count, cpu, wall = 0, time.process_time(), time.perf_counter()
    for images, _ in batches:
        count += images.shape[0]
    return count / (time.process_time() - cpu), count / (time.perf_counter() - wall)


def segjob_loader(dataset, passes: int, batch_size: int) -> DataLoader:
    keys = [(epoch, index) for epoch in range(passes + 1) for index in range(len(dataset))]  # +1: the warm-up batch
    batches = [keys[i : i + batch_size] for i in range(0, len(keys) - batch_size + 1, batch_size)]
    return DataLoader(dataset, batch_sampler=batches)


def reference_loader(dataset, passes: int, batch_size: int) -> DataLoader:
    indices = list(range(len(dataset.pairs) * (passes + 1)))
    batches = [indices[i : i + batch_size] for i in range(0, len(indices) - batch_size + 1, batch_size)]
    return DataLoader(dataset, batch_sampler=batches)


def run(name: str, args: argparse.Namespace) -> tuple[float, float, float, float]:
    folder, make_config, crop, aspect = DATASETS[name]
    train, _ = build_datasets(make_config(str(shared_data(folder)), crop), seed=0)
    pairs = [(train.image_path(n), train.label_path(n)) for n in train.names]
    table = train.coding.table[:256]  # raw label value -> class or 255, the same remap segjob does
    reference = ReferenceDataset(pairs, SegmentationPresetTrain(base_size=round(crop * aspect), crop_size=crop), table)
    ours, theirs = [], []
    for round_number in range(args.rounds):
        ours.append(samples_per_s(segjob_loader(train, args.passes, args.batch_size)))
        theirs.append(samples_per_s(reference_loader(reference, args.passes, args.batch_size)))
        print(f"  {name} round {round_number + 1}: segjob {ours[-1][0]:.1f} (wall {ours[-1][1]:.1f}), "
              f"reference {theirs[-1][0]:.1f} (wall {theirs[-1][1]:.1f}) samples per CPU-second")
    median = lambda runs, which: statistics.median(run[which] for run in runs)  # noqa: E731
    return median(ours, 0), median(theirs, 0), median(ours, 1), median(theirs, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--passes", type=int, default=2, help="passes over the sample files per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, one process and thread (a DataLoader worker's work), "
          f"batch {args.batch_size}")
    results = {name: run(name, args) for name in args.datasets}
    print("\n| dataset | crop | segjob samples/s per worker | reference samples/s per worker | segjob / reference "
          "| wall-clock ratio |")
    print("|---|---|---|---|---|---|")
    for name, (ours, theirs, ours_wall, theirs_wall) in results.items():
        print(f"| {name} | {DATASETS[name][2]} | {ours:.1f} | {theirs:.1f} | **{ours / theirs:.2f}** "
              f"| {ours_wall / theirs_wall:.2f} |")


if __name__ == "__main__":
    main()
