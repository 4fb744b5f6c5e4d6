"""evaluate, predict and report on bad and hostile input: one line, exit 2, nothing saved changed;
and a checkpoint that names an endpoint or a bucket for its data never makes segjob connect to it.

Checkpoints are copies of the tiny synthetic run (tests/trained_runs.py) with meta.json or
history.jsonl changed as an attacker with write access to the bucket could change them (the
hashes in meta.json updated to match, since whoever writes meta.json can)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socketserver
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from bad_inputs import one_line_error
from PIL import Image
from servers import closed_port_url
from trained_runs import SegjobLog, synthetic_run

from segjob import evaluate, predict, report
from segjob.store import checkpoint
from segjob.store.storage import open_storage

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return synthetic_run(tmp_path_factory)


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("image") / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(path)
    return path


def crafted(run, folder: Path, meta_change: Callable[[dict[str, Any]], None] | None = None,
            history_tail: bytes = b"") -> Path:
    """A copy of the run's newest checkpoint at `folder`, with meta.json changed and lines added to
    history.jsonl; meta.json vouches for the new history (sha256 and size)."""
    shutil.copytree(run.checkpoint_dir, folder)
    meta = json.loads((folder / checkpoint.META_FILE).read_text())
    if history_tail:
        history = folder / checkpoint.HISTORY_FILE
        history.write_bytes(history.read_bytes() + history_tail)
        meta["files"][checkpoint.HISTORY_FILE] = {"sha256": hashlib.sha256(history.read_bytes()).hexdigest(),
                                                  "bytes": history.stat().st_size}
    if meta_change is not None:
        meta_change(meta)
    (folder / checkpoint.META_FILE).write_text(json.dumps(meta))
    return folder


# --- a checkpoint never chooses endpoints -----------------------------------------------------


class CountingEndpoint(socketserver.ThreadingTCPServer):
    """A TCP server on 127.0.0.1 that only counts who connects: the endpoint a hostile checkpoint names."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self):
        self.connections = 0
        endpoint = self

        class Count(socketserver.BaseRequestHandler):
            def handle(self):
                endpoint.connections += 1

        super().__init__(("127.0.0.1", 0), Count)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def endpoint():
    server = CountingEndpoint()
    yield server
    server.shutdown()
    server.server_close()


def pointing_at(url: str) -> Callable[[dict[str, Any]], None]:
    """meta.json's job made to read Pets from a bucket behind `url` and to store runs there too."""

    def change(meta: dict[str, Any]) -> None:
        meta["job"]["data"] = {"name": "pets", "root": "s3://their-bucket/pets", "endpoint_url": url,
                               "image_size": 32, "loader_workers": 0}
        meta["job"]["storage"] = {"uri": "s3://their-bucket/runs", "endpoint_url": url}

    return change


def test_predict_never_contacts_the_endpoint_a_checkpoint_names(run, endpoint, image, tmp_path, capsys):
    ckpt = crafted(run, tmp_path / "ckpt", pointing_at(endpoint.url))
    out = tmp_path / "out"
    with SegjobLog() as log:
        assert predict.main([str(ckpt), str(image), "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    summary = json.loads((out / "predictions.json").read_text())
    assert summary["class_names"] == ["background", "pet", "border"]  # the job's dataset, from the job alone
    assert (out / "photo.mask.png").is_file()
    time.sleep(0.2)  # a connection the command opened would have been counted by now
    assert endpoint.connections == 0
    stated = [line for line in log.messages if "not using the" in line]
    assert len(stated) == 1 and "data.root (a bucket)" in stated[0] and "storage.endpoint_url" in stated[0]
    assert endpoint.url not in log.text  # a hostile value is named by its key, not echoed


def test_evaluate_says_which_flag_gives_the_data(run, endpoint, tmp_path, capsys):
    ckpt = crafted(run, tmp_path / "ckpt", pointing_at(endpoint.url))
    message = one_line_error(evaluate.main, [str(ckpt), "--out", str(tmp_path / "eval"), "--device", "cpu"],
                             capsys, keep=[ckpt])
    assert "--data ROOT" in message and "never used" in message
    assert endpoint.connections == 0 and not (tmp_path / "eval").exists()


SHAPES = ["background", "disc", "square"]


def shapes_folder(folder: Path, count: int = 10) -> Path:
    """A `folder` dataset of synthetic shapes: images/NAME.png and index masks/NAME.png."""
    from segjob.data.synthetic import render_sample

    for kind in ("images", "masks"):
        (folder / kind).mkdir(parents=True)
    for number in range(count):
        image, mask = render_sample(np.random.default_rng(number), 32, len(SHAPES))
        Image.fromarray((image * 255).round().astype(np.uint8)).save(folder / "images" / f"s{number}.png")
        Image.fromarray(mask.astype(np.uint8)).save(folder / "masks" / f"s{number}.png")
    return folder


def reading_shapes_from(url: str, **data: Any) -> Callable[[dict[str, Any]], None]:
    """meta.json's job made to read a shapes folder from a bucket behind `url`."""

    def change(meta: dict[str, Any]) -> None:
        meta["job"]["data"] = {"name": "folder", "root": "s3://their-bucket/shapes", "endpoint_url": url,
                               "classes": SHAPES, "image_size": 32, "loader_workers": 0, **data}

    return change


def test_evaluate_reads_the_data_the_command_line_names(run, endpoint, tmp_path):
    ckpt = crafted(run, tmp_path / "ckpt", reading_shapes_from(endpoint.url))
    data = shapes_folder(tmp_path / "shapes")
    out = tmp_path / "eval"
    assert evaluate.main([str(ckpt), "--data", str(data), "--out", str(out), "--workers", "0", "--no-figures",
                          "--no-assd", "--no-progress", "--device", "cpu"]) == 0
    assert json.loads((out / "metrics.json").read_text())["images"] == 2  # 20 % of 10
    assert endpoint.connections == 0


def test_a_data_bucket_is_reached_through_the_endpoint_the_command_line_gives(
        run, endpoint, s3_endpoint, s3_bucket, monkeypatch, tmp_path):
    monkeypatch.setenv("SEGJOB_DATA_CACHE", str(tmp_path / "cache"))
    ckpt = crafted(run, tmp_path / "ckpt", reading_shapes_from(endpoint.url))
    data = shapes_folder(tmp_path / "shapes")
    storage = open_storage(f"s3://{s3_bucket}", endpoint_url=s3_endpoint)
    names = [str(path.relative_to(data)) for path in sorted(data.rglob("*.png"))]
    storage.put_folder(data, storage.path("shapes"), names)
    out = tmp_path / "eval"
    assert evaluate.main([str(ckpt), "--data", f"s3://{s3_bucket}/shapes", "--set", f"data.endpoint_url={s3_endpoint}",
                          "--out", str(out), "--workers", "0", "--no-figures", "--no-assd", "--no-progress",
                          "--device", "cpu"]) == 0
    assert json.loads((out / "metrics.json").read_text())["images"] == 2
    assert endpoint.connections == 0


def test_predict_takes_classes_and_colours_from_the_job(run, endpoint, image, tmp_path):
    colours = [[10, 20, 30], [200, 0, 0], [0, 0, 200]]
    ckpt = crafted(run, tmp_path / "ckpt", reading_shapes_from(endpoint.url, palette=colours))
    out = tmp_path / "out"
    assert predict.main([str(ckpt), str(image), "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    assert json.loads((out / "predictions.json").read_text())["class_names"] == SHAPES
    with Image.open(out / "photo.mask.png") as mask:
        assert mask.getpalette()[:9] == [value for colour in colours for value in colour]
    assert endpoint.connections == 0


# --- storage that can't be used ---------------------------------------------------------------

COMMANDS = {"evaluate": evaluate.main, "predict": predict.main, "report": report.main}


@pytest.mark.parametrize("command", COMMANDS)
def test_an_unreachable_endpoint_is_one_line_within_seconds(command, image, tmp_path, capsys):
    argv = ["s3://bucket/runs/x", "--endpoint-url", closed_port_url(), "--out", str(tmp_path / "out")]
    if command == "predict":
        argv.insert(1, str(image))
    started = time.monotonic()
    message = one_line_error(COMMANDS[command], argv, capsys, keep=[tmp_path])
    assert "cannot reach the storage endpoint" in message and "--endpoint-url" in message
    assert time.monotonic() - started < 10


def test_a_bucket_without_credentials_is_one_line(s3_endpoint, s3_bucket, monkeypatch, tmp_path, capsys):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_WEB_IDENTITY_TOKEN_FILE",
                 "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata probe: tests stay on 127.0.0.1
    message = one_line_error(report.main, [f"s3://{s3_bucket}/runs/x", "--endpoint-url", s3_endpoint,
                                           "--out", str(tmp_path / "report")], capsys, keep=[tmp_path])
    assert "no credentials found" in message and "AWS_ACCESS_KEY_ID" in message


# --- flags ----------------------------------------------------------------------------------


def test_negative_workers(run, tmp_path, capsys):
    message = one_line_error(evaluate.main, [str(run.checkpoint_dir), "--workers", "-1",
                                             "--out", str(tmp_path / "eval")], capsys, keep=[run.run_dir])
    assert "--workers" in message


@pytest.mark.parametrize("device", ["bogus", "cuda:x", "meta", f"cuda:{torch.cuda.device_count()}"])
@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_a_device_this_machine_lacks(command, device, run, image, tmp_path, capsys):
    argv = [str(run.checkpoint_dir), "--device", device, "--out", str(tmp_path / "out")]
    if command == "predict":
        argv.insert(1, str(image))
    with SegjobLog() as log:
        message = one_line_error(COMMANDS[command], argv, capsys, keep=[run.run_dir])
    assert f"--device {device}:" in message
    assert "loaded" not in log.text  # refused before the checkpoint is read


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu(run, tmp_path, capsys):
    message = one_line_error(evaluate.main, [str(run.checkpoint_dir), "--device", "cuda",
                                             "--out", str(tmp_path / "eval")], capsys, keep=[run.run_dir])
    assert "no CUDA GPU" in message and "--device cpu" in message


@pytest.mark.parametrize("command", COMMANDS)
def test_out_naming_a_file_is_refused_before_any_work(command, run, image, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("the user's notes\n")
    argv = [str(run.checkpoint_dir), "--out", str(taken)]
    if command == "predict":
        argv.insert(1, str(image))
    with SegjobLog() as log:
        message = one_line_error(COMMANDS[command], argv, capsys, keep=[tmp_path, run.run_dir])
    assert f"--out {taken}: is a file" in message
    assert "loaded" not in log.text


def test_out_below_a_file(run, tmp_path, capsys):
    (tmp_path / "taken").write_text("x")
    message = one_line_error(evaluate.main, [str(run.checkpoint_dir), "--out", str(tmp_path / "taken" / "eval")],
                             capsys, keep=[tmp_path])
    assert "is a file, so no folder can be made below it" in message


def test_export_onnx_naming_a_folder(run, tmp_path, capsys):
    message = one_line_error(predict.main, [str(run.checkpoint_dir), "--export-onnx", str(tmp_path)], capsys,
                             keep=[tmp_path])
    assert "--export-onnx" in message and "is a folder" in message


# --- images ---------------------------------------------------------------------------------


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height RGB pixels in a few bytes: what a decompression bomb looks like to PIL."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_a_256_megapixel_image(run, tmp_path, capsys):
    huge = tmp_path / "huge.png"
    huge.write_bytes(png_header(16384, 16384))
    message = one_line_error(predict.main, [str(run.checkpoint_dir), str(huge), "--out", str(tmp_path / "out")],
                             capsys, keep=[run.run_dir])
    assert f"{huge}: the image is too large" in message and "268,435,456 pixels" in message
    assert f"the limit is {2 * Image.MAX_IMAGE_PIXELS:,} pixels" in message


# --- ONNX without its packages ----------------------------------------------------------------


def test_export_onnx_without_onnxruntime(run, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # the import system itself refuses: ImportError
    message = one_line_error(predict.main, [str(run.checkpoint_dir), "--export-onnx", str(tmp_path / "m.onnx")],
                             capsys, keep=[run.run_dir])
    assert "--export-onnx: needs" in message and "onnxruntime" in message and "segjob[onnx]" in message
    assert not (tmp_path / "m.onnx").exists()


def test_export_onnx_without_onnxruntime_in_a_fresh_interpreter(run, tmp_path):
    """The command as a user runs it, with onnxruntime hidden by a package on PYTHONPATH that fails to import."""
    shim = tmp_path / "shim" / "onnxruntime"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'onnxruntime'\")\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shim.parent), str(ROOT)])}
    done = subprocess.run([sys.executable, "-m", "segjob.predict", str(run.checkpoint_dir), "--export-onnx",
                           str(tmp_path / "m.onnx")], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "needs onnxruntime" in errors[0], done.stderr


# --- damaged or hostile meta.json and history.jsonl -------------------------------------------


@pytest.mark.parametrize("tail", [b"{not json\n", b"[1, 2]\n"], ids=["not-json", "not-an-object"])
def test_a_bad_history_line_in_evaluate(tail, run, tmp_path, capsys):
    ckpt = crafted(run, tmp_path / "ckpt", history_tail=tail)
    message = one_line_error(evaluate.main, [str(ckpt), "--out", str(tmp_path / "eval")], capsys, keep=[ckpt])
    assert f"{ckpt}/{checkpoint.HISTORY_FILE}:" in message


@pytest.mark.parametrize("layout", ["checkpoint", "run"])
@pytest.mark.parametrize("tail", [b"{not json\n", b"[1, 2]\n"], ids=["not-json", "not-an-object"])
def test_a_bad_history_line_in_report(layout, tail, run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    ckpt = crafted(run, run_dir / checkpoint.CHECKPOINTS_DIR / run.checkpoint_dir.name, history_tail=tail)
    target = ckpt if layout == "checkpoint" else run_dir
    message = one_line_error(report.main, [str(target), "--out", str(tmp_path / "report")], capsys, keep=[run_dir])
    assert f"{ckpt}/{checkpoint.HISTORY_FILE}:" in message


@pytest.mark.parametrize("job", [5, "pets", [1, 2], None], ids=["number", "string", "list", "null"])
@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_meta_json_job_of_the_wrong_type(command, job, run, image, tmp_path, capsys):
    ckpt = crafted(run, tmp_path / "ckpt", lambda meta: meta.update(job=job))
    argv = [str(ckpt), "--out", str(tmp_path / "out")]
    if command == "predict":
        argv.insert(1, str(image))
    message = one_line_error(COMMANDS[command], argv, capsys, keep=[ckpt])
    assert f"{ckpt}/meta.json: 'job'" in message and "mapping" in message


def test_meta_json_nested_too_deep(run, tmp_path, capsys):
    ckpt = crafted(run, tmp_path / "ckpt")
    meta = (ckpt / checkpoint.META_FILE).read_text()
    deep = "[" * 200_000 + "]" * 200_000
    (ckpt / checkpoint.META_FILE).write_text(meta[:-1] + f', "extra": {deep}}}')
    message = one_line_error(evaluate.main, [str(ckpt), "--out", str(tmp_path / "eval")], capsys, keep=[ckpt])
    assert str(ckpt) in message
