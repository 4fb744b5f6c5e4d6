"""Datasets and joint transforms: determinism, alignment, label mapping, user errors."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from shared_data import find_shared_data
from torch.utils.data import DataLoader
from torchvision import tv_tensors

from segjob.data import DATASETS, build_datasets
from segjob.data.base import mix_seed, sample_generator
from segjob.data.labels import IGNORE_INDEX
from segjob.data.pets import read_list
from segjob.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transform
from segjob.errors import UserError
from segjob.job.schema import AugmentConfig, PetsData, SyntheticData


def unnormalise(image: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return image * std + mean


def synthetic(seed: int = 0, **options) -> tuple:
    options = {"train_samples": 32, "val_samples": 16, **options}
    return build_datasets(SyntheticData(**options), seed)


# --- registry and seeding -----------------------------------------------------------------


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(UserError,
                       match="unknown dataset 'vok'; valid: camvid, folder, leaf, nyuv2, pets, synthetic, voc"):
        build_datasets(SimpleNamespace(name="vok"), seed=0)
    assert set(DATASETS) == {"synthetic", "pets", "voc", "camvid", "nyuv2", "leaf", "folder"}


def test_mix_seed_is_stable():
    # Pinned: changing the mix changes every augmentation, and a resumed run would differ.
    assert mix_seed(0, 0, 0) == 8435702009653986085
    assert mix_seed(0, 1, 0) != mix_seed(0, 0, 1) != mix_seed(1, 0, 0)
    assert 0 <= mix_seed(-5, 2**70, 3) < 2**63
    a, b = sample_generator(7, 2, 3), sample_generator(7, 2, 3)
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))


# --- synthetic ----------------------------------------------------------------------------


@pytest.mark.parametrize("num_classes, image_size", [(2, 32), (4, 64), (8, 48)])
def test_synthetic_shapes_dtypes_and_labels(num_classes, image_size):
    train, val = synthetic(num_classes=num_classes, image_size=image_size)
    assert (len(train), len(val)) == (32, 16)
    assert train.class_names[0] == "background" and len(train.class_names) == num_classes
    assert train.in_channels == 3 and val.class_names == train.class_names
    for dataset, key in ((train, (3, 5)), (val, 5)):
        image, mask = dataset[key]
        assert image.shape == (3, image_size, image_size) and image.dtype == torch.float32
        assert mask.shape == (image_size, image_size) and mask.dtype == torch.int64
        assert type(image) is torch.Tensor and type(mask) is torch.Tensor  # no tv_tensor leaks into collate
        assert 0 <= int(mask.min()) and int(mask.max()) < num_classes
    assert train.sample_name(5) == "synthetic-train-00005"
    images, masks = next(iter(DataLoader(val, batch_size=4)))
    assert images.shape == (4, 3, image_size, image_size) and masks.shape == (4, image_size, image_size)


def test_synthetic_is_a_pure_function_of_seed_split_and_index():
    train, val = synthetic(seed=3)
    again_train, again_val = synthetic(seed=3)
    other_train, _ = synthetic(seed=4)
    for a, b in ((train[(1, 7)], again_train[(1, 7)]), (val[7], again_val[7]), (val[7], val[(9, 7)])):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(train.load(7)["image"], other_train.load(7)["image"])
    assert not torch.equal(train.load(7)["image"], val.load(7)["image"])  # the splits differ


def test_synthetic_shows_every_class_and_is_not_colour_coded():
    train, _ = synthetic(num_classes=8, train_samples=24)
    seen, colours = set(), {label: [] for label in range(1, 8)}
    for index in range(24):
        sample = train.load(index)
        image, mask = sample["image"], sample["mask"]
        seen |= set(mask.unique().tolist())
        for label in mask.unique().tolist():
            if label:
                colours[label].append(image[:, mask == label].mean(1))
    assert seen == set(range(8))
    spread = [torch.stack(c).std(0).mean() for c in colours.values() if len(c) > 1]
    assert min(spread) > 0.1  # each kind comes in many colours


def test_synthetic_generation_is_fast():
    train, _ = synthetic(train_samples=200)
    start = time.perf_counter()
    for index in range(200):
        train[(0, index)]
    per_sample = (time.perf_counter() - start) / 200
    assert per_sample < 0.01, f"{per_sample * 1e3:.2f} ms per 64x64 sample"


# --- augmentation determinism and alignment -----------------------------------------------


def test_training_samples_depend_only_on_seed_epoch_index():
    train, _ = synthetic(train_samples=16)
    keys = [(epoch, index) for epoch in (0, 1) for index in range(16)]
    direct = [train[key] for key in keys]
    again = [train[key] for key in reversed(keys)][::-1]
    for (image, mask), (image2, mask2) in zip(direct, again):
        assert torch.equal(image, image2) and torch.equal(mask, mask2)

    batches = [keys[i : i + 4] for i in range(0, len(keys), 4)]  # what the batch samplers yield
    loaded = {}
    for workers in (0, 2):
        loader = DataLoader(train, batch_sampler=batches, num_workers=workers)
        loaded[workers] = torch.cat([images for images, _ in loader])
    assert torch.equal(loaded[0], loaded[2])
    assert torch.equal(loaded[0], torch.stack([image for image, _ in direct]))

    differs = [not torch.equal(direct[i][0], direct[16 + i][0]) for i in range(16)]
    assert any(differs) and not all(differs)  # hflip 0.5: some samples flip in one epoch only


def test_augmented_samples_are_the_same_in_any_loader_process(tmp_path):
    """Resume is exact only if a sample's augmentation depends on (seed, epoch, index) alone."""
    write_tiny_pets(tmp_path)
    augment = AugmentConfig(strength=1.0, scale=(0.5, 2.0), rotation=10)
    train, _ = build_datasets(PetsData(root=str(tmp_path), split="official", image_size=32, augment=augment), seed=0)
    keys = [(epoch, index) for epoch in (0, 1) for index in range(3)]
    direct = [train[key] for key in reversed(keys)][::-1]
    for workers in (0, 2):
        loader = DataLoader(train, batch_sampler=[keys[:3], keys[3:]], num_workers=workers)
        images, masks = (torch.cat(parts) for parts in zip(*loader))
        assert torch.equal(images, torch.stack([image for image, _ in direct]))
        assert torch.equal(masks, torch.stack([mask for _, mask in direct]))
    assert not torch.equal(direct[0][0], direct[3][0])  # epochs differ


def test_every_dataset_has_a_colour_per_class(tmp_path):
    write_tiny_pets(tmp_path)
    for dataset in (*synthetic(num_classes=5), *build_datasets(PetsData(root=str(tmp_path)), seed=0)):
        assert len(dataset.palette) == dataset.num_classes and len(set(dataset.palette)) == dataset.num_classes


def test_hflip_moves_image_and_mask_together():
    flipped, _ = synthetic(augment=AugmentConfig(hflip=1.0))
    plain, _ = synthetic(augment=AugmentConfig(hflip=0.0))
    for index in range(4):
        image, mask = flipped[(2, index)]
        image0, mask0 = plain[(2, index)]
        assert torch.equal(image, image0.flip(-1)) and torch.equal(mask, mask0.flip(-1))


def block_sample(size: int = 32, block: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An image of uniform blocks whose colour encodes the label, so the mask is derived from it."""
    palette = torch.tensor([[0.1, 0.2, 0.9], [0.9, 0.1, 0.1], [0.2, 0.8, 0.2], [0.9, 0.9, 0.1]])
    cells = size // block
    labels = torch.arange(cells * cells).view(cells, cells) % 4  # rows 0 1 2 3: a flip shows
    mask = labels.repeat_interleave(block, 0).repeat_interleave(block, 1)
    return palette[mask].permute(2, 0, 1).contiguous(), mask.to(torch.uint8), palette


@pytest.mark.parametrize("image_size", [32, 64])
def test_flip_and_resize_keep_image_and_mask_aligned(image_size):
    image, mask, palette = block_sample()
    cfg = SyntheticData(image_size=image_size, augment=AugmentConfig(hflip=1.0))
    out = build_transform(cfg, train=True)(
        {"image": tv_tensors.Image(image), "mask": tv_tensors.Mask(mask)}, torch.Generator().manual_seed(0)
    )
    out_image, out_mask = unnormalise(out["image"].as_subclass(torch.Tensor)), out["mask"].as_subclass(torch.Tensor)
    derived = torch.cdist(out_image.permute(1, 2, 0).reshape(-1, 3), palette).argmin(1).view(image_size, image_size)
    # Bilinear blends colours at block edges; compare where the 3x3 neighbourhood has one label.
    padded = torch.nn.functional.pad(out_mask[None, None].float(), (1, 1, 1, 1), mode="replicate")
    neighbourhood = torch.nn.functional.unfold(padded, 3).view(9, image_size, image_size)
    interior = (neighbourhood == out_mask.float()).all(0)
    assert interior.float().mean() > 0.5
    assert torch.equal(derived[interior], out_mask[interior].long())
    scale = image_size // 32
    expected = mask.repeat_interleave(scale, 0).repeat_interleave(scale, 1).flip(-1)  # nearest, then flipped
    assert torch.equal(out_mask, expected)


@pytest.mark.parametrize("image_size", [17, 50, 96])
def test_resize_keeps_the_label_set(image_size):
    labels = torch.tensor([0, 1, 2, IGNORE_INDEX], dtype=torch.uint8)
    mask = labels[torch.randint(0, 4, (40, 40), generator=torch.Generator().manual_seed(1))]
    image = torch.rand(3, 40, 40, generator=torch.Generator().manual_seed(2))
    cfg = SyntheticData(image_size=image_size)
    out = build_transform(cfg, train=False)({"image": tv_tensors.Image(image), "mask": tv_tensors.Mask(mask)})
    assert out["image"].shape == (3, image_size, image_size) and out["mask"].shape == (image_size, image_size)
    assert set(out["mask"].unique().tolist()) <= set(labels.tolist())


def test_training_transform_needs_a_generator():
    transform = build_transform(SyntheticData(), train=True)
    sample = {"image": tv_tensors.Image(torch.rand(3, 64, 64)), "mask": tv_tensors.Mask(torch.zeros(64, 64))}
    with pytest.raises(ValueError, match="Generator"):
        transform(sample)
    build_transform(SyntheticData(), train=False)(sample)  # validation: deterministic, no generator


# --- Oxford-IIIT Pet: the real files ------------------------------------------------------


@pytest.fixture(scope="module")
def real_pets() -> Path:
    root = find_shared_data("oxford-iiit-pet", "annotations")
    if root is None:
        pytest.skip("no Oxford-IIIT Pet sample at ../shared/data/oxford-iiit-pet (or $SEGJOB_SHARED_DATA)")
    return root


def test_real_pets_official_split(real_pets):
    train, val = build_datasets(PetsData(root=str(real_pets), split="official", image_size=64), seed=0)
    assert [train.sample_name(i) for i in range(len(train))] == read_list(real_pets / "annotations/trainval.txt")
    assert [val.sample_name(i) for i in range(len(val))] == read_list(real_pets / "annotations/test.txt")
    assert train.class_names == ["background", "pet", "border"]
    images, masks = next(iter(DataLoader(val, batch_size=len(val))))
    assert images.shape == (len(val), 3, 64, 64) and masks.shape == (len(val), 64, 64)
    assert set(masks.unique().tolist()) == {0, 1, 2}
    image, mask = train[(1, 0)]
    assert image.shape == (3, 64, 64) and mask.dtype == torch.int64


def test_real_pets_random_split(real_pets):
    cfg = PetsData(root=str(real_pets), split="random", val_fraction=0.3)
    names = lambda dataset: [dataset.sample_name(i) for i in range(len(dataset))]  # noqa: E731
    train, val = build_datasets(cfg, seed=0)
    listed = set(read_list(real_pets / "annotations/trainval.txt")) | set(read_list(real_pets / "annotations/test.txt"))
    assert set(names(train)) | set(names(val)) == listed and not set(names(train)) & set(names(val))
    assert len(val) == round(0.3 * len(listed))
    assert names(build_datasets(cfg, seed=0)[1]) == names(val)
    assert names(build_datasets(cfg, seed=1)[1]) != names(val)


@pytest.mark.parametrize("classes, expected", [("trimap", {1: 1, 2: 0, 3: 2}), ("binary", {1: 1, 2: 0, 3: 1})])
def test_real_pets_class_mapping_matches_the_raw_trimap(real_pets, classes, expected):
    # image_size 640 covers every Pet photo: no reduced-size decoding, so the mask keeps the trimap's grid
    _, val = build_datasets(PetsData(root=str(real_pets), split="official", classes=classes, image_size=640), seed=0)
    for index in (0, len(val) - 1):
        raw = np.asarray(Image.open(real_pets / "annotations/trimaps" / f"{val.sample_name(index)}.png"))
        mask = val.load(index)["mask"].numpy()
        assert mask.shape == raw.shape
        for trimap_value, label in expected.items():
            assert (raw == trimap_value).any() and (mask[raw == trimap_value] == label).all()
        assert set(np.unique(val[index][1].numpy())) <= set(expected.values())


# --- Oxford-IIIT Pet: a tiny copy made here -----------------------------------------------


def write_tiny_pets(root: Path, large: bool = False) -> dict[str, np.ndarray]:
    """Five samples in the published layout, with the originals' quirks (RGBA PNG and greyscale behind .jpg)."""
    (root / "images").mkdir(parents=True)
    (root / "annotations/trimaps").mkdir(parents=True)
    rng = np.random.default_rng(0)
    shapes = {"Abyssinian_1": (40, 60), "Abyssinian_2": (300, 400) if large else (50, 30), "Bengal_1": (33, 47),
              "Bengal_2": (45, 45), "Beagle_1": (28, 52)}  # fmt: skip
    trimaps = {}
    for name, (height, width) in shapes.items():
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        if name == "Bengal_2":
            Image.fromarray(np.dstack([pixels, pixels[..., :1]]), "RGBA").save(root / f"images/{name}.jpg", "PNG")
        elif name == "Beagle_1":
            Image.fromarray(pixels[..., 0], "L").save(root / f"images/{name}.jpg", "JPEG")
        else:
            Image.fromarray(pixels).save(root / f"images/{name}.jpg", "JPEG")
        trimap = np.full((height, width), 2, dtype=np.uint8)  # background
        trimap[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 3  # border ring
        trimap[height // 4 + 2 : 3 * height // 4 - 2, width // 4 + 2 : 3 * width // 4 - 2] = 1  # pet
        Image.fromarray(trimap, "L").save(root / f"annotations/trimaps/{name}.png")
        trimaps[name] = trimap
    (root / "annotations/trainval.txt").write_text("Abyssinian_1 1 1 1\nAbyssinian_2 1 1 1\nBengal_1 6 1 6\n")
    (root / "annotations/test.txt").write_text("# NAME CLASS-ID SPECIES BREED-ID\nBengal_2 6 1 6\nBeagle_1 7 2 7\n\n")
    return trimaps


def test_tiny_pets_loads_quirky_files(tmp_path):
    trimaps = write_tiny_pets(tmp_path)
    train, val = build_datasets(PetsData(root=str(tmp_path), split="official", image_size=32), seed=0)
    assert [val.sample_name(i) for i in range(len(val))] == ["Bengal_2", "Beagle_1"]
    for dataset in (train, val):
        for index in range(len(dataset)):
            image, mask = dataset[(0, index)]
            assert image.shape == (3, 32, 32) and mask.shape == (32, 32)
            assert set(mask.unique().tolist()) == {0, 1, 2}
            raw = trimaps[dataset.sample_name(index)]
            assert np.array_equal(dataset.load(index)["mask"].numpy(), np.array([IGNORE_INDEX, 1, 0, 2])[raw])


def test_tiny_pets_decodes_large_jpegs_at_reduced_size(tmp_path):
    write_tiny_pets(tmp_path, large=True)
    train, _ = build_datasets(PetsData(root=str(tmp_path), split="official", image_size=64), seed=0)
    sample = train.load(1)  # 300 x 400 on disk
    assert sample["image"].shape == (3, 75, 100)  # decoded at 1/4, still covering 64 x 64
    assert sample["mask"].shape == (75, 100)  # the trimap resampled (nearest) onto the decoded grid
    assert set(sample["mask"].unique().tolist()) == {0, 1, 2}
    assert train[1][0].shape == (3, 64, 64)


def test_tiny_pets_random_split_uses_both_lists(tmp_path):
    write_tiny_pets(tmp_path)
    train, val = build_datasets(PetsData(root=str(tmp_path), val_fraction=0.4), seed=0)
    assert (len(train), len(val)) == (3, 2)
    names = {d.sample_name(i) for d in (train, val) for i in range(len(d))}
    assert names == {"Abyssinian_1", "Abyssinian_2", "Bengal_1", "Bengal_2", "Beagle_1"}


@pytest.mark.parametrize("missing, kind",
                         [("images/Bengal_1.jpg", "image"), ("annotations/trimaps/Beagle_1.png", "trimap")])
def test_tiny_pets_missing_file_names_the_sample(tmp_path, missing, kind):
    write_tiny_pets(tmp_path)
    (tmp_path / missing).unlink()
    sample = Path(missing).stem
    train, val = build_datasets(PetsData(root=str(tmp_path), split="official"), seed=0)  # the check reports it
    dataset = train if sample in train.names else val
    index = dataset.names.index(sample)
    assert [finding.message for finding in dataset.inspect(index)] == [f"{kind} {tmp_path / missing} is missing"]
    with pytest.raises(UserError, match=f"pets sample '{sample}': cannot read .*{Path(missing).name}") as error:
        dataset[index]
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("missing", ["", "images", "annotations", "annotations/test.txt"])
def test_tiny_pets_missing_layout_names_the_path(tmp_path, missing):
    root = tmp_path / "pets"
    write_tiny_pets(root)
    target = root / missing
    if target.is_dir():
        shutil.rmtree(target)
    else:
        target.unlink()
    with pytest.raises(UserError, match="not found; the Oxford-IIIT Pet layout") as error:
        build_datasets(PetsData(root=str(root)), seed=0)
    assert str(root) in str(error.value) and "\n" not in str(error.value)


def test_tiny_pets_unreadable_image_names_the_sample(tmp_path):
    write_tiny_pets(tmp_path)
    (tmp_path / "images/Bengal_1.jpg").write_bytes(b"not an image")
    train, _ = build_datasets(PetsData(root=str(tmp_path), split="official"), seed=0)
    with pytest.raises(UserError, match="'Bengal_1': cannot read .*Bengal_1.jpg"):
        train[2]


def test_tiny_pets_size_mismatch_names_the_pair(tmp_path):
    write_tiny_pets(tmp_path)
    Image.fromarray(np.full((10, 10), 2, dtype=np.uint8), "L").save(tmp_path / "annotations/trimaps/Bengal_1.png")
    train, _ = build_datasets(PetsData(root=str(tmp_path), split="official"), seed=0)
    with pytest.raises(UserError,
                       match=r"'Bengal_1': image .*Bengal_1.jpg is 47x33 but its trimap .*Bengal_1.png is 10x10"):
        train.load(2)
