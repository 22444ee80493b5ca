#!/usr/bin/env bash
# The test command: sets up ./.venv if needed, checks style, then runs the whole pytest suite.
# Extra arguments go to pytest (e.g. scripts/test.sh tests/test_models.py -k resnet50).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
# The MLflow UI test looks at the runs table in a real browser: Debian's chromium, installed when missing
# and this user may install packages (CI runs as root); without it that one test is skipped, saying why.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "test: installing chromium for the MLflow UI test"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "test: could not install chromium; the MLflow UI test will be skipped"
fi
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
