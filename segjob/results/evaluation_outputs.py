"""What `evaluate` writes: metrics.json, per_image.csv and the figures of an Evaluation.

    written = write_outputs(evaluate(trained), Path("evaluation"), with_figures=True)

metrics.json is standard JSON (nan and inf become null). The figures show the best, median
and worst samples for each metric (per class for Dice, IoU and ASSD, as in the Pets U-Net
study), the N lowest- and highest-loss images (the PSPNet write-up's figure; each image's loss
is the job's loss on the grid the metrics were counted on), IoU per class, the confusion matrix,
and box plots of per-image Dice and ASSD.
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segjob.data.scoring import ScoringView
from segjob.data.transforms import padding_fill
from segjob.engine.evaluation import Scorer
from segjob.engine.inference import upsample
from segjob.results import figures
from segjob.results.evaluation import Evaluation

PER_CLASS_SAMPLE_METRICS = ("dice", "iou", "assd")  # best / median / worst per class
IMAGE_SAMPLE_METRICS = ("miou", "pixel_acc")  # best / median / worst over whole images
LOWER_IS_BETTER = {"assd", "mean_assd"}
SampleFigure = tuple[str, str, list[tuple[str, int]], np.ndarray]  # (file name, title, picks, values per image)
LOSS_IMAGES = 16  # the PSPNet write-up shows 16 lowest-loss and 16 highest-loss images


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
        "weights": trained.weights,  # "ema": the moving average train.ema kept; "trained": the weights themselves
        "split": result.split,
        "images": int(result.scores.indices.size),
        "image_size": getattr(trained.job.data, "image_size", None),
        "threshold": result.threshold if trained.is_binary else None,
        "protocol": result.protocol.record(),  # the grid counted on, whole image or sliding window, TTA
        "class_names": trained.class_names,
        "metrics": result.summary(),
        "confusion_matrix": result.confusion.mat.tolist(),
    }
    path.write_text(json.dumps(json_safe(record), indent=1) + "\n")
    return record


def write_per_image(result: Evaluation, path: Path) -> None:
    table = result.scores.scores()
    names = result.trained.class_names
    columns = ["index", "name", "loss", "pixel_acc", "miou", "mean_dice"] + (["mean_assd"] if "assd" in table else [])
    for metric in ("iou", "dice") + (("assd",) if "assd" in table else ()):
        columns += [f"{metric}/{name}" for name in names]

    def cell(value: float) -> str:
        return "" if math.isnan(value) else f"{value:.6g}"

    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(columns)
        for row, (index, name) in enumerate(zip(result.scores.indices, sample_names(result))):
            values = [result.image_losses[row], table["pixel_acc"][row], table["miou"][row], table["mean_dice"][row]]
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


def lowest_and_highest(values: np.ndarray, count: int) -> tuple[list[int], list[int]]:
    """Rows of the `count` lowest values (lowest first) and of the `count` highest (highest first), nan
    left out; ties keep row order. With fewer than 2 x count images the two lists share rows."""
    defined = np.flatnonzero(~np.isnan(values))
    ascending = defined[np.argsort(values[defined], kind="stable")].tolist()
    descending = defined[np.argsort(-values[defined], kind="stable")].tolist()
    return ascending[:count], descending[:count]


@torch.inference_mode()
def predictions_for(result: Evaluation, rows: list[int]) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """{row: (display image, target, prediction)} on the grid the scores were counted on, the model run
    again (with the evaluation's protocol) on just these samples."""
    trained, indices = result.trained, result.scores.indices
    view = ScoringView(result.dataset, trained.job.data)
    scorer = Scorer(trained.model, None, result.threshold, trained.device, protocol=result.protocol,
                    fill=padding_fill(trained.job.data, trained.in_channels))
    found = {}
    for row in rows:
        _, image, target = view[int(indices[row])]
        ((labels, predicted),) = scorer.score([image], [target])
        shown = upsample(image[:3].float(), tuple(labels.shape[-2:]))  # the photo on the label's grid
        found[row] = (figures.display_image(shown), labels[0].cpu().numpy(), predicted[0].cpu().numpy())
    return found


def sample_choices(table: dict[str, np.ndarray], names: list[str]) -> list[SampleFigure]:
    """(file name, title, picks, values) of every best / median / worst figure with a defined value to show."""
    candidates = []  # (file name, what is shown, metric, values per image)
    for metric in PER_CLASS_SAMPLE_METRICS:
        if metric in table:
            candidates += [(f"samples_{metric}_{file_safe(name)}.png", f"{metric} of {name}", metric,
                            table[metric][:, c]) for c, name in enumerate(names)]
    candidates += [(f"samples_{metric}.png", f"{metric} per image", metric, table[metric])
                   for metric in IMAGE_SAMPLE_METRICS]
    choices = []
    for file_name, what, metric, values in candidates:
        picks = best_median_worst(values, metric in LOWER_IS_BETTER)
        if picks:
            choices.append((file_name, f"{what} ({int((~np.isnan(values)).sum())} images)", picks, values))
    return choices


def write_figures(result: Evaluation, folder: Path, loss_images: int = LOSS_IMAGES) -> list[Path]:
    trained = result.trained
    names, palette = trained.class_names, trained.palette
    table = result.scores.scores()
    row_names = sample_names(result)
    choices = sample_choices(table, names)
    lowest, highest = lowest_and_highest(result.image_losses, loss_images)
    shown = predictions_for(result, sorted({row for _, _, picks, _ in choices for _, row in picks}
                                           | set(lowest) | set(highest)))
    written = []
    for file_name, title, picks, values in choices:
        rows = [figures.SampleRow(f"{which}: {values[row]:.3g}\n{row_names[row]}", *shown[row])
                for which, row in picks]
        written.append(figures.save(figures.sample_grid(rows, names, palette, title), folder / file_name))
    scored = int((~np.isnan(result.image_losses)).sum())
    for file_name, which, rows in (("lowest_loss.png", "lowest", lowest), ("highest_loss.png", "highest", highest)):
        if rows:
            tiles = [figures.SampleRow(f"{result.image_losses[row]:.3g}  {row_names[row]}", *shown[row])
                     for row in rows]
            title = (f"{len(rows)} {which}-loss {result.split} images of {scored} "
                     f"({trained.job.loss.name} per image, {which} first)")
            written.append(figures.save(figures.sample_tiles(tiles, names, palette, title), folder / file_name))
    stats = result.confusion.compute()
    iou_title = f"IoU per class ({result.split}, mIoU {stats['miou']:.3f})"
    written.append(figures.save(figures.iou_bar_chart(names, stats["iou"].tolist(), iou_title),
                                folder / "iou_per_class.png"))
    written.append(figures.save(figures.confusion_heatmap(result.confusion.mat.numpy(), names),
                                folder / "confusion_matrix.png"))
    written.append(figures.save(figures.box_plots(table["dice"], names, "Dice", "Dice per image and class"),
                                folder / "dice_per_image.png"))
    if "assd" in table:
        assd_plots = figures.box_plots(table["assd"], names, "ASSD (pixels)", "ASSD per image and class")
        written.append(figures.save(assd_plots, folder / "assd_per_image.png"))
    return written


def write_outputs(result: Evaluation, out: Path, with_figures: bool = True,
                  loss_images: int = LOSS_IMAGES) -> list[Path]:
    """loss_images: how many lowest- and highest-loss images to show (0: neither figure)."""
    out.mkdir(parents=True, exist_ok=True)
    write_metrics(result, out / "metrics.json")
    write_per_image(result, out / "per_image.csv")
    written = [out / "metrics.json", out / "per_image.csv"]
    return written + (write_figures(result, out / "figures", loss_images) if with_figures else [])
