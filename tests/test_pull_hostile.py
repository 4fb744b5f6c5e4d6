"""`pull` against a bucket someone else can write (issue 15): it may make pull refuse, never make it
write outside --to, bring along files meta.json does not list, accept a file whose size or sha256
differs, delete the user's files in --to, or end in a traceback.

The runs are real files, committed the way trials commit them (test_pull.write_sweep), on a local
folder and on the moto S3 server; the bucket writer tampers through the same storage API. On S3,
pull goes through a loopback proxy that counts the bytes it downloads.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from bad_inputs import one_line_error, tree_digest
from proxy import TcpProxy
from test_pull import write_sweep

from segjob.errors import UserError
from segjob.pull import PULLED_FILE, main
from segjob.store import checkpoint
from segjob.store.storage import Storage

STEP = "trials/a1a1a1a1/checkpoints/step-000000008"  # the sweep's best checkpoint by val/miou
CHECKPOINT_FILES = [checkpoint.HISTORY_FILE, checkpoint.META_FILE, checkpoint.MODEL_FILE, checkpoint.STATE_FILE]
BLOB = 20 << 20  # what a bucket writer adds; never downloaded
LITTLE = 2 << 20  # more than everything a pull of the tiny sweep reads


@dataclass
class Source:
    """A sweep in storage, the bucket writer's handle on it, and how pull reaches it."""

    uri: str
    storage: Storage  # straight to the store: the bucket writer's side
    flags: list[str]  # pull's --endpoint-url (through the proxy) on S3
    folder: Path | None  # the local storage folder, None on S3
    proxy: TcpProxy | None

    @property
    def best(self) -> str:
        """The best checkpoint's committed attempt (what its step folder's meta.json names), relative to the root."""
        attempt = checkpoint.committed_folder(self.storage, self.path(STEP))
        return attempt.removeprefix(self.storage.root).strip("/")

    def path(self, *parts: str) -> str:
        return self.storage.path(*parts)

    def display(self, *parts: str) -> str:
        return self.storage.display(self.path(*parts))

    def read(self, *parts: str) -> bytes:
        return self.storage.read_bytes(self.path(*parts))

    def write(self, data: bytes, *parts: str) -> None:
        self.storage.write_bytes(self.path(*parts), data)

    def snapshot(self) -> dict[str, str]:
        """Every stored object and its sha256: what a refused pull must leave as it was (a local
        folder is compared by one_line_error's keep)."""
        if self.folder:
            return {}
        return {key: hashlib.sha256(self.storage.fs.cat_file(key)).hexdigest()
                for key in self.storage.fs.find(self.storage.root)}

    def rewrite_meta(self, checkpoint_path: str, change) -> None:
        meta = json.loads(self.read(checkpoint_path, checkpoint.META_FILE))
        change(meta)
        self.write(json.dumps(meta).encode(), checkpoint_path, checkpoint.META_FILE)

    def replace_consistently(self, checkpoint_path: str, name: str, data: bytes) -> None:
        """A file and its meta.json entry both rewritten: what someone who can write the bucket can do."""
        self.write(data, checkpoint_path, name)
        self.rewrite_meta(checkpoint_path, lambda meta: meta["files"][name].update(
            sha256=hashlib.sha256(data).hexdigest(), bytes=len(data)))


@pytest.fixture(params=["local", "s3", "gcs"])
def source(request, tmp_path) -> Source:
    if request.param == "local":
        folder = tmp_path / "sweep"
        yield Source(str(folder), write_sweep(str(folder)), [], folder, None)
        return
    endpoint = request.getfixturevalue(f"{request.param}_endpoint")
    scheme = "s3" if request.param == "s3" else "gs"
    uri = f"{scheme}://{request.getfixturevalue(f'{request.param}_bucket')}/runs/sweep"
    target = urlsplit(endpoint)
    with TcpProxy(target.hostname, target.port) as proxy:
        yield Source(uri, write_sweep(uri, endpoint), ["--endpoint-url", proxy.url], None, proxy)


def pull(source: Source, *args) -> int:
    return main([source.uri, *source.flags, *map(str, args)])


def refused(source: Source, capsys, *args, keep: Path | None, run: str = "") -> str:
    """pull of the sweep (or of one run in it) refused in one line, the source and `keep` (the --to
    folder) unchanged; the error line."""
    before = source.snapshot()
    uri = f"{source.uri}/trials/{run}" if run else source.uri
    message = one_line_error(main, [uri, *source.flags, *map(str, args)], capsys,
                             keep=[folder for folder in (source.folder, keep) if folder])
    assert source.snapshot() == before
    assert ".partial" not in message and "segjob-ckpt-" not in message, "errors name the source, not a temporary copy"
    return message


def earlier_pull(source: Source, to: Path, capsys) -> None:
    """A good pull into `to` first: a refused pull must leave it as it was."""
    assert pull(source, "--to", to) == 0
    assert json.loads((to / PULLED_FILE).read_text())["run"] == "a1a1a1a1"
    capsys.readouterr()


def downloaded(source: Source) -> int:
    return source.proxy.bytes_down if source.proxy else 0


# --- only what meta.json lists, at the size and hash it lists ----------------------------


def test_only_the_files_meta_json_lists_are_downloaded(source, tmp_path, capsys):
    source.write(b"\0" * BLOB, source.best, "blob.bin")
    source.write(b"not in meta.json", source.best, "sub", "extra.txt")
    source.write(b"{}", source.best, "meta.json.bak")
    assert pull(source, "--to", tmp_path / "best") == 0
    assert sorted(p.name for p in (tmp_path / "best").iterdir()) == sorted(CHECKPOINT_FILES + [PULLED_FILE])
    assert downloaded(source) < LITTLE, "the 20 MB blob was never read"
    assert "every file verified against meta.json (size and sha256)" in capsys.readouterr().err
    checkpoint.load_folder(tmp_path / "best")


def test_a_file_larger_than_meta_json_lists_is_refused_as_it_streams(source, tmp_path, capsys):
    earlier_pull(source, tmp_path / "best", capsys)
    model = source.read(source.best, checkpoint.MODEL_FILE)
    source.write(model + b"\0" * BLOB, source.best, checkpoint.MODEL_FILE)  # meta.json's size is now smaller
    before = downloaded(source)
    message = refused(source, capsys, "--to", tmp_path / "best", keep=tmp_path / "best")
    assert message == (f"{source.display(source.best, checkpoint.MODEL_FILE)}: larger than the {len(model)} bytes "
                       f"meta.json lists; the checkpoint is damaged or was tampered with")
    assert downloaded(source) - before < LITTLE, "the download stopped at the listed size"
    assert sorted(p.name for p in tmp_path.iterdir()) == (["best", "sweep"] if source.folder else ["best"])


def test_a_file_whose_sha256_differs_is_refused(source, tmp_path, capsys):
    earlier_pull(source, tmp_path / "best", capsys)
    state = bytearray(source.read(source.best, checkpoint.STATE_FILE))
    state[len(state) // 2] ^= 0xFF  # same size, other bytes
    source.write(bytes(state), source.best, checkpoint.STATE_FILE)
    message = refused(source, capsys, "--to", tmp_path / "best", keep=tmp_path / "best")
    assert message.startswith(f"{source.display(source.best, checkpoint.STATE_FILE)}: sha256 does not match meta.json")
    with pytest.raises(UserError, match="sha256 does not match") as loading:  # evaluate and resume load it this way
        checkpoint.load(source.storage, source.path(source.best))
    assert str(loading.value).startswith(source.display(source.best, checkpoint.STATE_FILE))


def test_a_symlink_in_a_local_checkpoint_is_refused_not_followed(tmp_path, capsys):
    source = Source(str(tmp_path / "sweep"), write_sweep(str(tmp_path / "sweep")), [], tmp_path / "sweep", None)
    earlier_pull(source, tmp_path / "best", capsys)
    model = Path(source.path(source.best, checkpoint.MODEL_FILE))
    elsewhere = tmp_path / "outside" / "weights"  # the same bytes: sha256 and size would match
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(model.read_bytes())
    model.unlink()
    model.symlink_to(elsewhere)
    history = Path(source.path(source.best, checkpoint.HISTORY_FILE))
    message = refused(source, capsys, "--to", tmp_path / "best", keep=tmp_path / "best")
    assert message.startswith(f"{model}: a symbolic link; a checkpoint holds only regular files")

    model.unlink()
    model.write_bytes(elsewhere.read_bytes())
    history.unlink()
    history.symlink_to("/etc/hostname")  # never dereferenced into a regular file
    message = refused(source, capsys, "--to", tmp_path / "best", keep=tmp_path / "best")
    assert message.startswith(f"{history}: a symbolic link")
    with pytest.raises(UserError, match="a symbolic link"):
        checkpoint.load(source.storage, source.path(source.best))


# --- meta.json and history.jsonl that are not what segjob writes -------------------------


def test_a_meta_json_nested_200k_deep_is_skipped_as_damaged(source, tmp_path, capsys):
    deep = b"[" * 200_000 + b"]" * 200_000
    source.write(deep, STEP, checkpoint.META_FILE)  # the meta.json listing reads
    run = source.path("trials", "a1a1a1a1")
    assert checkpoint.latest(source.storage, run).step == 4, "resume skips it instead of blocking"
    assert pull(source, "--to", tmp_path / "best") == 0  # the best undamaged checkpoint instead
    assert json.loads((tmp_path / "best" / PULLED_FILE).read_text())["run"] == "b2b2b2b2"
    assert "meta.json: nested deeper than 64 levels; the file is damaged" in capsys.readouterr().err

    only = "trials/c3c3c3c3/checkpoints/step-000000004"  # a run whose only checkpoint is damaged so
    source.write(deep, only, checkpoint.META_FILE)
    message = refused(source, capsys, "--to", tmp_path / "best", keep=tmp_path / "best", run="c3c3c3c3")
    assert message.startswith(f"{source.display('trials/c3c3c3c3')}: no committed checkpoints found")


NO_CHECKPOINT = "no committed checkpoints found"
WRONG_TYPES = {  # a change to meta.json: (what _parse_meta says, so the checkpoint is skipped, or None; pull's error)
    "job-is-5": (lambda meta: meta.update(job=5), "'job' must be a mapping", NO_CHECKPOINT),
    "step-is-true": (lambda meta: meta.update(step=True), "'step' and 'epoch' must be integers", NO_CHECKPOINT),
    "metrics-a-list": (lambda meta: meta.update(metrics=[0.5]), "'metrics' must be a mapping", NO_CHECKPOINT),
    "run-a-list": (lambda meta: meta.update(run=["c3c3c3c3"]), "'run' must be the run's name", NO_CHECKPOINT),
    "bytes-a-string": (lambda meta: meta["files"]["state.pt"].update(bytes="12"),
                       "files.state.pt.bytes must be a size in bytes", NO_CHECKPOINT),
    "sha256-a-path": (lambda meta: meta["files"]["state.pt"].update(sha256="../../etc"),
                      "files.state.pt.sha256 is not 64 lowercase hex digits", NO_CHECKPOINT),
    "files-one-only": (lambda meta: meta.update(files={"state.pt": meta["files"]["state.pt"]}),
                       "'files' must list exactly", NO_CHECKPOINT),
    "metric-is-5": (lambda meta: meta["job"].update(metric=5), None,
                    "the runs' jobs name 0 different metric names (); choose one with --metric"),
    "metric-name-a-list": (lambda meta: meta["job"].update(metric={"name": ["val/miou"], "mode": "max"}), None,
                           "the runs' jobs name 0 different metric names (); choose one with --metric"),
}


@pytest.mark.parametrize("case", WRONG_TYPES)
def test_wrong_types_in_meta_json_are_one_line(source, tmp_path, capsys, case):
    change, skipped_because, expected = WRONG_TYPES[case]
    only = "trials/c3c3c3c3/checkpoints/step-000000004"  # the run's only checkpoint
    source.rewrite_meta(only, change)
    message = refused(source, capsys, "--to", tmp_path / "best", keep=None, run="c3c3c3c3")
    assert message.startswith(f"{source.display('trials/c3c3c3c3')}: {expected}")
    if skipped_because:  # what the warning before the error line says, and what resume skips it for
        with pytest.raises(UserError, match=re.escape(skipped_because)):
            checkpoint._parse_meta(source.read(only, checkpoint.META_FILE), "meta.json")
        assert checkpoint.latest(source.storage, source.path("trials", "c3c3c3c3")) is None


@pytest.mark.parametrize("line, expected", [
    (b"{not json", "line 2: not valid JSON; the file is damaged"),
    (b"[1, 2]", "line 2: not a JSON object; the file is damaged"),
    (b"[" * 100_000, "line 2: nested deeper than 64 levels; the file is damaged"),
    (b'{"step": 1' + b"0" * 5000 + b"}", "line 2: not valid JSON; the file is damaged"),  # past the int digit limit
])
def test_a_bad_history_line_is_one_line(source, tmp_path, capsys, line, expected):
    earlier_pull(source, tmp_path / "best", capsys)
    history = source.read(source.best, checkpoint.HISTORY_FILE)
    source.replace_consistently(source.best, checkpoint.HISTORY_FILE, history + line + b"\n")
    message = refused(source, capsys, "--to", tmp_path / "best", keep=tmp_path / "best")
    assert message == f"{source.display(source.best, checkpoint.HISTORY_FILE)}: {expected}"


# --- a checkpoint removed while it is pulled ----------------------------------------------


@pytest.mark.parametrize("when", ["fetch", "_download_listed"])  # before meta.json is read, or after it
def test_a_checkpoint_removed_while_pulling_is_one_line(source, tmp_path, capsys, monkeypatch, when):
    earlier_pull(source, tmp_path / "best", capsys)
    best = source.best  # the attempt pull is about to fetch
    original = getattr(checkpoint, when)
    removed = []

    def retention_runs_first(*args, **kwargs):
        if not removed:  # as apply_retention removes a checkpoint: meta.json first, then the folder
            source.storage.rm(source.path(STEP, checkpoint.META_FILE))
            source.storage.rm(source.path(STEP))
            removed.append(STEP)
        return original(*args, **kwargs)

    monkeypatch.setattr(checkpoint, when, retention_runs_first)
    message = one_line_error(main, [source.uri, *source.flags, "--to", str(tmp_path / "best")], capsys,
                             keep=[tmp_path / "best"])
    assert removed and message == (f"{source.display(best)}: changed while pulling (removed, e.g. by the run's "
                                   f"retention); pull again")
    monkeypatch.undo()
    assert pull(source, "--to", tmp_path / "best") == 0, "pulling again takes the best one left"
    assert json.loads((tmp_path / "best" / PULLED_FILE).read_text())["run"] == "b2b2b2b2"


# --- --to: only an earlier pull, exactly as it left it, is replaced -----------------------


def test_the_users_files_in_the_to_folder_are_never_deleted(tmp_path, capsys):
    source = Source(str(tmp_path / "sweep"), write_sweep(str(tmp_path / "sweep")), [], tmp_path / "sweep", None)
    best = tmp_path / "best"
    earlier_pull(source, best, capsys)
    (best / "eval").mkdir()  # `python -m segjob.evaluate ./best --out ./best/eval`
    (best / "eval" / "scores.json").write_text('{"val/miou": 0.5}')
    (best / "eval" / "figures").mkdir()
    (best / "eval" / "figures" / "0.png").write_bytes(b"png")
    message = refused(source, capsys, "--to", best, keep=best)
    assert message == (f"{best}: holds files the earlier pull did not write (extra: eval/); "
                       f"pull into another --to, or move those out of {best} first")

    (best / "notes.txt").write_text("mine")
    (best / "history.jsonl").write_text("edited\n")
    (best / "link").symlink_to(tmp_path / "sweep")
    message = refused(source, capsys, "--to", best, keep=best)
    assert "(extra: eval/, link, notes.txt; changed: history.jsonl)" in message

    assert pull(source, "--to", tmp_path / "other") == 0, "another --to works"
    shutil.rmtree(best / "eval")
    for extra in ("notes.txt", "link"):
        (best / extra).unlink()
    (best / "history.jsonl").write_bytes((tmp_path / "other" / "history.jsonl").read_bytes())
    (best / checkpoint.MODEL_FILE).unlink()  # a file the pull wrote, gone: nothing of the user's to lose
    assert pull(source, "--to", best, "--metric", "val/loss", "--mode", "max") == 0, "its own files, as they were"
    assert json.loads((best / PULLED_FILE).read_text())["run"] == "c3c3c3c3"


def test_a_to_folder_of_several_checkpoints_is_checked_file_by_file(tmp_path, capsys):
    source = Source(str(tmp_path / "sweep"), write_sweep(str(tmp_path / "sweep")), [], tmp_path / "sweep", None)
    top = tmp_path / "top"
    assert pull(source, "--top", "2", "--to", top) == 0
    recorded = json.loads((top / PULLED_FILE).read_text())["files"]
    assert sorted(recorded) == sorted(f"{folder}/{name}" for folder in ("01-a1a1a1a1-step-000000008",
                                                                         "02-b2b2b2b2-step-000000008")
                                      for name in CHECKPOINT_FILES + [PULLED_FILE])
    assert recorded == {name: digest for name, digest in tree_digest(top).items() if name != PULLED_FILE}
    (top / "02-b2b2b2b2-step-000000008" / "eval.json").write_text("{}")
    message = refused(source, capsys, "--top", "2", "--to", top, keep=top)
    assert "(extra: 02-b2b2b2b2-step-000000008/eval.json)" in message
    (top / "02-b2b2b2b2-step-000000008" / "eval.json").unlink()
    assert pull(source, "--top", "3", "--to", top) == 0


def test_a_pulled_json_without_its_files_is_not_trusted(tmp_path, capsys):
    source = Source(str(tmp_path / "sweep"), write_sweep(str(tmp_path / "sweep")), [], tmp_path / "sweep", None)
    best = tmp_path / "best"
    best.mkdir()
    (best / PULLED_FILE).write_text('{"source": "an older segjob recorded no files"}')
    (best / "results.csv").write_text("mine")
    message = refused(source, capsys, "--to", best, keep=best)
    assert message == (f"{best / PULLED_FILE}: records no list of the files the pull wrote (an older segjob, "
                       f"or edited); choose another --to or remove {best}")
    (best / PULLED_FILE).write_text("[" * 100_000)
    assert refused(source, capsys, "--to", best, keep=best).startswith(f"{best / PULLED_FILE}: records no list")
