"""The clouds' spot notices, polled from their metadata servers: AWS instance-action, GCP preempted.

A source is polled only where the machine is on its cloud (`detect`, once per watcher): its metadata server
answers as that cloud's does (an IMDSv2 token; a `Metadata-Flavor: Google` reply). A laptop, or a node of
another cloud, polls nothing and prints nothing about it.
"""

from __future__ import annotations

import http.client
import json
import os
import threading
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from segjob.engine.preemption.notice import Notice, one_line, parse_utc

_CONNECT_TIMEOUT_S = 1.0
_READ_TIMEOUT_S = 2.0
GIVE_UP_AFTER = 3  # connection failures in a row, before any answer: not on this cloud
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


def _request(url: str, headers: dict[str, str], method: str = "GET") -> tuple[int, str, dict[str, str]]:
    """(status, body, reply headers); an HTTP error status is an answer too. OSError when nothing answered."""
    request = urllib.request.Request(url, headers=headers, method=method)
    try:
        with _opener.open(request, timeout=_READ_TIMEOUT_S) as response:
            return response.status, response.read(65536).decode("utf-8", "replace"), dict(response.headers)
    except urllib.error.HTTPError as error:
        error.close()
        return error.code, "", dict(error.headers or {})
    except (http.client.HTTPException, ValueError) as error:  # garbage on the wire: as good as no answer
        raise OSError(str(error)) from error


class _Unexpected(Exception):
    """The server answered, but not as the metadata service would: keep the last state."""


class AwsSource:
    name = "aws"
    cloud = "AWS EC2"

    def __init__(self, base_url: str):
        self.base = base_url.rstrip("/")
        self._token: str | None = None
        self._token_expires = 0.0

    def identify(self) -> str:
        """How this machine is on EC2 (IMDSv2 gave a token; kept for the polls). OSError: no answer;
        _Unexpected: another server answered."""
        self._fresh_token()
        return "IMDSv2 answered"

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
            deadline = parse_utc(action["time"])
        except (ValueError, KeyError, TypeError):
            detail = f"instance-action {one_line(body)}"
            deadline = None
        return Notice("aws", one_line(detail), deadline or time.time() + _AWS_NOTICE_S)

    def _get_instance_action(self) -> tuple[int, str]:
        headers = {"X-aws-ec2-metadata-token": self._fresh_token()}
        status, body, _ = _request(f"{self.base}/latest/meta-data/spot/instance-action", headers)
        return status, body

    def _fresh_token(self) -> str:
        if self._token is None or time.monotonic() >= self._token_expires:
            status, body, _ = _request(
                f"{self.base}/latest/api/token",
                {"X-aws-ec2-metadata-token-ttl-seconds": str(_AWS_TOKEN_TTL_S)},
                method="PUT",
            )
            if status != 200 or not body:
                raise _Unexpected(f"IMDSv2 token request answered HTTP {status}")
            self._token = body.strip()
            self._token_expires = time.monotonic() + _AWS_TOKEN_TTL_S - 60  # renew a minute early
        return self._token


class GcpSource:
    name = "gcp"
    cloud = "GCP Compute Engine"

    def __init__(self, base_url: str):
        self.url = f"{base_url.rstrip('/')}/computeMetadata/v1/instance/preempted"

    def identify(self) -> str:
        """How this machine is on GCE (the metadata server answered as Google's). OSError: no answer;
        _Unexpected: another server answered."""
        status, _, headers = _request(self.url, {"Metadata-Flavor": "Google"})
        flavor = {name.lower(): value for name, value in headers.items()}.get("metadata-flavor")
        if status != 200 or flavor != "Google":
            raise _Unexpected(f"instance/preempted answered HTTP {status}"
                              f"{'' if flavor == 'Google' else ' without Metadata-Flavor: Google'}")
        return "its metadata server answered"

    def check(self) -> Notice | None:
        status, body, _ = _request(self.url, {"Metadata-Flavor": "Google"})
        if status != 200:
            raise _Unexpected(f"instance/preempted answered HTTP {status}")
        value = body.strip().upper()
        if value == "TRUE":
            return Notice("gcp", "instance/preempted TRUE", time.time() + _GCP_NOTICE_S)
        if value == "FALSE":
            return None
        raise _Unexpected(f"instance/preempted answered {one_line(body, 40)!r}")


def detect(source: AwsSource | GcpSource, stop: threading.Event, retry_s: float) -> tuple[bool, str]:
    """(whether this machine is on the source's cloud, why), asked once before polling.

    Off a cloud its address is a black hole (nothing answers: GIVE_UP_AFTER tries, retry_s apart) or
    something else answers (a laptop's VPN or proxy, another cloud's server, a 403): either way, not on it.
    """
    error: Exception | None = None
    for _ in range(GIVE_UP_AFTER):
        try:
            return True, source.identify()
        except OSError as unreachable:
            error = unreachable
            if stop.wait(retry_s):
                break
        except Exception as odd:  # an answer that cloud's metadata server never gives
            return False, f"not {source.cloud}: {one_line(odd)}"
    return False, f"not {source.cloud}: its metadata server is unreachable ({one_line(error)})"


# The machine's own metadata address, as the cloud SDKs read it (botocore, google-auth): a node's
# environment wins over the job file, which is the same on every node.
AWS_ENDPOINT_ENV = "AWS_EC2_METADATA_SERVICE_ENDPOINT"


GCE_HOST_ENV = "GCE_METADATA_HOST"

# The SDKs' own off switches (botocore, google-auth), set on machines without that cloud's metadata
# server: with one at "true", segjob never contacts the cloud's own metadata address either. An
# address named elsewhere (a proxy, a test server) is still polled.
AWS_DISABLED_ENV = "AWS_EC2_METADATA_DISABLED"
GCE_DISABLED_ENV = "NO_GCE_CHECK"
_AWS_METADATA_HOSTS = {"169.254.169.254", "fd00:ec2::254"}
_GCE_METADATA_HOSTS = {"metadata.google.internal", "metadata", "169.254.169.254"}


def gce_base_url() -> str | None:
    host = os.environ.get(GCE_HOST_ENV, "").strip()
    if not host:
        return None
    return host if "://" in host else f"http://{host}"


def aws_url(configured: str | None) -> str | None:
    """The AWS metadata base URL to poll, or None: the job's null turns the source off, the node's
    AWS_EC2_METADATA_SERVICE_ENDPOINT wins over the job's URL, AWS_EC2_METADATA_DISABLED=true
    keeps EC2's own address from being polled."""
    if not configured:
        return None
    url = os.environ.get(AWS_ENDPOINT_ENV) or configured
    return None if _switched_off(url, AWS_DISABLED_ENV, _AWS_METADATA_HOSTS) else url


def gcp_url(configured: str | None) -> str | None:
    """The GCE metadata base URL to poll, or None: as aws_url, with GCE_METADATA_HOST and NO_GCE_CHECK."""
    if not configured:
        return None
    url = gce_base_url() or configured
    return None if _switched_off(url, GCE_DISABLED_ENV, _GCE_METADATA_HOSTS) else url


def _switched_off(url: str, switch: str, cloud_hosts: set[str]) -> bool:
    if os.environ.get(switch, "").strip().lower() != "true":
        return False
    try:
        host = urlsplit(url).hostname or ""
    except ValueError:  # a malformed URL: polling it fails on its own
        return False
    return host.rstrip(".").lower() in cloud_hosts
