"""What a sweep loses to scheduling, and what ASHA buys, on the synthetic task.

    .venv/bin/python bench/sweep.py [--trials 8] [--epochs 6] [--seed 0]

Runs jobs/tune_quickstart.yaml twice on a local Ray with 2 CPUs (two one-worker trials at a
time), with the same Optuna seed, so both sweeps try the same configurations (TPE samples its
first 10 at random): once with ASHA, once with no early stopping. For each it reports

- efficiency: sweep wall time / (sum of trial wall times / concurrency), goal <= 1.15. A trial's
  wall time runs from Tune starting it (its actor up) to Tune seeing it end, so 1.0 means no
  slot ever waited. The slot-seconds lost are split into: before the first trials start, between
  one trial's end and the next one's start in a slot (Tune stopping an actor and starting the
  next: a fresh process that imports PyTorch and Ray Train), and at the end, when fewer trials
  are left than slots (how the trials' lengths pack, not overhead);
- time to the same best: when the sweep first had a trial at the best val/miou that both
  sweeps reached (the lower of their two final bests), from the start of the sweep.

The quickstart recipe that the sweep file tries first is left out here, so the search has to
find its best configuration.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import ray
from ray.tune import Callback

from segjob.cluster import driver
from segjob.cluster.tuner import build_tuner, default_concurrency
from segjob.errors import setup_logging
from segjob.job.sweep import load_sweep
from segjob.tune import prepare

SWEEP_FILE = Path(__file__).resolve().parents[1] / "jobs" / "tune_quickstart.yaml"


class Timeline(Callback):
    """When each trial started and ended, and every evaluation's time and value (driver clock)."""

    def __init__(self, metric: str):
        self.metric = metric
        self.started: dict[str, float] = {}
        self.ended: dict[str, float] = {}
        self.results: list[tuple[float, float]] = []

    def on_trial_start(self, iteration, trials, trial, **info):
        self.started[trial.trial_id] = time.monotonic()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if isinstance(result.get(self.metric), (int, float)):
            self.results.append((time.monotonic(), float(result[self.metric])))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.ended[trial.trial_id] = time.monotonic()

    on_trial_error = on_trial_complete


def run_sweep(scheduler: str, runs: str, trials: int, epochs: int, seed: int) -> dict:
    sweep = load_sweep(SWEEP_FILE, [f"name=bench_{scheduler}", f"storage.uri={runs}", f"tune.scheduler={scheduler}",
                                    f"tune.num_samples={trials}", f"train.epochs={epochs}",
                                    "tune.points_to_evaluate=[]", f"tune.seed={seed}",
                                    "preemption.aws_metadata_url=null", "preemption.gcp_metadata_url=null"])
    storage = prepare(sweep)
    timeline = Timeline(sweep.metric)
    concurrency = default_concurrency(sweep, use_gpu=False)
    started = time.monotonic()
    build_tuner(sweep, storage, use_gpu=False, callbacks=[timeline]).fit()
    ended = time.monotonic()
    trial_seconds = [timeline.ended[t] - timeline.started[t] for t in timeline.started if t in timeline.ended]
    best_so_far, running = [], -math.inf
    for moment, value in sorted(timeline.results):
        running = max(running, value)
        best_so_far.append((moment - started, running))
    # idle slot-seconds: before the first `concurrency` starts, after the last `concurrency` ends, and the rest between
    idle = (ended - started) * concurrency - sum(trial_seconds)
    first = sum(moment - started for moment in sorted(timeline.started.values())[:concurrency])
    last = sum(ended - moment for moment in sorted(timeline.ended.values())[-concurrency:])
    return {"scheduler": scheduler, "wall": ended - started, "trial_seconds": trial_seconds, "concurrency": concurrency,
            "epochs_trained": len(timeline.results), "best_so_far": best_so_far, "best": running,
            "idle": {"start": first, "between trials": idle - first - last, "end": last}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0, help="Optuna's seed: which configurations, in which order")
    args = parser.parse_args()
    setup_logging()
    ray.init(num_cpus=2, include_dashboard=True, log_to_driver=False, runtime_env=driver.runtime_env())
    with tempfile.TemporaryDirectory(prefix="segjob-bench-sweep-") as runs:
        sweeps = [run_sweep(scheduler, runs, args.trials, args.epochs, args.seed) for scheduler in ("asha", "none")]
    ray.shutdown()

    target = min(sweep["best"] for sweep in sweeps)  # val/miou (max): the level both sweeps reached
    print(f"\n{args.trials} trials, up to {args.epochs} epochs each, Optuna seed {args.seed}, val/miou; "
          f"the best both reached: {target:.4f}\n")
    print("| scheduler | sweep wall | trials' wall sum | concurrency | efficiency | idle slot-s: start / between / end "
          "| epochs evaluated | best val/miou | time to the same best |")
    print("|---|---|---|---|---|---|---|---|---|")
    for sweep in sweeps:
        ideal = sum(sweep["trial_seconds"]) / sweep["concurrency"]
        reached = next(moment for moment, best in sweep["best_so_far"] if best >= target)
        idle = " / ".join(f"{seconds:.0f}" for seconds in sweep["idle"].values())
        print(f"| {sweep['scheduler']} | {sweep['wall']:.0f} s | {sum(sweep['trial_seconds']):.0f} s "
              f"({len(sweep['trial_seconds'])} trials) | {sweep['concurrency']} | {sweep['wall'] / ideal:.3f} "
              f"| {idle} | "
              f"{sweep['epochs_trained']} | {sweep['best']:.4f} | {reached:.0f} s |")
    asha, none = sweeps
    asha_reached = next(m for m, b in asha["best_so_far"] if b >= target)
    none_reached = next(m for m, b in none["best_so_far"] if b >= target)
    print(f"\nASHA / no early stopping: wall {asha['wall'] / none['wall']:.2f}, "
          f"time to the same best {asha_reached / none_reached:.2f}")


if __name__ == "__main__":
    main()
