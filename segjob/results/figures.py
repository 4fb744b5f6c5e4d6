"""Pictures of masks and metrics: PNGs drawn with matplotlib's Agg canvas, and colour masks.

    save(sample_grid(rows, class_names, palette, "dice: pet"), out / "samples_dice_pet.png")
    save(sample_tiles(rows, class_names, palette, "16 lowest-loss images"), out / "lowest_loss.png")
    save(iou_bar_chart(class_names, iou), out / "iou_per_class.png")
    Image.fromarray(overlay(rgb, mask, palette)).save(out / "cat.overlay.png")

Figures are `matplotlib.figure.Figure` objects on an Agg canvas, never pyplot: no display,
no global state, safe in threads and on machines without a screen. Colour helpers work on
numpy arrays: uint8 RGB [H, W, 3] images and integer label maps [H, W], where IGNORE_INDEX
shows in VOC's void colour. A class whose palette colour is black (VOC's background) is
left untinted in overlays.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from segjob.data.labels import IGNORE_INDEX
from segjob.data.transforms import IMAGENET_MEAN, IMAGENET_STD

VOID_COLOUR = (224, 224, 192)  # PASCAL VOC's colour for unlabelled pixels
DPI = 100


def new_figure(width: float, height: float, constrained: bool = True) -> Figure:
    """A figure on its own Agg canvas; constrained layout unless the caller places the axes itself."""
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained" if constrained else None)
    FigureCanvasAgg(figure)
    return figure


def save(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=DPI, facecolor="white")
    return path


# --- colour -----------------------------------------------------------------------------


def palette_array(palette: Sequence[tuple[int, int, int]]) -> np.ndarray:
    """uint8 [256, 3] lookup table: class colours, VOID_COLOUR for every other value."""
    table = np.tile(np.array(VOID_COLOUR, dtype=np.uint8), (256, 1))
    table[: len(palette)] = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    return table


def colorize(mask: np.ndarray, palette: Sequence[tuple[int, int, int]]) -> np.ndarray:
    """uint8 RGB [H, W, 3] of a label map (ignored pixels in VOID_COLOUR)."""
    return palette_array(palette)[np.clip(mask, 0, 255).astype(np.uint8)]


def overlay(image: np.ndarray, mask: np.ndarray, palette: Sequence[tuple[int, int, int]],
            alpha: float = 0.5) -> np.ndarray:
    """The image with each class tinted in its colour; black classes and ignored pixels stay untinted."""
    colours = colorize(mask, palette).astype(np.float32)
    tinted = (colours.sum(axis=-1) > 0) & (mask != IGNORE_INDEX)
    blended = image.astype(np.float32)
    blended[tinted] = (1 - alpha) * blended[tinted] + alpha * colours[tinted]
    return np.clip(blended.round(), 0, 255).astype(np.uint8)


def display_image(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """uint8 RGB [H, W, 3] from a dataset's normalised image [C, H, W] (RGB first; depth not shown)."""
    image = torch.as_tensor(image).detach().float().cpu()
    if image.shape[0] >= 3:
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        rgb = image[:3] * std + mean
    else:  # one channel: stretch to the visible range
        channel = image[:1]
        rgb = ((channel - channel.min()) / (channel.max() - channel.min()).clamp(min=1e-6)).expand(3, -1, -1)
    return (rgb.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def probability_image(probability: np.ndarray) -> np.ndarray:
    """uint8 grey [H, W] from probabilities 0..1 (255 = certain foreground)."""
    return (np.clip(probability, 0.0, 1.0) * 255).round().astype(np.uint8)


def _legend(figure: Figure, class_names: Sequence[str], palette: Sequence[tuple[int, int, int]]) -> None:
    handles = [Patch(facecolor=np.array(colour) / 255, edgecolor="black", label=name)
               for name, colour in zip(class_names, palette)]
    figure.legend(handles=handles, loc="lower center", ncols=min(len(handles), 6), fontsize="small", frameon=False)


# --- figures ----------------------------------------------------------------------------


@dataclass
class SampleRow:
    label: str  # e.g. "best: 0.912 (Abyssinian_12)"
    image: np.ndarray  # uint8 RGB [H, W, 3]
    target: np.ndarray  # label map [H, W]
    prediction: np.ndarray  # label map [H, W]
    probability: np.ndarray | None = None  # one-channel models: the foreground probability [H, W], 0..1


def sample_grid(rows: Sequence[SampleRow], class_names: Sequence[str], palette: Sequence[tuple[int, int, int]],
                title: str) -> Figure:
    """One row per sample: image, ground truth, prediction."""
    legend_rows = math.ceil(len(class_names) / 6)
    # fixed margins in inches (row labels left, titles on top, the legend below): drawing with a
    # layout engine costs twice as much, and evaluate draws a grid per metric and class
    left, right, top, bottom = 1.2, 0.1, 0.7, 0.15 + 0.25 * legend_rows
    width, height = 7.5, 2.3 * len(rows) + top + bottom
    figure = new_figure(width, height, constrained=False)
    figure.subplots_adjust(left=left / width, right=1 - right / width, top=1 - top / height, bottom=bottom / height,
                           wspace=0.05, hspace=0.08)
    axes = figure.subplots(len(rows), 3, squeeze=False)
    for row, (left, middle, right) in zip(rows, axes):
        # nearest: label maps stay crisp, and drawing skips resampling
        left.imshow(row.image, interpolation="nearest")
        middle.imshow(colorize(row.target, palette), interpolation="nearest")
        right.imshow(colorize(row.prediction, palette), interpolation="nearest")
        left.set_ylabel(row.label, fontsize="small")
        for axis in (left, middle, right):
            axis.set_xticks([])
            axis.set_yticks([])
    for axis, name in zip(axes[0], ("image", "ground truth", "prediction")):
        axis.set_title(name, fontsize="medium")
    figure.suptitle(title)
    _legend(figure, class_names, palette)
    return figure


def sample_tiles(samples: Sequence[SampleRow], class_names: Sequence[str], palette: Sequence[tuple[int, int, int]],
                 title: str, columns: int = 8) -> Figure:
    """Many samples side by side: a column each (image, ground truth, prediction, its label on top; and the
    probability map, black 0 to white 1, when the samples carry one), `columns` to a band. A figure's size
    depends only on the number of samples, so grids of the same samples (a preview per epoch) are frames
    of one animation."""
    columns = max(1, min(columns, len(samples)))
    panels = 4 if any(sample.probability is not None for sample in samples) else 3
    bands = math.ceil(len(samples) / columns)
    legend_rows = math.ceil(len(class_names) / 6)
    tile = 1.5  # inches per panel
    left, right, top, bottom, label = 0.9, 0.1, 0.4, 0.15 + 0.25 * legend_rows, 0.4
    width = left + right + tile * columns
    height = top + bottom + bands * (panels * tile + label)
    figure = new_figure(width, height, constrained=False)
    for number, sample in enumerate(samples):
        band, column = divmod(number, columns)
        shown = [(sample.image, "image"), (colorize(sample.target, palette), "ground truth"),
                 (colorize(sample.prediction, palette), "prediction")]
        if panels == 4:
            shown.append((probability_image(sample.probability) if sample.probability is not None
                           else np.zeros_like(sample.target, dtype=np.uint8), "probability"))
        for panel, (picture, row_name) in enumerate(shown):
            x = left + column * tile
            y = height - top - band * (panels * tile + label) - label - (panel + 1) * tile
            axis = figure.add_axes((x / width, y / height, 0.97 * tile / width, 0.97 * tile / height))
            axis.imshow(picture, interpolation="nearest", cmap="gray", vmin=0, vmax=255)
            axis.set_xticks([])
            axis.set_yticks([])
            if panel == 0:
                axis.set_title(sample.label, fontsize="x-small")
            if column == 0:
                axis.set_ylabel(row_name, fontsize="small")
    figure.suptitle(title)
    _legend(figure, class_names, palette)
    return figure


def class_ticks(axis: Axes, class_names: Sequence[str], slanted: bool) -> None:
    """Class names under the x axis; slanted when there are too many to fit side by side."""
    axis.set_xticks(range(len(class_names)), class_names, rotation=45 if slanted else 0,
                    ha="right" if slanted else "center")


def iou_bar_chart(class_names: Sequence[str], iou: Sequence[float], title: str = "IoU per class") -> Figure:
    values = np.nan_to_num(np.asarray(iou, dtype=float), nan=0.0)
    figure = new_figure(max(4.0, 0.55 * len(class_names) + 1.5), 3.6)
    axis = figure.subplots()
    bars = axis.bar(range(len(class_names)), values, color="#4c72b0")
    for bar, value in zip(bars, iou):
        top_centre = (bar.get_x() + bar.get_width() / 2, bar.get_height())
        axis.annotate("n/a" if math.isnan(value) else f"{value:.2f}", top_centre, ha="center", va="bottom",
                      fontsize="x-small")
    class_ticks(axis, class_names, slanted=len(class_names) > 6)
    axis.set_ylim(0, 1.08)
    axis.set_ylabel("IoU")
    axis.set_title(title)
    axis.grid(axis="y", alpha=0.3)
    return figure


def confusion_heatmap(matrix: np.ndarray, class_names: Sequence[str]) -> Figure:
    """Rows normalised to the share of each true class's pixels; counts too when the matrix is small."""
    matrix = np.asarray(matrix, dtype=np.float64)
    totals = matrix.sum(axis=1, keepdims=True)
    shares = np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)
    size = max(3.5, 0.5 * len(class_names) + 2.0)
    figure = new_figure(size + 1.0, size)
    axis = figure.subplots()
    shown = axis.imshow(shares, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    figure.colorbar(shown, ax=axis, label="share of the true class's pixels")
    ticks = range(len(class_names))
    class_ticks(axis, class_names, slanted=len(class_names) > 4)
    axis.set_yticks(ticks, class_names)
    axis.set_xlabel("predicted")
    axis.set_ylabel("ground truth")
    if len(class_names) <= 12:
        for (row, col), share in np.ndenumerate(shares):
            axis.text(col, row, f"{share:.2f}\n{int(matrix[row, col])}", ha="center", va="center", fontsize="x-small",
                      color="white" if share > 0.5 else "black")
    axis.set_title("confusion matrix (pixels)")
    return figure


def box_plots(values: np.ndarray, class_names: Sequence[str], ylabel: str, title: str) -> Figure:
    """One box per class over the images where the score is defined (values [N, K], nan skipped)."""
    columns = [values[:, c][~np.isnan(values[:, c])] for c in range(values.shape[1])]
    figure = new_figure(max(4.0, 0.6 * len(class_names) + 1.5), 3.6)
    axis = figure.subplots()
    shown = [column if column.size else np.array([np.nan]) for column in columns]
    axis.boxplot(shown, showmeans=True)
    labels = [f"{name}\n(n={column.size})" for name, column in zip(class_names, columns)]
    axis.set_xticks(range(1, len(class_names) + 1), labels, fontsize="small")
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.grid(axis="y", alpha=0.3)
    return figure


@dataclass
class Curve:
    label: str
    x: Sequence[float]
    y: Sequence[float]
    style: str = "-"
    marker: str | None = "o"
    alpha: float = 1.0


def line_plot(curves: Sequence[Curve], title: str, ylabel: str, xlabel: str = "epoch", log_y: bool = False) -> Figure:
    figure = new_figure(6.0, 3.6)
    axis = figure.subplots()
    for curve in curves:
        axis.plot(curve.x, curve.y, curve.style, marker=curve.marker, markersize=3, alpha=curve.alpha,
                  label=curve.label)
    if not curves:
        axis.text(0.5, 0.5, "nothing recorded", ha="center", va="center", transform=axis.transAxes)
    if log_y:
        axis.set_yscale("log")
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.grid(alpha=0.3)
    if curves:
        axis.legend(fontsize="small")
    return figure

