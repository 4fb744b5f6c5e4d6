"""Find the best checkpoint of a run or a whole sweep in storage and download it, verified.

    python -m segjob.pull s3://bucket/runs/tune_pets --to ./best
    python -m segjob.pull ./runs/tune_quickstart --list
    python -m segjob.pull gs://bucket/runs/tune_pets --top 3 --to ./top3 --metric val/loss --mode min
    python -m segjob.evaluate ./best

URI is a run (`<storage.uri>/<name>`), a sweep (its `trials/` hold one run per trial) or a
folder of runs, on s3://, gs:// or a local path. Only the checkpoints' meta.json files are read
to rank them (no Ray, no cluster, no Tune files); checkpoints without meta.json are unfinished
uploads and never count. A run trained with train.ema is ranked by its EMA weights' scores
(val_ema/...), the weights evaluate and predict use; --raw-weights ranks by the trained ones'.
The chosen checkpoint's meta.json is downloaded into a temporary folder beside DIR, then
exactly the files it lists (nothing else stored beside them), each refused as soon as it grows
past its listed size and checked against its sha256; only then is the folder renamed to DIR, so
DIR is either the complete verified checkpoint or untouched. DIR is replaced only when empty or
holding exactly what an earlier pull wrote (its pulled.json records every file's sha256). With
--top K, DIR holds one folder per checkpoint, best first. What pull trusts and checks:
docs/pull.md.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path, PurePosixPath
from typing import Any

from segjob.errors import ArgumentParser, UserError, exits_cleanly_on_user_error, setup_logging
from segjob.store import checkpoint
from segjob.store.ranking import Candidate, Ranking, format_table, printable, rank
from segjob.store.storage import Storage, open_storage, replace_dir, retry

log = logging.getLogger("segjob")

PULLED_FILE = "pulled.json"  # what a pull wrote, where from: marks DIR as safe to replace by the next pull


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m segjob.pull", description=__doc__.split("\n\n")[0])
    parser.add_argument("uri", help="a run or a sweep: s3://bucket/runs/NAME, gs://bucket/runs/NAME or ./runs/NAME")
    parser.add_argument("--to", default="best", help="where to put the checkpoint (default: ./best)")
    parser.add_argument("--metric", help="rank by this metric (default: the job's metric.name)")
    parser.add_argument("--mode", choices=["max", "min"], help="default: the job's metric.mode")
    parser.add_argument("--top", type=int, default=1, metavar="K", help="download the K best checkpoints (default 1)")
    parser.add_argument("--list", action="store_true", help="print every ranked checkpoint; download nothing")
    parser.add_argument("--raw-weights", action="store_true",
                        help="runs with train.ema: rank by the trained weights' scores (val/...), not the EMA's "
                             "(val_ema/...); evaluate and predict then need --raw-weights too")
    parser.add_argument("--endpoint-url",
                        help="S3/GCS endpoint (MinIO, emulators); else AWS_ENDPOINT_URL / STORAGE_EMULATOR_HOST")
    args = parser.parse_args(argv)
    if args.top < 1:
        parser.error("--top must be 1 or more")
    return args


# --- ranking ----------------------------------------------------------------------------


def open_location(uri: str, endpoint_url: str | None = None) -> Storage:
    """Storage rooted at the run or sweep; a local folder must exist (pull never creates one there)."""
    storage = open_storage(uri, endpoint_url)
    if storage.is_local:
        if not os.path.isdir(storage.root):
            raise UserError(f"{uri}: no such folder")
    else:
        storage.check()
    return storage




# --- downloading ------------------------------------------------------------------------


def download(storage: Storage, chosen: list[Candidate], dest: Path, ranking: Ranking) -> Path:
    """Fetch and verify into a temporary sibling of dest, then rename it into place."""
    dest = Path(dest).absolute()
    check_replaceable(dest)
    for candidate in chosen:  # names from a listing become local folder names: refuse anything but plain names
        for name in (candidate.run, candidate.info.name):
            if name in ("", ".", "..") or "/" in name or "\\" in name or not name.isprintable():
                where = printable(storage.display(candidate.info.path))
                raise UserError(f"{where}: refusing unsafe name {ascii(name)}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(f".{dest.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        if len(chosen) == 1:
            fetch_verified(storage, chosen[0], partial, ranking, 1)
        else:
            partial.mkdir()
            for number, candidate in enumerate(chosen, start=1):
                fetch_verified(storage, candidate, partial / f"{number:02d}-{candidate.folder_name}", ranking, number)
            write_record(partial, {"source": storage.display(storage.root), "checkpoints": [
                f"{number:02d}-{candidate.folder_name}" for number, candidate in enumerate(chosen, start=1)]})
        replace_dir(partial, dest)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return dest


def fetch_verified(storage: Storage, candidate: Candidate, folder: Path, ranking: Ranking, number: int) -> None:
    """meta.json and exactly the files it lists, each checked (size while streaming, sha256, the safe
    loaders), into folder; or one error naming the checkpoint in storage, never our temporary copy."""
    source = storage.display(candidate.info.path)
    refuse_escaping_keys(storage, candidate.info.path)
    try:
        checkpoint.fetch(storage, candidate.info.path, folder)
        loaded = checkpoint.load_folder(folder)
    except UserError as error:
        if not storage.exists(f"{candidate.info.path}/{checkpoint.META_FILE}"):  # gone since it was ranked
            raise UserError(f"{source}: changed while pulling (removed, e.g. by the run's retention); "
                            f"pull again") from None
        raise UserError(str(error).replace(str(folder), source)) from None
    if loaded.meta["step"] != candidate.info.step:
        raise UserError(f"{source}: meta.json changed while pulling; pull again")
    write_record(folder, {
        "source": source, "run": candidate.run, "checkpoint": candidate.info.name,
        "rank": number, "epoch": candidate.info.epoch, "step": candidate.info.step,
        "metric": ranking.metric, "mode": ranking.mode, "value": candidate.value, "params": candidate.params,
        "pulled_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    })


def refuse_escaping_keys(storage: Storage, path: str) -> None:
    """Only the files meta.json lists are read, but a key under the checkpoint that no file inside DIR
    could have ('..', absolute, empty parts) was written to escape a download folder: refuse it all."""
    if storage.is_local:
        return  # a file system has no such names
    prefix = path.rstrip("/") + "/"
    for key in retry(storage.fs.find, path, what=f"list {path}"):
        parts = key[len(prefix):].split("/")
        if key.startswith(prefix) and not key.endswith("/") and any(part in ("", ".", "..") for part in parts):
            raise UserError(f"{storage.display(path)}: refusing unsafe key {ascii(key[len(prefix):])} "
                            f"('..', '.' or empty parts): the checkpoint was crafted to write outside a folder")


# --- what a pull wrote, and what may replace it -----------------------------------------


def write_record(folder: Path, record: dict[str, Any]) -> None:
    """pulled.json: where the files came from, and the sha256 of every file the pull wrote into folder."""
    files, _, _ = scan(folder)
    record["files"] = {name: _sha256(folder / name) for name in sorted(files) if name != PULLED_FILE}
    (folder / PULLED_FILE).write_text(json.dumps(record, indent=1) + "\n")


def check_replaceable(dest: Path) -> None:
    """Only an empty folder, or an earlier pull exactly as it left it, is replaced: never the user's own
    files (an evaluation written into it, notes): those stay, and the pull is refused."""
    if not os.path.lexists(dest):
        return
    not_a_pull = UserError(f"{dest}: exists and is not an earlier pull; choose another --to or remove it")
    if dest.is_symlink() or not dest.is_dir():
        raise not_a_pull
    if not any(dest.iterdir()):
        return  # nothing in it to lose
    if not os.path.lexists(dest / PULLED_FILE):
        raise not_a_pull
    recorded = recorded_files(dest)
    files, folders, others = scan(dest)
    wanted = {parent.as_posix() for name in recorded for parent in PurePosixPath(name).parents}
    extra_folders = tuple(f"{name}/" for name in folders if name not in wanted)
    extra = [f"{name}/" if name in folders else name for name in folders + files + others
             if name != PULLED_FILE and name not in recorded and name not in wanted
             and not name.startswith(extra_folders)]  # an extra folder is named once, not file by file
    changed = [name for name in files if name in recorded and _sha256(dest / name) != recorded[name]]
    if extra or changed:
        found = "; ".join(f"{what}: {_some(names)}" for what, names in (("extra", extra), ("changed", changed))
                          if names)
        raise UserError(f"{dest}: holds files the earlier pull did not write ({found}); pull into another --to, "
                        f"or move those out of {dest} first")


def recorded_files(dest: Path) -> dict[str, str]:
    """{relative path: sha256} that the pull into dest recorded in its pulled.json."""
    path = dest / PULLED_FILE
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > (16 << 20):
            raise ValueError
        files = json.loads(path.read_bytes()).get("files")
    except (ValueError, RecursionError, AttributeError, OSError):
        files = None
    if not isinstance(files, dict) or not all(isinstance(value, str) for value in files.values()):
        raise UserError(f"{path}: records no list of the files the pull wrote (an older segjob, or edited); "
                        f"choose another --to or remove {dest}")
    return files


def scan(folder: Path) -> tuple[list[str], list[str], list[str]]:
    """(regular files, folders, anything else: symlinks, ...) below folder, as sorted relative paths;
    symlinks are never followed."""
    files, folders, others = [], [], []
    pending = [folder]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                relative = Path(entry.path).relative_to(folder).as_posix()
                if entry.is_dir(follow_symlinks=False):
                    folders.append(relative)
                    pending.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    files.append(relative)
                else:
                    others.append(relative)
    return sorted(files), sorted(folders), sorted(others)


def _some(names: list[str], shown: int = 3) -> str:
    names = [printable(name) for name in sorted(names)]
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# --- the command ------------------------------------------------------------------------


@exits_cleanly_on_user_error
def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    storage = open_location(args.uri, args.endpoint_url)
    ranking = rank(storage, storage.root, args.metric, args.mode, raw_weights=args.raw_weights)
    where = storage.display(storage.root)
    log.info("%d checkpoints with %s in %d run(s) under %s, ranked (%s)",
             len(ranking.candidates), ranking.metric, ranking.runs, where, ranking.mode)
    print(format_table(ranking, None if args.list else max(args.top, 10)))
    if args.list:
        return 0
    chosen = ranking.candidates[: args.top]
    if len(chosen) < args.top:
        log.info("only %d checkpoint(s) to pull (asked for %d)", len(chosen), args.top)
    dest = download(storage, chosen, Path(args.to), ranking)
    best = chosen[0]
    log.info("pulled %s/%s (%s %.4f, epoch %d) -> %s; every file verified against meta.json (size and sha256)",
             best.run, best.info.name, ranking.metric, best.value, best.info.epoch,
             dest if len(chosen) == 1 else f"{dest} ({len(chosen)} checkpoints, best first)")
    if args.raw_weights and checkpoint.EMA_FILE in best.info.meta["files"]:
        log.info("it holds EMA weights too, which evaluate and predict use by default: pass them --raw-weights")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
