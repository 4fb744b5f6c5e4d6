"""Oxford-IIIT Pet in its published layout.

    root/images/NAME.jpg
    root/annotations/trimaps/NAME.png      1 = pet, 2 = background, 3 = border
    root/annotations/trainval.txt, test.txt  lines "NAME CLASS-ID SPECIES BREED-ID"

The trimap coding is the dataset's own (some write-ups list it differently; trust the
files). Output classes: trimap mode 0 background, 1 pet, 2 border; binary mode
0 background, 1 pet, with the border counted as pet. Images are squashed to
image_size x image_size without keeping the aspect ratio, as the Pets recipes do.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from ..config import PetsData
from ..constants import IGNORE_INDEX
from ..errors import UserError
from .base import SegmentationDataset, mix_seed
from .transforms import JointTransform, Sample, build_transform

TRIMAP_PET, TRIMAP_BACKGROUND, TRIMAP_BORDER = 1, 2, 3
CLASS_NAMES = {"trimap": ["background", "pet", "border"], "binary": ["background", "pet"]}
LAYOUT = "images/NAME.jpg, annotations/trimaps/NAME.png, annotations/trainval.txt and test.txt"
SPLIT_STREAM = 0x5E7  # keeps the split's shuffle apart from other uses of the seed


def trimap_lookup(classes: str) -> np.ndarray:
    """256-entry table from trimap value to class; values outside 1..3 become IGNORE_INDEX."""
    table = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    table[TRIMAP_BACKGROUND] = 0
    table[TRIMAP_PET] = 1
    table[TRIMAP_BORDER] = 2 if classes == "trimap" else 1
    return table


class PetsDataset(SegmentationDataset):
    def __init__(
        self,
        root: str | Path,
        names: list[str],
        classes: str,
        image_size: int,
        seed: int,
        transform: JointTransform,
        train: bool,
    ):
        super().__init__(transform, seed, train)
        self.root, self.names, self.image_size = Path(root), list(names), image_size
        self.class_names = list(CLASS_NAMES[classes])
        self.in_channels = 3
        self._lookup = trimap_lookup(classes)

    def __len__(self) -> int:
        return len(self.names)

    def sample_name(self, index: int) -> str:
        return self.names[index]

    def image_path(self, name: str) -> Path:
        return self.root / "images" / f"{name}.jpg"

    def trimap_path(self, name: str) -> Path:
        return self.root / "annotations" / "trimaps" / f"{name}.png"

    def load(self, index: int) -> Sample:
        name = self.names[index]
        path = self.image_path(name)
        try:
            with Image.open(path) as file:
                original_size = file.size
                # JPEG decodes at 1/2, 1/4 or 1/8 scale when that still covers the target size;
                # a no-op for the few files that are really GIF or PNG.
                file.draft("RGB", (self.image_size, self.image_size))
                image = file.convert("RGB")  # a few originals are RGBA, palette or greyscale
            path = self.trimap_path(name)
            with Image.open(path) as file:
                trimap = np.asarray(file)
        except (OSError, UnidentifiedImageError, ValueError) as error:
            raise UserError(f"pets sample '{name}': cannot read {path} ({error})") from None
        if trimap.ndim == 3:  # an RGB(A) trimap: the label sits in every colour channel
            trimap = trimap[..., 0]
        if (trimap.shape[1], trimap.shape[0]) != original_size:
            raise UserError(
                f"pets sample '{name}': image {self.image_path(name)} is {original_size[0]}x{original_size[1]} "
                f"but its trimap {path} is {trimap.shape[1]}x{trimap.shape[0]}; fix or remove the pair"
            )
        labels = self._lookup[np.minimum(trimap, 255)]
        return {
            "image": tv_tensors.Image(F.pil_to_tensor(image)),
            "mask": tv_tensors.Mask(torch.from_numpy(labels)),
        }


def build(cfg: PetsData, seed: int) -> tuple[PetsDataset, PetsDataset]:
    root = Path(cfg.root)
    for required in (root, root / "images", root / "annotations" / "trimaps"):
        if not required.is_dir():
            raise UserError(f"data.root: {required} not found; the Oxford-IIIT Pet layout under root is {LAYOUT}")
    trainval = read_list(root / "annotations" / "trainval.txt")
    test = read_list(root / "annotations" / "test.txt")
    if cfg.split == "official":
        train_names, val_names = trainval, test
    else:
        train_names, val_names = random_split(sorted(set(trainval) | set(test)), cfg.val_fraction, seed)

    common = dict(root=root, classes=cfg.classes, image_size=cfg.image_size, seed=seed)
    train = PetsDataset(names=train_names, transform=build_transform(cfg, train=True), train=True, **common)
    val = PetsDataset(names=val_names, transform=build_transform(cfg, train=False), train=False, **common)
    for dataset in (train, val):
        check_files(dataset)
    return train, val


def read_list(path: Path) -> list[str]:
    """Sample names from a split list; '#' lines (upstream list.txt has them) are skipped."""
    if not path.is_file():
        raise UserError(f"data.root: {path} not found; the Oxford-IIIT Pet layout under root is {LAYOUT}")
    names = [line.split()[0] for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    if not names:
        raise UserError(f"{path}: lists no samples; expected lines like 'Abyssinian_100 1 1 1'")
    return names


def random_split(names: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    if len(names) < 2:
        raise UserError(f"data.split=random needs at least 2 listed samples, found {len(names)}")
    generator = torch.Generator().manual_seed(mix_seed(seed, SPLIT_STREAM))
    order = torch.randperm(len(names), generator=generator).tolist()
    num_val = min(max(round(len(names) * val_fraction), 1), len(names) - 1)
    val = sorted(names[i] for i in order[:num_val])
    train = sorted(names[i] for i in order[num_val:])
    return train, val


def check_files(dataset: PetsDataset) -> None:
    """Fail on the driver, before any worker starts, when a listed sample lacks a file."""
    for name in dataset.names:
        for kind, path in (("image", dataset.image_path(name)), ("trimap", dataset.trimap_path(name))):
            if not path.is_file():
                raise UserError(f"pets sample '{name}' is listed but its {kind} {path} is missing")
