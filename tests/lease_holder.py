"""A driver that only holds a run's lease, for tests/test_lease.py: a real process to stop, resume and kill.

    python tests/lease_holder.py URI ENDPOINT|- FOLDER [--clock-offset SECONDS]

Prints "acquired <generation>" once it holds the lease, then waits. When another driver takes the lease
over, the lease interrupts this process (as it interrupts a real driver, whose Ray then stops its workers):
it prints "lost" and exits 3. SIGTERM releases the lease and exits 0.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time

from segjob.store.lease import Lease
from segjob.store.storage import open_storage

parser = argparse.ArgumentParser()
parser.add_argument("uri")
parser.add_argument("endpoint")
parser.add_argument("folder")
parser.add_argument("--clock-offset", type=float, default=0.0, help="run this process's wall clock off by this much")
args = parser.parse_args()
if args.clock_offset:
    real_time = time.time
    time.time = lambda: real_time() + args.clock_offset
storage = open_storage(args.uri, None if args.endpoint == "-" else args.endpoint)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
lease = Lease(storage, storage.path(args.folder))
try:
    with lease:
        print("acquired", lease.generation, flush=True)
        while True:
            time.sleep(0.1)
except KeyboardInterrupt:
    print("lost" if lease.lost.is_set() else "interrupted", flush=True)
    sys.exit(3)
