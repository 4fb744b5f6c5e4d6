"""Tests talk to 127.0.0.1 only: an audit hook that refuses, and records, every address lookup or
connection a segjob preemption poller thread makes to any other host.

Python raises the audit events `socket.getaddrinfo` and `socket.connect` before it acts, and a hook
that raises stops the call: the poller sees an unreachable server (an OSError), and nothing leaves
the machine, not even a DNS query. conftest installs the hook once per pytest process (audit hooks
cannot be removed) and fails the test during which a poller tried. Processes the tests start get
no hook; for them conftest's environment keeps the default metadata addresses off instead.
"""

from __future__ import annotations

import ipaddress
import sys
import threading

# segjob.engine.preemption.watcher names its poller threads segjob-preemption-aws / -gcp.
POLLER_THREAD_PREFIX = "segjob-preemption-"

refused: list[str] = []  # "<thread> -> <host>", in order
_installed = False


def install() -> None:
    global _installed
    if not _installed:
        sys.addaudithook(_refuse_pollers_off_loopback)
        _installed = True


def is_loopback(host: object) -> bool:
    if host is None:  # getaddrinfo(None, port): this machine's own addresses
        return True
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    host = str(host).split("%", 1)[0].rstrip(".").lower()  # no IPv6 scope, no root dot
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: even resolving it leaves the machine


def _refuse_pollers_off_loopback(event: str, args: tuple) -> None:
    if event != "socket.getaddrinfo" and event != "socket.connect":
        return  # every other audit event of the process passes untouched
    thread = threading.current_thread().name
    if not thread.startswith(POLLER_THREAD_PREFIX):
        return
    if event == "socket.getaddrinfo":
        host = args[0]
    elif isinstance(args[1], tuple):
        host = args[1][0]
    else:
        return  # a Unix socket
    if is_loopback(host):
        return
    refused.append(f"{thread} -> {host}")
    raise ConnectionRefusedError(f"tests talk to 127.0.0.1 only: {thread} tried {host}")
