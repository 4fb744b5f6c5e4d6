"""Tests talk to 127.0.0.1 only: no test job polls a cloud's metadata server, in pytest's process
or in the processes it starts, and the guard that would catch one works.

The mechanism is conftest's: the cloud SDKs' own switches (AWS_EC2_METADATA_DISABLED=true,
NO_GCE_CHECK=true) in the session's environment, which segjob honours for the clouds' own
addresses, and an audit hook (tests/loopback_guard.py) that refuses and reports any poller
connection off loopback in pytest's process.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path
from urllib.parse import urlsplit

import loopback_guard
import pytest
from metadata_servers import FakeAwsMetadata

from segjob.engine.preemption import cloud
from segjob.engine.preemption.watcher import PreemptionWatcher
from segjob.job.load import load_job
from segjob.job.schema import JobConfig, PreemptionSection

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = PreemptionSection()  # the cloud addresses every job file keeps unless it says otherwise


def wait_for(predicate, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s")
        time.sleep(0.02)


def started(section: PreemptionSection) -> PreemptionWatcher:
    watcher = PreemptionWatcher(section)
    watcher.start()
    return watcher


def test_the_defaults_name_the_clouds_own_addresses():
    """What the switches are for: a job file that says nothing polls these."""
    assert urlsplit(DEFAULTS.aws_metadata_url).hostname == "169.254.169.254"
    assert urlsplit(DEFAULTS.gcp_metadata_url).hostname == "metadata.google.internal"


def test_a_default_job_polls_no_cloud_in_this_process():
    watcher = started(DEFAULTS)
    try:
        assert watcher._found == {}, "a poller was started for a cloud's metadata address"
    finally:
        watcher.stop()


def test_a_default_job_polls_no_cloud_in_a_process_a_test_starts():
    """Commands, drivers and Ray nodes that tests start inherit the session's environment."""
    code = textwrap.dedent("""
        from segjob.engine.preemption.watcher import PreemptionWatcher
        from segjob.job.schema import PreemptionSection
        print(sorted(PreemptionWatcher(PreemptionSection())._found))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_switches_turn_off_the_clouds_own_addresses_only(monkeypatch):
    for url in ("http://169.254.169.254", "http://[fd00:ec2::254]", "http://169.254.169.254:80/"):
        assert cloud.aws_url(url) is None, url
    for url in ("http://metadata.google.internal", "http://metadata.google.internal.", "http://169.254.169.254"):
        assert cloud.gcp_url(url) is None, url
    assert cloud.aws_url("http://127.0.0.1:9") == "http://127.0.0.1:9"  # a fake server is still polled
    assert cloud.gcp_url("http://127.0.0.1:9") == "http://127.0.0.1:9"
    monkeypatch.setenv(cloud.AWS_DISABLED_ENV, "false")
    monkeypatch.delenv(cloud.GCE_DISABLED_ENV)
    assert cloud.aws_url(DEFAULTS.aws_metadata_url) == DEFAULTS.aws_metadata_url  # on a cloud: polled
    assert cloud.gcp_url(DEFAULTS.gcp_metadata_url) == DEFAULTS.gcp_metadata_url


def test_a_nodes_own_endpoint_is_polled_with_the_switches_on(monkeypatch):
    """AWS_EC2_METADATA_SERVICE_ENDPOINT still wins over the job's URL, as on a cluster."""
    with FakeAwsMetadata() as aws:
        monkeypatch.setenv(cloud.AWS_ENDPOINT_ENV, aws.url)
        watcher = started(PreemptionSection(gcp_metadata_url=None, poll_interval_s=0.1))
        try:
            wait_for(lambda: aws.requests >= 2)  # the token, then instance-action
        finally:
            watcher.stop()


def test_the_guard_refuses_and_reports_a_poll_off_loopback(monkeypatch):
    """Without the switch a default job polls EC2's address; the audit hook refuses the lookup
    (nothing leaves the machine), the poller takes the address for unreachable and gives up."""
    monkeypatch.delenv(cloud.AWS_DISABLED_ENV)
    before = len(loopback_guard.refused)
    watcher = started(PreemptionSection(gcp_metadata_url=None, poll_interval_s=0.05))
    try:
        wait_for(lambda: watcher.polling() == [])  # three refused attempts, then not on this cloud
    finally:
        watcher.stop()
    refused = loopback_guard.refused[before:]
    del loopback_guard.refused[before:]  # expected here: conftest must not fail this test for it
    assert refused and set(refused) == {"segjob-preemption-aws -> 169.254.169.254"}, refused


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.9.9.9", True), ("::1", True), ("localhost", True), (None, True),
    (b"127.0.0.1", True), ("169.254.169.254", False), ("metadata.google.internal", False),
    ("fd00:ec2::254", False), ("10.0.0.1", False), ("example.com", False),
])
def test_the_guard_knows_loopback(host, loopback):
    assert loopback_guard.is_loopback(host) is loopback


def _test_jobs() -> dict[str, JobConfig]:
    """The job each test helper builds, with its defaults."""
    import test_engine
    import test_model_training
    import test_ray_train
    import trained_runs

    return {
        "test_engine.tiny_job": test_engine.tiny_job("unused"),
        "test_model_training.tiny_job": test_model_training.tiny_job("unused", {"name": "unet", "depth": 2}),
        "trained_runs.tiny_job": trained_runs.tiny_job("unused", Path("unused")),
        "test_ray_train.SMALL": load_job(ROOT / "jobs" / "quickstart.yaml", test_ray_train.SMALL),
    }


def test_no_test_job_keeps_a_cloud_metadata_address():
    """The job builders of the tests say null (or a fake server's URL), not the cloud's default:
    the guard and the switches are the net, not the plan."""
    for name, job in _test_jobs().items():
        for url in (job.preemption.aws_metadata_url, job.preemption.gcp_metadata_url):
            assert url is None or loopback_guard.is_loopback(urlsplit(url).hostname), f"{name} polls {url}"
