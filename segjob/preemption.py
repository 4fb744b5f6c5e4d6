"""Preemption notices: learn that this machine is about to go away, early enough to checkpoint.

Sources, checked in this order by `PreemptionWatcher.notice()`:

- **sigterm**: SIGTERM to this process (Kubernetes pod deletion, a spot interruption handler,
  `ray stop`). `install_sigterm_handler()` runs once per process from Ray's
  `worker_process_setup_hook` (the main thread: Train V2 runs the training function in a
  thread, where `signal.signal` raises). The notice is sticky: a SIGTERM is never taken back.
- **aws**: EC2 spot `instance-action` through IMDSv2 (token, then GET; 404 = nothing), about
  two minutes ahead; the deadline is the notice's own `time`.
- **gcp**: GCE `instance/preempted` = TRUE, about 30 s ahead.

The cloud sources are polled by daemon threads every `poll_interval_s`; `notice()` only reads
what they found, so the engine can call it every step. Off that cloud the first requests
fail to connect; after 3 such failures with no answer ever the source is dropped.

Ray's own drain notices (`ray.train.get_preemption_info()`) are a barrier across ranks, so
the engine asks for them from its training loop, never from here.

When a notice arrives the watcher calls `drain(notice)` once, from a side thread: on Ray that
asks Ray to drain this node with the PREEMPTION reason and the notice's deadline, so Ray's
accounting (a preemption never uses up `failure.max_failures`), every rank's
`get_preemption_info()` and the elastic policy all see it. A drain cannot be undone, so from
then on the notice stays, even if the cloud withdraws it; a notice that drained nothing (no
Ray, or `ray_drain: false`) may still be withdrawn.
"""

from __future__ import annotations

import contextlib
import datetime
import http.client
import json
import logging
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Callable, NamedTuple

from .config import PreemptionSection

log = logging.getLogger(__name__)


class Notice(NamedTuple):
    source: str  # "sigterm" | "aws" | "gcp" | "ray"
    detail: str  # one line for logs and the run's history
    deadline: float | None = None  # Unix time by which the work here must be safe; None: unknown


def utc_stamp(seconds: float | None = None) -> str:
    """A Unix time (default: now) as the clouds write it, 2026-11-23T14:00:00Z."""
    moment = datetime.datetime.fromtimestamp(time.time() if seconds is None else seconds, datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_utc(text: str) -> float | None:
    try:
        moment = datetime.datetime.strptime(str(text), "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        return None
    return moment.replace(tzinfo=datetime.timezone.utc).timestamp()


def _one_line(text: str, limit: int = 200) -> str:
    return " ".join(str(text).split())[:limit]


# --- SIGTERM -------------------------------------------------------------------------------
#
# What Ray does (2.60, ray/_private/worker.py and workers/default_worker.py): a worker
# process runs the setup hook and *then* `Worker.main_loop()`, which installs Ray's own
# SIGTERM handler through `ray._private.utils.set_sigterm_handler`; that handler raises
# SystemExit(1) ("The process receives a SIGTERM.") in the main thread, whose task loop
# polls for signals, and Ray's atexit shutdown follows: the actor dies, the Train
# controller sees a worker failure. Because Ray would overwrite a handler installed from the
# hook, `install_sigterm_handler` wraps `set_sigterm_handler` (only when Ray is already
# imported, as it is in a worker): ours stays installed and Ray's becomes the handler we
# chain to. Chaining to it = the worker exits the way Ray itself would have on SIGTERM.
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
        _keep_ours_when_ray_sets_sigterm()
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


def sigterm_notice() -> Notice | None:
    """The SIGTERM notice of this process, if one came (it stays)."""
    return _sigterm


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


def _keep_ours_when_ray_sets_sigterm() -> None:
    """In a Ray worker, Ray installs its SIGTERM handler after the setup hook: make it our chain target."""
    utils = sys.modules.get("ray._private.utils")  # never import Ray here
    original = getattr(utils, "set_sigterm_handler", None)
    if original is None or getattr(original, "segjob", False):
        return

    def set_sigterm_handler(handler):
        global _previous
        if signal.getsignal(signal.SIGTERM) is _on_sigterm and os.getpid() == _installed_pid:
            _previous = handler
        else:
            original(handler)

    set_sigterm_handler.segjob = True
    utils.set_sigterm_handler = set_sigterm_handler


# --- Metadata servers and Ray ---------------------------------------------------------------

_CONNECT_TIMEOUT_S = 1.0
_READ_TIMEOUT_S = 2.0
_GIVE_UP_AFTER = 3  # connection failures in a row, before any answer: not on this cloud
_AWS_TOKEN_TTL_S = 21600
_AWS_NOTICE_S = 120.0  # an instance-action without a readable time: AWS's documented two minutes
_GCP_NOTICE_S = 30.0  # GCE stops a preempted VM about 30 s after instance/preempted turns TRUE


class _Connection(http.client.HTTPConnection):
    """Short connect timeout (off-cloud the address is a black hole), a longer one for reads."""

    def connect(self):
        self.timeout = _CONNECT_TIMEOUT_S
        super().connect()
        self.sock.settimeout(_READ_TIMEOUT_S)


class _Handler(urllib.request.HTTPHandler):
    def http_open(self, req):
        return self.do_open(_Connection, req)


# No proxies: metadata addresses are link-local, and a proxy must never see an IMDS token.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _Handler)


def _request(url: str, headers: dict[str, str], method: str = "GET") -> tuple[int, str]:
    """(status, body); an HTTP error status is an answer too. OSError when nothing answered."""
    request = urllib.request.Request(url, headers=headers, method=method)
    try:
        with _opener.open(request, timeout=_READ_TIMEOUT_S) as response:
            return response.status, response.read(65536).decode("utf-8", "replace")
    except urllib.error.HTTPError as error:
        error.close()
        return error.code, ""
    except (http.client.HTTPException, ValueError) as error:  # garbage on the wire: as good as no answer
        raise OSError(str(error)) from error


class _Unexpected(Exception):
    """The server answered, but not as the metadata service would: keep the last state."""


class _Aws:
    name = "aws"

    def __init__(self, base_url: str):
        self.base = base_url.rstrip("/")
        self._token: str | None = None
        self._token_expires = 0.0

    def check(self) -> Notice | None:
        status, body = self._get_instance_action()
        if status == 401:  # token revoked or expired early: one fresh token, one retry
            self._token = None
            status, body = self._get_instance_action()
        if status == 404:
            return None
        if status != 200:
            raise _Unexpected(f"spot/instance-action answered HTTP {status}")
        try:
            action = json.loads(body)
            detail = f"instance-action {action['action']} at {action['time']}"
            deadline = _parse_utc(action["time"])
        except (ValueError, KeyError, TypeError):
            detail = f"instance-action {_one_line(body)}"
            deadline = None
        return Notice("aws", _one_line(detail), deadline or time.time() + _AWS_NOTICE_S)

    def _get_instance_action(self) -> tuple[int, str]:
        headers = {"X-aws-ec2-metadata-token": self._fresh_token()}
        return _request(f"{self.base}/latest/meta-data/spot/instance-action", headers)

    def _fresh_token(self) -> str:
        if self._token is None or time.monotonic() >= self._token_expires:
            status, body = _request(
                f"{self.base}/latest/api/token",
                {"X-aws-ec2-metadata-token-ttl-seconds": str(_AWS_TOKEN_TTL_S)},
                method="PUT",
            )
            if status != 200 or not body:
                raise _Unexpected(f"IMDSv2 token request answered HTTP {status}")
            self._token = body.strip()
            self._token_expires = time.monotonic() + _AWS_TOKEN_TTL_S - 60  # renew a minute early
        return self._token


class _Gcp:
    name = "gcp"

    def __init__(self, base_url: str):
        self.url = f"{base_url.rstrip('/')}/computeMetadata/v1/instance/preempted"

    def check(self) -> Notice | None:
        status, body = _request(self.url, {"Metadata-Flavor": "Google"})
        if status != 200:
            raise _Unexpected(f"instance/preempted answered HTTP {status}")
        value = body.strip().upper()
        if value == "TRUE":
            return Notice("gcp", "instance/preempted TRUE", time.time() + _GCP_NOTICE_S)
        if value == "FALSE":
            return None
        raise _Unexpected(f"instance/preempted answered {_one_line(body, 40)!r}")


# The machine's own metadata address, as the cloud SDKs read it (botocore, google-auth): a node's
# environment wins over the job file, which is the same on every node.
AWS_ENDPOINT_ENV = "AWS_EC2_METADATA_SERVICE_ENDPOINT"
GCE_HOST_ENV = "GCE_METADATA_HOST"


def _gce_base_url() -> str | None:
    host = os.environ.get(GCE_HOST_ENV, "").strip()
    if not host:
        return None
    return host if "://" in host else f"http://{host}"


class PreemptionWatcher:
    """Polls the cloud sources in daemon threads; `notice()` is a cheap read.

    `drain(notice)` (on Ray: drain this node for preemption) is called once, from a side
    thread, for the first notice; it returns whether a drain was sent.
    """

    def __init__(self, cfg: PreemptionSection, drain: Callable[[Notice], bool] | None = None):
        self.cfg = cfg
        self._drain = drain if cfg.ray_drain else None
        self._sources: list = []
        if cfg.aws_metadata_url:
            self._sources.append(_Aws(os.environ.get(AWS_ENDPOINT_ENV) or cfg.aws_metadata_url))
        if cfg.gcp_metadata_url:
            self._sources.append(_Gcp(_gce_base_url() or cfg.gcp_metadata_url))
        self._found: dict[str, Notice | None] = {source.name: None for source in self._sources}
        self._drained: Notice | None = None  # the notice a drain was sent for: it stays
        self._drain_started = False
        self._stop = threading.Event()
        self._threads: list[tuple[str, threading.Thread]] = []
        self._lock = threading.Lock()  # start/stop and the one drain

    def start(self) -> None:
        with self._lock:
            if self._threads:
                return
            self._stop = threading.Event()
            for source in self._sources:
                thread = threading.Thread(
                    target=self._poll, args=(source, self._stop), name=f"segjob-preemption-{source.name}", daemon=True
                )
                self._threads.append((source.name, thread))
                thread.start()
            if self.cfg.sigterm and self._drain is not None:
                thread = threading.Thread(target=self._wait_for_sigterm, args=(self._stop,),
                                          name="segjob-preemption-sigterm", daemon=True)
                self._threads.append(("sigterm", thread))
                thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stop.set()
            threads, self._threads = self._threads, []
        # A thread inside a request finishes it (≤ 2 s) and exits on its own; don't wait for that.
        deadline = time.monotonic() + 0.5
        for _, thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def notice(self) -> Notice | None:
        if self.cfg.sigterm and _sigterm is not None:
            return _sigterm
        if self._drained is not None:
            return self._drained
        for name in ("aws", "gcp"):
            found = self._found.get(name)
            if found is not None:
                return found
        return None

    def drained(self) -> bool:
        """A drain was sent for this node (the notice can no longer be withdrawn)."""
        return self._drained is not None

    def polling(self) -> list[str]:
        """Sources still being polled (an unreachable cloud drops out after 3 failures)."""
        return [name for name, thread in list(self._threads) if thread.is_alive() and name != "sigterm"]

    def _on_notice(self, notice: Notice) -> None:
        with self._lock:
            if self._drain is None or self._drain_started:
                return
            self._drain_started = True
        try:
            sent = self._drain(notice)
        except Exception as error:  # never let a failed drain stop the checkpoint the notice asks for
            log.warning("could not drain this node for preemption (%s); checkpointing anyway", _one_line(error))
            return
        if sent:
            self._drained = notice

    def _wait_for_sigterm(self, stop: threading.Event) -> None:
        while not stop.is_set():
            if _signalled.wait(0.2) and _sigterm is not None:
                self._on_notice(_sigterm)
                return

    def _poll(self, source, stop: threading.Event) -> None:
        answered = False  # this source has answered once: failures from now on are transient
        failures = 0
        warned = False
        while not stop.is_set():
            try:
                found = source.check()
            except OSError as error:  # nothing answered (refused, timeout, DNS)
                failures += 1
                if not answered and failures >= _GIVE_UP_AFTER:
                    log.debug("%s metadata unreachable (%s); not polling it", source.name, _one_line(error))
                    return
                if answered and not warned:
                    log.warning("%s preemption poll failed (%s); keeping the last state", source.name, _one_line(error))
                    warned = True
            except Exception as error:  # an odd answer: off this cloud, something else may hold the address
                if answered and not warned:
                    log.warning("%s preemption poll failed (%s); keeping the last state", source.name, _one_line(error))
                elif not warned:
                    log.debug("%s preemption poll failed (%s)", source.name, _one_line(error))
                answered, warned = True, True
            else:
                answered, failures, warned = True, 0, False
                if stop.is_set():
                    return
                self._record(source.name, found)
            stop.wait(self.cfg.poll_interval_s)

    def _record(self, name: str, found: Notice | None) -> None:
        before = self._found[name]
        if (found is None) != (before is None):
            if found is not None:
                log.warning("preemption notice from %s: %s", name, found.detail)
            elif self._drained is None:
                log.warning("preemption notice from %s withdrawn", name)
        self._found[name] = found
        if found is not None:
            self._on_notice(found)
