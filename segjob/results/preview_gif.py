"""An animated GIF of a run's per-epoch previews (<run>/previews/epoch-NNN.png, written in training
when train.preview_every_epochs is on): one frame per stored preview, in epoch order.

    gif = write_preview_gif(storage, run_path, out / "previews.gif")   # None when the run has no previews
"""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path

from PIL import Image

from segjob.engine.previews import FOLDER
from segjob.store.storage import Storage

log = logging.getLogger("segjob")

FRAME = re.compile(r"^epoch-(\d+)\.png$")
FRAME_MS = 600  # each epoch on screen
LAST_FRAME_MS = 2000  # the final picture stays a little longer before the loop starts again


def preview_files(storage: Storage, run_path: str) -> list[tuple[int, str]]:
    """(epoch, stored path) of every preview, in epoch order."""
    found = []
    for name in storage.files(f"{run_path}/{FOLDER}"):
        match = FRAME.match(name)
        if match:
            found.append((int(match.group(1)), f"{run_path}/{FOLDER}/{name}"))
    return sorted(found)


def write_preview_gif(storage: Storage, run_path: str, path: Path) -> Path | None:
    """The GIF of the run's previews, or None (nothing written) when it has none. A preview that
    cannot be read is left out with a warning."""
    frames = []
    for epoch, stored in preview_files(storage, run_path):
        try:
            with Image.open(io.BytesIO(storage.read_bytes(stored))) as picture:
                frames.append(picture.convert("RGB"))
        except (OSError, ValueError) as error:  # a damaged or partly uploaded picture: the rest still animate
            log.warning("preview of epoch %d (%s) left out of the GIF: %s", epoch, storage.display(stored), error)
    if not frames:
        return None
    size = frames[0].size  # every preview of a run has the same size; a stranger one is fitted to it
    frames = [frame if frame.size == size else frame.resize(size, Image.Resampling.LANCZOS) for frame in frames]
    durations = [FRAME_MS] * (len(frames) - 1) + [LAST_FRAME_MS]
    path.parent.mkdir(parents=True, exist_ok=True)
    # an adaptive palette per frame; PIL drops a frame identical to the one before (each title names its epoch)
    frames[0].save(path, format="GIF", save_all=True, append_images=frames[1:], duration=durations, loop=0,
                   optimize=False)
    return path
