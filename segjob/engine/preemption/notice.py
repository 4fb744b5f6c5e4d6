"""A preemption notice: where it came from, what it said, and by when the work must be safe."""

from __future__ import annotations

import datetime
import time
from typing import NamedTuple


class Notice(NamedTuple):
    source: str  # "sigterm" | "aws" | "gcp" | "ray"
    detail: str  # one line for logs and the run's history
    deadline: float | None = None  # Unix time by which the work here must be safe; None: unknown


def utc_stamp(seconds: float | None = None) -> str:
    """A Unix time (default: now) as the clouds write it, 2026-11-23T14:00:00Z."""
    moment = datetime.datetime.fromtimestamp(time.time() if seconds is None else seconds, datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_utc(text: str) -> float | None:
    try:
        moment = datetime.datetime.strptime(str(text), "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        return None
    return moment.replace(tzinfo=datetime.timezone.utc).timestamp()


def one_line(text: str, limit: int = 200) -> str:
    return " ".join(str(text).split())[:limit]
