#!/usr/bin/env bash
# Set up, then train the quickstart job on local Ray (2 CPU workers, checkpoints in ./runs).
# Run it twice: the second time it resumes or reports the run as finished.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export RAY_USAGE_STATS_ENABLED=0
exec .venv/bin/python -m segjob.train jobs/quickstart.yaml "$@"
