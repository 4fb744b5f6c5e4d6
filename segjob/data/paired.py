"""Datasets stored as one image file and one label file per sample (Pets, VOC, CamVid, leaf, folder).

    class VOCDataset(PairedFileDataset):
        dataset_name, label_kind = "voc", "mask"
        def image_path(self, name): ...
        def label_path(self, name): ...

A subclass says where a sample's two files are and how label values map to classes (a
coding, labels.py); loading, the size check, reduced-size JPEG decoding and inspection are
shared. The label map is resampled onto the decoded image's grid at load time, so every
later step applies identical integer operations to both.
"""

from __future__ import annotations

from abc import abstractmethod
from pathlib import Path

import numpy as np
import torch
from torchvision import tv_tensors

from segjob.data.base import SegmentationDataset
from segjob.data.files import (
    READ_ERRORS,
    Finding,
    LabelCoding,
    LabelFileError,
    inspect_image,
    inspect_labels,
    read_image,
    read_labels,
    size_mismatch,
)
from segjob.data.labels import Palette, default_palette
from segjob.data.transforms import JointTransform, Sample, resize
from segjob.errors import UserError


class PairedFileDataset(SegmentationDataset):
    dataset_name = "data"  # starts every message: "<dataset_name> sample '<name>': ..."
    label_kind = "mask"  # how messages call the label file

    def __init__(
        self,
        names: list[str],
        coding: LabelCoding,
        class_names: list[str],
        transform: JointTransform,
        seed: int,
        train: bool,
        palette: Palette | None = None,
    ):
        super().__init__(transform, seed, train)
        self.names, self.coding = list(names), coding
        self.class_names = list(class_names)
        self._palette = palette

    @property
    def palette(self) -> Palette:
        return list(self._palette) if self._palette else default_palette(self.num_classes)

    @abstractmethod
    def image_path(self, name: str) -> Path: ...

    @abstractmethod
    def label_path(self, name: str) -> Path: ...

    def __len__(self) -> int:
        return len(self.names)

    def sample_name(self, index: int) -> str:
        return self.names[index]

    def who(self, name: str) -> str:
        return f"{self.dataset_name} sample '{name}'"

    def read_raw_labels(self, path: Path, grid: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
        """The label values as stored, on `grid` when the file is larger, and the file's size
        (SBD's .mat files override this in VOC)."""
        return read_labels(path, self.coding, grid)

    def load(self, index: int) -> Sample:
        return self._load(index, on_image_grid=True)

    def load_original(self, index: int) -> Sample:
        return self._load(index, on_image_grid=False)

    def _load(self, index: int, on_image_grid: bool) -> Sample:
        """The sample; its mask on the (possibly draft-decoded) image's grid, or on the label file's own."""
        name = self.names[index]
        path = self.image_path(name)
        try:
            image, original = read_image(path, self.transform.decode_size)
            path = self.label_path(name)
            # smaller than the file when the JPEG was draft-decoded; the file's own size for scoring
            grid = (image.shape[-1], image.shape[-2]) if on_image_grid else original
            raw, label_size = self.read_raw_labels(path, grid)
        except LabelFileError as error:
            raise UserError(f"{self.who(name)}: {self.label_kind} {error}") from None
        except READ_ERRORS as error:
            raise UserError(f"{self.who(name)}: cannot read {path} ({error})") from None
        if label_size != original:
            mismatch = size_mismatch(self.image_path(name), original, path, label_size, self.label_kind)
            raise UserError(f"{self.who(name)}: {mismatch}")
        mask = tv_tensors.Mask(torch.from_numpy(self.coding.decode(raw)))
        if not on_image_grid:
            return {"image": image, "mask": mask}
        return {"image": image, "mask": resize(mask, list(image.shape[-2:]))}  # a no-op unless a .mat mask

    def inspect(self, index: int) -> list[Finding]:
        name = self.names[index]
        image_path, label_path = self.image_path(name), self.label_path(name)
        image_size, findings = inspect_image(image_path, self.transform.decode_size)
        label_size, label_findings = self.inspect_label_file(label_path)
        findings += label_findings
        if image_size and label_size and image_size != label_size:
            findings.append(Finding(size_mismatch(image_path, image_size, label_path, label_size, self.label_kind)))
        return findings

    def inspect_label_file(self, path: Path) -> tuple[tuple[int, int] | None, list[Finding]]:
        return inspect_labels(path, self.coding, self.label_kind)
