"""Metric cost per 512x512 image against the evaluation step that produces the prediction.

    .venv/bin/python bench/metrics.py [--size 512] [--images 4] [--classes 3 8] [--repeats 3] [--threads 2]

Single process, no Ray, CPU. The evaluation step is a U-Net forward pass (the default
model: base 32, depth 4, with the largest class count measured) on a batch of `--images`
images, per image. The metrics, per image:
the labels from the logits (argmax), the engine's confusion-matrix update (one bincount),
the per-image matrices python -m segjob.evaluate keeps, and ASSD per class (surface pixels,
nearest ones through k-d trees).
Masks are synthetic shapes (segjob.data.synthetic) with a prediction that differs from them
the way a decent model's does (boundaries moved by a pixel or two, a few spurious blobs,
an object missed), so ASSD does its full work. Medians over `--repeats`; goal: metric
computation <= 5% of an evaluation step.

The second table (--part inference, or all) times one image as scoring runs it (segjob.engine.
inference): the default U-Net over an image at the job's scale (--view, CamVid's 360x480 by
default) whose label file is --label-scale times larger (CamVid's 720x960 photos at image_size
480), prediction plus confusion-matrix update, per protocol: counted on the model's input grid
(labels resized; segjob's count before eval.grid) or on the label's own grid (logits upsampled),
whole image or sliding windows of --window (overlap 0.5, Gaussian or uniform blending), and
test-time augmentation (a flip; a flip and scales 0.75/1/1.25). Ratios are against the whole
image on the original grid, the default protocol; goal for the original grid: <= 5% over the
input grid.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import torch
from scipy import ndimage

from segjob.data.synthetic import render_sample
from segjob.engine.evaluation import on_input_grid
from segjob.engine.inference import Predictor, Protocol, upsample
from segjob.job.schema import UNetConfig
from segjob.learning.metrics import ConfusionMatrix, ImageScores, assd_per_class, per_image_confusion, predict_labels
from segjob.models import create_model


def masks(count: int, size: int, num_classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(target, prediction) int64 [count, size, size]: shapes, and a plausible imperfect prediction of them."""
    rng = np.random.default_rng(seed)
    targets, predictions = [], []
    for _ in range(count):
        _, target = render_sample(rng, size, num_classes)
        prediction = target.copy()
        for label in np.unique(target)[1:]:
            inside = target == label
            step = int(rng.integers(1, 3))
            moved = (ndimage.binary_dilation(inside, iterations=step) if rng.random() < 0.5
                     else ndimage.binary_erosion(inside, iterations=step))
            prediction[inside] = 0
            prediction[moved] = label
        for _ in range(3):  # spurious blobs
            y, x, r = rng.integers(0, size), rng.integers(0, size), rng.integers(3, size // 24)
            prediction[max(0, y - r): y + r, max(0, x - r): x + r] = rng.integers(0, num_classes)
        labels = np.unique(target)[1:]
        if labels.size:  # one object class missed entirely now and then
            missed = rng.choice(labels)
            if rng.random() < 0.3:
                prediction[prediction == missed] = 0
        targets.append(target)
        predictions.append(prediction)
    return torch.from_numpy(np.stack(targets)).long(), torch.from_numpy(np.stack(predictions)).long()


CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}
clock = time.perf_counter


def timed(fn, repeats: int) -> float:
    """Median time of fn() over repeats (wall, or this process's CPU time with --clock cpu), after a warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        started = clock()
        fn()
        times.append(clock() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--images", type=int, default=4, help="images per evaluation batch")
    parser.add_argument("--classes", type=int, nargs="+", default=[3, 8], help="class counts to measure (2..8)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--part", choices=("metrics", "inference", "all"), default="all")
    parser.add_argument("--clock", choices=tuple(CLOCK), default="wall",
                        help="cpu: this process's CPU time (all its threads), steadier on a machine others share")
    parser.add_argument("--view", type=int, nargs=2, default=[360, 480], metavar=("H", "W"),
                        help="inference: the image at the job's scale")
    parser.add_argument("--label-scale", type=float, default=2.0, help="inference: label grid / the job's scale")
    parser.add_argument("--window", type=int, default=240, help="inference: sliding window side (data.crop.size)")
    args = parser.parse_args()
    global clock
    clock = CLOCK[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.part in ("metrics", "all"):
        metric_table(args)
    if args.part in ("inference", "all"):
        inference_table(args)


def metric_table(args: argparse.Namespace) -> None:
    n, size = args.images, args.size
    print(f"# {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
          f"{n} images of {size}x{size}, median of {args.repeats}")

    images = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))
    model = create_model(UNetConfig(), 3, max(args.classes)).eval()  # the class count only sizes the last 1x1 conv
    with torch.inference_mode():
        forward_ms = timed(lambda: model(images), args.repeats) / n * 1000
    print(f"{'classes':>7} | {'forward ms':>10} | {'labels ms':>9} | {'matrix ms':>9} | {'per-image ms':>12} | "
          f"{'ASSD ms':>7} | {'engine ms':>9} | {'evaluate ms':>11} | {'engine %':>8} | {'evaluate %':>10}")
    for classes in args.classes:
        print_row(classes, n, size, args.repeats, forward_ms)


def print_row(classes: int, n: int, size: int, repeats: int, forward_ms: float) -> None:
    """Times every metric for one class count and prints its row of the table."""
    target, prediction = masks(n, size, classes)
    logits = torch.randn(n, classes, size, size, generator=torch.Generator().manual_seed(1))
    target_np, prediction_np = target.numpy(), prediction.numpy()
    per_image = lambda timing: timed(timing, repeats) / n * 1000  # noqa: E731

    labels_ms = per_image(lambda: predict_labels(logits))
    matrix_ms = per_image(lambda: ConfusionMatrix(classes).update(target, prediction))
    matrices_ms = per_image(lambda: per_image_confusion(target, prediction, classes))
    assd_ms = per_image(lambda: [assd_per_class(t, p, classes) for t, p in zip(target_np, prediction_np)])
    # what the engine's evaluation does per batch, and what python -m segjob.evaluate does
    engine_ms = per_image(lambda: ConfusionMatrix(classes).update(target, predict_labels(logits)))

    def evaluate_batch():
        predict_labels(logits)
        ImageScores(classes).update(list(range(n)), target, prediction)  # matrices and ASSD of a realistic prediction

    evaluate_ms = per_image(evaluate_batch)
    print(f"{classes:>7} | {forward_ms:>10.1f} | {labels_ms:>9.2f} | {matrix_ms:>9.2f} | {matrices_ms:>12.2f} | "
          f"{assd_ms:>7.2f} | {engine_ms:>9.2f} | {evaluate_ms:>11.2f} | {100 * engine_ms / forward_ms:>7.2f}% | "
          f"{100 * evaluate_ms / forward_ms:>9.2f}%")


def inference_table(args: argparse.Namespace) -> None:
    """Prediction + matrix update of one image per scoring protocol, and the ratio to the default one."""
    (height, width), classes = args.view, max(args.classes)
    label_size = (round(height * args.label_scale), round(width * args.label_scale))
    print(f"\n# inference: image {height}x{width} at the job's scale, labels {label_size[0]}x{label_size[1]}, "
          f"{classes} classes, U-Net (base 32, depth 4), window {args.window}, median of {args.repeats}")
    model = create_model(UNetConfig(), 3, classes).eval()
    image = torch.randn(3, height, width, generator=torch.Generator().manual_seed(2))
    target = torch.randint(0, classes, label_size, generator=torch.Generator().manual_seed(3))
    window = {"window": args.window, "overlap": 0.5}
    protocols = [
        ("whole image, input grid", Protocol(grid="input")),
        ("whole image, original grid", Protocol()),
        ("sliding window, gaussian", Protocol(blend="gaussian", **window)),
        ("sliding window, uniform", Protocol(blend="uniform", **window)),
        ("whole image + flip", Protocol(flip=True)),
        ("whole image + flip + scales 0.75/1/1.25", Protocol(flip=True, scales=(0.75, 1.0, 1.25))),
        ("sliding window + flip", Protocol(flip=True, **window)),
    ]
    times = {}
    for name, protocol in protocols:
        predictor = Predictor(model, protocol, torch.zeros(3), torch.device("cpu"))
        labels = on_input_grid(target, (height, width)) if protocol.grid == "input" else target

        def step(predictor=predictor, labels=labels):
            logits = predictor([image], [tuple(labels.shape)])[0]
            ConfusionMatrix(classes).update(labels[None], predict_labels(logits[None]))

        with torch.inference_mode():
            times[name] = timed(step, args.repeats) * 1000
    base = times["whole image, original grid"]
    print(f"{'protocol':<42} | {'ms per image':>12} | {'x whole image':>13}")
    for name, _ in protocols:
        print(f"{name:<42} | {times[name]:>12.0f} | {times[name] / base:>13.2f}")
    extra = base / times["whole image, input grid"] - 1
    print(f"original grid over input grid, whole protocol: {100 * extra:+.1f}% (goal <= 5%)")

    # the part that differs, alone (less noisy than the difference of two forward passes): what follows the forward
    logits = torch.randn(classes, height, width, generator=torch.Generator().manual_seed(4))
    on_input = on_input_grid(target, (height, width))
    with torch.inference_mode():
        forward_ms = timed(lambda: Predictor(model, Protocol(), torch.zeros(3), torch.device("cpu")).forward(
            torch.zeros(1, 3, width, width)), args.repeats) * 1000
        input_ms = timed(lambda: ConfusionMatrix(classes).update(on_input[None], predict_labels(logits[None])),
                         args.repeats) * 1000
        original_ms = timed(lambda: ConfusionMatrix(classes).update(
            target[None], predict_labels(upsample(logits, label_size)[None])), args.repeats) * 1000
    print(f"after the forward pass ({forward_ms:.0f} ms): input grid {input_ms:.1f} ms, original grid "
          f"{original_ms:.1f} ms (upsample + labels + matrix): {100 * (original_ms - input_ms) / forward_ms:+.2f}% "
          f"of the forward pass")


if __name__ == "__main__":
    main()
