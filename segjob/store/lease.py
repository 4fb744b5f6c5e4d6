"""Which driver drives a run: a lease with fencing.

    <folder>/lease.json                   the holder: generation, owner, host, pid, beat, released
    <run>/fences/gen-000000002.json       written once by generation 2's rank 0 when it resumes a run:
                                          {"generation": 2, "from_step": 100}

`folder` is the run folder for `segjob.train`, and a sweep's trials/ folder for `segjob.tune` (one
lease for every trial run under it); fences are per run folder.

Acquiring. No lease.json: create it (create-only, generation 1 or one past any generation recorded in
the fences). A lease.json there: it is free when released, or when its holder's process is gone and
ran on this host (the pid shortcut: a resubmission after a crash on the same machine takes over at
once). Otherwise it is watched on this machine's clock: a holder that renews within LEASE_STALE_S is
alive and the new driver is refused; one whose lease.json has not changed for LEASE_STALE_S is taken
over. The writer's own timestamps are never compared with our clock. Taking over is a
compare-and-swap against the exact version watched, to generation + 1: of two contenders the store
lets one through and refuses the other.

Renewing. Every HEARTBEAT_S the holder swaps in beat + 1 against the version it wrote last. A
refused swap means another driver took the lease: this driver has lost it, says so, and `on_lost`
stops its workers. A failed request (the store unreachable) is retried at the next beat.

Fencing. An object store cannot refuse a PUT from a superseded driver's workers, so readers enforce
it: every commit's meta.json carries its generation, and a commit by generation g at a step after
the step a newer generation resumed from is superseded. list_committed leaves superseded commits
out, so resume, retention, pull and evaluate never see them. Writers check as well: rank 0 reads the
lease before each commit and each cleanup and stops when a newer generation holds it (which ends a
zombie soon, but only the readers make it safe).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass

from segjob.errors import UserError
from segjob.store.conditional import VersionConflict, Versioned, create, read_versioned, replace_if
from segjob.store.storage import Storage

log = logging.getLogger("segjob")

LEASE_FILE = "lease.json"
FENCES_DIR = "fences"
MAX_LEASE_BYTES = 4096  # a lease segjob writes is about 200 bytes; anything far larger is not one

# Seconds; the environment may change them (a flaky store wants a longer stale period). The stale
# period is how long a driver waits, at most, before it takes over from one that died on another host.
HEARTBEAT_ENV, STALE_ENV = "SEGJOB_LEASE_HEARTBEAT_S", "SEGJOB_LEASE_STALE_S"
HEARTBEAT_S, LEASE_STALE_S = 15.0, 60.0  # four missed renewals make a lease stale


def heartbeat_s() -> float:
    return _seconds(HEARTBEAT_ENV, HEARTBEAT_S)


def stale_s() -> float:
    return _seconds(STALE_ENV, LEASE_STALE_S)


def _seconds(name: str, default: float) -> float:
    try:
        value = float(os.environ.get(name, default))
    except ValueError:
        raise UserError(f"{name}={os.environ[name]!r}: must be a number of seconds; fix or unset it") from None
    if not 0 < value < 86400:
        raise UserError(f"{name}={value:g}: must be between 0 and 86400 seconds; fix or unset it")
    return value


@dataclass(frozen=True)
class Holder:
    """One lease.json."""

    generation: int
    owner: str
    host: str
    pid: int
    beat: int = 0
    released: bool = False

    def dumps(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def parse(cls, raw: bytes, where: str) -> Holder:
        """A lease from storage is untrusted input: wrong types are one UserError line."""
        problem = "larger than a lease" if len(raw) > MAX_LEASE_BYTES else None
        record: object = None
        if problem is None:
            try:
                record = json.loads(raw)
            except (ValueError, RecursionError):
                problem = "not JSON"
        if problem is None and not isinstance(record, dict):
            problem = "not a JSON object"
        if problem is None:
            record.setdefault("generation", 0)  # written before generations: the oldest there is
            types = {"generation": int, "owner": str, "host": str, "pid": int, "beat": int, "released": bool}
            wrong = [key for key, kind in types.items()
                     if key in record and (type(record[key]) is not kind)] + \
                    [key for key in ("owner", "host", "pid") if key not in record]
            if wrong:
                problem = f"'{wrong[0]}' missing or of the wrong type"
        if problem:
            raise UserError(f"{where}: not a lease segjob wrote ({problem}); if no driver runs this run, remove the "
                            f"file and start again")
        return cls(**{key: record[key] for key in cls.__dataclass_fields__ if key in record})


class Lease:
    """This driver's claim on a run folder (or a sweep's trials/), renewed by a thread; released on exit."""

    def __init__(self, storage: Storage, folder: str, on_lost: Callable[[], None] | None = None):
        """on_lost runs on the renewal thread when another driver takes the lease; by default it interrupts this
        process as Ctrl-C would, which Ray Train and Tune answer by stopping their workers gracefully."""
        heartbeat_s(), stale_s()  # a bad setting is one line now, not a dead renewal thread later
        self.storage, self.folder, self.path = storage, folder, f"{folder}/{LEASE_FILE}"
        self.where = storage.display(self.path)
        self.owner = uuid.uuid4().hex
        self.on_lost = on_lost or interrupt_this_process
        self.generation = 0
        self.lost = threading.Event()
        self._version: str | None = None
        self._beat = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def fence(self) -> Fence:
        return Fence(self.path, self.generation)

    def acquire(self) -> None:
        held = read_versioned(self.storage, self.path)
        holder = Holder.parse(held.data, self.where) if held else None
        if holder and not holder.released and not self._gone(holder):
            held = self._wait_until_stale(held, holder)
            holder = Holder.parse(held.data, self.where) if held else None  # what it was when the watch ended
        floor = highest_fenced_generation(self.storage, self.folder)
        if held is None:
            record = self._record(floor + 1)
            try:
                self._version = create(self.storage, self.path, record.dumps())
            except FileExistsError:
                raise self._raced() from None
        else:
            if not holder.released:
                log.info("taking over the run from a driver that is gone (%s pid %d, generation %d)",
                         holder.host, holder.pid, holder.generation)
            record = self._record(max(holder.generation, floor) + 1)
            try:
                self._version = replace_if(self.storage, self.path, record.dumps(), held.version)
            except VersionConflict:
                raise self._raced() from None
        self.generation = record.generation
        self._thread = threading.Thread(target=self._renew_until_stopped, name="segjob-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=30)
        if self._version is None or self.lost.is_set():
            return
        try:  # kept, not removed: the next driver's generation counts on from this one
            self._beat += 1
            replace_if(self.storage, self.path, self._record(self.generation, released=True).dumps(), self._version)
        except VersionConflict:
            pass  # taken over meanwhile: nothing of ours to release
        except Exception as error:
            log.warning("could not release the lease %s (%s); the next driver waits until it is stale",
                        self.where, error)

    def raise_if_lost(self) -> None:
        """After the driver's work ended (either way): one line when it ended because the lease was lost."""
        if self.lost.is_set():
            raise UserError(f"{self.where}: another driver took over this run; this driver (generation "
                            f"{self.generation}) stopped its workers and exits")

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _record(self, generation: int, released: bool = False) -> Holder:
        return Holder(generation, self.owner, socket.gethostname(), os.getpid(), self._beat, released)

    def _raced(self) -> UserError:
        return UserError(f"{self.where}: another driver took this run at the same moment; it runs, this one stops")

    def _gone(self, holder: Holder) -> bool:
        """The holder ran on this host and its process is gone (no need to wait for staleness)."""
        if holder.host != socket.gethostname() or holder.pid == os.getpid():
            return False
        try:
            os.kill(holder.pid, 0)
        except ProcessLookupError:
            return True
        except (PermissionError, OverflowError, ValueError):
            return False
        return False

    def _wait_until_stale(self, held: Versioned, holder: Holder) -> Versioned | None:
        """Watch the holder's lease: refuse as soon as it changes (the holder is alive); return the version to take
        over from once it has stood still for the stale period on our clock (None: it was removed)."""
        period = stale_s()
        log.info("%s is held by %s pid %d (generation %d); watching it for up to %.0f s to see whether that "
                 "driver is alive", self.where, holder.host, holder.pid, holder.generation, period)
        started = time.monotonic()
        while (waited := time.monotonic() - started) < period:
            time.sleep(min(max(heartbeat_s() / 4, 0.05), period - waited, 5.0))
            now = read_versioned(self.storage, self.path)
            if now is None:
                return None
            if now.version != held.version:
                current = Holder.parse(now.data, self.where)
                if current.released:
                    return now
                raise UserError(
                    f"{self.where}: run is being driven by {current.host} pid {current.pid} (its lease was renewed "
                    f"{time.monotonic() - started:.0f} s into watching); stop that driver first, or let it finish")
            if self._gone(holder):
                return held
        return held

    def _renew_until_stopped(self) -> None:
        while not self._stop.wait(heartbeat_s()):
            self._beat += 1
            try:
                self._version = replace_if(self.storage, self.path, self._record(self.generation).dumps(),
                                           self._version)
            except VersionConflict:
                self._lose()
                return
            except Exception as error:  # the store unreachable: the next beat tries again
                log.warning("lease renewal failed (%s: %s); trying again in %.0f s", type(error).__name__, error,
                            heartbeat_s())

    def _lose(self) -> None:
        try:
            held = read_versioned(self.storage, self.path)
            now = Holder.parse(held.data, self.where) if held else None
        except Exception:
            now = None
        by = f"{now.host} pid {now.pid}, generation {now.generation}" if now else "someone else"
        log.error("%s: another driver (%s) took over this run; this driver (generation %d) stops its workers",
                  self.where, by, self.generation)
        self.lost.set()
        if not self._stop.is_set():  # not while the driver is already on its way out
            self.on_lost()


def interrupt_this_process() -> None:
    os.kill(os.getpid(), signal.SIGINT)


class Superseded(UserError):
    """A newer driver holds the lease: this writer must stop."""


@dataclass(frozen=True)
class Fence:
    """What a writer carries: the lease it works under and that lease's generation. Plain data (it travels to
    Ray workers in the train loop's config)."""

    lease_path: str
    generation: int

    def to_config(self) -> dict:
        return {"lease_path": self.lease_path, "generation": self.generation}

    @classmethod
    def from_config(cls, config: dict | None) -> Fence | None:
        return cls(str(config["lease_path"]), int(config["generation"])) if config else None

    def check(self, storage: Storage) -> None:
        """Raise Superseded when a newer generation holds the lease. An unreadable lease is not a reason to stop."""
        try:
            held = read_versioned(storage, self.lease_path)
            holder = Holder.parse(held.data, storage.display(self.lease_path)) if held else None
        except Exception as error:
            log.debug("could not read the lease %s (%s); going on", self.lease_path, error)
            return
        if holder is not None and holder.generation > self.generation:
            raise Superseded(f"{storage.display(self.lease_path)}: a newer driver ({holder.host} pid {holder.pid}, "
                             f"generation {holder.generation}) took over this run; this one "
                             f"(generation {self.generation}) stops")

    def record_start(self, storage: Storage, run_path: str, from_step: int) -> None:
        """Say where this generation resumed the run (once: a worker restart in the same generation keeps the first)."""
        record = {"generation": self.generation, "from_step": from_step, "host": socket.gethostname(),
                  "time": time.time()}
        try:
            storage.write_bytes(fence_path(run_path, self.generation), json.dumps(record).encode(), create_only=True)
        except FileExistsError:
            pass


def fence_path(run_path: str, generation: int) -> str:
    return f"{run_path}/{FENCES_DIR}/gen-{generation:09d}.json"


def read_fences(storage: Storage, run_path: str) -> dict[int, int]:
    """generation -> the step it resumed the run from. Malformed records are skipped with a warning (a record
    can only hide commits: one that is ignored makes readers trust more, never lose a good checkpoint)."""
    folder = f"{run_path}/{FENCES_DIR}"
    starts: dict[int, int] = {}
    for name in storage.files(folder):
        if not (name.startswith("gen-") and name.endswith(".json")) or "/" in name:
            continue
        try:
            record = json.loads(storage.read_bytes(f"{folder}/{name}")[:MAX_LEASE_BYTES + 1])
            generation, step = record["generation"], record["from_step"]
            if type(generation) is not int or type(step) is not int or name != f"gen-{generation:09d}.json":
                raise ValueError("generation or from_step of the wrong type, or another file name")
        except FileNotFoundError:
            continue
        except (ValueError, KeyError, TypeError, RecursionError) as error:
            log.warning("ignoring %s: not a fence segjob wrote (%s)", storage.display(f"{folder}/{name}"), error)
            continue
        starts[generation] = step
    return starts


def superseded(starts: dict[int, int], generation: int, step: int) -> bool:
    """A commit by `generation` at `step` came after a newer generation resumed the run from an earlier step."""
    return any(newer > generation and step > from_step for newer, from_step in starts.items())


def highest_fenced_generation(storage: Storage, folder: str) -> int:
    """The newest generation any run under a lease folder recorded (the folder itself, or its trials)."""
    runs = [folder] + [f"{folder}/{name}" for name in storage.list_dirs(folder) if name != FENCES_DIR]
    return max((max(read_fences(storage, run), default=0) for run in runs), default=0)
