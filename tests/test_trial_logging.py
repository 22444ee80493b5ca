"""Concurrent trials log to one MLflow store: what each trial's driver logs before its training starts.

Seen from a fresh clone (issue 20): two ensemble members logged the same dataset at the same moment, and
one failed with `UNIQUE constraint failed: datasets.experiment_id, ...` (MLflow's SQL store looks a dataset
up, then inserts it). Four processes here do the same at a barrier, against a real SQLite store.
"""

from __future__ import annotations

import multiprocessing as mp
import os

import pytest
from mlflow.tracking import MlflowClient

from orchestrator import tracking

pytestmark = pytest.mark.slow
MANIFEST = {"splits": {"train": {"shards": [{"sha256": "ab"}], "num_samples": 3}}, "classes": [0, 1]}


def _log(uri: str, barrier, results) -> None:
    from orchestrator.train import _log_dataset

    client = MlflowClient(uri)
    run_id, _ = tracking.find_or_create_run(client, "trials", f"r{os.getpid()}", {}, {})
    barrier.wait()
    try:
        _log_dataset(client, run_id, MANIFEST, "/data/digits", "train", "training")
        results.put(("ok", run_id))
    except Exception as e:  # noqa: BLE001 - reported to the test
        results.put((f"{type(e).__name__}: {str(e).splitlines()[0]}", run_id))


def test_trials_that_log_the_same_dataset_at_once_all_succeed(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tracking.experiment_id(MlflowClient(tracking.tracking_uri()), "trials")
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_log, args=(uri, barrier, results)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    got = [results.get(timeout=10) for _ in procs]
    assert [status for status, _ in got] == ["ok"] * 4, got
    client = MlflowClient(uri)
    for _, run_id in got:
        inputs = client.get_run(run_id).inputs.dataset_inputs
        assert [i.dataset.name for i in inputs] == ["digits/train"]
