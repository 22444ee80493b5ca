"""The Ray internals the product relies on (`orchestrator/ray_compat.py`), each through Ray's real call path.

The token-auth client and the loopback multi-node CLI are exercised by every cluster test and by
`test_topology.py`; the two below have no other test that isolates them.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import ray

from orchestrator import ray_compat

ROOT = Path(__file__).resolve().parent.parent


def test_the_compat_module_is_written_for_the_pinned_ray():
    pinned = re.search(r'"ray\[[^\]]*\]==([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert ray_compat.RAY_VERSION == pinned == ray.__version__


@pytest.mark.slow
def test_a_tune_trial_gets_its_nodes_credentials_not_the_drivers(ray_local, tmp_path, monkeypatch):
    """Without the patch Ray Tune copies the driver's AWS secret into the trial's runtime env (and Ray
    logs runtime envs in plain text); with it the trial has its node's, as every worker does."""
    from ray import tune

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "driver-only-sentinel")
    ray_compat.keep_credentials_out_of_trials()

    def trial(config):
        import os

        tune.report({"driver_secret": float(os.environ.get("AWS_SECRET_ACCESS_KEY") == "driver-only-sentinel"),
                     "node_secret": float(os.environ.get("AWS_SECRET_ACCESS_KEY") == "testing")})

    grid = tune.Tuner(tune.with_resources(trial, {"CPU": 0.01}),
                      run_config=tune.RunConfig(storage_path=str(tmp_path), name="compat", verbose=0)).fit()
    metrics = grid[0].metrics
    assert metrics["driver_secret"] == 0.0 and metrics["node_secret"] == 1.0, metrics


@pytest.mark.slow
def test_known_noise_from_workers_is_not_printed_and_the_rest_is(ray_local, capfd):
    @ray.remote(num_cpus=0)
    def chatty(tag: str) -> None:
        print(f"Saving pytorch model by Pickle or CloudPickle format ({tag})", flush=True)
        print(f"a line the user needs ({tag})", flush=True)

    tag = f"t{time.monotonic_ns()}"
    ray.get(chatty.remote(tag))
    seen = ""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and f"a line the user needs ({tag})" not in seen:
        time.sleep(0.5)
        seen += capfd.readouterr().out
    assert f"a line the user needs ({tag})" in seen
    assert f"Pickle or CloudPickle format ({tag})" not in seen
