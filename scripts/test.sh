#!/usr/bin/env bash
# Set up, then run the whole test suite (unit + integration on local Ray, moto S3, GCS emulator).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export RAY_USAGE_STATS_ENABLED=0
# lint and import order first (pyproject.toml [tool.ruff]): seconds, and CI enforces it
.venv/bin/ruff check segjob tests bench
# every test has its own limit (pyproject.toml, tests/conftest.py); the whole run stops after 50 minutes
exec .venv/bin/python -m pytest -q --session-timeout 3000 "$@"
