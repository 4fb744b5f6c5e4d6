"""A loopback TCP proxy that tests use to break the network between a client and a server.

    proxy = TcpProxy("127.0.0.1", moto_port)      # listens on 127.0.0.1:<free port>
    storage = open_storage("s3://bucket/runs", proxy.url)
    proxy.delay(0.01)             # every forwarded chunk waits 10 ms: slow uploads
    proxy.cut()                   # partition: open connections reset, new ones refused
    proxy.restore()               # accepting again, on the same port
    proxy.reset_next_response(b"PUT ")  # the request lands, its answer is lost
    proxy.stop()                  # or use it as a context manager

Bytes pass through unchanged (no HTTP parsing). Everything runs in daemon threads that
wake at least every POLL_S, so stop() returns promptly even while traffic is delayed.
"""

from __future__ import annotations

import selectors
import socket
import struct
import threading
import time

HOST = "127.0.0.1"
CHUNK = 64 * 1024
POLL_S = 0.05


class TcpProxy:
    def __init__(self, target_host: str, target_port: int, port: int = 0):
        if target_host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError("TcpProxy only forwards to loopback addresses")
        self.target = (target_host, target_port)
        self.bytes_up = 0  # client -> server, forwarded
        self.bytes_down = 0  # server -> client, forwarded
        self.connections = 0  # accepted so far
        self.refused_while_cut = 0
        self._lock = threading.Lock()
        self._delay = 0.0
        self._reset_marker: bytes | None = None
        self._pipes: set[_Pipe] = set()
        self._stopped = threading.Event()
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self.port = port
        self._listen()

    # --- public -----------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def is_cut(self) -> bool:
        return self._listener is None

    def delay(self, seconds: float) -> None:
        """Hold every forwarded chunk (up to 64 KiB, either way) for seconds; 0 turns it off."""
        self._delay = max(0.0, seconds)

    def cut(self) -> None:
        """Like a partition or a dead server: every open connection is reset (RST), the
        listening socket is closed, so new connections are refused at once."""
        with self._lock:
            self._listener = None  # the acceptor sees this within POLL_S and closes it
            pipes = list(self._pipes)
        if self._acceptor is not None:
            self._acceptor.join(timeout=5)
            self._acceptor = None
        for pipe in pipes:
            pipe.abort()
        for pipe in pipes:
            pipe.thread.join(timeout=5)

    def restore(self) -> None:
        """Accept connections again, on the same port."""
        if self._stopped.is_set():
            raise RuntimeError("the proxy was stopped")
        if self._listener is None:
            self._listen()

    def reset_next_response(self, marker: bytes) -> None:
        """Once: the next connection whose client bytes contain marker has its request
        forwarded whole, but is reset as soon as the server starts its final answer, so
        the client never sees the answer to a request that did land (a lost response).
        An interim "100 Continue" (botocore asks for one before sending a PUT body) is
        let through, or the body would never be sent."""
        self._reset_marker = marker

    def stop(self) -> None:
        self._stopped.set()
        self.cut()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"TcpProxy({self.url} -> {self.target[0]}:{self.target[1]}, {'cut' if self.is_cut else 'open'})"

    # --- internals --------------------------------------------------------------------

    def _listen(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # restore() binds the same port again, though connections on it sit in TIME_WAIT.
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((HOST, self.port))
        listener.listen(64)
        listener.settimeout(POLL_S)
        self.port = listener.getsockname()[1]
        with self._lock:
            self._listener = listener
        self._acceptor = threading.Thread(
            target=self._accept_loop, args=(listener,), name=f"proxy-accept-{self.port}", daemon=True
        )
        self._acceptor.start()

    def _accept_loop(self, listener: socket.socket) -> None:
        try:
            while self._listener is listener:
                try:
                    client, _ = listener.accept()
                except TimeoutError:
                    continue
                try:
                    upstream = socket.create_connection(self.target, timeout=5)
                except OSError:
                    _reset(client)
                    continue
                with self._lock:
                    if self._listener is not listener:  # cut while we were connecting
                        _reset(client)
                        _close_quietly(upstream)
                        return
                    self.connections += 1
                    pipe = _Pipe(self, client, upstream)
                    self._pipes.add(pipe)
                pipe.thread.start()
        except OSError:
            return
        finally:
            # Connections still waiting in the backlog are reset by this close.
            _close_quietly(listener)

    def _take_marker(self, data: bytes) -> bool:
        with self._lock:
            if self._reset_marker is not None and self._reset_marker in data:
                self._reset_marker = None
                return True
        return False

    def _count(self, up: int, down: int) -> None:
        with self._lock:
            self.bytes_up += up
            self.bytes_down += down

    def _forget(self, pipe: _Pipe) -> None:
        with self._lock:
            self._pipes.discard(pipe)


class _Pipe:
    """Both directions of one connection, in one thread."""

    def __init__(self, proxy: TcpProxy, client: socket.socket, upstream: socket.socket):
        self.proxy = proxy
        self.client = client
        self.upstream = upstream
        self.aborted = threading.Event()
        self.reset_on_answer = False
        self.thread = threading.Thread(target=self._run, name="proxy-pipe", daemon=True)

    def abort(self) -> None:
        # The pipe thread never blocks longer than POLL_S; it sees this and resets both ends.
        self.aborted.set()

    def _run(self) -> None:
        for sock in (self.client, self.upstream):
            sock.settimeout(POLL_S)
        selector = selectors.DefaultSelector()
        selector.register(self.client, selectors.EVENT_READ, self.upstream)
        selector.register(self.upstream, selectors.EVENT_READ, self.client)
        try:
            while not self.aborted.is_set():
                for key, _ in selector.select(POLL_S):
                    source, dest = key.fileobj, key.data
                    data = source.recv(CHUNK)
                    if not data:
                        return  # one side closed: close both
                    going_up = source is self.client
                    if going_up and self.proxy._take_marker(data):
                        self.reset_on_answer = True
                    if not going_up and self.reset_on_answer:
                        interim = _interim_length(data)
                        if interim < len(data):  # the final answer starts: drop it and reset
                            self._send_all(dest, data[:interim])
                            return
                    if not self._hold():
                        return
                    self._send_all(dest, data)
                    self.proxy._count(len(data) if going_up else 0, 0 if going_up else len(data))
        except OSError:
            pass
        finally:
            selector.close()
            if self.aborted.is_set() or self.reset_on_answer:
                _reset(self.client)
                _reset(self.upstream)
            else:
                _close_quietly(self.client)
                _close_quietly(self.upstream)
            self.proxy._forget(self)

    def _hold(self) -> bool:
        """Sleep the configured delay; False when aborted meanwhile."""
        delay = self.proxy._delay
        return not (delay and self.aborted.wait(delay))

    def _send_all(self, sock: socket.socket, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self.aborted.is_set():
                raise OSError("aborted")
            try:
                sent = sock.send(view)
            except TimeoutError:
                continue
            view = view[sent:]


def _interim_length(data: bytes) -> int:
    """Length of the complete HTTP "100 Continue" answers this chunk starts with."""
    length = 0
    while data.startswith((b"HTTP/1.1 100", b"HTTP/1.0 100"), length):
        end = data.find(b"\r\n\r\n", length)
        if end < 0:
            break
        length = end + 4
    return length


def _reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer gets a RST (connection reset), not a clean FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    _close_quietly(sock)


def _close_quietly(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass


def wait_for(condition, timeout: float, interval: float = 0.01) -> bool:
    """Poll condition() until it is true (True) or timeout seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return bool(condition())
