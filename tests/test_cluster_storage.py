"""The storage as Ray sees it: a pyarrow filesystem over segjob's fsspec one (RunConfig(storage_filesystem=...))."""

from __future__ import annotations

import pyarrow.fs

from segjob.cluster.driver import pyarrow_filesystem
from segjob.store.storage import open_storage


def test_rays_filesystem_on_s3(s3_endpoint, s3_bucket):
    storage = open_storage(f"s3://{s3_bucket}/runs", s3_endpoint)
    storage.write_bytes(storage.path("run", "ckpt", "meta.json"), b"{}")
    fs = pyarrow_filesystem(storage)
    info = fs.get_file_info(storage.path("run", "ckpt", "meta.json"))
    assert info.type == pyarrow.fs.FileType.File and info.size == 2
    listed = fs.get_file_info(pyarrow.fs.FileSelector(storage.path("run"), recursive=True))
    assert {(i.path, i.type) for i in listed} == {
        (storage.path("run", "ckpt"), pyarrow.fs.FileType.Directory),
        (storage.path("run", "ckpt", "meta.json"), pyarrow.fs.FileType.File),
    }
    with fs.open_output_stream(storage.path("run", "from_arrow.txt")) as out:
        out.write(b"arrow")
    assert storage.read_bytes(storage.path("run", "from_arrow.txt")) == b"arrow"


def test_rays_filesystem_local(tmp_path):
    assert isinstance(pyarrow_filesystem(open_storage(str(tmp_path))), pyarrow.fs.LocalFileSystem)
