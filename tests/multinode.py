"""Several Ray nodes on one machine, for tests that lose, drain or signal one node of a cluster.

    cluster = MultiNodeCluster(head_cpus=1, log_dir=tmp_path)    # head: 1 CPU, no dashboard UI
    node2 = cluster.add_node(num_cpus=1, env_vars={"X": "1"})     # X only in that node's processes
    driver = run_driver(["jobs/quickstart.yaml", "--set", ...], cluster.address, log_path=tmp_path / "d.log")
    ...
    train_worker_pids_on(node2)                  # Ray Train workers that run on node2
    drain_node(cluster.address, node_id_hex(node2), deadline_s=30)   # what a spot reclaim does
    draining_nodes(cluster.address)              # {node id hex: deadline ms}
    cluster.kill_node(node2)                     # SIGKILL its raylet and every process under it
    cluster.add_node(num_cpus=1)                 # the replacement (no autoscaler here)
    driver.wait()                                # exit code; on timeout: kill, raise with the log tail
    cluster.shutdown()                           # and every process of the cluster is gone

Built on Ray 2.60's `ray.cluster_utils.Cluster`, which does not run in pytest's process but in a
helper process (this file run as a script) that pytest talks to over a pipe, because in-process
it would disturb the Ray that pytest itself may be connected to (conftest's `ray_cluster`):

- `services.start_api_server` (run for every head node) calls
  `ray.experimental.internal_kv._initialize_internal_kv(gcs_client)`: the process-wide internal KV
  client then points at the new cluster, and `Cluster.shutdown` ends with
  `ray.experimental.internal_kv._internal_kv_reset()` (None) -- both under pytest's own `ray.init`.
- `Node(shutdown_at_exit=True)` registers an atexit hook and a SIGTERM handler per node
  (`Node._register_shutdown_hooks`; signal handlers only from the main thread), and every Ray
  process it starts gets `PR_SET_PDEATHSIG` (`utils.set_kill_on_parent_death_linux`), which
  fires when the *thread* that started it ends: a node added from a test's helper thread would
  die with that thread. In the helper all nodes are started from its main thread.
- `Cluster.add_node` (head) writes and `Cluster.shutdown` deletes `/tmp/ray/ray_current_cluster`,
  the file `ray.init("auto")` of every Ray user on the machine reads: the helper turns both off.

Ports and files: the head gets an explicit free `dashboard_port` (the API server runs even with
`include_dashboard=False`, and the default 8265 is the first Ray's) and
`dashboard_agent_listen_port=None` (RayParams' default is the fixed 52365 that a plain
`ray.init()` also takes; None becomes 0 = an OS-chosen port in `Node.__init__`, as cluster_utils
already does for non-head nodes). GCS, node manager, object manager, metrics agent, metrics
export, runtime-env agent and worker ports are all 0/None = OS-chosen. All nodes share one
temp dir of their own (`/tmp/mn-*`, short for Unix socket paths), so `/tmp/ray/session_latest`
is not touched either. Nodes keep Ray's default node IP (this machine's address, like a plain
`ray.init()`): with `node_ip_address="127.0.0.1"` a driver's `ray.init()` rewrites the
127.0.0.1 of RAY_ADDRESS to the machine's IP (`services.canonicalize_bootstrap_address` ->
`resolve_ip_for_localhost`) and then never reaches the GCS.

A node that GCS drains while idle ends itself (its raylet exits, GCS forgets it and its drain
entry); `kill_node` still works on it afterwards and only does the bookkeeping.

Each node's processes inherit the environment pytest had when the cluster started (so start it
after `s3_env`), minus RAY_ADDRESS, plus that node's `env_vars` (RayParams.env_vars, passed to
the raylet as `env_updates`; the raylet's workers and agents inherit them).
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
_NODE_ID = re.compile(r"[0-9a-f]{56}")
_NIL_NODE_ID = "f" * 56


# GCS declares a node dead after health_check_failure_threshold failed checks, one every
# health_check_period_ms (RayConfig defaults 5 x 3000 ms: ~15 s seen here after a SIGKILL). Tests
# that lose nodes may pass this as MultiNodeCluster(system_config=...) to learn of it in ~2-3 s.
FAST_NODE_DEATH = {"health_check_period_ms": 1000, "health_check_failure_threshold": 2}


class MultiNodeError(RuntimeError):
    """The cluster helper failed or did not answer."""


# --- processes (/proc, no psutil in the venv) -------------------------------------------


def _stat(pid: int) -> tuple[int, int] | None:
    """(ppid, start time) of a live process, None if it is gone (zombies count as gone)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the name in (...) may hold spaces
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[1]), int(fields[19])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _all_pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def children_of(pid: int) -> list[int]:
    return sorted(child for child in _all_pids() if (_stat(child) or (None,))[0] == pid)


def descendants_of(pid: int) -> list[int]:
    parents = {}
    for candidate in _all_pids():
        stat = _stat(candidate)
        if stat:
            parents.setdefault(stat[0], []).append(candidate)
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return sorted(found)


def pid_alive(pid: int) -> bool:
    return _stat(pid) is not None


def wait_until(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.2):
    """condition's first truthy value; TimeoutError naming `what` after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f} s for {what}")
        time.sleep(interval)


def _popen(command: list[str], death_signal: int = signal.SIGKILL, **kwargs) -> subprocess.Popen:
    """Started from pytest's main thread, the child gets death_signal when pytest dies
    (PR_SET_PDEATHSIG); from any other thread it would get it when that thread ends, so there it
    gets none."""
    if threading.current_thread() is threading.main_thread() and sys.platform.startswith("linux"):
        import ctypes

        prctl = ctypes.CDLL(None).prctl  # resolved here: preexec_fn should not import or load

        def preexec():
            prctl(1, int(death_signal), 0, 0, 0)  # PR_SET_PDEATHSIG

        kwargs["preexec_fn"] = preexec
    return subprocess.Popen(command, **kwargs)


# --- nodes --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterNode:
    """One Ray node of a MultiNodeCluster, as pytest sees it."""

    node_id: str  # hex, what `ray drain-node --node-id` and GCS's draining table use
    raylet_pid: int
    raylet_socket: str
    plasma_socket: str
    session_dir: str
    is_head: bool
    num_cpus: float
    env_vars: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{'head' if self.is_head else 'node'} {self.node_id[:8]} (raylet pid {self.raylet_pid})"


def node_id_hex(node: ClusterNode | str) -> str:
    """The hex id of a node (56 hex digits); Ray's drain API wants this, not the binary id."""
    return _checked_node_id(node.node_id if isinstance(node, ClusterNode) else node)


def _checked_node_id(value: object) -> str:
    if not isinstance(value, str) or not _NODE_ID.fullmatch(value) or value == _NIL_NODE_ID:
        raise ValueError(f"not the hex id of a Ray node: {value!r}")
    return value


def ray_worker_pids_on(node: ClusterNode, title: str = "") -> list[int]:
    """Live Ray worker processes of one node: the raylet's children whose process title (Ray
    rewrites argv to `ray::<actor class or task>`) starts with `ray::` and contains `title`."""
    pids = []
    for pid in children_of(node.raylet_pid):
        cmdline = _cmdline(pid)
        if cmdline.startswith("ray::") and not cmdline.startswith(_AGENTS) and title in cmdline:
            pids.append(pid)
    return pids


_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")  # the raylet's children too, not workers


def train_worker_pids_on(node: ClusterNode) -> list[int]:
    """PIDs of the Ray Train workers (actor class RayTrainWorker) running on this node."""
    return ray_worker_pids_on(node, "RayTrainWorker")


# --- the cluster ----------------------------------------------------------------------------


class MultiNodeCluster:
    """A Ray cluster of several nodes on this machine, owned by a helper process (see the module doc).

    Thread-safe: a test's thread may add or kill nodes while the main thread waits on a driver.
    Every call has a timeout; a helper that stops answering is killed with all its processes.
    """

    def __init__(self, head_cpus: float = 1, *, log_dir: str | os.PathLike | None = None,
                 head_env_vars: dict[str, str] | None = None, system_config: dict[str, Any] | None = None,
                 object_store_mb: int = 100, include_dashboard: bool = False, start_timeout: float = 120.0):
        self._lock = threading.Lock()
        self._buffer = b""
        self._broken: str | None = None
        self._tracked: dict[int, int] = {}  # pid -> start time, every process seen under the helper
        self._nodes: list[ClusterNode] = []
        self.object_store_mb = object_store_mb
        self.temp_dir = tempfile.mkdtemp(prefix="mn-", dir="/tmp")
        self.log_dir = Path(log_dir) if log_dir else Path(self.temp_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.helper_log = self.log_dir / "cluster-helper.log"
        env = {name: value for name, value in os.environ.items() if name not in ("RAY_ADDRESS",)}
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        env["PYTHONUNBUFFERED"] = "1"
        with open(self.helper_log, "ab") as log:
            self._helper = _popen(
                [sys.executable, str(Path(__file__).resolve()), "--serve"], signal.SIGTERM,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, cwd=REPO, env=env,
                start_new_session=True,  # pytest's Ctrl-C goes to pytest, which shuts this down
            )
        try:
            head_args = {
                "num_cpus": head_cpus,
                "include_dashboard": include_dashboard,
                "dashboard_port": _free_port(),
                "dashboard_agent_listen_port": None,
                "temp_dir": self.temp_dir,
                "object_store_memory": object_store_mb * 1024 * 1024,
                "env_vars": head_env_vars,
            }
            if system_config:
                head_args["_system_config"] = system_config
            result = self._call("start", start_timeout, head_args=head_args)
        except BaseException:
            self._stop_helper()
            self._leftover_pids()
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            raise
        self.address: str = result["address"]
        self.head = self._node(result["node"], head_cpus, head_env_vars)

    # -- nodes --

    @property
    def nodes(self) -> list[ClusterNode]:
        """The live nodes this cluster started, head first."""
        return list(self._nodes)

    @property
    def worker_nodes(self) -> list[ClusterNode]:
        return [node for node in self._nodes if not node.is_head]

    def add_node(self, num_cpus: float = 1, env_vars: dict[str, str] | None = None,
                 resources: dict[str, float] | None = None, timeout: float = 90.0) -> ClusterNode:
        """Start one more node and wait until GCS lists it. env_vars reach only this node's
        raylet and the processes it starts (workers, agents)."""
        args = {
            "num_cpus": num_cpus,
            "object_store_memory": self.object_store_mb * 1024 * 1024,
            "env_vars": env_vars,
            "resources": resources,
        }
        result = self._call("add_node", timeout, node_args={k: v for k, v in args.items() if v is not None})
        return self._node(result["node"], num_cpus, env_vars)

    def kill_node(self, node: ClusterNode, timeout: float = 60.0) -> list[int]:
        """Lose a node the way a spot machine goes: SIGKILL its raylet and, at once, every process
        under it (workers, agents), then Cluster.remove_node(allow_graceful=False) for the rest
        (log monitor, ...). Returns the PIDs killed; all are gone when this returns."""
        if node.is_head:
            raise ValueError("kill_node takes a worker node; the head holds GCS (use shutdown)")
        result = self._call("kill_node", timeout, node_id=node.node_id)
        killed = result["killed"]
        wait_until(lambda: not any(pid_alive(pid) for pid in killed), timeout,
                   f"the processes of {node} to exit after SIGKILL (pids {killed})")
        self._nodes = [n for n in self._nodes if n.node_id != node.node_id]
        return killed

    def wait_for_nodes(self, timeout: float = 60.0) -> None:
        """Until GCS lists exactly the live nodes this cluster started (Cluster.wait_for_nodes)."""
        self._call("wait_for_nodes", timeout + 10, timeout=timeout)

    def alive_node_ids(self, timeout: float = 30.0) -> list[str]:
        """Hex ids of the nodes GCS considers alive (from the helper's GlobalState)."""
        return self._call("alive_node_ids", timeout)["node_ids"]

    # -- the end --

    def shutdown(self, timeout: float = 90.0) -> None:
        """Stop every node (Cluster.shutdown in the helper), then make sure no process of this
        cluster is left: any process ever seen under the helper, or whose command line names our
        temp dir, still there 10 s later is SIGKILLed and reported (MultiNodeError)."""
        error = None
        if self._helper.poll() is None and not self._broken:
            try:
                self._call("shutdown", timeout)
            except Exception as exc:  # still clean up below, then report it
                error = exc
        self._stop_helper()
        leftovers = self._leftover_pids()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        if error:
            raise error
        if leftovers:
            raise MultiNodeError(f"processes of the cluster outlived shutdown (now killed): {leftovers}")

    def __enter__(self) -> MultiNodeCluster:
        return self

    def __exit__(self, *exc_info) -> None:
        self.shutdown()

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.helper_log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    # -- internals --

    def _node(self, info: dict, num_cpus: float, env_vars: dict | None) -> ClusterNode:
        node = ClusterNode(num_cpus=num_cpus, env_vars=dict(env_vars or {}), **info)
        self._nodes.append(node)
        return node

    def _track(self) -> None:
        for pid in descendants_of(self._helper.pid):
            stat = _stat(pid)
            if stat:
                self._tracked.setdefault(pid, stat[1])

    def _call(self, op: str, timeout: float, /, **payload) -> dict:
        with self._lock:
            if self._broken:
                raise MultiNodeError(f"cluster helper unusable ({self._broken}); '{op}' not sent")
            try:
                self._helper.stdin.write((json.dumps({"op": op, **payload}) + "\n").encode())
                self._helper.stdin.flush()
                reply = self._read_reply(op, timeout)
            except BaseException as exc:
                self._broken = f"'{op}' failed: {exc!r}"[:300]
                raise
            finally:
                self._track()
        if not reply["ok"]:
            raise MultiNodeError(f"'{op}' failed in the cluster helper:\n{reply['error']}\n"
                                 f"helper log ({self.helper_log}) ends:\n{self.log_tail(2000)}")
        return reply["result"]

    def _read_reply(self, op: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        fd = self._helper.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"cluster helper gave no answer to '{op}' within {timeout:.0f} s; "
                                   f"its log ({self.helper_log}) ends:\n{self.log_tail(2000)}")
            ready, _, _ = select.select([fd], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    code = self._helper.wait(timeout=10)
                    raise MultiNodeError(f"cluster helper exited (code {code}) during '{op}'; "
                                         f"its log ends:\n{self.log_tail(2000)}")
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return json.loads(line)

    def _stop_helper(self) -> None:
        """stdin's EOF (or SIGTERM) makes the helper shut its cluster down and exit; SIGKILL if not."""
        self._track()
        if self._helper.poll() is None:
            try:
                self._helper.stdin.close()  # EOF: the helper shuts the cluster down and exits
            except OSError:
                pass
            try:
                self._helper.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._helper.send_signal(signal.SIGTERM)
                try:
                    self._helper.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    self._helper.kill()
                    self._helper.wait(timeout=10)

    def _leftover_pids(self) -> list[str]:
        """Processes of this cluster still alive a few seconds after shutdown, killed."""
        def leftovers():
            found = []
            for pid, started in self._tracked.items():
                stat = _stat(pid)
                if stat and stat[1] == started:
                    found.append(pid)
            found += [pid for pid in _all_pids() if self.temp_dir in _cmdline(pid) and pid not in found]
            return found

        deadline = time.monotonic() + 10
        while (found := leftovers()) and time.monotonic() < deadline:
            time.sleep(0.2)
        described = [f"{pid} {_cmdline(pid)[:80]}" for pid in found]
        for pid in found:
            _kill(pid)
        return described


def _kill(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def cluster_fixture(worker_cpus: Iterable[float] = (1,), head_cpus: float = 1,
                    requires: Iterable[str] = ("s3_env",), **cluster_kwargs):
    """A module-scoped fixture: a MultiNodeCluster with a head and one node per worker_cpus entry,
    started after the fixtures named in `requires` (their env reaches every node).

        cluster = cluster_fixture(worker_cpus=(1,), requires=("s3_endpoint",))
    """
    import pytest

    @pytest.fixture(scope="module")
    def _cluster(request, tmp_path_factory):
        for name in requires:
            request.getfixturevalue(name)
        started = time.monotonic()
        with MultiNodeCluster(head_cpus, log_dir=tmp_path_factory.mktemp("multinode"), **cluster_kwargs) as cluster:
            for cpus in worker_cpus:
                cluster.add_node(num_cpus=cpus)
            print(f"\nRay cluster of {len(cluster.nodes)} nodes at {cluster.address} up in "
                  f"{time.monotonic() - started:.1f} s (logs: {cluster.log_dir}, {cluster.temp_dir})")
            yield cluster

    return _cluster


# --- GCS: drain a node, read the draining table ---------------------------------------------


def _with_timeout(fn: Callable[[], Any], timeout: float, what: str) -> Any:
    """Ray's GCS clients retry for a long time against a dead GCS: give up after timeout."""
    box: dict[str, Any] = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as exc:  # re-raised in the caller
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True, name=f"gcs: {what}")
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"GCS call '{what}' did not return within {timeout:.0f} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def drain_node(cluster_address: str, node_id_hex: str, deadline_s: float | None,
               reason: str = "DRAIN_NODE_REASON_PREEMPTION", message: str = "spot reclaim",
               timeout: float = 30.0) -> None:
    """Ask GCS to drain a node, as `ray drain-node` does (ray/scripts/scripts.py:drain_node):
    `GcsClient(address=...).drain_node(hex id, DrainNodeReason, message, deadline ms)`; the
    deadline is absolute (ms since the epoch), 0 = none. Raises if GCS rejects it."""
    node_id = _checked_node_id(node_id_hex)  # a binary or nil id: GCS accepts it and drains nothing

    def call():
        import ray._raylet
        from ray.core.generated import autoscaler_pb2

        deadline_ms = 0 if deadline_s is None else time.time_ns() // 1_000_000 + int(deadline_s * 1000)
        client = ray._raylet.GcsClient(address=cluster_address)
        return client.drain_node(node_id, autoscaler_pb2.DrainNodeReason.Value(reason), message, deadline_ms)

    accepted, rejection = _with_timeout(call, timeout, f"drain_node {node_id[:8]}")
    if not accepted:
        raise MultiNodeError(f"GCS rejected draining node {node_id}: {rejection}")


def draining_nodes(cluster_address: str, timeout: float = 30.0) -> dict[str, int]:
    """{hex node id: drain deadline in ms since the epoch (0 = none)} for the nodes GCS is
    draining: `GlobalState.get_draining_nodes()` on a GlobalState of our own, initialised with
    the address the way ray.cluster_utils.Cluster does, so this process never joins the cluster
    (ray._private.state.state, the module's global, is the one ray.init connects)."""

    def call():
        from ray._private.state import GlobalState
        from ray._raylet import GcsClientOptions

        state = GlobalState()
        state._initialize_global_state(GcsClientOptions.create(
            cluster_address, None, allow_cluster_id_nil=True, fetch_cluster_id_if_nil=False))
        try:
            return dict(state.get_draining_nodes())
        finally:
            state.disconnect()

    return _with_timeout(call, timeout, "get_draining_nodes")


# --- drivers ----------------------------------------------------------------------------------


class Driver:
    """A driver process (its own session and process group) with its output in a log file."""

    def __init__(self, process: subprocess.Popen, command: list[str], log_path: Path, timeout: float | None):
        self.process, self.command, self.log_path, self.timeout = process, command, log_path, timeout
        self.started = time.monotonic()

    @property
    def pid(self) -> int:
        return self.process.pid

    def poll(self) -> int | None:
        return self.process.poll()

    def running(self) -> bool:
        return self.process.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, chars: int = 4000) -> str:
        return f"--- {self.log_path} (last {chars} chars) ---\n{self.log()[-chars:]}"

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the driver's whole process group."""
        try:
            os.killpg(self.process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def wait(self, timeout: float | None = None) -> int:
        """The exit code. After timeout (default: run_driver's, counted from the start) the
        process group is killed and TimeoutError carries the log's tail."""
        if timeout is None and self.timeout is not None:
            timeout = max(1.0, self.timeout - (time.monotonic() - self.started))
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.process.wait(timeout=30)
            command = " ".join(self.command[1:])
            raise TimeoutError(f"driver `{command[:200]}` still running after {timeout:.0f} s; killed\n"
                               f"{self.tail()}") from None

    def expect_success(self, timeout: float | None = None) -> None:
        code = self.wait(timeout)
        assert code == 0, f"driver exited with {code}\n{self.tail()}"

    def __enter__(self) -> Driver:
        return self

    def __exit__(self, *exc_info) -> None:
        if self.running():
            self.kill()
            self.process.wait(timeout=30)


def run_driver(args: list[str], cluster_address: str, env_extra: dict[str, str] | None = None,
               log_path: str | os.PathLike = "driver.log", timeout: float | None = 600.0,
               module: str | None = "segjob.train") -> Driver:
    """`python -m <module> *args` (module=None: `python *args`, e.g. ["-c", code]) against the
    cluster: RAY_ADDRESS=cluster_address, RAY_USAGE_STATS_ENABLED=0, the repo as cwd, its own
    session, stdout and stderr into log_path. env_extra goes on top of pytest's environment."""
    command = [sys.executable, *(["-m", module] if module else []), *map(str, args)]
    env = {**os.environ, "RAY_ADDRESS": cluster_address, "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        process = _popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                         env=env, cwd=REPO, start_new_session=True)
    return Driver(process, command, log_path, timeout)


# --- shared checks ------------------------------------------------------------------------


# --- the helper process (python tests/multinode.py --serve) -------------------------------


def _describe(node, head: bool) -> dict:
    from ray._private import ray_constants

    raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process
    return {"node_id": node.node_id, "raylet_pid": raylet.pid, "raylet_socket": node.raylet_socket_name,
            "plasma_socket": node.plasma_store_socket_name, "session_dir": node.get_session_dir_path(),
            "is_head": head}


def _serve() -> None:
    """Own one ray.cluster_utils.Cluster; answer one JSON line per JSON request on stdin.
    stdin's EOF (pytest gone or done) shuts the cluster down."""
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything printed goes to the log, never into the replies
    import ray._common.utils
    import ray._private.utils
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    # /tmp/ray/ray_current_cluster is every local Ray user's ray.init("auto") target: leave it alone.
    ray._private.utils.write_ray_address = lambda *args, **kwargs: None
    ray._common.utils.reset_ray_address = lambda *args, **kwargs: None

    cluster = None
    temp_dir = None
    nodes: dict[str, Any] = {}

    def kill_node(node_id: str) -> list[int]:
        node = nodes.pop(node_id)
        raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process
        if raylet.poll() is not None:  # it ended itself (e.g. drained while idle)
            cluster.remove_node(node, allow_graceful=False)
            return []
        under = descendants_of(raylet.pid)
        for pid in [raylet.pid, *under]:  # the raylet first, its workers and agents right after
            _kill(pid)
        cluster.remove_node(node, allow_graceful=False)
        return [raylet.pid, *under]

    class Stop(BaseException):
        pass

    def stop(signum, frame):
        raise Stop()

    signal.signal(signal.SIGTERM, stop)  # also pytest's death (PR_SET_PDEATHSIG, see _popen)
    try:
        for line in sys.stdin:
            request = json.loads(line)
            op = request.pop("op")
            try:
                if op == "start":
                    temp_dir = request["head_args"]["temp_dir"]
                    cluster = Cluster(initialize_head=True, connect=False, head_node_args=request["head_args"])
                    nodes[cluster.head_node.node_id] = cluster.head_node
                    result = {"address": cluster.address, "node": _describe(cluster.head_node, True)}
                elif op == "add_node":
                    node = cluster.add_node(**request["node_args"])
                    nodes[node.node_id] = node
                    result = {"node": _describe(node, False)}
                elif op == "kill_node":
                    result = {"killed": kill_node(request["node_id"])}
                elif op == "wait_for_nodes":
                    cluster.wait_for_nodes(timeout=request["timeout"])
                    result = {}
                elif op == "alive_node_ids":
                    result = {"node_ids": sorted(cluster.global_state._live_node_ids())}
                elif op == "shutdown":
                    cluster.shutdown()
                    cluster = None
                    result = {}
                else:
                    raise ValueError(f"unknown op {op!r}")
                reply = {"ok": True, "result": result}
            except Stop:
                raise
            except BaseException:
                reply = {"ok": False, "error": traceback.format_exc()}
            signal.signal(signal.SIGTERM, stop)  # every Node.__init__ installs its own handler
            print(f"{time.strftime('%H:%M:%S')} [multinode helper] {op}: {'ok' if reply['ok'] else reply['error']}",
                  file=sys.stderr, flush=True)
            replies.write(json.dumps(reply) + "\n")
            if op == "shutdown" and reply["ok"]:
                break
    except Stop:
        print("[multinode helper] SIGTERM", file=sys.stderr, flush=True)
    finally:  # EOF (pytest done or gone), SIGTERM, or the shutdown op
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if cluster is not None:
            signal.alarm(60)  # a hung shutdown ends this process; the nodes die with it (PDEATHSIG)
            cluster.shutdown()
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)


if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    _serve()
