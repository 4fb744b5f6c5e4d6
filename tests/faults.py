"""Real fault injection for the integration tests: find processes, kill them, wait for state."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

from segjob.store import checkpoint
from segjob.store.storage import Storage


def train_worker_pids() -> list[int]:
    """PIDs of live Ray Train worker processes on this machine (Ray names them in their cmdline)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"RayTrainWorker" in cmdline:
            pids.append(int(entry.name))
    return sorted(pids)


def wait_for(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"waited {timeout:.0f} s for {what}")


def committed_steps(storage: Storage, run: str) -> list[int]:
    try:
        return [info.step for info in checkpoint.list_committed(storage, storage.path(run))]
    except Exception:  # the run folder may not exist yet, or storage may be mid-fault
        return []


def kill(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def final_state(storage, run: str):
    """The last committed checkpoint of `run`, loaded."""
    from segjob.store import checkpoint

    info = checkpoint.latest(storage, storage.path(run))
    return checkpoint.load(storage, info, expected_run=run)


def assert_same_as_reference(loaded, reference) -> None:
    """Bit-identical final weights, every step exactly once, the same loss at every step."""
    import torch

    assert loaded.model_state.keys() == reference.model_state.keys()
    for name, tensor in reference.model_state.items():
        assert torch.equal(loaded.model_state[name], tensor), f"{name} differs from the uninterrupted run"
    steps = [r["step"] for r in loaded.history if "train/step_loss" in r]
    assert steps == list(range(1, steps[-1] + 1)), "every step exactly once in the history"
    losses = {r["step"]: r["train/step_loss"] for r in loaded.history if "train/step_loss" in r}
    reference_losses = {r["step"]: r["train/step_loss"] for r in reference.history if "train/step_loss" in r}
    assert losses == reference_losses


def in_thread(fn, *args) -> tuple[threading.Thread, dict]:
    """Start fn(*args) on a daemon thread; its return value or exception lands in the dict."""
    outcome: dict = {}

    def run():
        try:
            outcome["value"] = fn(*args)
        except BaseException as error:  # noqa: BLE001 - handed to the test
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome
