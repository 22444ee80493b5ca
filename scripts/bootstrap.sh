#!/usr/bin/env bash
# Creates ./.venv with Python 3.11 and installs the project with its pinned dependencies.
# Idempotent: re-installs only when pyproject.toml changed since the last successful install.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for cand in python3.11 python3; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      PY=$cand; break
    fi
  done
fi
[ -n "$PY" ] || { echo "bootstrap: Python 3.11 is required (set PYTHON=/path/to/python3.11)" >&2; exit 1; }

if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv with $PY"
  "$PY" -m venv .venv
fi
# pip on some machines warns about every missing local index folder; keep its real errors visible.
pip_install() {
  local rc=0
  .venv/bin/python -m pip install -q "$@" 2>&1 | grep -v 'is ignored: it is neither a file nor a directory' || true
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "bootstrap: pip install $* failed (exit $rc)" >&2; exit "$rc"; }
}

stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  echo "bootstrap: installing the project and its pinned dependencies (a few minutes the first time)"
  pip_install --upgrade pip
  # compat mode: the checkout itself goes on sys.path, so new packages need no re-install.
  pip_install -e '.[test]' --config-settings editable_mode=compat
  rm -f .venv/.installed-*
  touch "$stamp"
fi
