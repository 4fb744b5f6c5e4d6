"""How a label file's pixel values become classes, and the colours classes are drawn in.

    coding = IndexCoding({2: 0, 1: 1, 3: 2}, ignore=[])         # Pets trimap values -> classes
    classes = coding.decode(raw)                                # uint8, IGNORE_INDEX where ignored
    coding.invalid_values(raw)                                  # [99]: neither a class nor ignored
    palette = default_palette(21)                               # PASCAL VOC's colour map

Loading maps a value the coding does not know to IGNORE_INDEX, so training never crashes on
one stray pixel; `python -m segjob.check` (and the check before training) reports it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

# Label for pixels that count for nothing: padding, VOC's void, CamVid's unlabelled.
IGNORE_INDEX = 255

Palette = list[tuple[int, int, int]]


def default_palette(num_classes: int) -> Palette:
    """PASCAL VOC's colour map (bit-interleaved class index): distinct, and the colours VOC files use."""
    palette = []
    for label in range(num_classes):
        red = green = blue = 0
        value = label
        for bit in range(8):
            red |= ((value >> 0) & 1) << (7 - bit)
            green |= ((value >> 1) & 1) << (7 - bit)
            blue |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        palette.append((red, green, blue))
    return palette


class IndexCoding:
    """Label files whose pixel values are codes (mode L or P PNGs, .mat arrays): a table to classes."""

    colour = False

    def __init__(self, classes: Mapping[int, int], ignore: Iterable[int] = (), size: int = 256):
        # one entry past the codes: every value >= size (16-bit files) is clamped onto it, and it ignores
        self.size = size
        self.table = np.full(size + 1, IGNORE_INDEX, dtype=np.uint8)
        self.valid = np.zeros(size, dtype=bool)
        for value, label in classes.items():
            self.table[value] = label
            self.valid[value] = True
        self.valid[list(ignore)] = True
        self.known = sorted(int(v) for v in np.flatnonzero(self.valid))

    def decode(self, raw: np.ndarray) -> np.ndarray:
        if raw.dtype != np.uint8 or self.size < 256:
            raw = np.minimum(raw, self.size)
        return self.table[raw]

    def invalid_values(self, raw: np.ndarray) -> list[int]:
        present = np.flatnonzero(np.bincount(raw.ravel(), minlength=self.size))
        return [int(value) for value in present if value >= self.size or not self.valid[value]]

    def describe(self) -> str:
        return "values " + _ranges(self.known)


class ColourCoding:
    """RGB label files where each class has a colour (a palette in the job)."""

    colour = True

    def __init__(self, palette: Palette, ignore_colour: tuple[int, int, int] | None = None):
        self.codes = np.array([_pack(colour) for colour in palette], dtype=np.int64)
        self.ignore_code = _pack(ignore_colour) if ignore_colour is not None else None
        order = np.argsort(self.codes)
        self.sorted_codes, self.sorted_labels = self.codes[order], order.astype(np.uint8)

    def _codes_of(self, raw: np.ndarray) -> np.ndarray:
        rgb = raw[..., :3].astype(np.int64)
        return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]

    def decode(self, raw: np.ndarray) -> np.ndarray:
        codes = self._codes_of(raw)
        position = np.clip(np.searchsorted(self.sorted_codes, codes), 0, len(self.sorted_codes) - 1)
        found = self.sorted_codes[position] == codes
        return np.where(found, self.sorted_labels[position], IGNORE_INDEX).astype(np.uint8)

    def invalid_values(self, raw: np.ndarray) -> list[tuple[int, int, int]]:
        present = np.unique(self._codes_of(raw))
        allowed = set(self.codes.tolist()) | ({self.ignore_code} if self.ignore_code is not None else set())
        return [_unpack(code) for code in present.tolist() if code not in allowed]

    def describe(self) -> str:
        return "the palette's colours" + (" and ignore_color" if self.ignore_code is not None else "")


def _pack(colour: tuple[int, int, int]) -> int:
    red, green, blue = colour
    return (int(red) << 16) | (int(green) << 8) | int(blue)


def _unpack(code: int) -> tuple[int, int, int]:
    return (code >> 16) & 255, (code >> 8) & 255, code & 255


def _ranges(values: list[int]) -> str:
    """[0, 1, 2, 3, 255] -> '0..3, 255'."""
    parts, start = [], None
    for i, value in enumerate(values):
        if start is None:
            start = value
        if i + 1 == len(values) or values[i + 1] != value + 1:
            parts.append(str(start) if start == value else f"{start}..{value}")
            start = None
    return ", ".join(parts)
