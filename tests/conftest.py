"""Shared fixtures: local S3 (moto) and GCS (fake-gcs-server) servers on 127.0.0.1.

Servers start only when a test asks for them, once per session; every test that needs a
bucket gets a fresh one, so tests never see each other's objects. No test reaches a cloud's
metadata server (`_no_cloud_metadata`, `_pollers_stay_on_loopback`).
"""

from __future__ import annotations

import itertools
import os
from urllib.parse import urlsplit

import loopback_guard
import pytest
from proxy import TcpProxy
from servers import create_gcs_bucket, create_s3_bucket, start_fake_gcs, start_moto, stop_process

from segjob.engine.preemption import cloud

_bucket_numbers = itertools.count(1)
# Unique across concurrent sessions against the same server too (e.g. a moto process).
_session_tag = os.urandom(3).hex()


# Per-test limits (pytest-timeout) by marker; a test's own @pytest.mark.timeout wins. A test past
# its limit fails with its name and the suite goes on: nothing can hang CI.
TIMEOUT_BY_MARKER = {"multinode": 420, "ray": 420}


def pytest_collection_modifyitems(items):
    for item in items:
        if item.get_closest_marker("timeout"):
            continue
        limits = [limit for marker, limit in TIMEOUT_BY_MARKER.items() if item.get_closest_marker(marker)]
        if limits:
            item.add_marker(pytest.mark.timeout(max(limits)))


def _unique_bucket_name() -> str:
    return f"segjob-test-{_session_tag}-{next(_bucket_numbers)}"


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine thread contention
    made model tests 10x slower; the setting is restored for other modules."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def session_env():
    """A monkeypatch for os.environ that lasts the whole session, undone at its end."""
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="session", autouse=True)
def _quiet_and_isolated_env(session_env):
    session_env.setenv("RAY_USAGE_STATS_ENABLED", "0")
    session_env.delenv("AWS_PROFILE", raising=False)
    # Any gcsfs import from here on picks the plain filesystem (the default hangs on emulators).
    session_env.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


@pytest.fixture(scope="session", autouse=True)
def _no_cloud_metadata(session_env):
    """Tests talk to 127.0.0.1 only. A job that keeps the default preemption URLs would poll EC2's
    and GCE's metadata servers: the cloud SDKs' own off switches, which segjob honours too, keep
    those addresses off in every process of the session -- pytest's, the commands and drivers the
    tests start, the Ray nodes and workers they start (each inherits this environment). A test that
    wants a poller names a fake server on 127.0.0.1 (tests/metadata_servers.py), which is polled."""
    session_env.setenv(cloud.AWS_DISABLED_ENV, "true")
    session_env.setenv(cloud.GCE_DISABLED_ENV, "true")
    for name in (cloud.AWS_ENDPOINT_ENV, cloud.GCE_HOST_ENV):  # a developer's own metadata address
        session_env.delenv(name, raising=False)


loopback_guard.install()


@pytest.fixture(autouse=True)
def _pollers_stay_on_loopback():
    """Fails the test during which a preemption poller in this process tried to reach anything but
    127.0.0.1 (the attempt itself was refused before a packet left: tests/loopback_guard.py)."""
    before = len(loopback_guard.refused)
    yield
    tried = loopback_guard.refused[before:]
    if tried:
        pytest.fail(f"a preemption poller tried to leave 127.0.0.1 (refused): {tried}; give the test's job "
                    "null metadata URLs or a fake server's (tests/metadata_servers.py)", pytrace=False)


@pytest.fixture(scope="session")
def s3_env(session_env, tmp_path_factory) -> None:
    """Dummy AWS credentials and region, nothing from the developer's AWS setup.
    Tests that run their own server (start_moto_process) ask for this directly."""
    aws_home = tmp_path_factory.mktemp("aws")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        session_env.delenv(name, raising=False)
    session_env.setenv("AWS_ACCESS_KEY_ID", "testing")
    session_env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    session_env.setenv("AWS_DEFAULT_REGION", "us-east-1")
    # Keep the developer's ~/.aws (profiles, endpoints, regions) out of the tests.
    session_env.setenv("AWS_CONFIG_FILE", str(aws_home / "config"))
    session_env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(aws_home / "credentials"))


@pytest.fixture(scope="session")
def s3_endpoint(s3_env) -> str:
    """URL of a moto S3 server on 127.0.0.1 (in this process), with s3_env applied."""
    url, server = start_moto()
    yield url
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint) -> str:
    """A fresh, empty bucket on the moto server."""
    name = _unique_bucket_name()
    create_s3_bucket(s3_endpoint, name)
    return name


@pytest.fixture(scope="session")
def gcs_endpoint(session_env) -> str:
    """URL of a fake-gcs-server on 127.0.0.1, also in STORAGE_EMULATOR_HOST. It honours ifGenerationMatch
    (create-only and compare-and-swap), as GCS does."""
    # gcsfs hangs on every open() against an emulator unless this is off before import.
    session_env.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    url, process = start_fake_gcs()
    session_env.setenv("STORAGE_EMULATOR_HOST", url)
    yield url
    stop_process(process)


@pytest.fixture
def gcs_bucket(gcs_endpoint) -> str:
    """A fresh, empty bucket on the GCS emulator."""
    name = _unique_bucket_name()
    create_gcs_bucket(gcs_endpoint, name)
    return name


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint, gcs_endpoint):
    """One local Ray (2 CPUs) for every integration test, started after the storage servers so
    its workers inherit their settings; workers get segjob's runtime env (SIGTERM handler)."""
    ray = pytest.importorskip("ray")
    from segjob.cluster.driver import runtime_env

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env=runtime_env())
    yield ray
    ray.shutdown()


@pytest.fixture
def proxy(s3_endpoint):
    """A loopback TCP proxy in front of the moto S3 server: a test slows or cuts a writer's uploads with it."""
    target = urlsplit(s3_endpoint)
    with TcpProxy(target.hostname, target.port) as running:
        yield running
