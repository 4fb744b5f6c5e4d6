"""Evaluate a trained checkpoint on its dataset: metrics, per-image scores and figures. No Ray.

    python -m segjob.evaluate ./best
    python -m segjob.evaluate s3://bucket/runs/pets_unet --data /data/oxford-iiit-pet --out eval/pets
    python -m segjob.evaluate runs/quickstart/checkpoints/step-000000384 --split train --limit 200
    python -m segjob.evaluate ./best --data /data/VOCdevkit --tta-flip --tta-scales 0.75 1 1.25

CKPT is a checkpoint folder, or a run folder (its best checkpoint by the run's metric;
--pick latest for the newest), local, s3:// or gs://. A dataset that reads files needs --data
(or --set data.root=...): the data location and the endpoints a checkpoint records are never
used. Every sample of the split is scored exactly once (the count is checked). Written into --out:

    metrics.json     figures from the summed confusion matrix (mIoU, pixel and mean class
                     accuracy, Dice, per class IoU/Dice), the job's loss, mean ASSD per class
                     over the images, the confusion matrix; nan is written as null
    per_image.csv    a row per sample: the job's loss, pixel accuracy, mIoU, mean Dice, mean ASSD;
                     IoU, Dice, ASSD per class
    figures/         best / median / worst samples for each metric (per class for Dice, IoU and
                     ASSD, as in the Pets U-Net study), the 16 lowest- and 16 highest-loss images
                     (lowest_loss.png, highest_loss.png, as in the PSPNet write-up; --loss-images),
                     IoU per class, the confusion matrix, box plots of per-image Dice and ASSD per class

Pixels are counted on each label file's own grid by default (the job's eval.grid, as published
figures are counted): the model runs at the job's scale (data.image_size; sliding windows of
data.crop.size where the job trained on crops) and its logits are upsampled to the label's size.
--grid input counts on the model's input grid instead (labels resized), segjob's count before
eval.grid existed. --tta-flip and --tta-scales add test-time views whose probabilities are
averaged. metrics.json records the protocol used ("protocol"), and so do the log lines.

ASSD is in pixels of the grid counted on; see segjob.learning.metrics for its convention when
a mask is empty. --no-assd skips it, --no-figures the pictures.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from segjob.errors import ArgumentParser, exits_cleanly_on_user_error, setup_logging
from segjob.results.arguments import add_checkpoint_arguments, check_output_folder, trained_from_arguments
from segjob.results.evaluation import evaluate
from segjob.results.evaluation_outputs import LOSS_IMAGES, write_outputs
from segjob.results.protocol_arguments import add_protocol_arguments, check_protocol_arguments, protocol_from_arguments

log = logging.getLogger("segjob")

SPLITS = ("val", "train")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m segjob.evaluate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_arguments(parser)
    parser.add_argument("--out", default="evaluation", help="output folder (default: ./evaluation)")
    parser.add_argument("--split", choices=SPLITS, default="val", help="which split of the job's dataset")
    parser.add_argument("--limit", type=int, default=None, help="only the first N samples of the split")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the job's train.batch_size")
    parser.add_argument("--workers", type=int, default=None,
                        help="DataLoader processes (default: the job's data.loader_workers)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="one-channel models: foreground above this probability")
    add_protocol_arguments(parser, grid=True)
    parser.add_argument("--loss-images", type=int, default=LOSS_IMAGES, metavar="N",
                        help=f"figures of the N lowest- and N highest-loss images (default {LOSS_IMAGES}; 0: none)")
    parser.add_argument("--no-assd", dest="assd", action="store_false", help="skip ASSD")
    parser.add_argument("--no-figures", dest="figures", action="store_false",
                        help="only metrics.json and per_image.csv")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    args = parser.parse_args(argv)
    for name in ("limit", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.loss_images < 0:
        parser.error("--loss-images must be 0 (no loss figures) or more")
    if args.workers is not None and args.workers < 0:
        parser.error("--workers must be 0 (load in this process) or more")
    if args.threshold is not None and not 0.0 < args.threshold < 1.0:
        parser.error("--threshold must be between 0 and 1")
    check_protocol_arguments(parser, args)
    return args


@exits_cleanly_on_user_error
def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    out = Path(args.out)
    for folder in (out, out / "figures") if args.figures else (out,):
        check_output_folder(folder, "--out")  # before the scoring, which may take hours
    trained = trained_from_arguments(args, need_data=True)
    workers = trained.job.data.loader_workers if args.workers is None else args.workers
    result = evaluate(trained, args.split, args.batch_size or trained.job.train.batch_size, workers, args.limit,
                      args.assd, args.threshold, args.progress, protocol_from_arguments(trained.job, args))
    written = write_outputs(result, out, args.figures, args.loss_images)
    summary = result.summary()
    keys = [f"{args.split}/{name}" for name in ("miou", "pixel_acc", "dice", "assd", "loss")]
    shown = "  ".join(f"{key} {summary[key]:.4f}" for key in keys if key in summary)
    log.info("%s, %d %s images (%s): %s", trained.source, result.scores.indices.size, args.split,
             result.protocol.describe(), shown)
    log.info("wrote %d files to %s", len(written), out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
