"""Check a job before spending GPU time on it: the job file, the storage, every sample.

    python -m segjob.check jobs/pets_unet.yaml
    python -m segjob.check jobs/pets_unet.yaml --set data.root=/data/pets --limit 200

Reads every sample of both splits (or the first --limit of each) as training would, and
lists each bad one by name: unreadable file, image/mask size mismatch, labels outside the
class range. Exit code 0 when all is well, 1 when samples are bad, 2 for a bad job/storage.
No Ray needed.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from .config import add_job_arguments, load_job, resolve_local_paths
from .constants import IGNORE_INDEX
from .data import build_datasets
from .errors import UserError, exits_cleanly_on_user_error, setup_logging
from .storage import open_storage

log = logging.getLogger("segjob")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m segjob.check", description=__doc__.split("\n\n")[0])
    add_job_arguments(parser)
    parser.add_argument("--limit", type=int, default=None, help="check only the first N samples of each split")
    return parser.parse_args(argv)


def sample_problems(dataset, split: str, limit: int | None = None) -> list[str]:
    """One line per bad sample: load it as training would and look at what came back."""
    problems = []
    num_classes = len(dataset.class_names)
    for index in range(min(len(dataset), limit) if limit else len(dataset)):
        name = dataset.sample_name(index)
        try:
            raw = dataset.load(index)
            image, mask = dataset[(0, index)]
        except UserError as error:
            problems.append(f"{split}: {error}")
            continue
        labels = torch.unique(raw["mask"]).tolist()
        bad = [label for label in labels if label != IGNORE_INDEX and not 0 <= label < num_classes]
        if bad:
            problems.append(f"{split} sample '{name}': mask labels {bad} outside 0..{num_classes - 1} (and {IGNORE_INDEX} = ignore)")
        if not torch.isfinite(image).all():
            problems.append(f"{split} sample '{name}': image has NaN or infinite values after loading")
    return problems


@exits_cleanly_on_user_error
def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    job = resolve_local_paths(load_job(args.job, args.overrides))
    log.info("job %s: valid (%s, %s, %d epochs)", args.job, job.data.name, job.model.name, job.train.epochs)

    storage = open_storage(job.storage.uri, job.storage.endpoint_url)
    storage.check()
    log.info("storage %s: reachable", job.storage.uri)

    started = time.perf_counter()
    train_set, val_set = build_datasets(job.data, job.seed)
    problems = sample_problems(train_set, "train", args.limit) + sample_problems(val_set, "val", args.limit)
    checked = sum(min(len(d), args.limit) if args.limit else len(d) for d in (train_set, val_set))
    for problem in problems:
        print(problem)
    log.info("data: %d samples checked in %.1f s (%d train, %d val in all), %d bad",
             checked, time.perf_counter() - started, len(train_set), len(val_set), len(problems))
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
