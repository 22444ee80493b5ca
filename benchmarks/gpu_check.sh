#!/usr/bin/env bash
# Prepares the GPU check for the device machine and prints the one device-tool call that runs it.
#
#   bash benchmarks/gpu_check.sh            # PYTHON=... to use another interpreter than .venv/bin/python
#
# 1. The packages the GPU machine lacks and the check's import path needs (`gpu_check.py --print-wheels`:
#    webdataset, braceexpand and, while `pipelines` imports boto3 at import time, boto3, botocore,
#    s3transfer and jmespath) are downloaded as CPython 3.12 wheels, the versions installed here, into
#    .whl/ (ignored by git). Ray and MLflow never travel: the check does not import them.
# 2. What would travel is measured as the device tool counts it: tracked and untracked, not ignored
#    files, shared/ where the checkout has one, and the carried .whl/. Over 64 MiB is an error.
# 3. The call is printed: `run` with carry, timeout_s and command. On the machine the command installs
#    the wheels with --no-index --no-deps into /tmp/site, puts it on PYTHONPATH and runs the check,
#    which writes gpu_check.json and gpu_check.txt under $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}

wheels=$("$PY" benchmarks/gpu_check.py --print-wheels)
rm -rf .whl
mkdir -p .whl
if [ -n "$wheels" ]; then
    # shellcheck disable=SC2086  # one argument per wheel
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl $wheels
fi

"$PY" - "$wheels" <<'EOF'
import json
import os
import subprocess
import sys
from pathlib import Path

LIMIT = 64 << 20
MiB = 1 << 20
listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                        capture_output=True, check=True).stdout.decode().split("\0")
files = {Path(f) for f in listed if f and os.path.isfile(f)}
tree = sum(f.stat().st_size for f in files)
shared = sum(f.stat().st_size for f in Path("shared").rglob("*") if f.is_file() and f not in files) if Path("shared").is_dir() else 0
wheels = sorted(Path(".whl").glob("*.whl"))
carried = sum(f.stat().st_size for f in wheels)
total = tree + shared + carried
print(f"wheels ({len(wheels)}): " + (", ".join(f"{w.name} {w.stat().st_size / MiB:.2f} MiB" for w in wheels) or "none"))
print(f"what would travel: working tree {tree / MiB:.2f} MiB ({len(files)} files) + shared/ {shared / MiB:.2f} MiB "
      f"+ .whl/ {carried / MiB:.2f} MiB = {total / MiB:.2f} MiB of 64 MiB")
run = "PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out \"$OUT\""
if wheels:
    install = ("python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "
               ".whl/*.whl && export PYTHONPATH=/tmp/site || exit; ")
    call = {"carry": [".whl"], "timeout_s": 600, "command": install + run}
else:
    call = {"timeout_s": 600, "command": run}
print("device tool call (run), about 8 minutes of the 15 a task is lent:")
print(json.dumps(call, indent=1))
if total > LIMIT:
    sys.exit(f"error: {total / MiB:.2f} MiB would travel, over the device tool's 64 MiB")
EOF
