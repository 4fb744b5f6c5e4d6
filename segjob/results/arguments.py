"""The command-line pieces evaluate, predict and report share: the checkpoint and data flags,
the device, and output paths checked before any work is done.

    add_checkpoint_arguments(parser)
    check_output_folder(args.out, "--out")            # refused before scoring, not after
    trained = trained_from_arguments(args, need_data=True)

A wrong --device, or an --out that is a file, is one line before the checkpoint is even read.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch
import yaml

from segjob.errors import UserError
from segjob.results.trained import PICKS, Trained, load_trained

DEVICE_TYPES = ("cpu", "cuda", "mps")


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CKPT",
                        help="a checkpoint folder, or a run folder (its best checkpoint); local, s3:// or gs://")
    parser.add_argument("--pick", choices=PICKS, default="best",
                        help="for a run folder: its best checkpoint by the run's metric, or the latest")
    parser.add_argument("--data", metavar="ROOT", default=None,
                        help="where the job's dataset is on this machine (replaces data.root; data.path for nyuv2); "
                             "a checkpoint's own data location is never used")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="data.KEY=VALUE",
                        help="change a data key, e.g. --set data.split=official (repeatable)")
    parser.add_argument("--endpoint-url", default=None,
                        help="S3/GCS endpoint of CKPT (MinIO, emulators); never taken from the checkpoint")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    parser.add_argument("--raw-weights", action="store_true",
                        help="a run trained with train.ema: use (and, for a run folder, pick the best by) the "
                             "trained weights, not their moving average")


def trained_from_arguments(args: argparse.Namespace, need_data: bool = False, with_data: bool = True) -> Trained:
    """The checkpoint that add_checkpoint_arguments' arguments name, loaded; --threshold (each command
    has its own) checked against the model."""
    device = device_from_argument(args.device)
    trained = load_trained(args.checkpoint, endpoint_url=args.endpoint_url, data_root=args.data,
                           data_overrides=data_overrides(args.overrides), pick=args.pick, need_data=need_data,
                           with_data=with_data, device=device, raw_weights=args.raw_weights)
    if args.threshold is not None and not trained.is_binary:
        raise UserError("--threshold: only for one-channel (bce, bce+dice) models; this one takes the argmax")
    return trained


def data_overrides(overrides: list[str]) -> dict[str, Any]:
    """{key: value} from ["data.KEY=VALUE", ...]; values are YAML, as in the job file."""
    parsed = {}
    for text in overrides:
        key, sep, value = text.partition("=")
        key = key.strip()
        if not sep or not key.startswith("data.") or "." in key[len("data."):] or key == "data.":
            raise UserError(f"--set {text}: expected data.KEY=VALUE (only top-level data keys change here), "
                            f"e.g. --set data.image_size=256")
        try:
            parsed[key[len("data."):]] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            parsed[key[len("data."):]] = value
    return parsed


def device_from_argument(text: str | None) -> torch.device:
    """--device as a torch.device that exists on this machine (default: cuda when available)."""
    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {text}: not a device name; use cpu, cuda or cuda:N") from None
    if device.type not in DEVICE_TYPES:
        raise UserError(f"--device {text}: segjob runs on cpu, cuda or cuda:N (or mps), not {device.type}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {text}: no Apple GPU (MPS) here; use --device cpu")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"--device {text}: no CUDA GPU is visible here; use --device cpu")
        if device.index is not None and device.index >= count:
            raise UserError(f"--device {text}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}")
    return device


def check_output_folder(path: Path, flag: str) -> None:
    """Refuse an output folder that can't be one (a file, or under a file) or can't be written,
    before any work: the outputs of a long evaluation must not fail at the very end."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path}: is a file, not a folder; choose another {flag}")
    existing = next(parent for parent in (path, *path.absolute().parents) if parent.exists())
    if not existing.is_dir():
        raise UserError(f"{flag} {path}: {existing} is a file, so no folder can be made below it; "
                        f"choose another {flag}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: {existing} is not writable; choose another {flag}")


def check_output_file(path: Path, flag: str) -> None:
    """The same for one output file: not a folder, and its folder can be made and written."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a folder; give a file name, e.g. {path / 'model.onnx'}")
    check_output_folder(path.absolute().parent, flag)
