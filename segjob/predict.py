"""Segment images with a trained checkpoint; optionally export the model to ONNX. No Ray.

    python -m segjob.predict ./best cat.jpg dog.png --out predictions/
    python -m segjob.predict s3://bucket/runs/leaf leaf1.jpg --out leaf/ --threshold 0.4
    python -m segjob.predict ./nyu_best rgb1.png rgb2.png --depth d1.png d2.png --out nyu/
    python -m segjob.predict ./best cat.jpg --out predictions/ --export-onnx model.onnx
    python -m segjob.predict ./best street.png --out streets/ --tta-flip --tta-scales 0.75 1 1.25

Each image goes through the dataset's evaluation transform (resize to data.image_size,
squashed or fitted and padded as the job says; ImageNet normalisation), the model runs over it
whole, or in sliding windows of data.crop.size where the job trained on crops, and its logits
are upsampled (bilinear) to the image's own size, as evaluate scores. --tta-flip and
--tta-scales add test-time views (a mirrored one; multiples of the job's scale) whose
probabilities are averaged. The dataset is built only when --data (or --set
data.root=...) says where it is; otherwise class names and colours come from the checkpoint's
job. Where to read data and which endpoint to reach never come from the checkpoint.
For every image STEM, --out gets:

    STEM.mask.png      the class index of every pixel (a palette PNG: the values are the
                       indices, viewers show the dataset's colours)
    STEM.overlay.png   the image with each class tinted in its colour
    STEM.prob.png      two-class models: the foreground probability, 0..255 (one-channel
                       sigmoid models: their lesion/foreground map; softmax: class 1)

and predictions.json lists them with the share of pixels of each class. RGB-D models take
one depth file per image (--depth, in the same order): .npy in metres, or a 16-bit PNG in
millimetres (the Kinect/NYUv2 convention).

--export-onnx writes the model (batch size free, input size data.image_size; weights over
1 GiB in FILE.onnx.data beside it) with torch's exporter and runs onnxruntime on a sample
against PyTorch; the largest difference is reported, and the command fails when it is
beyond 1e-3 (+1e-3 relative).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from PIL.Image import DecompressionBombError
from torchvision import tv_tensors
from tqdm import tqdm

from segjob.data.labels import IGNORE_INDEX
from segjob.data.transforms import Depth, build_transform, padding_fill
from segjob.engine.evaluation import logits_of
from segjob.engine.inference import Predictor, Protocol, protocol_of
from segjob.errors import ArgumentParser, UserError, exits_cleanly_on_user_error, setup_logging
from segjob.learning.metrics import predict_labels
from segjob.results import figures
from segjob.results.arguments import (
    add_checkpoint_arguments,
    check_output_file,
    check_output_folder,
    trained_from_arguments,
)
from segjob.results.protocol_arguments import add_protocol_arguments, check_protocol_arguments, protocol_from_arguments
from segjob.results.trained import Trained

log = logging.getLogger("segjob")

ONNX_ATOL = 1e-3
EXTERNAL_DATA_BYTES = 1 << 30  # ONNX files are protobufs (2 GiB at most): bigger weights go to FILE.onnx.data
ONNX_RTOL = 1e-3
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")  # torch's exporter needs the first two, the check the third


@dataclass
class Prepared:
    """One image ready for the model, and how to map the prediction back to it."""

    path: Path
    rgb: np.ndarray  # uint8 [H, W, 3], the image as read
    tensor: torch.Tensor  # float32 [C, S, S], as the dataset would give it
    content: tuple[int, int]  # (rows, cols) of the tensor holding the image; the rest is padding


# --- reading ----------------------------------------------------------------------------


def too_large(path: Path, error: DecompressionBombError) -> UserError:
    """PIL refuses images past twice Image.MAX_IMAGE_PIXELS (a decompression bomb may be a small file)."""
    found = re.search(r"\((\d+) pixels\)", str(error))
    size = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
    return UserError(f"{path}: the image is too large to read ({size}; the limit is "
                     f"{2 * (Image.MAX_IMAGE_PIXELS or 0):,} pixels); scale it down first")


@contextmanager
def reading_image(path: Path):
    """PIL's errors about one image file as one line that names it."""
    try:
        yield
    except FileNotFoundError:
        raise UserError(f"{path}: no such image") from None
    except DecompressionBombError as error:
        raise too_large(path, error) from None
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise UserError(f"{path}: cannot read it as an image ({error})") from None


def check_image(path: Path) -> None:
    """Open the file's header only (format, size): cheap enough to do for every image up front."""
    with reading_image(path), Image.open(path):
        pass


def read_rgb(path: Path) -> np.ndarray:
    with reading_image(path), Image.open(path) as file:
        return np.asarray(file.convert("RGB"))


def read_depth(path: Path, size: tuple[int, int]) -> np.ndarray:
    """Depth in metres, float32 [H, W]: .npy in metres, or a 16-bit PNG in millimetres."""
    try:
        if path.suffix.lower() == ".npy":
            depth = np.load(path, allow_pickle=False).astype(np.float32)
        else:
            with Image.open(path) as file:
                if file.mode not in ("I;16", "I;16B", "I;16L", "I"):
                    raise UserError(f"{path}: depth PNGs must be 16-bit millimetres (this one is mode {file.mode}); "
                                    f"or give a .npy in metres")
                depth = np.asarray(file, dtype=np.float32) / 1000.0
    except FileNotFoundError:
        raise UserError(f"{path}: no such depth file") from None
    except DecompressionBombError as error:
        raise too_large(path, error) from None
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise UserError(f"{path}: cannot read it as a depth map ({error})") from None
    depth = np.squeeze(depth)
    if depth.shape != size:
        raise UserError(f"{path}: depth is {depth.shape[1]}x{depth.shape[0]} but its image is {size[1]}x{size[0]}; "
                        f"give a depth map of the image's size")
    return depth


def evaluation_transform(trained: Trained):
    """The dataset's own evaluation transform (its depth statistics included) when the data is
    here, else the one the job's data section describes."""
    if trained.datasets is not None:
        return trained.datasets[1].transform
    if trained.in_channels == 4 and not hasattr(trained.job.data, "depth_mean"):
        log.warning("the job's data section has no depth statistics: depth is normalised with mean 0 and std 1")
    return build_transform(trained.job.data, train=False)  # depth statistics from the data section


def prepare(trained: Trained, path: Path, depth_path: Path | None, transform) -> Prepared:
    rgb = read_rgb(path)
    height, width = rgb.shape[:2]
    sample = {
        "image": tv_tensors.Image(torch.from_numpy(rgb.copy()).permute(2, 0, 1)),
        # zeros mark the image's pixels; padding comes back as IGNORE_INDEX, which shows where it is
        "mask": tv_tensors.Mask(torch.zeros(height, width, dtype=torch.uint8)),
    }
    if depth_path is not None:
        sample["depth"] = Depth(torch.from_numpy(read_depth(depth_path, (height, width))).unsqueeze(0))
    sample = transform(sample)
    tensor = sample["image"].as_subclass(torch.Tensor)
    if "depth" in sample:
        tensor = torch.cat([tensor, sample["depth"].as_subclass(torch.Tensor).float()])
    if tensor.shape[0] != trained.in_channels:
        raise UserError(f"{path}: gives {tensor.shape[0]} input channels, the model takes {trained.in_channels}"
                        + ("; pass a depth file per image with --depth" if trained.in_channels == 4 else ""))
    inside = sample["mask"].as_subclass(torch.Tensor) != IGNORE_INDEX
    content = (int(inside.any(dim=1).sum()), int(inside.any(dim=0).sum()))
    return Prepared(path, rgb, tensor, content)


# --- predicting -------------------------------------------------------------------------


@dataclass
class Prediction:
    labels: np.ndarray  # int64 [H, W] at the image's size
    probability: np.ndarray | None  # float32 [H, W]: the foreground probability (two-class models)


def probability_of(trained: Trained, logits: torch.Tensor) -> torch.Tensor | None:
    if logits.shape[1] == 1:
        return torch.sigmoid(logits[:, 0].float())
    if trained.num_classes == 2:
        return torch.softmax(logits.float(), dim=1)[:, 1]
    return None


@torch.inference_mode()
def predict(trained: Trained, prepared: list[Prepared], threshold: float,
            protocol: Protocol | None = None) -> list[Prediction]:
    """The image's own pixels at the model's scale (padding cut off), run per the protocol (the job's by
    default), logits upsampled (bilinear) to each image's size, then labels."""
    predictor = Predictor(trained.model, protocol or protocol_of(trained.job),
                          padding_fill(trained.job.data, trained.in_channels), trained.device)
    images = [item.tensor[:, :item.content[0], :item.content[1]] for item in prepared]
    sizes = [item.rgb.shape[:2] for item in prepared]
    predictions = []
    for logits in predictor(images, sizes):
        probability = probability_of(trained, logits[None])
        predictions.append(Prediction(
            predict_labels(logits[None], threshold)[0].cpu().numpy(),
            None if probability is None else probability[0].cpu().numpy(),
        ))
    return predictions


def output_stems(paths: list[Path]) -> list[str]:
    """File stems, made unique (a/x.jpg and b/x.jpg become x and x-2)."""
    seen: dict[str, int] = {}
    stems = []
    for path in paths:
        count = seen.get(path.stem, 0) + 1
        seen[path.stem] = count
        stems.append(path.stem if count == 1 else f"{path.stem}-{count}")
    return stems


def write_prediction(trained: Trained, item: Prepared, prediction: Prediction, out: Path, stem: str) -> dict[str, Any]:
    mask = Image.fromarray(prediction.labels.astype(np.uint8), mode="P")
    mask.putpalette(figures.palette_array(trained.palette).reshape(-1).tolist())
    files = {"mask": out / f"{stem}.mask.png", "overlay": out / f"{stem}.overlay.png"}
    mask.save(files["mask"])
    Image.fromarray(figures.overlay(item.rgb, prediction.labels, trained.palette)).save(files["overlay"])
    if prediction.probability is not None:
        files["probability"] = out / f"{stem}.prob.png"
        Image.fromarray(figures.probability_image(prediction.probability)).save(files["probability"])
    counts = np.bincount(prediction.labels.reshape(-1), minlength=trained.num_classes)
    shares = [round(float(count) / prediction.labels.size, 6) for count in counts]
    return {
        "image": str(item.path),
        "size": [int(item.rgb.shape[1]), int(item.rgb.shape[0])],
        "files": {kind: path.name for kind, path in files.items()},
        "class_share": dict(zip(trained.class_names, shares)),
    }


# --- ONNX -------------------------------------------------------------------------------


def check_onnx_packages() -> None:
    """Import what --export-onnx needs before anything else runs: a missing package is one line."""
    missing = []
    for name in ONNX_PACKAGES:
        try:
            importlib.import_module(name)
        except (ImportError, OSError):  # OSError: a native library of the package that won't load
            missing.append(name)
    if missing:
        raise UserError(f"--export-onnx: needs {', '.join(missing)}, which cannot be imported here; "
                        f"install segjob's onnx extra (pip install 'segjob[onnx]') or leave --export-onnx out")


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path, name: str = "model") -> float:
    """Export with torch.onnx (dynamic batch), check onnxruntime against PyTorch on `example`;
    returns the largest absolute difference. An architecture the exporter can't take is a UserError."""
    import onnxruntime  # here: only this option needs it

    model = model.eval().cpu()
    example = example.cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=4096)
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    try:
        torch.onnx.export(model, (example,), str(path), input_names=["images"], output_names=["logits"],
                          dynamic_shapes=({0: batch},), dynamo=True, verbose=False,
                          external_data=weight_bytes > EXTERNAL_DATA_BYTES)
    except Exception as error:  # the exporter's errors have many types; each means "cannot export"
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        # torch.export's own reason sits on a "<class ...>: ..." line of its exception summary
        reason = next((line for line in lines if line.startswith("<class")), lines[0] if lines else "")
        raise UserError(f"--export-onnx: the {name} model cannot be exported to ONNX by torch.onnx.export "
                        f"({type(error).__name__}: {reason[:300]})") from None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.inference_mode():
        expected = logits_of(model, example).float().numpy()
    (actual,) = session.run(["logits"], {"images": example.numpy()})
    difference = float(np.abs(actual - expected).max())
    if not np.allclose(actual, expected, atol=ONNX_ATOL, rtol=ONNX_RTOL):
        raise UserError(f"--export-onnx: {path} differs from PyTorch by up to {difference:.3g} on a sample "
                        f"(tolerance {ONNX_ATOL} + {ONNX_RTOL} relative); the export is not usable as it is")
    return difference


# --- the command ------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m segjob.predict", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_arguments(parser)
    parser.add_argument("images", nargs="*", type=Path, metavar="IMAGE", help="image files (JPEG, PNG, ...)")
    parser.add_argument("--out", type=Path, default=None, help="output folder for masks, overlays and probability maps")
    parser.add_argument("--depth", nargs="+", type=Path, default=None, metavar="DEPTH",
                        help="RGB-D models: one depth file per image, in order (.npy metres or 16-bit PNG millimetres)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="one-channel models: foreground above this probability "
                             "(default: the job's loss.threshold)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per forward pass")
    add_protocol_arguments(parser, grid=False)
    parser.add_argument("--export-onnx", type=Path, default=None, metavar="FILE.onnx",
                        help="also export the model to ONNX and check it against PyTorch with onnxruntime")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    args = parser.parse_args(argv)
    if not args.images and args.export_onnx is None:
        parser.error("give images to segment, --export-onnx, or both")
    if args.images and args.out is None:
        parser.error("--out DIR is needed for the predictions")
    if args.depth is not None and len(args.depth) != len(args.images):
        parser.error(f"--depth: {len(args.depth)} depth files for {len(args.images)} images; "
                     f"give one per image, in order")
    if args.threshold is not None and not 0.0 < args.threshold < 1.0:
        parser.error("--threshold must be between 0 and 1")
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    check_protocol_arguments(parser, args)
    return args


@exits_cleanly_on_user_error
def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    if args.export_onnx is not None:
        check_onnx_packages()
        check_output_file(args.export_onnx, "--export-onnx")
    if args.out is not None:
        check_output_folder(args.out, "--out")
    for path in args.images:  # every header first: a bad image is refused before any prediction is written
        check_image(path)
    # the dataset only when asked for (--data, --set data.root=...): classes and colours come from the job
    trained = trained_from_arguments(args, with_data=False)
    if trained.in_channels == 4 and args.images and args.depth is None:
        raise UserError(f"{trained.source}: an RGB-D model (4 input channels); "
                        f"pass one depth file per image with --depth")
    if trained.in_channels != 4 and args.depth is not None:
        raise UserError(f"--depth: the model takes {trained.in_channels} input channels, no depth")
    threshold = trained.threshold if args.threshold is None else args.threshold
    protocol = protocol_from_arguments(trained.job, args)
    transform = evaluation_transform(trained)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    depths = args.depth or [None] * len(args.images)
    stems = output_stems(args.images)
    records = []
    batches = range(0, len(args.images), args.batch_size)
    for start in tqdm(batches, desc="predict", unit="batch", disable=not args.progress, file=sys.stderr,
                      dynamic_ncols=True):
        end = start + args.batch_size
        chunk = [prepare(trained, path, depth, transform)
                 for path, depth in zip(args.images[start:end], depths[start:end])]
        for item, prediction, stem in zip(chunk, predict(trained, chunk, threshold, protocol), stems[start:end]):
            records.append(write_prediction(trained, item, prediction, args.out, stem))
    summary: dict[str, Any] = {"checkpoint": trained.source, "class_names": trained.class_names,
                               "protocol": protocol.record(), "images": records}
    if trained.is_binary:
        summary["threshold"] = threshold
    if args.export_onnx is not None:
        size = trained.job.data.image_size
        example = (prepare(trained, args.images[0], depths[0], transform).tensor.unsqueeze(0) if args.images
                   else torch.randn(1, trained.in_channels, size, size, generator=torch.Generator().manual_seed(0)))
        difference = export_onnx(trained.model, example, args.export_onnx, trained.job.model.name)
        trained.model.to(trained.device)
        summary["onnx"] = {"file": str(args.export_onnx), "input": [None, trained.in_channels, size, size],
                           "max_abs_diff": difference}
        log.info("exported %s; onnxruntime vs PyTorch on a sample: max abs diff %.3g", args.export_onnx, difference)
    if records:
        (args.out / "predictions.json").write_text(json.dumps(summary, indent=1) + "\n")
        log.info("wrote masks and overlays for %d images to %s", len(records), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
