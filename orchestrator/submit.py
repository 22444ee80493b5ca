"""Submit an orchestrator command to a Ray cluster as a job: `ray job submit --working-dir` with the
settings a job needs to leave its results where the user expects them.

    python -m orchestrator.submit [--address URL] -- ensemble train.schedule.epochs=2 --storage runs
    python -m orchestrator.submit -- train --config digits_resnet20.yaml --storage s3://bucket/runs

What it adds to a bare `ray job submit --working-dir . -- python -m orchestrator.run ...`:
- ORCHESTRATOR_CWD, the folder you ran it in: relative paths you pass (`--storage runs`,
  `data.url=data/digits`, `./mlflow.db`) are resolved there, not in Ray's copy of the working
  directory, which Ray deletes;
- the MLflow store (MLFLOW_TRACKING_URI, made absolute), the git commit and your user name, so runs
  say which code and who ran them (the upload leaves .git out);
- the non-secret S3 settings (endpoint, region, profile, checksum mode). Credentials are never sent:
  Ray writes runtime-env variables to its logs in plain text. The nodes need their own.
- the upload leaves out .venv, .git, data and run outputs (Ray refuses uploads over 100 MiB);
- token authentication: RAY_AUTH_MODE=token when ~/.ray/auth_token exists.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from .cluster import CWD_ENV, forwarded_env
from .tracking import PROJECT_ROOT, git_commit, tracking_uri

EXCLUDES = [".venv", ".git", "data", "runs", "mlruns", "mlartifacts", "mlflow.db", ".local-stack", "*.egg-info",
            "__pycache__", ".pytest_cache", ".ruff_cache"]


def job_env() -> dict:
    """The job's environment variables: settings only, never a secret (see cluster.FORWARDED_ENV)."""
    import getpass

    os.environ.setdefault(CWD_ENV, os.getcwd())
    tracking_uri()  # made absolute against the user's folder, and exported
    env = forwarded_env()
    env.update({
        CWD_ENV: os.environ[CWD_ENV],
        "ORCHESTRATOR_GIT_COMMIT": git_commit(),
        "ORCHESTRATOR_USER": os.environ.get("ORCHESTRATOR_USER") or getpass.getuser(),
        "RAY_DEDUP_LOGS": "0",  # every member's epoch lines, not a folded sample of them
    })
    return env


def submit_argv(command: list[str], address: str | None = None, no_wait: bool = False) -> list[str]:
    runtime_env = {"excludes": EXCLUDES, "env_vars": job_env()}
    ray = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    argv = [ray, "job", "submit", "--working-dir", str(PROJECT_ROOT), "--runtime-env-json", json.dumps(runtime_env)]
    if address:
        argv += ["--address", address]
    if no_wait:
        argv.append("--no-wait")
    return [*argv, "--", "python", "-m", "orchestrator.run", *command]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m orchestrator.submit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", default=None, help="the cluster's dashboard, e.g. http://127.0.0.1:8265 (default: RAY_ADDRESS)")
    p.add_argument("--no-wait", action="store_true", help="return once the job is submitted")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS]: what `python -m orchestrator.run` runs")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("give the command after --, e.g. -- ensemble train.schedule.epochs=2")
    if not (args.address or os.environ.get("RAY_ADDRESS")):
        p.error("no cluster: pass --address http://HOST:8265 or set RAY_ADDRESS (scripts/run.sh starts a local one)")
    if (Path.home() / ".ray" / "auth_token").exists():
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    # EXCLUDES already leaves out .git and .venv; Ray would warn about its own defaults otherwise.
    os.environ.setdefault("RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES", "")
    argv = submit_argv(command, args.address, args.no_wait)
    os.execv(argv[0], argv)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
