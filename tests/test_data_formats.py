"""Every loader on small files written here in its dataset's published format.

The writers below are also used by test_check.py and test_data_remote.py.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image
from torch.utils.data import DataLoader

from segjob.data import build_datasets
from segjob.data.labels import IGNORE_INDEX, default_palette
from segjob.errors import UserError
from segjob.job.load import resolve_local_paths
from segjob.job.schema import CamVidData, FolderData, JobConfig, LeafData, NYUv2Data, VOCData

RNG = np.random.default_rng(0)


def photo(height: int, width: int) -> np.ndarray:
    return RNG.integers(0, 256, (height, width, 3), dtype=np.uint8)


def blocks(height: int, width: int, values: list[int]) -> np.ndarray:
    """A label map of vertical stripes cycling through values (all of them present)."""
    stripe = np.array(values, dtype=np.uint8)[(np.arange(width) * len(values)) // width]
    return np.repeat(stripe[None], height, 0)


# --- PASCAL VOC 2012 ---------------------------------------------------------------------


def write_voc(root: Path, train=("2007_000001", "2007_000002"), val=("2007_000003",), size=(40, 50)) -> Path:
    voc = root / "VOCdevkit" / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / folder).mkdir(parents=True, exist_ok=True)
    flat_palette = [value for colour in default_palette(256) for value in colour]
    for number, name in enumerate([*train, *val]):
        Image.fromarray(photo(*size)).save(voc / "JPEGImages" / f"{name}.jpg")
        labels = blocks(*size, [0, 1 + number, 15, 255])
        mask = Image.fromarray(labels, "P")
        mask.putpalette(flat_palette)
        mask.save(voc / "SegmentationClass" / f"{name}.png")
    (voc / "ImageSets/Segmentation/train.txt").write_text("".join(f"{name}\n" for name in train))
    (voc / "ImageSets/Segmentation/val.txt").write_text("".join(f"{name}\n" for name in val))
    return voc


def test_voc_palette_pngs_load_as_class_indices(tmp_path):
    write_voc(tmp_path)
    train, val = build_datasets(VOCData(root=str(tmp_path), image_size=32), seed=0)
    assert [train.sample_name(i) for i in range(len(train))] == ["2007_000001", "2007_000002"]
    assert [val.sample_name(i) for i in range(len(val))] == ["2007_000003"]
    assert train.num_classes == 21 and train.class_names[15] == "person" and len(train.palette) == 21
    raw = train.load(1)["mask"]
    assert set(raw.unique().tolist()) == {0, 2, 15, IGNORE_INDEX}  # 255 (void) stays the ignore index
    image, mask = val[0]
    assert image.shape == (3, 32, 32) and mask.dtype == torch.int64
    assert all(train.inspect(i) == [] for i in range(len(train)))


def test_voc_accepts_voc2012_or_vocdevkit_as_root_and_names_the_layout(tmp_path):
    voc = write_voc(tmp_path)
    for root in (tmp_path, tmp_path / "VOCdevkit", voc):
        assert len(build_datasets(VOCData(root=str(root)), seed=0)[0]) == 2
    with pytest.raises(UserError, match=r"no VOC2012 folder under .*nowhere; expected VOCdevkit/VOC2012/"):
        build_datasets(VOCData(root=str(tmp_path / "nowhere")), seed=0)


def test_voc_sbd_list_with_png_and_mat_masks_leaves_out_val_ids(tmp_path, caplog):
    voc = write_voc(tmp_path)
    (voc / "SegmentationClassAug").mkdir()
    (voc / "cls").mkdir()
    Image.fromarray(photo(30, 20)).save(voc / "JPEGImages" / "2008_000009.jpg")
    Image.fromarray(blocks(30, 20, [0, 7]), "L").save(voc / "SegmentationClassAug" / "2008_000009.png")
    Image.fromarray(photo(24, 36)).save(voc / "JPEGImages" / "2008_000010.jpg")
    segmentation = blocks(24, 36, [0, 12])
    scipy.io.savemat(voc / "cls" / "2008_000010.mat",
                     {"GTcls": {"Segmentation": segmentation, "CategoriesPresent": np.array([12])}})
    (tmp_path / "train_aug.txt").write_text(
        "/JPEGImages/2008_000009.jpg /SegmentationClassAug/2008_000009.png\n"
        "/JPEGImages/2008_000010.jpg /cls/2008_000010.mat\n"
        "/JPEGImages/2007_000003.jpg /SegmentationClass/2007_000003.png\n"  # a val image: must not train
    )
    train, val = build_datasets(VOCData(root=str(tmp_path), train_list=str(tmp_path / "train_aug.txt"), image_size=32),
                                seed=0)
    assert [train.sample_name(i) for i in range(len(train))] == ["2008_000009", "2008_000010"]
    assert "left out of training" in caplog.text
    assert np.array_equal(train.load(1)["mask"].numpy(), segmentation)
    assert train.inspect(0) == [] and train.inspect(1) == []
    (tmp_path / "ids.txt").write_text("2008_000009\n")  # bare IDs: masks from SegmentationClassAug/
    train, _ = build_datasets(VOCData(root=str(tmp_path), train_list=str(tmp_path / "ids.txt")), seed=0)
    assert train.label_path("2008_000009").parent.name == "SegmentationClassAug"


# --- CamVid -------------------------------------------------------------------------------


def write_camvid(root: Path, counts=None, size=(36, 48)) -> Path:
    camvid = root / "CamVid"
    counts = counts or {"train": 3, "val": 2, "test": 2}
    for split, count in counts.items():
        (camvid / split).mkdir(parents=True)
        (camvid / f"{split}annot").mkdir()
        lines = []
        for number in range(count):
            name = f"0001TP_{split}{number:03d}"
            Image.fromarray(photo(*size)).save(camvid / split / f"{name}.png")
            Image.fromarray(blocks(*size, [0, 3, 8, 11, number % 11]), "L").save(
                camvid / f"{split}annot" / f"{name}.png")
            lines.append(f"/SegNet/CamVid/{split}/{name}.png /SegNet/CamVid/{split}annot/{name}.png\n")
        (camvid / f"{split}.txt").write_text("".join(lines))
    return camvid


def test_camvid_unlabelled_is_ignored_and_splits_follow_the_lists(tmp_path):
    write_camvid(tmp_path)
    train, val = build_datasets(CamVidData(root=str(tmp_path), image_size=48), seed=0)
    assert (len(train), len(val)) == (3, 2)
    assert train.class_names[0] == "sky" and train.num_classes == 11 and train.palette[3] == (128, 64, 128)
    assert set(train.load(0)["mask"].unique().tolist()) == {0, 3, 8, IGNORE_INDEX}  # 11 -> ignore
    image, mask = val[0]
    assert image.shape == (3, 48, 48) and (mask[36:] == IGNORE_INDEX).all()  # fit: 48x36 padded below
    train, val = build_datasets(CamVidData(root=str(tmp_path / "CamVid"), split="trainval"), seed=0)
    assert (len(train), len(val)) == (5, 2) and val.sample_name(0).startswith("0001TP_test")


def test_camvid_without_list_files_lists_the_folders(tmp_path):
    camvid = write_camvid(tmp_path)
    for split in ("train", "val", "test"):
        (camvid / f"{split}.txt").unlink()
    train, val = build_datasets(CamVidData(root=str(camvid), exclude=["0001TP_train001"]), seed=0)
    assert [train.sample_name(i) for i in range(len(train))] == ["0001TP_train000", "0001TP_train002"]


# --- Leaf lesions --------------------------------------------------------------------------


def write_leaf(root: Path, count: int = 6, size=(48, 64)) -> dict[str, np.ndarray]:
    for folder in ("original_images", "binary_mask", "probabilistic_mask"):
        (root / folder).mkdir(parents=True)
    votes = {}
    for number in range(1, count + 1):
        name = f"image{number}"
        Image.fromarray(photo(*size)).save(root / "original_images" / f"{name}.jpeg", quality=95)
        vote = blocks(*size, [0, 1, 2, 3, 0, 0])
        Image.fromarray((vote * 85).astype(np.uint8), "L").save(root / "probabilistic_mask" / f"{name}.png")
        Image.fromarray(np.where(vote >= 2, 255, 0).astype(np.uint8), "L").save(root / "binary_mask" / f"{name}.png")
        votes[name] = vote
    return votes


def test_leaf_binary_255_is_the_lesion_not_ignore(tmp_path):
    write_leaf(tmp_path)
    train, val = build_datasets(LeafData(root=str(tmp_path), val_fraction=0.34, image_size=64), seed=0)
    assert (len(train), len(val)) == (4, 2) and train.class_names == ["background", "lesion"]
    assert set(train.load(0)["mask"].unique().tolist()) == {0, 1}
    names = [train.sample_name(i) for i in range(len(train))] + [val.sample_name(i) for i in range(len(val))]
    assert sorted(names) == sorted(f"image{n}" for n in range(1, 7))
    again = build_datasets(LeafData(root=str(tmp_path), val_fraction=0.34), seed=0)[1]
    assert [again.sample_name(i) for i in range(len(again))] == [val.sample_name(i) for i in range(len(val))]


def test_leaf_soft_targets_are_vote_probabilities_in_training_only(tmp_path):
    votes = write_leaf(tmp_path)
    train, val = build_datasets(LeafData(root=str(tmp_path), soft_targets=True, val_fraction=0.34, image_size=64),
                                seed=0)
    image, target = train[(0, 0)]
    assert target.shape == (2, 64, 64) and target.dtype == torch.float32 and image.shape == (3, 64, 64)
    labelled = target.sum(0) > 0
    assert torch.allclose(target.sum(0)[labelled], torch.ones(()))
    assert set(torch.round(target[1][labelled] * 3).unique().tolist()) == {0.0, 1.0, 2.0, 3.0}
    assert (target[:, 48:] == 0).all()  # the padding below the 64x48 photo: ignored, all-zero
    # the lesion probability is the vote share of the raw file, pixel for pixel (no zoom at strength 0)
    expected = torch.from_numpy(votes[train.sample_name(0)] / 3).float()
    assert torch.allclose(target[1][:48], expected) or torch.allclose(target[1][:48], expected.flip(-1))
    _, val_target = val[0]
    assert val_target.dtype == torch.int64 and set(val_target.unique().tolist()) == {0, 1, IGNORE_INDEX}


def test_leaf_large_photos_decode_at_reduced_size(tmp_path):
    write_leaf(tmp_path, count=2, size=(480, 640))
    train, _ = build_datasets(LeafData(root=str(tmp_path), val_fraction=0.5, image_size=96), seed=0)
    sample = train.load(0)
    assert sample["image"].shape == (3, 120, 160)  # JPEG draft at 1/4, still covering 96 px
    assert sample["mask"].shape == (120, 160)  # resampled onto the image's grid
    assert train[0][0].shape == (3, 96, 96)


# --- Folder ----------------------------------------------------------------------------


def write_folder(root: Path, palette: list | None = None, count: int = 5, size=(30, 40)) -> None:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for number in range(count):
        Image.fromarray(photo(*size)).save(root / "images" / f"scene{number}.{'png' if number % 2 else 'jpg'}")
        labels = blocks(*size, [0, 1, 2])
        if palette:
            Image.fromarray(np.array(palette, dtype=np.uint8)[labels], "RGB").save(
                root / "masks" / f"scene{number}.png")
        else:
            Image.fromarray(labels, "L").save(root / "masks" / f"scene{number}.png")


def test_folder_with_index_masks(tmp_path):
    write_folder(tmp_path)
    cfg = FolderData(root=str(tmp_path), classes=["ground", "crop", "weed"], val_fraction=0.4, image_size=32)
    train, val = build_datasets(cfg, seed=0)
    assert (len(train), len(val)) == (3, 2) and train.class_names == ["ground", "crop", "weed"]
    assert set(train.load(0)["mask"].unique().tolist()) == {0, 1, 2}
    images, masks = next(iter(DataLoader(train, batch_size=3)))
    assert images.shape == (3, 3, 32, 32) and masks.shape == (3, 32, 32)


def test_folder_with_colour_coded_masks(tmp_path):
    palette = [(0, 0, 0), (0, 200, 0), (200, 0, 0)]
    write_folder(tmp_path, palette=palette)
    cfg = FolderData(root=str(tmp_path), classes=["ground", "crop", "weed"], palette=palette, image_size=32)
    train, _ = build_datasets(cfg, seed=0)
    assert set(train.load(0)["mask"].unique().tolist()) == {0, 1, 2} and train.palette == palette
    assert train.inspect(0) == []
    index_cfg = FolderData(root=str(tmp_path), classes=["ground", "crop", "weed"])
    index_train, _ = build_datasets(index_cfg, seed=0)
    with pytest.raises(UserError, match=r"folder sample 'scene\d': mask .* is a colour \(RGB\) mask"):
        index_train.load(0)


def test_folder_split_folders_and_config_errors(tmp_path):
    for split in ("train", "val"):
        write_folder(tmp_path / "tmp" / split, count=2)
        for kind in ("images", "masks"):
            (tmp_path / kind).mkdir(exist_ok=True)
            (tmp_path / "tmp" / split / kind).rename(tmp_path / kind / split)
    train, val = build_datasets(FolderData(root=str(tmp_path), classes=["a", "b", "c"], split="folders"), seed=0)
    assert (len(train), len(val)) == (2, 2)
    with pytest.raises(ValueError, match="palette has 2 colours for 3 classes"):
        FolderData(root="x", classes=["a", "b", "c"], palette=[(0, 0, 0), (1, 1, 1)])
    with pytest.raises(ValueError, match="becomes the metric"):
        FolderData(root="x", classes=["a b", "c"])
    with pytest.raises(ValueError, match="ignore_value 1 is a class index"):
        FolderData(root="x", classes=["a", "b"], ignore_value=1)


# --- NYUv2 (MATLAB v7.3 = HDF5) -------------------------------------------------------------


def write_nyuv2(folder: Path, frames: int = 6, height: int = 24, width: int = 32) -> dict:
    """The labelled file in its published layout: HDF5 behind MATLAB's 512-byte header, every array
    stored with MATLAB's axes reversed. Plus the split and the two class mappings, as .mat v5."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (frames, height, width, 3), dtype=np.uint8)
    depths = rng.uniform(0.5, 9.0, (frames, height, width)).astype(np.float32)
    labels = rng.integers(0, 895, (frames, height, width)).astype(np.uint16)  # 0 = unlabelled, 1..894
    path = folder / "nyu_depth_v2_labeled.mat"
    with h5py.File(path, "w", userblock_size=512) as file:
        for name, array, matlab_class in (("images", images.transpose(0, 3, 2, 1), "uint8"),
                                          ("depths", depths.transpose(0, 2, 1), "single"),
                                          ("labels", labels.transpose(0, 2, 1), "uint16")):
            file.create_dataset(name, data=array, chunks=(1, *array.shape[1:]), compression="gzip")
            file[name].attrs["MATLAB_class"] = np.bytes_(matlab_class)
    with open(path, "r+b") as file:
        file.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Tue Nov 23 00:00:00 2026 "
                   b"HDF5 schema 1.00 .".ljust(116))
        file.write(b"\x00" * 8 + b"\x00\x02" + b"IM")
    map40 = np.concatenate([[0, 0], (np.arange(892) % 40) + 1])  # raw 1 and 2 unmapped; others cycle 1..40
    map13 = (np.arange(40) % 13) + 1
    scipy.io.savemat(folder / "classMapping40.mat",
                     {"mapClass": map40[None], "className": np.array(["wall"] * 40, dtype=object)[None]})
    scipy.io.savemat(folder / "class13Mapping.mat",
                     {"classMapping13": {"labelName": np.array(["bed"] * 13, dtype=object),
                                         "labelsMapping": map13[None]}})
    scipy.io.savemat(folder / "splits.mat",
                     {"trainNdxs": np.array([[1], [2], [4], [6]]), "testNdxs": np.array([[3], [5]])})
    return {"path": path, "images": images, "depths": depths, "labels": labels, "map40": map40, "map13": map13}


def expected_classes(raw: np.ndarray, nyu: dict, classes: int) -> np.ndarray:
    forty = np.concatenate([[0], nyu["map40"]])[raw]
    mapped = forty if classes == 40 else np.concatenate([[0], nyu["map13"]])[forty]
    return np.where(mapped > 0, mapped - 1, IGNORE_INDEX)


@pytest.mark.parametrize("classes", [40, 13])
def test_nyuv2_reads_the_transposed_axes_and_maps_the_labels(tmp_path, classes):
    nyu = write_nyuv2(tmp_path)
    train, val = build_datasets(NYUv2Data(path=str(nyu["path"]), classes=classes, image_size=32), seed=0)
    assert [train.sample_name(i) for i in range(len(train))] == ["nyuv2-0001", "nyuv2-0002", "nyuv2-0004", "nyuv2-0006"]
    assert [val.sample_name(i) for i in range(len(val))] == ["nyuv2-0003", "nyuv2-0005"]
    assert train.in_channels == 4 and train.num_classes == classes
    sample = val.load(1)  # frame 5
    assert np.array_equal(sample["image"].numpy(), nyu["images"][4].transpose(2, 0, 1))
    assert np.array_equal(sample["depth"][0].numpy(), nyu["depths"][4])
    assert np.array_equal(sample["mask"].numpy(), expected_classes(nyu["labels"][4], nyu, classes))
    image, mask = val[1]
    assert image.shape == (4, 32, 32) and mask.shape == (32, 32)
    expected_depth = (nyu["depths"][4][0, 0] - 2.842) / 1.417  # the 4th channel: normalised depth
    assert image[3, 0, 0].item() == pytest.approx(expected_depth, rel=1e-5)
    assert val.inspect(1) == []


def test_nyuv2_training_keeps_depth_and_labels_aligned(tmp_path):
    nyu = write_nyuv2(tmp_path)
    with h5py.File(nyu["path"], "r+") as file:  # depth that says which class a pixel is
        labels = file["labels"][()]
        file["depths"][...] = (labels % 7).astype(np.float32) + 1
    cfg = NYUv2Data(path=str(nyu["path"]), image_size=40,
                    augment={"strength": 1.0, "scale": [0.7, 1.6], "rotation": 15})
    train, _ = build_datasets(cfg, seed=0)
    coding = train.coding
    raw_of_class = {}
    for raw in range(895):
        raw_of_class.setdefault(int(coding.table[raw]), set()).add(raw % 7 + 1)
    for epoch in range(3):
        image, mask = train[(epoch, 0)]
        depth = image[3] * 1.417 + 2.842
        labelled = mask != IGNORE_INDEX
        for label in mask[labelled].unique().tolist():
            seen = set(torch.round(depth[mask == label]).int().tolist())
            assert seen <= raw_of_class[label], "depth at a pixel comes from the same source pixel as its label"


def test_nyuv2_random_split_and_layout_errors(tmp_path):
    nyu = write_nyuv2(tmp_path)
    train, val = build_datasets(NYUv2Data(path=str(nyu["path"]), split="random", val_fraction=0.5), seed=3)
    assert len(train) == len(val) == 3
    with pytest.raises(UserError, match="data.mapping13: .*class13Mapping.mat not found"):
        (tmp_path / "class13Mapping.mat").unlink()
        build_datasets(NYUv2Data(path=str(nyu["path"]), classes=13), seed=0)
    with pytest.raises(UserError, match="no variable 'nope'"):
        build_datasets(NYUv2Data(path=str(nyu["path"]), mapping40_key="nope"), seed=0)
    (tmp_path / "plain.mat").write_bytes(b"not hdf5")
    with pytest.raises(UserError, match="is not HDF5; the labelled NYUv2 file is MATLAB v7.3"):
        build_datasets(NYUv2Data(path=str(tmp_path / "plain.mat")), seed=0)
    with h5py.File(tmp_path / "other.mat", "w") as file:
        file["images"] = np.zeros((2, 3, 4, 4), dtype=np.uint8)
    with pytest.raises(UserError, match="has no depths, labels"):
        build_datasets(NYUv2Data(path=str(tmp_path / "other.mat")), seed=0)


def test_nyuv2_opens_its_own_file_handle_in_each_process(tmp_path):
    nyu = write_nyuv2(tmp_path)
    _, val = build_datasets(NYUv2Data(path=str(nyu["path"]), image_size=32), seed=0)
    val[0]  # opens the file in this process: the workers must open their own
    copy = pickle.loads(pickle.dumps(val))  # what spawn / forkserver DataLoader workers receive
    assert copy._handle is None and torch.equal(copy[1][0], val[1][0])
    loader = DataLoader(val, batch_size=2, num_workers=2, multiprocessing_context="fork")  # inherits the open handle
    images, _ = next(iter(loader))
    assert images.shape == (2, 4, 32, 32) and torch.equal(images[0], val[0][0])


def test_local_nyuv2_paths_become_absolute_for_the_workers(tmp_path):
    job = JobConfig(name="x", data=NYUv2Data(path="nyu/labelled.mat", mapping40="maps/m40.mat", endpoint_url=None))
    resolved = resolve_local_paths(job, base=tmp_path)
    assert resolved.data.path == str(tmp_path / "nyu/labelled.mat")
    assert resolved.data.mapping40 == str(tmp_path / "maps/m40.mat")
    assert resolved.data.mapping13 is None and resolved.data.splits is None
    remote = JobConfig(name="x", data=NYUv2Data(path="s3://bucket/nyu/labelled.mat"))
    assert resolve_local_paths(remote, base=tmp_path).data.path == "s3://bucket/nyu/labelled.mat"


def test_voc_random_split_pools_both_lists(tmp_path):
    write_voc(tmp_path, train=("2007_000001", "2007_000002", "2007_000004", "2007_000005"), val=("2007_000003",))
    train, val = build_datasets(VOCData(root=str(tmp_path), split="random", val_fraction=0.4), seed=0)
    assert (len(train), len(val)) == (3, 2)
    assert sorted(train.names + val.names) == [
        "2007_000001", "2007_000002", "2007_000003", "2007_000004", "2007_000005"]
    assert build_datasets(VOCData(root=str(tmp_path), split="random", val_fraction=0.4), seed=0)[1].names == val.names
