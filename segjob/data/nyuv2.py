"""NYUv2 labelled RGB-D frames, read from the official nyu_depth_v2_labeled.mat.

    nyu_depth_v2_labeled.mat   MATLAB v7.3, i.e. HDF5 (h5py). Axes come reversed from MATLAB's:
        images  (N, 3, W, H) uint8         a frame is images[i].transpose(0, 2, 1) -> [3, H, W]
        depths  (N, W, H)    float metres  -> [1, H, W]
        labels  (N, W, H)    0 = unlabelled, 1..894 raw classes
    splits.mat                 trainNdxs / testNdxs, 1-based: the standard 795 / 654 split
    classMapping40.mat         mapClass: raw class -> 1..40 (Gupta et al.)
    class13Mapping.mat         classMapping13: 40 classes -> 1..13 (Couprie et al.); a table over
                               the 894 raw classes (e.g. classMapping13.mat's mapClass) works too

The mapping files circulate under several names: their paths and variables are in the job.
Depth is the 4th input channel, normalised as (d - depth_mean) / depth_std (defaults: the
mean and standard deviation of the training frames' depth, 2.842 m and 1.417 m, as ESANet
publishes them), resampled with nearest like the labels.
Unlabelled pixels (raw 0, or a class the mapping leaves out) are ignored. Sample names are
"nyuv2-0001" (the frame's 1-based MATLAB index).
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import scipy.io
import torch
from torchvision import tv_tensors

from segjob.data.base import SegmentationDataset
from segjob.data.files import Finding, label_value_findings
from segjob.data.labels import IndexCoding
from segjob.data.remote import local_file
from segjob.data.splits import random_split
from segjob.data.transforms import Depth, JointTransform, Sample, build_transform
from segjob.errors import UserError
from segjob.job.schema import NYUv2Data

RAW_CLASSES = 894
CLASS_NAMES = {
    40: [
        "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf", "picture",
        "counter", "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror", "floor_mat", "clothes",
        "ceiling", "books", "refrigerator", "television", "paper", "towel", "shower_curtain", "box", "whiteboard",
        "person", "night_stand", "toilet", "sink", "lamp", "bathtub", "bag", "otherstructure", "otherfurniture",
        "otherprop",
    ],
    13: ["bed", "books", "ceiling", "chair", "floor", "furniture", "objects", "picture", "sofa", "table", "tv",
         "wall", "window"],
}  # fmt: skip
LAYOUT = "HDF5 (MATLAB v7.3) with images (N, 3, W, H), depths (N, W, H) and labels (N, W, H)"


class NYUv2Dataset(SegmentationDataset):
    in_channels = 4

    def __init__(self, path: Path, frames: list[int], coding: IndexCoding, classes: int, transform: JointTransform,
                 seed: int, train: bool):
        super().__init__(transform, seed, train)
        self.path, self.frames, self.coding = Path(path), list(frames), coding
        self.class_names = list(CLASS_NAMES[classes])
        self._handle: h5py.File | None = None
        self._handle_pid: int | None = None

    def __getstate__(self) -> dict:
        # an open HDF5 file cannot travel to a DataLoader process; each process opens its own
        return {**self.__dict__, "_handle": None, "_handle_pid": None}

    def _file(self) -> h5py.File:
        if self._handle is None or self._handle_pid != os.getpid():
            self._handle, self._handle_pid = h5py.File(self.path, "r"), os.getpid()
        return self._handle

    def __len__(self) -> int:
        return len(self.frames)

    def sample_name(self, index: int) -> str:
        return frame_name(self.frames[index])

    def read_frame(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(image [3, H, W] uint8, depth [H, W] float32 metres, raw labels [H, W]) of one frame."""
        file, frame = self._file(), self.frames[index]
        image = np.ascontiguousarray(file["images"][frame].transpose(0, 2, 1))
        depth = np.ascontiguousarray(file["depths"][frame].T, dtype=np.float32)
        labels = np.ascontiguousarray(file["labels"][frame].T)
        return image, depth, labels

    def load(self, index: int) -> Sample:
        try:
            image, depth, labels = self.read_frame(index)
        except (OSError, KeyError, ValueError) as error:
            raise UserError(f"nyuv2 sample '{self.sample_name(index)}': "
                            f"cannot read it from {self.path} ({error})") from None
        return {
            "image": tv_tensors.Image(torch.from_numpy(image)),
            "depth": Depth(torch.from_numpy(depth)[None]),
            "mask": tv_tensors.Mask(torch.from_numpy(self.coding.decode(labels))),
        }

    def inspect(self, index: int) -> list[Finding]:
        where = f"frame {self.frames[index] + 1} of {self.path}"
        try:
            image, depth, labels = self.read_frame(index)
        except Exception as error:  # noqa: BLE001 - a finding, never a crash
            return [Finding(f"{where} cannot be read ({type(error).__name__}: {error})")]
        findings = []
        if not image.shape[1:] == depth.shape == labels.shape:
            findings.append(Finding(f"{where}: image {image.shape[1:]}, depth {depth.shape} "
                                    f"and labels {labels.shape} differ in size"))
        if not np.isfinite(depth).all() or (depth < 0).any():
            findings.append(Finding(f"{where}: depth has NaN, infinite or negative values"))
        return findings + label_value_findings(labels, self.coding, f"labels of {where}")


def frame_name(frame: int) -> str:
    return f"nyuv2-{frame + 1:04d}"


# --- the .mat files ------------------------------------------------------------------------


def read_mat_variable(path: Path, key: str, fix: str) -> np.ndarray:
    """A numeric variable of a .mat file (v5 via scipy, v7.3 via h5py), flattened; for a struct,
    its first numeric field. `fix` ends the message when the variable is not there."""
    try:
        try:
            value = scipy.io.loadmat(path)[key]
        except NotImplementedError:  # v7.3: HDF5
            with h5py.File(path, "r") as file:
                node = file[key]
                value = node[()] if isinstance(node, h5py.Dataset) else next(
                    node[name][()] for name in node if isinstance(node[name], h5py.Dataset)
                )
    except KeyError:
        raise UserError(f"{path}: no variable '{key}'; {fix}") from None
    except (OSError, ValueError, StopIteration) as error:
        raise UserError(f"{path}: not a readable .mat file ({error})") from None
    while value.dtype.names:  # a MATLAB struct: take its first numeric field
        record = value.flat[0]
        value = next((np.asarray(record[name]) for name in value.dtype.names
                      if np.asarray(record[name]).dtype.kind in "iuf"), None)
        if value is None:
            raise UserError(f"{path}: the struct '{key}' has no numeric field")
    if value.dtype == object:  # a cell holding one array
        value = np.asarray(value.flat[0])
    return np.asarray(value).astype(np.int64).ravel()


def label_coding(cfg: NYUv2Data) -> IndexCoding:
    """Raw label (0..894) -> class (0..K-1) or ignored, through the job's mapping files."""
    labels = np.arange(RAW_CLASSES + 1)  # 0 = unlabelled, kept as 0 through every table
    table13 = path13 = None
    if cfg.classes == 13:
        path13 = companion(cfg, cfg.mapping13, "class13Mapping.mat", "mapping13")
        table13 = read_mat_variable(path13, cfg.mapping13_key, "name the right one in data.mapping13_key")
    if table13 is not None and len(table13) == RAW_CLASSES:
        labels = _apply(labels, table13, 13, path13)  # straight from the raw classes
    else:
        path40 = companion(cfg, cfg.mapping40, "classMapping40.mat", "mapping40")
        table40 = read_mat_variable(path40, cfg.mapping40_key, "name the right one in data.mapping40_key")
        labels = _apply(labels, table40, 40, path40)
        if table13 is not None:
            labels = _apply(labels, table13, 13, path13)
    classes = {raw: int(label) - 1 for raw, label in enumerate(labels) if raw and label}
    unmapped = [raw for raw in range(RAW_CLASSES + 1) if raw not in classes]
    return IndexCoding(classes, ignore=unmapped, size=RAW_CLASSES + 1)


def _apply(labels: np.ndarray, table: np.ndarray, classes: int, path: Path) -> np.ndarray:
    """labels (0 = none) through a table indexed from 1, onto 1..classes (0 = none)."""
    if len(table) < labels.max():
        raise UserError(f"{path}: maps {len(table)} labels, but labels go up to {labels.max()} here; "
                        "is it the right file?")
    if table.min() < 0 or table.max() > classes:
        raise UserError(f"{path}: maps onto {table.min()}..{table.max()}, expected 1..{classes}; is it the right file?")
    return np.concatenate([[0], table])[labels]


def companion(cfg: NYUv2Data, given: str | None, default_name: str, key: str) -> Path:
    """A file the job names, or else the one with the usual name beside the labelled .mat."""
    location = given or f"{cfg.path.rsplit('/', 1)[0] if '/' in cfg.path else '.'}/{default_name}"
    path = local_file(location, cfg.endpoint_url)
    if not path.is_file():
        raise UserError(f"data.{key}: {location} not found; "
                        f"give the path of NYUv2's {default_name} (or its equivalent) in data.{key}")
    return path


def open_checked(path: Path) -> int:
    """The number of frames, after checking the file has the labelled set's layout."""
    if not path.is_file():
        raise UserError(f"data.path: {path} not found; expected nyu_depth_v2_labeled.mat ({LAYOUT})")
    if not h5py.is_hdf5(path):
        raise UserError(f"data.path: {path} is not HDF5; the labelled NYUv2 file is MATLAB v7.3 ({LAYOUT})")
    with h5py.File(path, "r") as file:
        missing = [name for name in ("images", "depths", "labels") if name not in file]
        if missing:
            raise UserError(f"data.path: {path} has no {', '.join(missing)}; expected {LAYOUT}")
        images, depths, labels = file["images"].shape, file["depths"].shape, file["labels"].shape
    if len(images) != 4 or images[1] != 3 or depths != labels or images[0] != depths[0] or images[2:] != depths[1:]:
        raise UserError(f"data.path: {path} holds images {images}, depths {depths}, labels {labels}; expected {LAYOUT}")
    return images[0]


def official_frames(path: Path, frames: int) -> tuple[list[int], list[int]]:
    fix = "is it NYUv2's splits.mat? (or use data.split: random)"
    train, test = (read_mat_variable(path, key, fix) - 1 for key in ("trainNdxs", "testNdxs"))
    for name, indices in (("trainNdxs", train), ("testNdxs", test)):
        if len(indices) and (indices.min() < 0 or indices.max() >= frames):
            raise UserError(f"{path}: {name} runs outside the labelled file's frames 1..{frames}; "
                            "is it the right splits.mat?")
    return train.tolist(), test.tolist()


def build(cfg: NYUv2Data, seed: int) -> tuple[NYUv2Dataset, NYUv2Dataset]:
    path = local_file(cfg.path, cfg.endpoint_url)
    frames = open_checked(path)
    coding = label_coding(cfg)
    if cfg.split == "official":
        train_frames, val_frames = official_frames(companion(cfg, cfg.splits, "splits.mat", "splits"), frames)
    else:
        by_name = {frame_name(frame): frame for frame in range(frames)}
        train_names, val_names = random_split(list(by_name), cfg.val_fraction, seed)
        train_frames, val_frames = [by_name[name] for name in train_names], [by_name[name] for name in val_names]

    def kept(frames: list[int]) -> list[int]:
        excluded = set(cfg.exclude)
        return [frame for frame in frames if frame_name(frame) not in excluded]

    common = dict(path=path, coding=coding, classes=cfg.classes, seed=seed)
    train = NYUv2Dataset(frames=kept(train_frames), transform=build_transform(cfg, train=True), train=True, **common)
    val = NYUv2Dataset(frames=kept(val_frames), transform=build_transform(cfg, train=False), train=False, **common)
    return train, val
