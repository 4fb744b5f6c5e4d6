"""The flags of evaluate and predict that choose how the model is run: test-time augmentation, and
(evaluate) the grid pixels are counted on.

    add_protocol_arguments(parser, grid=True)
    args = parser.parse_args(argv); check_protocol_arguments(parser, args)
    protocol = protocol_from_arguments(trained.job, args)     # the job's protocol, changed by the flags
"""

from __future__ import annotations

import argparse
from typing import Any

from segjob.engine.inference import Protocol, protocol_of

GRIDS = ("original", "input")
MAX_TTA_SCALE = 4.0


def add_protocol_arguments(parser: argparse.ArgumentParser, grid: bool) -> None:
    parser.add_argument("--tta-flip", action="store_true",
                        help="test-time augmentation: add a horizontally flipped view; probabilities are averaged")
    parser.add_argument("--tta-scales", type=float, nargs="+", default=None, metavar="S",
                        help="test-time augmentation: views at these multiples of the job's scale, e.g. 0.75 1 1.25 "
                             "(default: 1 only)")
    if grid:
        parser.add_argument("--grid", choices=GRIDS, default=None,
                            help="original: count every pixel of each label file, as published figures do; input: "
                                 "labels resized to the model's input (default: the job's eval.grid)")


def check_protocol_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for scale in args.tta_scales or ():
        if not 0.0 < scale <= MAX_TTA_SCALE:
            parser.error(f"--tta-scales: {scale:g} is not a scale; each must be above 0 and at most {MAX_TTA_SCALE:g}")
    if args.tta_scales and len(set(args.tta_scales)) != len(args.tta_scales):
        parser.error("--tta-scales: a scale is repeated; give each once")


def protocol_from_arguments(job: Any, args: argparse.Namespace) -> Protocol:
    return protocol_of(job, grid=getattr(args, "grid", None), flip=args.tta_flip,
                       scales=tuple(args.tta_scales) if args.tta_scales else None)
