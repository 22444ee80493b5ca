"""Shared fixtures: a real S3 endpoint (moto's server) on loopback.

boto3 talks HTTP to it exactly as to AWS; nothing is patched in-process.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Iterator

import boto3
import pytest

# Before anything imports Ray: the tests' clusters stay on loopback (see orchestrator/local_cluster.py),
# and every worker's line reaches the output (no folding of alike lines).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

# The modules that start Ray clusters and train, slowest first (seconds of a worker's time in CI, 2 workers on 2
# cores): topology 885, exit_and_cleanup 380, train 170, first_run 140, ensemble 80, gpu_check 62, infra 55,
# errors_before_work 50, ablate 45, bench 32, shards_integrity 30.
SLOWEST_FIRST = ["test_topology", "test_exit_and_cleanup", "test_train", "test_first_run", "test_ensemble",
                 "test_gpu_check", "test_infra", "test_errors_before_work", "test_ablate", "test_bench",
                 "test_shards_integrity"]


def pytest_collection_modifyitems(config, items):
    """Slow modules first, the topology module first of all. Under `pytest -n 2 --dist loadfile` (pyproject.toml)
    one worker runs the topology module, most of it waiting out its drills' outages and deadlines, while the
    other runs the rest; the many fast modules come last, where they even out the two workers' ends."""
    def rank(item) -> int:
        module = item.nodeid.split("::")[0].removeprefix("tests/").removesuffix(".py")
        return SLOWEST_FIRST.index(module) if module in SLOWEST_FIRST else len(SLOWEST_FIRST)

    items.sort(key=rank)  # stable: each module's tests stay in their order


_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """URL of a moto S3 server on 127.0.0.1; AWS_ENDPOINT_URL and dummy credentials are set
    for the session (DataLoader workers inherit them), and restored afterwards."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    from orchestrator.local_cluster import free_ports

    (port,) = free_ports(1)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    env = {**_AWS_ENV, "AWS_ENDPOINT_URL": url}
    saved = {k: os.environ.get(k) for k in [*env, "AWS_PROFILE", "AWS_SESSION_TOKEN"]}
    os.environ.pop("AWS_PROFILE", None)
    os.environ.pop("AWS_SESSION_TOKEN", None)
    os.environ.update(env)
    try:
        yield url
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def make_bucket(s3_endpoint: str) -> Callable[[str | None], str]:
    """Create a fresh bucket on the loopback endpoint; returns its name."""

    def create(name: str | None = None) -> str:
        name = name or f"test-{uuid.uuid4().hex[:12]}"
        boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
        return name

    return create


@pytest.fixture(scope="session")
def ray_local(s3_endpoint, tmp_path_factory) -> Iterator[None]:
    """One real local Ray cluster (2 CPUs) for every test that trains; each start costs seconds.

    Started after the S3 endpoint's settings and test credentials are in the environment: the nodes
    inherit them, as a real cluster's nodes have their own (credentials never travel with a job)."""
    import ray

    from orchestrator.local_cluster import connect, stop
    from orchestrator.ray_compat import drop_known_noise

    state_file = tmp_path_factory.mktemp("ray") / "cluster.json"
    if not ray.is_initialized():
        connect(state_file, num_cpus=2)  # loopback, token auth, its own ports: as scripts/run.sh starts it
        drop_known_noise()
    yield
    ray.shutdown()
    stop(state_file)


@pytest.fixture(scope="session")
def digits_url(tmp_path_factory) -> str:
    """The bundled demo data (scikit-learn's real digits) written as shards once per session."""
    from pipelines.shards import main as shards_cli

    out = tmp_path_factory.mktemp("data") / "digits"
    assert shards_cli(["write", "--source", "digits", "--out", str(out), "--quiet"]) == 0
    return str(out)
