#!/usr/bin/env bash
# The test command: sets up ./.venv if needed, checks style, then runs the whole pytest suite.
# Extra arguments go to pytest (e.g. scripts/test.sh tests/test_models.py -k resnet50).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
