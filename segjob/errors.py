"""User errors: one clear line, no traceback."""

from __future__ import annotations

import functools
import logging
import sys
from typing import Callable


class UserError(Exception):
    """Something the user can fix (a job file, a path, a bucket). Printed as one line."""


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


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
