"""One watcher per training process: the cloud pollers and SIGTERM, and the drain request on the first notice."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from segjob.engine.preemption import cloud, sigterm
from segjob.engine.preemption.cloud import AwsSource, GcpSource
from segjob.engine.preemption.notice import Notice, one_line
from segjob.job.schema import PreemptionSection

log = logging.getLogger(__name__)


class PreemptionWatcher:
    """Polls the cloud sources in daemon threads; `notice()` is a cheap read.

    `drain(notice)` (on Ray: drain this node for preemption) is called once, from a side
    thread, for the first notice; it returns whether a drain was sent.
    """

    def __init__(self, cfg: PreemptionSection, drain: Callable[[Notice], bool] | None = None, announce: bool = True):
        self.cfg = cfg
        self._announce = announce  # say which cloud this machine is on (one rank says it for the run)
        self._drain = drain if cfg.ray_drain else None
        self._sources: list = []
        if aws := cloud.aws_url(cfg.aws_metadata_url):
            self._sources.append(AwsSource(aws))
        if gcp := cloud.gcp_url(cfg.gcp_metadata_url):
            self._sources.append(GcpSource(gcp))
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
        received = sigterm.sigterm_notice()
        if self.cfg.sigterm and received is not None:
            return received
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
            log.warning("could not drain this node for preemption (%s); checkpointing anyway", one_line(error))
            return
        if sent:
            self._drained = notice

    def _wait_for_sigterm(self, stop: threading.Event) -> None:
        while not stop.is_set():
            received = sigterm.wait_for_sigterm(0.2)
            if received is not None:
                self._on_notice(received)
                return

    def _poll(self, source, stop: threading.Event) -> None:
        on_cloud, how = cloud.detect(source, stop, self.cfg.poll_interval_s)
        if not on_cloud:
            log.debug("%s: not polling its preemption notices", how)
            return
        if self._announce:
            log.info("on %s (%s): polling its preemption notices every %g s", source.cloud, how,
                     self.cfg.poll_interval_s)
        warned = False  # failures on the cloud are transient: said once, the last state kept
        while not stop.is_set():
            try:
                found = source.check()
            except Exception as error:  # nothing answered, or an odd answer
                if not warned:
                    log.warning("%s preemption poll failed (%s); keeping the last state", source.name, one_line(error))
                    warned = True
            else:
                warned = False
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
