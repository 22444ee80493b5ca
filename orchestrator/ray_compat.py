"""The one module of the product that reaches into Ray's internals (`ray._private`, `ray.tune.execution`).

Written for Ray 2.60.0, the version pyproject.toml pins; `check_version()` says so when another is
installed (each item below may then stop working, silently restoring Ray's own behaviour). Everything
else in the product uses Ray's public APIs. Each item says why no public API does it and which test
goes through Ray's real call path with it:

- `keep_credentials_out_of_trials`: Ray Tune copies AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and the
  session tokens from the driver's environment into every trial's runtime_env
  (`ray.tune.execution.class_cache.ENV_VARS_TO_PROPAGATE`), and Ray writes runtime envs to its logs in
  plain text and shows them in its state API. There is no switch for it. Tested by
  `tests/test_ray_compat.py` (a Tune trial sees its node's credentials, not the driver's) and by the
  sentinel search of `tests/test_first_run.py`.
- `drop_known_noise`: lines Ray and MLflow print in workers that a user can do nothing about are
  dropped from what the driver prints. Ray has no public hook on the stream of worker lines it
  prints (`log_to_driver`); the handler lives in `ray._private.worker`. Tested by
  `tests/test_ray_compat.py` (a task's known-noise line is not printed, its other lines are).
- `enable_token_auth`: RAY_AUTH_MODE=token for a process that has already imported Ray (Ray reads its
  auth config once, at import). Used by clients of a token cluster (the topology tests, `ensure_ray`
  joining a RAY_ADDRESS). Every test that joins a local cluster goes through it.
- `LOOPBACK_NODE_CLI`: `ray start --address` with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (what keeps a
  node on 127.0.0.1 and its servers off other interfaces) refuses to add a node; the same CLI with
  only that refusal lifted adds one on loopback. For multi-node clusters on one machine (the drills);
  tested by `tests/test_topology.py` (every listening socket of the three nodes is on loopback).
"""

from __future__ import annotations

import re
import warnings

RAY_VERSION = "2.60.0"


def check_version() -> None:
    import ray

    if ray.__version__ != RAY_VERSION:
        warnings.warn(f"orchestrator.ray_compat was written for Ray {RAY_VERSION}, this is Ray {ray.__version__}: "
                      "check its items (credentials kept out of Tune trials, the log filter, token auth)",
                      RuntimeWarning, stacklevel=2)


TUNE_SECRETS = frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN"})


def keep_credentials_out_of_trials() -> None:
    """Tune trials get credentials from their node, like every other worker (see the module docstring)."""
    from ray.tune.execution import class_cache

    class_cache.ENV_VARS_TO_PROPAGATE = set(class_cache.ENV_VARS_TO_PROPAGATE) - TUNE_SECRETS


# Lines Ray and MLflow print that a user can do nothing about; everything else reaches the console.
KNOWN_NOISE = re.compile("|".join([
    r"PYTHON worker processes have been started on node",  # raylet: fractional-CPU Tune drivers, by design
    r"has constructor arguments in the object store and max_restarts > 0",  # Ray Train's own PreemptionWatcher
    r"State API may be temporarily unavailable", r"Failed to query Ray Train Controller actor state",
    r"Saving pytorch model by Pickle or CloudPickle",  # deliberate: the nets stay fully convolutional
    r"Passing a Python object as `python_model` causes it to be serialized",  # deliberate, see ensemble_model
    r"Add type hints to the `predict` method", r"^\s*color_warning\(",  # our signature is explicit
]))


def drop_known_noise() -> None:
    """Filter the worker log lines streamed to this driver through `KNOWN_NOISE`."""
    import functools

    from ray._private import worker as ray_worker

    dispatcher = ray_worker.global_worker_stdstream_dispatcher
    if not any(name == "ray_print_logs" for name, _ in getattr(dispatcher, "handlers", [])):
        return
    ignore_prefix = ray_worker._should_ignore_worker_log_prefix(ray_worker.global_worker)
    print_logs = functools.partial(ray_worker.print_to_stdstream, ignore_prefix=ignore_prefix)

    def filtered(data: dict) -> None:
        lines = [line for line in data.get("lines", []) if not KNOWN_NOISE.search(line)]
        if lines:
            print_logs({**data, "lines": lines})

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", filtered)


def enable_token_auth() -> None:
    """RAY_AUTH_MODE=token for this process, also when Ray is already imported (it caches its config)."""
    from ray._private.authentication.authentication_token_setup import _enable_token_auth

    _enable_token_auth()  # sets the variable and re-reads Ray's config


LOOPBACK_NODE_CLI = (
    "import sys; import ray._private.ray_constants as c; import ray._private.services as s; "
    "s.resolve_ip_for_localhost = lambda a: a; c.ENABLE_RAY_CLUSTER = True; "
    "from ray.scripts.scripts import main; sys.argv = ['ray', *sys.argv[1:]]; main()"
)
