"""Your own data: a folder of images and a folder of masks with the same names.

    root/images/NAME.jpg (.jpeg .png .bmp .tif .webp)     root/masks/NAME.png
    or, with data.split: folders, root/images/{train,val}/... and root/masks/{train,val}/...

The job names the classes in label order. Masks hold either class indices (an 8-bit L or P
PNG where value i is class i and data.ignore_value is ignored) or, with data.palette, one
colour per class (RGB PNGs; data.ignore_color is ignored). A value or colour outside these
is reported by the check and ignored in training.
"""

from __future__ import annotations

from pathlib import Path

from segjob.data.files import IMAGE_SUFFIXES
from segjob.data.labels import ColourCoding, IndexCoding
from segjob.data.paired import PairedFileDataset
from segjob.data.remote import local_root
from segjob.data.splits import random_split, without
from segjob.data.transforms import build_transform
from segjob.errors import UserError
from segjob.job.schema import FolderData

LAYOUT = "images/NAME.jpg and masks/NAME.png (or images/train, images/val, masks/train, masks/val with split: folders)"


class FolderDataset(PairedFileDataset):
    dataset_name = "folder"

    def __init__(self, images: dict[str, Path], mask_folder: Path, cfg: FolderData, **common):
        if cfg.palette:
            coding = ColourCoding(cfg.palette, cfg.ignore_color)
        else:
            coding = IndexCoding({label: label for label in range(len(cfg.classes))}, ignore=[cfg.ignore_value])
        super().__init__(list(images), coding, cfg.classes, palette=cfg.palette, **common)
        self.images, self.mask_folder = images, mask_folder

    def image_path(self, name: str) -> Path:
        return self.images[name]

    def label_path(self, name: str) -> Path:
        return self.mask_folder / f"{name}.png"


def list_images(folder: Path) -> dict[str, Path]:
    """{NAME: path} of the images in a folder; two files with one name is an error."""
    if not folder.is_dir():
        raise UserError(f"data.root: {folder} not found; the folder layout is {LAYOUT}")
    images: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            continue
        if path.stem in images:
            raise UserError(f"data: {images[path.stem].name} and {path.name} in {folder} "
                            f"share the name '{path.stem}'; keep one")
        images[path.stem] = path
    return images


def build(cfg: FolderData, seed: int) -> tuple[FolderDataset, FolderDataset]:
    root = local_root(cfg.root, cfg.endpoint_url)
    if cfg.split == "folders":
        train_images, val_images = list_images(root / "images" / "train"), list_images(root / "images" / "val")
        train_masks, val_masks = root / "masks" / "train", root / "masks" / "val"
    else:
        images = list_images(root / "images")
        train_names, val_names = random_split(list(images), cfg.val_fraction, seed)
        train_images = {name: images[name] for name in train_names}
        val_images = {name: images[name] for name in val_names}
        train_masks = val_masks = root / "masks"
    for folder in (train_masks, val_masks):
        if not folder.is_dir():
            raise UserError(f"data.root: {folder} not found; the folder layout is {LAYOUT}")

    def kept(images: dict[str, Path]) -> dict[str, Path]:
        return {name: images[name] for name in without(list(images), cfg.exclude)}

    train = FolderDataset(kept(train_images), train_masks, cfg, transform=build_transform(cfg, train=True),
                          seed=seed, train=True)
    val = FolderDataset(kept(val_images), val_masks, cfg, transform=build_transform(cfg, train=False),
                        seed=seed, train=False)
    return train, val
