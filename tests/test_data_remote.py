"""Data roots in a bucket: synced once per node into the local cache, never used half-copied."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from test_data_formats import write_camvid, write_nyuv2

from segjob.data import build_datasets, remote
from segjob.errors import UserError
from segjob.job.schema import CamVidData, NYUv2Data
from segjob.store.storage import Storage, open_storage


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("SEGJOB_DATA_CACHE", str(folder))
    return folder


@pytest.fixture
def downloads(monkeypatch) -> list[str]:
    """Every folder download made through segjob.store.storage, in order."""
    made: list[str] = []
    original = Storage.get_folder

    def counted(self, path, local_dir):
        made.append(path)
        return original(self, path, local_dir)

    monkeypatch.setattr(Storage, "get_folder", counted)
    return made


def upload(local: Path, uri: str, endpoint: str) -> None:
    storage = open_storage(uri, endpoint)
    files = sorted(str(path.relative_to(local)) for path in local.rglob("*") if path.is_file())
    storage.put_folder(str(local), storage.root, files)


def camvid_in_bucket(tmp_path: Path, bucket: str, endpoint: str) -> str:
    write_camvid(tmp_path / "local")
    uri = f"s3://{bucket}/datasets/camvid"
    upload(tmp_path / "local", uri, endpoint)
    return uri


def test_a_bucket_root_is_synced_once_and_then_read_locally(tmp_path, s3_bucket, s3_endpoint, cache, downloads):
    uri = camvid_in_bucket(tmp_path, s3_bucket, s3_endpoint)
    cfg = CamVidData(root=uri, endpoint_url=s3_endpoint, image_size=32)
    train, val = build_datasets(cfg, seed=0)
    assert (len(train), len(val)) == (3, 2) and len(downloads) == 1
    assert train.image_path(train.sample_name(0)).is_relative_to(cache)
    assert train[0][0].shape == (3, 32, 32)
    markers = list(cache.glob("*.complete.json"))
    assert len(markers) == 1 and uri in markers[0].read_text()
    build_datasets(cfg, seed=0)
    assert len(downloads) == 1, "the second build reads the node's copy"


def test_a_half_copy_is_never_used(tmp_path, s3_bucket, s3_endpoint, cache, downloads):
    uri = camvid_in_bucket(tmp_path, s3_bucket, s3_endpoint)
    cfg = CamVidData(root=uri, endpoint_url=s3_endpoint)
    train, _ = build_datasets(cfg, seed=0)
    copy = next(path for path in cache.iterdir() if path.is_dir())
    # a node preempted mid-copy leaves a partial download and no marker (or a copy without its marker)
    next(cache.glob("*.complete.json")).unlink()
    (copy / "CamVid/train").joinpath(f"{train.sample_name(0)}.png").unlink()
    (cache / f".{copy.name}.partial-dead").mkdir()
    train, _ = build_datasets(cfg, seed=0)
    assert len(downloads) == 2 and train.inspect(0) == []
    assert not (cache / f".{copy.name}.partial-dead").exists()


def test_a_changed_bucket_is_synced_again(tmp_path, s3_bucket, s3_endpoint, cache, downloads):
    uri = camvid_in_bucket(tmp_path, s3_bucket, s3_endpoint)
    cfg = CamVidData(root=uri, endpoint_url=s3_endpoint)
    build_datasets(cfg, seed=0)
    storage = open_storage(uri, s3_endpoint)
    two_of_three = (tmp_path / "local/CamVid/train.txt").read_text().splitlines(keepends=True)[:2]
    storage.write_bytes(storage.path("CamVid/train.txt"), "".join(two_of_three).encode())
    train, _ = build_datasets(cfg, seed=0)
    assert len(downloads) == 2 and len(train) == 2


def test_workers_of_one_node_share_one_download(tmp_path, s3_bucket, s3_endpoint, cache, downloads):
    uri = camvid_in_bucket(tmp_path, s3_bucket, s3_endpoint)
    cfg = CamVidData(root=uri, endpoint_url=s3_endpoint)
    sizes, errors = [], []

    def build():
        try:
            sizes.append(len(build_datasets(cfg, seed=0)[0]))
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and sizes == [3, 3, 3] and len(downloads) == 1


def test_a_single_remote_file_and_its_companions(tmp_path, s3_bucket, s3_endpoint, cache):
    write_nyuv2(tmp_path / "nyu")
    upload(tmp_path / "nyu", f"s3://{s3_bucket}/nyu", s3_endpoint)
    cfg = NYUv2Data(path=f"s3://{s3_bucket}/nyu/nyu_depth_v2_labeled.mat", endpoint_url=s3_endpoint, image_size=32)
    train, val = build_datasets(cfg, seed=0)
    assert (len(train), len(val)) == (4, 2) and train.path.is_relative_to(cache)
    assert val[0][0].shape == (4, 32, 32)


def test_an_empty_prefix_is_one_clear_error(s3_bucket, s3_endpoint, cache):
    with pytest.raises(UserError, match=rf"nothing is stored at s3://{s3_bucket}/missing"):
        build_datasets(CamVidData(root=f"s3://{s3_bucket}/missing", endpoint_url=s3_endpoint), seed=0)


def test_local_paths_pass_through(tmp_path):
    assert remote.local_root(str(tmp_path)) == tmp_path
    assert remote.local_root(f"file://{tmp_path}") == tmp_path
    assert remote.local_file(str(tmp_path / "x.mat")) == tmp_path / "x.mat"
