"""Find the best checkpoint of a run or a whole sweep in storage and download it, verified.

    python -m segjob.pull s3://bucket/runs/tune_pets --to ./best
    python -m segjob.pull ./runs/tune_quickstart --list
    python -m segjob.pull gs://bucket/runs/tune_pets --top 3 --to ./top3 --metric val/loss --mode min
    python -m segjob.evaluate ./best

URI is a run (`<storage.uri>/<name>`), a sweep (its `trials/` hold one run per trial) or a
folder of runs, on s3://, gs:// or a local path. Only the checkpoints' meta.json files are
read to rank them (no Ray, no cluster, no Tune files); checkpoints without meta.json are
unfinished uploads and never count. The chosen checkpoint is downloaded into a temporary
folder beside DIR, every file is checked against the sha256 in its meta.json, and only then
is the folder renamed to DIR, so DIR is either the complete verified checkpoint or untouched.
An object key or a run name that would land outside DIR is refused before anything is written.
With --top K, DIR holds one folder per checkpoint, best first.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from segjob.errors import ArgumentParser, UserError, exits_cleanly_on_user_error, setup_logging
from segjob.store import checkpoint
from segjob.store.ranking import Candidate, Ranking, format_table, rank
from segjob.store.storage import Storage, open_storage, replace_dir

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
            if name in ("", ".", "..") or "/" in name or "\\" in name:
                raise UserError(f"{storage.display(candidate.info.path)}: refusing unsafe name '{name}'")
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(f".{dest.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        if len(chosen) == 1:
            fetch_verified(storage, chosen[0], partial, ranking, 1)
        else:
            partial.mkdir()
            for number, candidate in enumerate(chosen, start=1):
                fetch_verified(storage, candidate, partial / f"{number:02d}-{candidate.folder_name}", ranking, number)
            _write_json(partial / PULLED_FILE, {"source": storage.display(storage.root), "checkpoints": [
                f"{number:02d}-{candidate.folder_name}" for number, candidate in enumerate(chosen, start=1)]})
        replace_dir(partial, dest)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return dest


def fetch_verified(storage: Storage, candidate: Candidate, folder: Path, ranking: Ranking, number: int) -> None:
    checkpoint.fetch(storage, candidate.info.path, folder)  # refuses keys with '..' or absolute paths
    loaded = checkpoint.load_folder(folder)  # every hash, and the safe loaders, or a UserError naming the file
    if loaded.meta.get("step") != candidate.info.step:
        raise UserError(f"{storage.display(candidate.info.path)}: meta.json changed while pulling; pull again")
    _write_json(folder / PULLED_FILE, {
        "source": storage.display(candidate.info.path), "run": candidate.run, "checkpoint": candidate.info.name,
        "rank": number, "epoch": candidate.info.epoch, "step": candidate.info.step,
        "metric": ranking.metric, "mode": ranking.mode, "value": candidate.value, "params": candidate.params,
        "pulled_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    })


def check_replaceable(dest: Path) -> None:
    """Only an empty folder or an earlier pull is replaced: never a folder of the user's own files."""
    if not os.path.lexists(dest):
        return
    if dest.is_dir() and not dest.is_symlink() and (not any(dest.iterdir()) or (dest / PULLED_FILE).is_file()):
        return
    raise UserError(f"{dest}: exists and is not an earlier pull; choose another --to or remove it")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n")


# --- the command ------------------------------------------------------------------------


@exits_cleanly_on_user_error
def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    storage = open_location(args.uri, args.endpoint_url)
    ranking = rank(storage, storage.root, args.metric, args.mode)
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
    log.info("pulled %s/%s (%s %.4f, epoch %d) -> %s; every file verified against its sha256",
             best.run, best.info.name, ranking.metric, best.value, best.info.epoch,
             dest if len(chosen) == 1 else f"{dest} ({len(chosen)} checkpoints, best first)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
