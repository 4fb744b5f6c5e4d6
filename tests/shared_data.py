"""Where the real sample datasets are: ../shared/data beside the checkout, or $SEGJOB_SHARED_DATA first.
Tests that need one skip, with the reason, where it is absent (nothing from it is copied into the repo)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def find_shared_data(folder: str, marker: str = "") -> Path | None:
    """The sample's folder if it is here (holding `marker`, a subfolder, when given)."""
    candidates = [Path(__file__).resolve().parents[2] / "shared" / "data" / folder]
    if os.environ.get("SEGJOB_SHARED_DATA"):
        candidates.insert(0, Path(os.environ["SEGJOB_SHARED_DATA"]) / folder)
    return next((path for path in candidates if (path / marker).is_dir()), None)


def shared_data(folder: str, marker: str = "") -> Path:
    """The sample's folder; skips the test when it is absent."""
    found = find_shared_data(folder, marker)
    if found is None:
        pytest.skip(f"no {folder} sample at ../shared/data/{folder} (or $SEGJOB_SHARED_DATA)")
    return found
