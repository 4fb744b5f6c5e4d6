"""Check a job before spending GPU time on it: the job file, the storage, every sample.

    python -m segjob.check jobs/pets_unet.yaml
    python -m segjob.check jobs/pets_unet.yaml --set data.root=/data/pets --limit 200 --workers 8

Checks what the model needs of the job (its smallest input) and that the metric names a class
of the dataset, then builds both splits as training would and reads every sample fully, in parallel (threads:
PIL's decoders and h5py release the GIL), then lists every problem at once, one line each,
naming the file: unreadable or truncated images, image/mask size mismatches, mask values
outside the dataset's classes and ignore value, colour masks where label values are
expected, listed samples whose files are missing, empty splits. Warnings (a PNG or GIF
behind a .jpg name, an alpha channel, a mask without a labelled pixel) are listed too but
do not fail. Exit code 0 when no sample is bad, 1 when some are, 2 for a bad job or
storage. No Ray needed. `python -m segjob.train` runs the same check first and refuses to
start on errors (its --skip-bad leaves the bad samples out instead).
"""

from __future__ import annotations

import argparse
import logging

from segjob.data.audit import check_job_data
from segjob.errors import ArgumentParser, UserError, exits_cleanly_on_user_error, setup_logging
from segjob.job.load import add_job_arguments, load_job, resolve_local_paths
from segjob.models import check_model_fits
from segjob.store.storage import open_storage

log = logging.getLogger("segjob")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m segjob.check", description=__doc__.split("\n\n")[0])
    add_job_arguments(parser)
    parser.add_argument("--limit", type=int, default=None, help="check only the first N samples of each split")
    parser.add_argument("--workers", type=int, default=None,
                        help="threads reading samples (default: CPUs + 4, at most 32)")
    return parser.parse_args(argv)


@exits_cleanly_on_user_error
def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit {args.limit}: give at least 1 (or leave it out to check everything)")
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers {args.workers}: give at least 1 thread (or leave it out for CPUs + 4, at most 32)")
    job = resolve_local_paths(load_job(args.job, args.overrides))
    try:
        check_model_fits(job)
    except ValueError as error:
        raise UserError(f"{args.job}: {error}") from None
    log.info("job %s: valid (%s, %s, %d epochs)", args.job, job.data.name, job.model.name, job.train.epochs)

    storage = open_storage(job.storage.uri, job.storage.endpoint_url)
    storage.check()
    log.info("storage %s: reachable", job.storage.uri)

    report = check_job_data(job, args.job, args.limit, args.workers)
    for problem in report.problems:
        print(problem)
    log.info(report.summary())
    if report.bad_samples and hasattr(job.data, "exclude"):
        log.info("to train without the bad samples: python -m segjob.train %s --skip-bad", args.job)
    return 1 if report.errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
