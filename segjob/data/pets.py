"""Oxford-IIIT Pet in its published layout.

    root/images/NAME.jpg
    root/annotations/trimaps/NAME.png      1 = pet, 2 = background, 3 = border
    root/annotations/trainval.txt, test.txt  lines "NAME CLASS-ID SPECIES BREED-ID"

The trimap coding is the dataset's own (some write-ups list it differently; trust the
files). Output classes: trimap mode 0 background, 1 pet, 2 border; binary mode
0 background, 1 pet, with the border counted as pet. The Pets recipes squash images to
image_size x image_size without keeping the aspect ratio (data.resize: squash, the default
here). A few originals are GIF, PNG, RGBA or greyscale files behind a .jpg name: they load
as RGB, and the check names them.
"""

from __future__ import annotations

from pathlib import Path

from segjob.data.labels import IndexCoding
from segjob.data.paired import PairedFileDataset
from segjob.data.remote import local_root
from segjob.data.splits import random_split, read_names, without
from segjob.data.transforms import build_transform
from segjob.errors import UserError
from segjob.job.schema import PetsData

TRIMAP_PET, TRIMAP_BACKGROUND, TRIMAP_BORDER = 1, 2, 3
CLASS_NAMES = {"trimap": ["background", "pet", "border"], "binary": ["background", "pet"]}
LAYOUT = "images/NAME.jpg, annotations/trimaps/NAME.png, annotations/trainval.txt and test.txt"


def trimap_coding(classes: str) -> IndexCoding:
    """Trimap value -> class; any other value is invalid (and ignored when loaded)."""
    border = 2 if classes == "trimap" else 1
    return IndexCoding({TRIMAP_BACKGROUND: 0, TRIMAP_PET: 1, TRIMAP_BORDER: border})


class PetsDataset(PairedFileDataset):
    dataset_name, label_kind = "pets", "trimap"

    def __init__(self, root: Path, names: list[str], classes: str, **common):
        super().__init__(names, trimap_coding(classes), CLASS_NAMES[classes], **common)
        self.root = Path(root)

    def image_path(self, name: str) -> Path:
        return self.root / "images" / f"{name}.jpg"

    def label_path(self, name: str) -> Path:
        return self.root / "annotations" / "trimaps" / f"{name}.png"


def build(cfg: PetsData, seed: int) -> tuple[PetsDataset, PetsDataset]:
    root = local_root(cfg.root, cfg.endpoint_url)
    for required in (root, root / "images", root / "annotations" / "trimaps"):
        if not required.is_dir():
            raise UserError(f"data.root: {required} not found; the Oxford-IIIT Pet layout under root is {LAYOUT}")
    trainval = read_list(root / "annotations" / "trainval.txt")
    test = read_list(root / "annotations" / "test.txt")
    if cfg.split == "official":
        train_names, val_names = trainval, test
    else:
        train_names, val_names = random_split(sorted(set(trainval) | set(test)), cfg.val_fraction, seed)

    common = dict(root=root, classes=cfg.classes, seed=seed)
    train = PetsDataset(names=without(train_names, cfg.exclude), transform=build_transform(cfg, train=True),
                        train=True, **common)
    val = PetsDataset(names=without(val_names, cfg.exclude), transform=build_transform(cfg, train=False),
                      train=False, **common)
    return train, val


def read_list(path: Path) -> list[str]:
    """Sample names from a split list; '#' lines (upstream list.txt has them) are skipped."""
    if not path.is_file():
        raise UserError(f"data.root: {path} not found; the Oxford-IIIT Pet layout under root is {LAYOUT}")
    return read_names(path)
