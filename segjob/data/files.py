"""Reading image and label files with PIL, and finding everything wrong with them.

    image, (width, height) = read_image(path, decode_size)   # uint8 Image [3, h, w], original size
    raw, (width, height) = read_labels(path, coding, grid)   # label values as stored, on the image's grid
    size, findings = inspect_image(path, decode_size)        # full decode; [] when the file is fine
    size, findings = inspect_labels(path, coding, "trimap")

Loading is lenient where the content is still right (a greyscale, palette or RGBA photo is
converted to RGB; a GIF or PNG behind a .jpg name is read as what it is) and strict where
it is not (an RGB colour mask where label values are expected). Inspection reports both
kinds, the first as warnings: the published Pet set has such files.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision import tv_tensors

from segjob.data.labels import IGNORE_INDEX, ColourCoding, IndexCoding

# What a file's name promises; PIL's format names.
FORMAT_OF_SUFFIX = {
    ".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".gif": "GIF",
    ".tif": "TIFF", ".tiff": "TIFF", ".webp": "WEBP",
}  # fmt: skip
IMAGE_SUFFIXES = tuple(FORMAT_OF_SUFFIX)
# Errors PIL and its decoders raise on files that are not what they should be.
READ_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, EOFError)

DecodeSize = Callable[[int, int], tuple[int, int]]  # (width, height) on disk -> smallest useful (width, height)
LabelCoding = IndexCoding | ColourCoding


@dataclass(frozen=True)
class Finding:
    """One thing wrong with a sample, naming the file. Fatal ones stop training; the rest are warnings."""

    message: str
    fatal: bool = True


class LabelFileError(ValueError):
    """A label file that reads but cannot be used as labels (e.g. a colour mask where values are expected)."""


# --- reading ---------------------------------------------------------------------------


def read_image(path: Path, decode_size: DecodeSize | None = None) -> tuple[tv_tensors.Image, tuple[int, int]]:
    """The image as uint8 RGB [3, h, w] and its (width, height) on disk. A JPEG larger than
    decode_size asks for is decoded at 1/2, 1/4 or 1/8 scale (PIL's draft: the DCT is
    scaled, so the reduced pixels cover the same field of view)."""
    with Image.open(path) as file:
        original = file.size
        if decode_size is not None:
            file.draft("RGB", decode_size(*original))  # a no-op for formats other than JPEG
        array = np.array(file.convert("RGB"))  # a writable copy torch can own
    return tv_tensors.Image(torch.from_numpy(array).permute(2, 0, 1)), original


def read_labels(path: Path, coding: LabelCoding,
                grid: tuple[int, int] | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """Label values as stored ([H, W] for index codings, [H, W, 3] for colour ones) and the
    file's (width, height). With `grid` (width, height) smaller than the file, the values are
    first resampled onto it with nearest (pixel centres, as the image's draft decoding keeps
    them): the cheapest place to shrink a label map, before it becomes an array."""
    with Image.open(path) as file:
        size = file.size
        if grid is not None and grid != size and grid[0] <= size[0] and grid[1] <= size[1]:
            file = file.resize(grid, Image.Resampling.NEAREST)
        return _label_array(file, coding, path), size


def _label_array(file: Image.Image, coding: LabelCoding, path: Path) -> np.ndarray:
    if coding.colour:
        if file.mode not in ("RGB", "RGBA", "P"):
            raise LabelFileError(f"{path} is a {file.mode} image; the job's palette expects colour-coded RGB masks")
        return np.asarray(file.convert("RGB") if file.mode == "P" else file)[..., :3]
    if file.mode == "1":
        file = file.convert("L")  # bilevel PNGs read as booleans otherwise
    array = np.asarray(file)
    if array.ndim == 3:
        colours = array[..., :3] if array.shape[-1] >= 3 else array[..., :1]
        if not (colours == colours[..., :1]).all():
            raise LabelFileError(
                f"{path} is a colour ({file.mode}) mask; expected one label value per pixel (an 8-bit L or P PNG)"
            )
        array = colours[..., 0]  # the label sits in every channel
    return array


# --- inspecting -------------------------------------------------------------------------


def inspect_image(path: Path, decode_size: DecodeSize | None = None) -> tuple[tuple[int, int] | None, list[Finding]]:
    """(width, height) and the problems of one image file, decoding it fully as training would."""
    if not path.is_file():
        return None, [Finding(f"image {path} is missing")]
    findings: list[Finding] = []
    try:
        with Image.open(path) as file:
            size, mode, kind = file.size, file.mode, file.format
            expected = FORMAT_OF_SUFFIX.get(path.suffix.lower())
            if expected and kind != expected:
                findings.append(Finding(f"image {path} is really a {kind} file behind a {path.suffix} name; "
                                        "it is read as it is, but convert or rename it", fatal=False))
            if getattr(file, "n_frames", 1) > 1:
                findings.append(Finding(f"image {path} has {file.n_frames} frames; the first is used", fatal=False))
            if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in file.info):
                findings.append(Finding(f"image {path} has an alpha channel ({mode}); it is dropped", fatal=False))
            elif mode == "CMYK":
                findings.append(Finding(f"image {path} is CMYK; it is converted to RGB, colours may shift",
                                        fatal=False))
            elif mode.startswith(("I", "F")):
                return size, [Finding(f"image {path} has {mode} pixels (16-bit or float); "
                                      "expected 8-bit RGB or greyscale")]
            if decode_size is not None:
                file.draft("RGB", decode_size(*size))
            file.load()  # the whole file: a truncated one fails here
    except UnidentifiedImageError:
        return None, [Finding(f"image {path} is not an image file PIL can read")]
    except Exception as error:  # noqa: BLE001 - every decoder failure is a finding, never a crash
        return None, [Finding(f"image {path} is truncated or corrupt ({_one_line(error)})")]
    return size, findings


def inspect_labels(path: Path, coding: LabelCoding, kind: str = "mask") -> tuple[tuple[int, int] | None, list[Finding]]:
    """(width, height) and the problems of one label file: format, mode, values outside the coding."""
    if not path.is_file():
        return None, [Finding(f"{kind} {path} is missing")]
    findings: list[Finding] = []
    try:
        with Image.open(path) as file:
            size = file.size
            if file.format == "JPEG":
                findings.append(Finding(f"{kind} {path} is a JPEG: lossy compression changes label values at edges; "
                                        "save it as PNG"))
            if not coding.colour and file.mode in ("RGB", "RGBA"):
                findings.append(Finding(f"{kind} {path} repeats its labels in every colour channel ({file.mode}); "
                                        "an 8-bit L or P PNG is expected", fatal=False))
            raw = _label_array(file, coding, path)
    except LabelFileError as error:
        return None, [Finding(f"{kind} {error}")]
    except UnidentifiedImageError:
        return None, [Finding(f"{kind} {path} is not an image file PIL can read")]
    except Exception as error:  # noqa: BLE001
        return None, [Finding(f"{kind} {path} is truncated or corrupt ({_one_line(error)})")]
    findings += label_value_findings(raw, coding, f"{kind} {path}")
    return size, findings


def label_value_findings(raw: np.ndarray, coding: LabelCoding, what: str) -> list[Finding]:
    """Values outside the coding (fatal), and a mask with no labelled pixel at all (a warning)."""
    bad = coding.invalid_values(raw)
    if bad:
        shown = ", ".join(str(value) for value in bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
        return [Finding(f"{what} has values {shown} outside the dataset's {coding.describe()}")]
    if (coding.decode(raw) == IGNORE_INDEX).all():
        return [Finding(f"{what} has no labelled pixel (all ignored)", fatal=False)]
    return []


def size_mismatch(image_path: Path, image_size: tuple[int, int], label_path: Path, label_size: tuple[int, int],
                  kind: str) -> str:
    return (f"image {image_path} is {image_size[0]}x{image_size[1]} but its {kind} {label_path} is "
            f"{label_size[0]}x{label_size[1]}; fix or remove the pair")


def _one_line(error: BaseException) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())
