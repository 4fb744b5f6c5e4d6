#!/usr/bin/env bash
# Set up, then the whole story on local Ray, no download: a small hyperparameter sweep
# (jobs/tune_quickstart.yaml: Optuna proposes, ASHA stops poor trials early, 8 one-worker
# trials two at a time, about 7 minutes on 2 cores), a verified pull of its best checkpoint
# to runs/best, and an evaluation of it with figures in runs/best-evaluation.
# Arguments go to the sweep (e.g. --set tune.num_samples=4). Run it again: a finished sweep
# just reports its results, an interrupted one carries on where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export RAY_USAGE_STATS_ENABLED=0
.venv/bin/python -m segjob.tune jobs/tune_quickstart.yaml "$@"
.venv/bin/python -m segjob.pull runs/tune_quickstart --to runs/best
.venv/bin/python -m segjob.evaluate runs/best --out runs/best-evaluation
