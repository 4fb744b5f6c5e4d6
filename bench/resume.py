"""What a killed worker costs on local Ray: time to the first resumed step, steps lost.

    .venv/bin/python bench/resume.py [--kills 2]

Trains the quickstart model (2 workers, gloo) with a checkpoint after every step, SIGKILLs
a worker process after some steps, and measures from the kill to the first step committed
by the restarted worker group (goal <= 30 s), and how many completed steps had to be
trained again: steps since the newest commit at the kill (bounded by checkpoint_every_steps
plus one upload in flight), plus any committed step not resumed from (should be 0).
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from faults import committed_steps, kill, train_worker_pids, wait_for  # noqa: E402

from segjob.store import checkpoint  # noqa: E402
from segjob.store.storage import open_storage  # noqa: E402
from segjob.train import main as train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=2)
    args = parser.parse_args()
    import ray

    from segjob.cluster.driver import runtime_env

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env=runtime_env())
    results = []
    with tempfile.TemporaryDirectory() as runs:
        storage = open_storage(runs)

        def kill_workers():
            for _ in range(args.kills):
                wait_for(lambda: committed_steps(storage, "quickstart"), 300, "a committed step")
                time.sleep(2)  # let it train a little past the newest checkpoint
                newest = max(committed_steps(storage, "quickstart"))
                killed_at = time.monotonic()
                kill(train_worker_pids()[-1], signal.SIGKILL)
                resumed = wait_for(lambda newest=newest: [s for s in committed_steps(storage, "quickstart")
                                                          if s > newest],
                                   300, "a step after the restart", interval=0.02)
                seconds = time.monotonic() - killed_at
                history = checkpoint.load(storage, checkpoint.latest(storage, storage.path("quickstart"))).history
                restarted_from = max(r["step"] for r in history if r.get("checkpoint") and r["step"] <= newest)
                results.append((seconds, newest - restarted_from, min(resumed)))

        thread = threading.Thread(target=kill_workers, daemon=True)
        thread.start()
        overrides = ["train.epochs=3", "train.checkpoint_every_steps=1", "failure.max_failures=5",
                     f"storage.uri={runs}", "storage.keep_best=100"]
        train(["jobs/quickstart.yaml", *[a for o in overrides for a in ("--set", o)]])
        thread.join(timeout=5)
    ray.shutdown()
    for number, (seconds, lost, first) in enumerate(results, 1):
        print(f"kill {number}: first resumed step committed {seconds:.1f} s after the kill (step {first}); "
              f"committed steps not resumed from: {lost} (plus the steps since the newest commit, "
              f"at most checkpoint_every_steps + 1 with an upload in flight)")


if __name__ == "__main__":
    main()
