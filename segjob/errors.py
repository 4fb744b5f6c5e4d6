"""User errors: one clear line, no traceback."""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from collections.abc import Callable


class UserError(Exception):
    """Something the user can fix (a job file, a path, a bucket). Printed as one line."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, but a bad flag is one line and exit 2 like every other user error;
    the usage is one --help away."""

    def error(self, message: str):
        print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def exits_cleanly_on_user_error(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a command's main(): a UserError becomes one line on stderr and exit code 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs) or 0
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return wrapper


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (test capture, Ray's log redirection)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_logging(level: int = logging.INFO) -> None:
    """segjob's own lines on stderr. Its own handler: Ray workers have configured the root logger already."""
    logger = logging.getLogger("segjob")
    if not any(getattr(handler, "segjob", False) for handler in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s segjob: %(message)s", datefmt="%H:%M:%S"))
        handler.segjob = True
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
