"""SIGTERM as a preemption notice: the training loop gets a grace period to checkpoint.

SIGTERM reaches a training process when Kubernetes deletes its pod, a spot interruption
handler acts, or `ray stop` runs. `install_sigterm_handler()` runs once per process (on Ray,
from the `worker_process_setup_hook`, in the main thread: Train V2 runs the training function
in a thread, where `signal.signal` raises). The notice is sticky: a SIGTERM is never taken back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time

from segjob.engine.preemption.notice import Notice, utc_stamp

log = logging.getLogger(__name__)


# --- SIGTERM -------------------------------------------------------------------------------
#
# What Ray does (2.60, ray/_private/worker.py and workers/default_worker.py): a worker
# process runs the setup hook and *then* `Worker.main_loop()`, which installs Ray's own
# SIGTERM handler through `ray._private.utils.set_sigterm_handler`; that handler raises
# SystemExit(1) ("The process receives a SIGTERM.") in the main thread, whose task loop
# polls for signals, and Ray's atexit shutdown follows: the actor dies, the Train
# controller sees a worker failure. Because Ray would overwrite a handler installed from the
# hook, segjob.cluster.process_setup wraps `set_sigterm_handler` and hands Ray's handler to
# `chain_to()`: ours stays installed and Ray's becomes the handler we chain to. Chaining to
# it = the worker exits the way Ray itself would have on SIGTERM.
# In a plain process the previous handler is usually SIG_DFL; chaining then restores it and
# re-sends SIGTERM, so the process dies by the signal exactly as without us (exit -15/143).

_DEFAULT_GRACE_S = 25.0  # Kubernetes kills at 30 s; GCP gives ~30 s
# A SIGTERM notice's deadline comes this long before the process ends: Ray must restart the group
# (a preemption) before this worker's own exit shows up as a worker failure.
_DEADLINE_BEFORE_EXIT_S = 5.0
_HARD_EXIT_AFTER_S = 5.0  # if chaining did not end the process (main thread stuck in C, threads left), os._exit

_active_lock = threading.Lock()
_install_lock = threading.Lock()
_active = 0  # training loops inside training_active(); read lock-free by the handler
_previous: object = signal.SIG_DFL  # the handler we chain to
_installed_pid: int | None = None
_grace_s = _DEFAULT_GRACE_S
_sigterm: Notice | None = None
_expired = False  # grace is over (or a second SIGTERM came): the handler chains at once
_signalled = threading.Event()  # wakes the watchdog thread; set from the handler


def install_sigterm_handler() -> None:
    """Make SIGTERM a preemption notice in this process. Main thread only; idempotent.

    Without an active training loop SIGTERM goes straight to the previous handler (Ray's
    or the default), so shutdown is never held up. With one, the loop gets `grace` seconds
    (env SEGJOB_SIGTERM_GRACE_S, default 25) to checkpoint; then the previous handler runs.
    A second SIGTERM chains at once.
    """
    global _previous, _installed_pid, _grace_s
    if threading.current_thread() is not threading.main_thread():
        # signal.signal would raise here; a setup hook that raises makes Ray drain the worker.
        log.warning("SIGTERM handler not installed: not called from the main thread")
        return
    with _install_lock:
        if _installed_pid == os.getpid():
            return
        _grace_s = _grace_from_env()
        current = signal.getsignal(signal.SIGTERM)
        if current is not _on_sigterm:  # installed in a parent before fork: keep its previous
            _previous = current
        signal.signal(signal.SIGTERM, _on_sigterm)
        _installed_pid = os.getpid()
        # Started now, not from the handler: a handler must not start threads (locks it may interrupt).
        threading.Thread(target=_watchdog, name="segjob-sigterm", daemon=True).start()


@contextlib.contextmanager
def training_active():
    """While inside, SIGTERM waits up to the grace period so the loop can checkpoint."""
    global _active
    with _active_lock:
        _active += 1
    try:
        yield
    finally:
        with _active_lock:
            _active -= 1


def chain_to(handler) -> bool:
    """Make `handler` the one ours passes SIGTERM on to, if ours is installed in this process."""
    global _previous
    if signal.getsignal(signal.SIGTERM) is _on_sigterm and os.getpid() == _installed_pid:
        _previous = handler
        return True
    return False


def sigterm_notice() -> Notice | None:
    """The SIGTERM notice of this process, if one came (it stays)."""
    return _sigterm


def wait_for_sigterm(timeout: float) -> Notice | None:
    """The SIGTERM notice, once one came; None if none came within `timeout` seconds."""
    return _sigterm if _signalled.wait(timeout) else None


def _grace_from_env() -> float:
    raw = os.environ.get("SEGJOB_SIGTERM_GRACE_S", "")
    try:
        return max(0.0, float(raw)) if raw.strip() else _DEFAULT_GRACE_S
    except ValueError:
        log.warning("SEGJOB_SIGTERM_GRACE_S=%r is not a number; using %.0f s", raw, _DEFAULT_GRACE_S)
        return _DEFAULT_GRACE_S


def _on_sigterm(signum, frame) -> None:
    # Runs in the main thread between bytecodes: no locks, no logging, no thread starts here.
    global _sigterm, _expired
    if os.getpid() != _installed_pid:  # a forked child (DataLoader worker): not the training process
        _chain(signum, frame)
        return
    first = _sigterm is None
    if first:
        now = time.time()
        _sigterm = Notice("sigterm", f"SIGTERM received at {utc_stamp(now)}",
                          deadline=now + max(0.0, _grace_s - _DEADLINE_BEFORE_EXIT_S))
    if _previous is signal.SIG_IGN:  # SIGTERM was ignored before us: only the notice changes
        return
    if _expired or not first or _active <= 0:
        _expired = True  # from now on every SIGTERM is passed on at once
        _signalled.set()
        _chain(signum, frame)
        return
    _signalled.set()  # the watchdog gives the loop its grace period


def _chain(signum, frame) -> None:
    previous = _previous
    if callable(previous):
        previous(signum, frame)  # Ray's: raises SystemExit(1) here, in the main thread
    elif previous is signal.SIG_IGN:
        return
    else:  # SIG_DFL, or None (a handler set outside Python): die by the signal as before
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)


def _watchdog() -> None:
    """Logs the notice; after the grace period re-sends SIGTERM so the handler chains."""
    global _expired
    _signalled.wait()
    if _expired:  # passed on at once, nothing held up: say so if the process is still here to
        log.debug("SIGTERM with no training loop active: passed on at once")
        return
    log.warning("SIGTERM: checkpointing now; the process ends in %.0f s at the latest", _grace_s)
    time.sleep(_grace_s)
    log.warning("SIGTERM grace period (%.0f s) over; exiting", _grace_s)
    _expired = True
    os.kill(os.getpid(), signal.SIGTERM)  # the main thread's handler now chains
    # Ray's handler exits via SystemExit, which waits for non-daemon threads (a training thread
    # that is still going): the promise is that the process ends, so end it.
    time.sleep(_HARD_EXIT_AFTER_S)
    log.warning("still running %.0f s after SIGTERM was passed on; exiting hard", _HARD_EXIT_AFTER_S)
    os._exit(128 + signal.SIGTERM)



