"""Preemption notices from fake AWS/GCP metadata servers and real SIGTERMs to child processes,
and the one drain each asks for."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request

import pytest
from metadata_servers import FakeAwsMetadata, FakeGcpMetadata
from servers import closed_port_url

from segjob.engine.preemption import cloud, sigterm
from segjob.engine.preemption.notice import Notice
from segjob.engine.preemption.watcher import PreemptionWatcher
from segjob.job.schema import PreemptionSection

POLL = 0.1


def wait_for(predicate, timeout: float = 3.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s")
        time.sleep(0.02)


def section(aws=None, gcp=None, **overrides) -> PreemptionSection:
    return PreemptionSection(**{"aws_metadata_url": aws, "gcp_metadata_url": gcp, "poll_interval_s": POLL, **overrides})


@pytest.fixture
def aws():
    with FakeAwsMetadata() as server:
        yield server


@pytest.fixture
def gcp():
    with FakeGcpMetadata() as server:
        yield server


@pytest.fixture
def watch():
    """watch(cfg, drain=None) -> a started watcher, stopped after the test."""
    watchers = []

    def start(cfg, drain=None):
        watcher = PreemptionWatcher(cfg, drain)
        watcher.start()
        watchers.append(watcher)
        return watcher

    yield start
    for watcher in watchers:
        watcher.stop()


# --- AWS ------------------------------------------------------------------------------------


def test_aws_notice_appears_and_is_withdrawn(aws, watch):
    watcher = watch(section(aws=aws.url))
    wait_for(lambda: aws.requests >= 4)  # token + a few polls answered 404
    assert watcher.notice() is None

    aws.announce(action="terminate", time="2026-11-23T14:00:00Z")
    announced = time.monotonic()
    notice = wait_for(watcher.notice)
    assert time.monotonic() - announced < 3 * POLL + 0.5
    assert notice == Notice("aws", "instance-action terminate at 2026-11-23T14:00:00Z", 1795442400.0)  # its own time

    aws.withdraw()
    wait_for(lambda: watcher.notice() is None)
    assert aws.token_requests == 1  # one token for all polls
    assert aws.unauthorized == 0  # never asked without it


def test_aws_refuses_a_get_without_token(aws):
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{aws.url}/latest/meta-data/spot/instance-action", timeout=2)
    assert refused.value.code == 401


def test_aws_token_is_renewed_when_revoked(aws, watch):
    watcher = watch(section(aws=aws.url))
    wait_for(lambda: aws.requests >= 3)
    aws.revoke_tokens()
    aws.announce(action="stop", time="2026-11-23T14:00:00Z")
    assert wait_for(watcher.notice).detail == "instance-action stop at 2026-11-23T14:00:00Z"
    assert aws.token_requests >= 2
    assert aws.unauthorized >= 1  # the revoked token was refused once, then a fresh one used


# --- GCP ------------------------------------------------------------------------------------


def test_gcp_true_then_false_again(gcp, watch):
    watcher = watch(section(gcp=gcp.url))
    wait_for(lambda: gcp.requests >= 3)
    assert watcher.notice() is None
    gcp.announce()
    announced = time.time()
    notice = wait_for(watcher.notice)
    assert notice[:2] == ("gcp", "instance/preempted TRUE")
    assert announced + 29 < notice.deadline < time.time() + 30  # GCE stops the VM about 30 s later
    gcp.withdraw()
    wait_for(lambda: watcher.notice() is None)
    assert gcp.refused == 0  # the watcher always sends Metadata-Flavor


def test_gcp_refuses_a_request_without_the_header(gcp):
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{gcp.url}/computeMetadata/v1/instance/preempted", timeout=2)
    assert refused.value.code == 403


# --- Unreachable sources, order, stop -------------------------------------------------------


def test_unreachable_sources_are_dropped_and_stop_is_fast(watch):
    watcher = watch(section(aws=closed_port_url(), gcp=closed_port_url()))
    wait_for(lambda: watcher.polling() == [], timeout=3 * POLL + 2.0)
    assert watcher.notice() is None
    started = time.monotonic()
    watcher.stop()
    assert time.monotonic() - started < 1.0


def test_a_source_that_answered_keeps_being_polled_and_keeps_its_state(watch):
    gcp = FakeGcpMetadata()
    gcp.announce()
    watcher = watch(section(gcp=gcp.url))
    wait_for(watcher.notice)
    gcp.stop()  # a transient outage after answering: not "off GCP"
    time.sleep(5 * POLL)
    assert watcher.polling() == ["gcp"]
    assert watcher.notice()[:2] == ("gcp", "instance/preempted TRUE")


def test_stop_is_fast_while_polling(aws, gcp, watch):
    watcher = watch(section(aws=aws.url, gcp=gcp.url, poll_interval_s=30.0))
    wait_for(lambda: aws.requests >= 2 and gcp.requests >= 1)  # first poll right away
    watcher.start()  # idempotent
    assert sorted(watcher.polling()) == ["aws", "gcp"]
    started = time.monotonic()
    watcher.stop()
    assert time.monotonic() - started < 1.0
    assert watcher.polling() == []


def test_fake_server_as_a_separate_process(watch):
    script = os.path.join(os.path.dirname(__file__), "metadata_servers.py")
    server = subprocess.Popen([sys.executable, script, "aws", "--port", "0"], stdout=subprocess.PIPE, text=True)
    try:
        url = server.stdout.readline().strip()
        watcher = watch(section(aws=url))
        wait_for(lambda: watcher.polling() == ["aws"])
        body = b'{"action": "hibernate", "time": "2026-11-23T14:00:00Z"}'
        urllib.request.urlopen(urllib.request.Request(f"{url}/_fake/announce", data=body, method="POST"), timeout=2)
        assert wait_for(watcher.notice).detail == "instance-action hibernate at 2026-11-23T14:00:00Z"
    finally:
        server.kill()
        server.wait()


def test_order_of_sources(aws, gcp, watch):
    aws.announce(time="2026-11-23T14:00:00Z")
    gcp.announce()
    watcher = watch(section(aws=aws.url, gcp=gcp.url))
    wait_for(lambda: watcher.notice() and watcher._found["gcp"])
    assert watcher.notice().source == "aws"  # before gcp


class Drains:
    """A drain function that records its calls (on Ray: segjob.cluster.worker.drain_node_for_preemption)."""

    def __init__(self, accept: bool = True):
        self.accept, self.calls = accept, []

    def __call__(self, notice):
        self.calls.append(notice)
        return self.accept


def test_a_notice_drains_once_and_then_cannot_be_withdrawn(aws, watch):
    drains = Drains()
    watcher = watch(section(aws=aws.url), drains)
    aws.announce(time="2026-11-23T14:00:00Z")
    notice = wait_for(watcher.notice)
    wait_for(lambda: drains.calls)
    time.sleep(5 * POLL)
    assert drains.calls == [notice] and watcher.drained()
    aws.withdraw()  # the node is draining for good: the notice stays
    wait_for(lambda: aws.requests >= 10)
    time.sleep(3 * POLL)
    assert watcher.notice() == notice


def test_a_refused_drain_leaves_the_notice_withdrawable(gcp, watch):
    drains = Drains(accept=False)
    watcher = watch(section(gcp=gcp.url), drains)
    gcp.announce()
    wait_for(watcher.notice)
    wait_for(lambda: drains.calls)
    assert not watcher.drained()
    gcp.withdraw()
    wait_for(lambda: watcher.notice() is None)


def test_no_drain_when_ray_drain_is_off(gcp, watch):
    drains = Drains()
    watcher = watch(section(gcp=gcp.url, ray_drain=False), drains)
    gcp.announce()
    wait_for(watcher.notice)
    time.sleep(5 * POLL)
    assert drains.calls == [] and not watcher.drained()


def test_a_failing_drain_is_a_warning_not_a_crash(gcp, watch, caplog):
    def broken(notice):
        raise RuntimeError("GCS unreachable")

    watcher = watch(section(gcp=gcp.url), broken)
    gcp.announce()
    wait_for(watcher.notice)
    wait_for(lambda: "could not drain this node" in caplog.text)
    assert watcher.notice() is not None and not watcher.drained()


def test_sigterm_drains_with_its_deadline(monkeypatch, watch):
    drains = Drains()
    watcher = watch(section(), drains)
    received = Notice("sigterm", "SIGTERM received at x", deadline=time.time() + 20)
    monkeypatch.setattr(sigterm, "_sigterm", received)
    sigterm._signalled.set()
    try:
        wait_for(lambda: drains.calls)
    finally:
        sigterm._signalled.clear()
    assert drains.calls == [received] and watcher.notice() == received


def test_sigterm_notice_is_reported_only_when_enabled(monkeypatch, watch):
    monkeypatch.setattr(sigterm, "_sigterm", Notice("sigterm", "SIGTERM received at x", 1.0))
    assert watch(section()).notice() == Notice("sigterm", "SIGTERM received at x", 1.0)
    assert watch(section(sigterm=False)).notice() is None


# --- SIGTERM, in child processes ------------------------------------------------------------

CHILD = """
import contextlib, signal, sys, time
from segjob.engine.preemption.sigterm import install_sigterm_handler, sigterm_notice, training_active
install_sigterm_handler()
install_sigterm_handler()  # idempotent: must not chain to itself
print("ready", flush=True)
with {context}:
    while True:
        notice = sigterm_notice()
        print(notice.detail if notice else "none", flush=True)
        time.sleep(0.05)
"""


class Child:
    def __init__(self, training: bool = True, grace: float = 1.0):
        code = CHILD.format(context="training_active()" if training else "contextlib.nullcontext()")
        env = {**os.environ, "SEGJOB_SIGTERM_GRACE_S": str(grace)}
        self.process = subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.expect(lambda line: line == "ready", timeout=20)

    def _read(self):
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))

    def expect(self, predicate, timeout: float = 5.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no such line within {timeout} s (exit code {self.process.poll()})") from None
            if predicate(line):
                return line

    def terminate(self) -> float:
        self.process.send_signal(signal.SIGTERM)
        return time.monotonic()

    def close(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


@pytest.fixture
def child():
    children = []

    def start(**kwargs) -> Child:
        children.append(Child(**kwargs))
        return children[-1]

    yield start
    for started in children:
        started.close()


def test_sigterm_during_training_gives_a_grace_period_then_ends(child):
    worker = child(grace=1.0)
    worker.expect(lambda line: line == "none")
    sent = worker.terminate()
    worker.expect(lambda line: line.startswith("SIGTERM received at "))
    time.sleep(0.5)
    assert worker.process.poll() is None  # still training: time to checkpoint
    assert worker.process.wait(timeout=5) == -signal.SIGTERM  # then dies by SIGTERM, as without us
    assert 0.9 < time.monotonic() - sent < 3.0


def test_sigterm_without_training_is_passed_on_at_once(child):
    idle = child(training=False)
    sent = idle.terminate()
    assert idle.process.wait(timeout=5) == -signal.SIGTERM
    assert time.monotonic() - sent < 1.0


def test_second_sigterm_is_passed_on_at_once(child):
    worker = child(grace=30.0)
    worker.expect(lambda line: line == "none")  # inside training_active()
    worker.terminate()
    worker.expect(lambda line: line.startswith("SIGTERM received at "))
    sent = worker.terminate()
    assert worker.process.wait(timeout=5) == -signal.SIGTERM
    assert time.monotonic() - sent < 1.0


# Ray 2.60 installs its own SIGTERM handler after the setup hook, through
# ray._private.utils.set_sigterm_handler, and that handler raises SystemExit(1). A stand-in
# module keeps Ray itself out of this fast test.
@pytest.mark.parametrize("training", [True, False])
def test_chains_to_the_ray_handler_installed_after_the_hook(training):
    code = textwrap.dedent(
        """
        import contextlib, signal, sys, time, types
        def ray_handler(signum, frame):
            print("ray handler", flush=True)
            raise SystemExit(1)
        utils = types.ModuleType("ray._private.utils")
        utils.set_sigterm_handler = lambda handler: signal.signal(signal.SIGTERM, handler)
        sys.modules["ray._private.utils"] = utils
        from segjob.cluster.process_setup import keep_ours_when_ray_sets_sigterm
        from segjob.engine.preemption.sigterm import install_sigterm_handler, sigterm_notice, training_active
        install_sigterm_handler()                  # the worker_process_setup_hook...
        keep_ours_when_ray_sets_sigterm()
        utils.set_sigterm_handler(ray_handler)     # then Worker.main_loop(), as in Ray 2.60
        assert signal.getsignal(signal.SIGTERM).__module__ == "segjob.engine.preemption.sigterm"
        print("ready", flush=True)
        with (training_active() if TRAINING else contextlib.nullcontext()):
            while True:
                print("notice" if sigterm_notice() else "none", flush=True)
                time.sleep(0.05)
        """
    ).replace("TRAINING", str(training))
    env = {**os.environ, "SEGJOB_SIGTERM_GRACE_S": "0.5"}
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert process.stdout.readline().strip() == "ready"
        assert process.stdout.readline().strip() == "none"  # inside the with block
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=5)
    finally:
        process.kill()
    lines = out.split()
    assert process.returncode == 1 and lines[-2:] == ["ray", "handler"]
    assert ("notice" in lines) == training  # kept training through the grace period only if active


def test_a_nodes_metadata_address_wins_over_the_job_file(aws, gcp, monkeypatch, watch):
    """On a cluster the job file is the same everywhere; a node's own environment names its metadata server."""
    monkeypatch.setenv(cloud.AWS_ENDPOINT_ENV, aws.url)
    monkeypatch.setenv(cloud.GCE_HOST_ENV, gcp.url.removeprefix("http://"))
    aws.announce(time="2026-11-23T14:00:00Z")
    gcp.announce()
    watcher = watch(section(aws=closed_port_url(), gcp=closed_port_url()))
    wait_for(lambda: watcher._found["aws"] and watcher._found["gcp"])
    assert sorted(watcher.polling()) == ["aws", "gcp"]


def test_a_disabled_source_stays_disabled_whatever_the_environment(aws, monkeypatch, watch):
    monkeypatch.setenv(cloud.AWS_ENDPOINT_ENV, aws.url)
    assert watch(section(aws=None)).polling() == []
