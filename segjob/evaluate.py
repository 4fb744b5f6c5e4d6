"""Evaluate a trained checkpoint on its dataset: metrics, per-image scores and figures. No Ray.

    python -m segjob.evaluate ./best
    python -m segjob.evaluate s3://bucket/runs/pets_unet --data /data/oxford-iiit-pet --out eval/pets
    python -m segjob.evaluate runs/quickstart/checkpoints/step-000000384 --split train --limit 200

CKPT is a checkpoint folder, or a run folder (its best checkpoint by the run's metric;
--pick latest for the newest), local, s3:// or gs://. Every sample of the split is scored
exactly once (the count is checked). Written into --out:

    metrics.json     figures from the summed confusion matrix (mIoU, pixel and mean class
                     accuracy, Dice, per class IoU/Dice), the job's loss, mean ASSD per class
                     over the images, the confusion matrix; nan is written as null
    per_image.csv    a row per sample: pixel accuracy, mIoU, mean Dice, mean ASSD; IoU, Dice, ASSD per class
    figures/         best / median / worst samples for each metric (per class for Dice, IoU and
                     ASSD, as in the Pets U-Net study), IoU per class, the confusion matrix,
                     box plots of per-image Dice and ASSD per class

ASSD is in pixels at the evaluated size (data.image_size); see segjob.metrics for its
convention when a mask is empty. --no-assd skips it, --no-figures the pictures.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from segjob.data.labels import IGNORE_INDEX
from segjob.engine.evaluation import labels_of, logits_of
from segjob.errors import UserError, exits_cleanly_on_user_error, setup_logging
from segjob.learning.losses import build_loss
from segjob.learning.metrics import ConfusionMatrix, ImageScores, predict_labels
from segjob.results import figures
from segjob.results.trained import Trained, add_checkpoint_arguments, data_overrides, load_trained

log = logging.getLogger("segjob")

SPLITS = ("val", "train")
PER_CLASS_SAMPLE_METRICS = ("dice", "iou", "assd")  # best / median / worst per class
IMAGE_SAMPLE_METRICS = ("miou", "pixel_acc")  # best / median / worst over whole images
LOWER_IS_BETTER = {"assd", "mean_assd"}


@dataclass
class Evaluation:
    trained: Trained
    split: str
    dataset: Any
    scores: ImageScores
    loss: float
    threshold: float

    @property
    def confusion(self) -> ConfusionMatrix:
        return self.scores.total_confusion()

    def summary(self) -> dict[str, float]:
        """Flat names as in training (val/miou, ...), for this split, plus loss and ASSD means."""
        prefix = self.split
        result = self.confusion.summary(self.trained.class_names, prefix=prefix)
        result[f"{prefix}/loss"] = self.loss
        if self.scores.with_assd:
            per_class = nanmean_columns(self.scores.assd)
            result[f"{prefix}/assd"] = nanmean(per_class)
            for name, value in zip(self.trained.class_names, per_class):
                result[f"{prefix}/assd/{name}"] = value
        return result


class _Indexed(Dataset):
    """(index, image, target) for the first `count` samples, so scores are keyed by sample."""

    def __init__(self, dataset: Any, count: int):
        self.dataset, self.count = dataset, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int):
        image, target = self.dataset[index]
        return index, image, target


@torch.inference_mode()
def evaluate(trained: Trained, split: str = "val", batch_size: int = 8, workers: int = 0, limit: int | None = None,
             with_assd: bool = True, threshold: float | None = None, progress: bool = True) -> Evaluation:
    """Score every sample of the split (or the first `limit`) once; the loss is the job's own."""
    train_set, val_set = trained.require_data()
    dataset = val_set if split == "val" else train_set
    count = len(dataset) if limit is None else min(limit, len(dataset))
    if count == 0:
        raise UserError(f"data: the {split} split is empty")
    threshold = trained.threshold if threshold is None else threshold
    loss_fn = build_loss(trained.job.loss, trained.num_classes, train_set).to(trained.device)
    scores = ImageScores(trained.num_classes, with_assd=with_assd)
    loss_sum = labelled_sum = 0.0
    loader = DataLoader(_Indexed(dataset, count), batch_size=batch_size, num_workers=workers, shuffle=False,
                        multiprocessing_context="forkserver" if workers else None)
    model = trained.model.eval()
    for indices, images, targets in tqdm(loader, desc=f"evaluate {split}", unit="batch", disable=not progress,
                                         file=sys.stderr, dynamic_ncols=True):
        logits = logits_of(model, images.to(trained.device))
        targets = targets.to(trained.device)
        labels = labels_of(targets)
        labelled = int((labels != IGNORE_INDEX).sum())
        loss_sum += float(loss_fn(logits, targets)) * labelled  # as the engine does: weighted by labelled pixels
        labelled_sum += labelled
        scores.update(indices.tolist(), labels.cpu(), predict_labels(logits, threshold).cpu())
    scores.gather()
    scores.check_complete(count)
    return Evaluation(trained, split, dataset, scores, loss_sum / max(labelled_sum, 1), threshold)


# --- outputs ----------------------------------------------------------------------------


def nanmean(values: Any) -> float:
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else math.nan


def nanmean_columns(table: np.ndarray) -> list[float]:
    return [nanmean(table[:, column]) for column in range(table.shape[1])]


def json_safe(value: Any) -> Any:
    """nan and inf as null: metrics.json stays standard JSON."""
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def file_safe(name: str) -> str:
    return re.sub(r"[^\w.-]", "_", name)


def sample_names(result: Evaluation) -> list[str]:
    dataset = result.dataset
    name = getattr(dataset, "sample_name", None)
    return [name(int(i)) if name else f"{result.split}-{int(i):05d}" for i in result.scores.indices]


def write_metrics(result: Evaluation, path: Path) -> dict[str, Any]:
    trained = result.trained
    record = {
        "checkpoint": trained.source,
        "run": trained.meta.get("run"),
        "epoch": trained.meta.get("epoch"),
        "step": trained.meta.get("step"),
        "split": result.split,
        "images": int(result.scores.indices.size),
        "image_size": getattr(trained.job.data, "image_size", None),
        "threshold": result.threshold if trained.is_binary else None,
        "class_names": trained.class_names,
        "metrics": result.summary(),
        "confusion_matrix": result.confusion.mat.tolist(),
    }
    path.write_text(json.dumps(json_safe(record), indent=1) + "\n")
    return record


def write_per_image(result: Evaluation, path: Path) -> None:
    table = result.scores.scores()
    names = result.trained.class_names
    columns = ["index", "name", "pixel_acc", "miou", "mean_dice"] + (["mean_assd"] if "assd" in table else [])
    for metric in ("iou", "dice") + (("assd",) if "assd" in table else ()):
        columns += [f"{metric}/{name}" for name in names]

    def cell(value: float) -> str:
        return "" if math.isnan(value) else f"{value:.6g}"

    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(columns)
        for row, (index, name) in enumerate(zip(result.scores.indices, sample_names(result))):
            values = [table["pixel_acc"][row], table["miou"][row], table["mean_dice"][row]]
            if "assd" in table:
                values.append(table["mean_assd"][row])
            for metric in ("iou", "dice") + (("assd",) if "assd" in table else ()):
                values += table[metric][row].tolist()
            writer.writerow([int(index), name, *(cell(float(v)) for v in values)])


def best_median_worst(values: np.ndarray, lower_is_better: bool) -> list[tuple[str, int]]:
    """(which, row) for the best, median and worst of the defined values. The median is the
    lower middle value whichever way is better. On ties the best is the first row holding
    its value and the worst the last, so they differ whenever two images do."""
    defined = np.flatnonzero(~np.isnan(values))
    if defined.size == 0:
        return []
    low, high = values[defined].min(), values[defined].max()
    first_low, last_low = defined[values[defined] == low][[0, -1]]
    first_high, last_high = defined[values[defined] == high][[0, -1]]
    ascending = defined[np.argsort(values[defined], kind="stable")]
    median = int(ascending[(ascending.size - 1) // 2])
    best, worst = (first_low, last_high) if lower_is_better else (first_high, last_low)
    return [("best", int(best)), ("median", median), ("worst", int(worst))]


@torch.inference_mode()
def predictions_for(result: Evaluation, rows: list[int]) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """{row: (display image, target, prediction)}, the model run again on just these samples."""
    trained, indices = result.trained, result.scores.indices
    found = {}
    for start in range(0, len(rows), 8):
        chunk = rows[start:start + 8]
        samples = [result.dataset[int(indices[row])] for row in chunk]
        images = torch.stack([image for image, _ in samples])
        predicted = predict_labels(logits_of(trained.model, images.to(trained.device)), result.threshold).cpu()
        for row, (image, target), prediction in zip(chunk, samples, predicted):
            found[row] = (figures.display_image(image), labels_of(target.unsqueeze(0))[0].numpy(), prediction.numpy())
    return found


def write_figures(result: Evaluation, folder: Path) -> list[Path]:
    trained = result.trained
    names, palette = trained.class_names, trained.palette
    table = result.scores.scores()
    sample_names_ = sample_names(result)
    choices: list[tuple[str, str, list[tuple[str, int]], np.ndarray]] = []  # (file, title, picks, values)
    for metric in PER_CLASS_SAMPLE_METRICS:
        if metric not in table:
            continue
        for c, name in enumerate(names):
            values = table[metric][:, c]
            picks = best_median_worst(values, metric in LOWER_IS_BETTER)
            if picks:
                count = int((~np.isnan(values)).sum())
                choices.append((f"samples_{metric}_{file_safe(name)}.png", f"{metric} of {name} ({count} images)", picks, values))
    for metric in IMAGE_SAMPLE_METRICS:
        values = table[metric]
        picks = best_median_worst(values, metric in LOWER_IS_BETTER)
        if picks:
            choices.append((f"samples_{metric}.png", f"{metric} per image ({int((~np.isnan(values)).sum())} images)", picks, values))

    shown = predictions_for(result, sorted({row for _, _, picks, _ in choices for _, row in picks}))
    written = []
    for file_name, title, picks, values in choices:
        rows = [figures.SampleRow(f"{which}: {values[row]:.3g}\n{sample_names_[row]}", *shown[row]) for which, row in picks]
        written.append(figures.save(figures.sample_grid(rows, names, palette, title), folder / file_name))
    stats = result.confusion.compute()
    written.append(figures.save(figures.iou_bar_chart(names, stats["iou"].tolist(),
                                                      f"IoU per class ({result.split}, mIoU {stats['miou']:.3f})"),
                                folder / "iou_per_class.png"))
    written.append(figures.save(figures.confusion_heatmap(result.confusion.mat.numpy(), names), folder / "confusion_matrix.png"))
    written.append(figures.save(figures.box_plots(table["dice"], names, "Dice", "Dice per image and class"),
                                folder / "dice_per_image.png"))
    if "assd" in table:
        written.append(figures.save(figures.box_plots(table["assd"], names, "ASSD (pixels)", "ASSD per image and class"),
                                    folder / "assd_per_image.png"))
    return written


def write_outputs(result: Evaluation, out: Path, with_figures: bool = True) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    write_metrics(result, out / "metrics.json")
    write_per_image(result, out / "per_image.csv")
    written = [out / "metrics.json", out / "per_image.csv"]
    return written + (write_figures(result, out / "figures") if with_figures else [])


# --- the command ------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m segjob.evaluate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_arguments(parser)
    parser.add_argument("--out", default="evaluation", help="output folder (default: ./evaluation)")
    parser.add_argument("--split", choices=SPLITS, default="val", help="which split of the job's dataset")
    parser.add_argument("--limit", type=int, default=None, help="only the first N samples of the split")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the job's train.batch_size")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader processes (default: the job's data.loader_workers)")
    parser.add_argument("--threshold", type=float, default=None, help="one-channel models: foreground above this probability")
    parser.add_argument("--no-assd", dest="assd", action="store_false", help="skip ASSD")
    parser.add_argument("--no-figures", dest="figures", action="store_false", help="only metrics.json and per_image.csv")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    args = parser.parse_args(argv)
    for name in ("limit", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.threshold is not None and not 0.0 < args.threshold < 1.0:
        parser.error("--threshold must be between 0 and 1")
    return args


@exits_cleanly_on_user_error
def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    trained = load_trained(args.checkpoint, endpoint_url=args.endpoint_url, data_root=args.data,
                           data_overrides=data_overrides(args.overrides), pick=args.pick, need_data=True,
                           device=args.device)
    if args.threshold is not None and not trained.is_binary:
        raise UserError("--threshold: only for one-channel (bce, bce+dice) models; this one takes the argmax")
    workers = trained.job.data.loader_workers if args.workers is None else args.workers
    result = evaluate(trained, args.split, args.batch_size or trained.job.train.batch_size, workers, args.limit,
                      args.assd, args.threshold, args.progress)
    out = Path(args.out)
    written = write_outputs(result, out, args.figures)
    summary = result.summary()
    shown = "  ".join(f"{key} {summary[key]:.4f}" for key in
                      (f"{args.split}/miou", f"{args.split}/pixel_acc", f"{args.split}/dice", f"{args.split}/assd", f"{args.split}/loss")
                      if key in summary)
    log.info("%s, %d %s images: %s", trained.source, result.scores.indices.size, args.split, shown)
    log.info("wrote %d files to %s", len(written), out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
