"""Fake cloud metadata servers on 127.0.0.1 that announce (and withdraw) preemption notices.

    aws = FakeAwsMetadata()             # IMDSv2: token PUT, then spot/instance-action (404 until announced)
    aws.announce(action="terminate")    # instance-action answers 200 JSON from now on
    aws.withdraw(); aws.revoke_tokens(); aws.url; aws.requests; aws.stop()

    gcp = FakeGcpMetadata()             # instance/preempted FALSE until announced; needs Metadata-Flavor
    gcp.announce(); gcp.withdraw(); gcp.stop()

As a separate process: `python tests/metadata_servers.py aws --port N` prints its URL and
serves until killed; `POST /_fake/announce`, `/_fake/withdraw` and `/_fake/revoke` change its
state from outside (an optional JSON body for announce: {"action": ..., "time": ...}).
"""

from __future__ import annotations

import argparse
import datetime
import json
import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOST = "127.0.0.1"


class _FakeServer:
    def __init__(self, port: int = 0):
        self._lock = threading.Lock()
        self.requests = 0  # every request, control requests excluded
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                fake._handle(self, "GET")

            def do_PUT(self):
                fake._handle(self, "PUT")

            def do_POST(self):
                fake._handle(self, "POST")

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer((HOST, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name=type(self).__name__, daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self._server.server_address[1]}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def _handle(self, request: BaseHTTPRequestHandler, method: str) -> None:
        path = request.path.split("?", 1)[0]
        length = int(request.headers.get("Content-Length") or 0)
        body = request.rfile.read(length) if length else b""
        if method == "POST" and path.startswith("/_fake/"):
            self._control(path.removeprefix("/_fake/"), json.loads(body or b"{}"))
            return self._reply(request, 200, "ok")
        with self._lock:
            self.requests += 1
        status, text, headers = self.answer(method, path, request.headers)
        self._reply(request, status, text, headers)

    @staticmethod
    def _reply(request, status: int, text: str, headers: dict[str, str] | None = None) -> None:
        data = text.encode()
        request.send_response(status)
        for name, value in (headers or {}).items():
            request.send_header(name, value)
        request.send_header("Content-Type", "text/plain")
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        request.wfile.write(data)

    def answer(self, method: str, path: str, headers) -> tuple[int, str, dict[str, str]]:
        raise NotImplementedError

    def _control(self, command: str, args: dict) -> None:
        getattr(self, {"announce": "announce", "withdraw": "withdraw", "revoke": "revoke_tokens"}[command])(**args)


class FakeAwsMetadata(_FakeServer):
    """EC2 IMDSv2: PUT /latest/api/token, then GET spot/instance-action with the token (else 401)."""

    def __init__(self, port: int = 0):
        self.action: dict[str, str] | None = None
        self.tokens: set[str] = set()
        self.token_requests = 0
        self.unauthorized = 0  # GETs refused for a missing or revoked token
        super().__init__(port)

    def announce(self, action: str = "terminate", time: str | None = None) -> None:
        if time is None:
            soon = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=2)
            time = soon.strftime("%Y-%m-%dT%H:%M:%SZ")
        self.action = {"action": action, "time": time}

    def withdraw(self) -> None:
        self.action = None

    def revoke_tokens(self) -> None:
        with self._lock:
            self.tokens.clear()

    def answer(self, method, path, headers):
        if path == "/latest/api/token":
            if method != "PUT":
                return 405, "", {}
            ttl = headers.get("X-aws-ec2-metadata-token-ttl-seconds", "")
            if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
                return 400, "", {}
            token = secrets.token_urlsafe(24)
            with self._lock:
                self.tokens.add(token)
                self.token_requests += 1
            return 200, token, {"X-aws-ec2-metadata-token-ttl-seconds": ttl}
        if method != "GET":
            return 405, "", {}
        with self._lock:
            if headers.get("X-aws-ec2-metadata-token") not in self.tokens:
                self.unauthorized += 1
                return 401, "", {}
        if path == "/latest/meta-data/spot/instance-action" and self.action is not None:
            return 200, json.dumps(self.action), {}
        return 404, "", {}


class FakeGcpMetadata(_FakeServer):
    """GCE metadata: instance/preempted TRUE/FALSE, only with `Metadata-Flavor: Google` (else 403)."""

    def __init__(self, port: int = 0):
        self.preempted = False
        self.refused = 0  # requests without the Metadata-Flavor header
        super().__init__(port)

    def announce(self) -> None:
        self.preempted = True

    def withdraw(self) -> None:
        self.preempted = False

    def answer(self, method, path, headers):
        if headers.get("Metadata-Flavor") != "Google":
            with self._lock:
                self.refused += 1
            return 403, "", {}
        if method != "GET":
            return 405, "", {}
        if path == "/computeMetadata/v1/instance/preempted":
            return 200, "TRUE" if self.preempted else "FALSE", {"Metadata-Flavor": "Google"}
        return 404, "", {"Metadata-Flavor": "Google"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cloud", choices=["aws", "gcp"])
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    server = (FakeAwsMetadata if args.cloud == "aws" else FakeGcpMetadata)(args.port)
    print(server.url, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
