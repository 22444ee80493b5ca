"""Bad input fails before any work: one line (`error: ...`), exit code 2, within seconds, for every
command; errors a retry cannot fix are not retried; a failed run is never left RUNNING."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
from mlflow.tracking import MlflowClient

from orchestrator.run import main

ROOT = Path(__file__).resolve().parent.parent
FAST = 20.0  # seconds: a check, not a training


@pytest.fixture(autouse=True)
def _environ_restored():
    """`main()` runs in this process and sets process-wide settings (RAY_DEDUP_LOGS, the S3 checksum
    mode, ...), as it does at the start of a command; later tests must not inherit them."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(autouse=True, scope="module")
def _imported():
    """The commands' modules imported once: the bound below is for the checks, not for importing torch and Ray."""
    import orchestrator.batch_eval  # noqa: F401
    import orchestrator.ensemble  # noqa: F401
    import orchestrator.train  # noqa: F401


def run_cli(argv, capsys) -> tuple[int, list[str], float]:
    t0 = time.monotonic()
    rc = main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return rc, err, time.monotonic() - t0


def one_line_error(rc, err, seconds, *must):
    assert rc == 2, (rc, err)
    assert len(err) == 1 and err[0].startswith("error: "), err
    for m in must:
        assert m in err[0], (m, err[0])
    assert seconds < FAST, seconds


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    return tmp_path


def test_train_with_a_data_url_that_has_no_manifest(store, capsys):
    missing = store / "no-such-data"
    one_line_error(*run_cli(["train", "--config", "digits_resnet20.yaml", f"data.url={missing}",
                             "--storage", str(store / "runs")], capsys), str(missing), "manifest.json")
    assert not missing.exists(), "no demo data is written to a path the user typed"


def test_train_with_a_bucket_that_does_not_exist(store, s3_endpoint, capsys):
    one_line_error(*run_cli(["train", "--config", "digits_resnet20.yaml", "data.url=s3://no-such-bucket-4711/digits",
                             "--storage", str(store / "runs")], capsys), "s3://no-such-bucket-4711/digits")


def test_train_without_any_credentials_for_s3(store, s3_endpoint, monkeypatch, capsys):
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(store / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(store / "none"))
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)  # a new process: no credentials cached by earlier tests
    one_line_error(*run_cli(["train", "--config", "digits_resnet20.yaml", "data.url=s3://some-bucket/digits",
                             "--storage", str(store / "runs")], capsys), "credentials")


def test_train_with_storage_in_a_missing_bucket(store, s3_endpoint, digits_url, capsys):
    one_line_error(*run_cli(["train", "--config", "digits_resnet20.yaml", f"data.url={digits_url}",
                             "--storage", "s3://missing-bucket-4711/runs"], capsys), "s3://missing-bucket-4711/runs")


def test_train_asking_more_than_the_cluster_has(store, ray_local, digits_url, capsys):
    one_line_error(*run_cli(["train", "--config", "digits_resnet20.yaml", f"data.url={digits_url}",
                             "scaling.num_workers=8", "--storage", str(store / "runs")], capsys), "needs 8 CPU")


def test_ensemble_never_writes_demo_data_to_a_url_the_user_typed(store, s3_endpoint, capsys):
    one_line_error(*run_cli(["ensemble", "train.data.url=s3://no-such-bucket-4712/digits",
                             "--storage", str(store / "runs")], capsys), "s3://no-such-bucket-4712/digits")
    names = [b["Name"] for b in boto3.client("s3").list_buckets()["Buckets"]]
    assert "no-such-bucket-4712" not in names


def test_ensemble_override_that_would_not_take_effect(store, capsys):
    one_line_error(*run_cli(["ensemble", "train.model.name=resnet21", "--storage", str(store / "runs")], capsys),
                   "train.model.name", "members")


def test_unknown_model_and_unknown_key(store, capsys, digits_url):
    one_line_error(*run_cli(["train", "--config", "digits_resnet20.yaml", "model.name=resnet21",
                             f"data.url={digits_url}"], capsys), "resnet21")
    one_line_error(*run_cli(["train", "--config", "digits_resnet20.yaml", "schedule.epoch=3",
                             f"data.url={digits_url}"], capsys), "schedule.epoch")


def test_evaluate_bad_data_and_bad_model(store, capsys, digits_url):
    one_line_error(*run_cli(["evaluate", "--model-uri", "models:/resnet-ensemble@champion", "--data",
                             str(store / "nothing"), "--storage", str(store / "runs")], capsys), "manifest.json")
    one_line_error(*run_cli(["evaluate", "--model-uri", "models:/no-such-model@champion", "--data", digits_url,
                             "--storage", str(store / "runs")], capsys), "no-such-model")


def test_ablate_with_bad_data(store, capsys):  # the benchmark's: tests/test_bench.py
    one_line_error(*run_cli(["ablate", "depth", f"data.url={store / 'none'}", "--storage", str(store / "runs")],
                            capsys), "manifest.json")


def test_the_real_command_line_prints_one_line_and_exits_2(store):
    t0 = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator.run", "train", "--config", "digits_resnet20.yaml",
         f"data.url={store / 'typo'}", "--storage", str(store / "runs")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}/mlflow.db"},
    )
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: data.url="), out.stderr
    assert time.monotonic() - t0 < 60


def test_relative_paths_inside_ray_s_package_cache_are_refused_or_resolved(tmp_path, monkeypatch):
    from orchestrator.cluster import CWD_ENV, UserPathError, user_path

    cache = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_1"
    cache.mkdir(parents=True)
    monkeypatch.chdir(cache)
    monkeypatch.delenv(CWD_ENV, raising=False)
    with pytest.raises(UserPathError, match="package cache"):
        user_path("runs", "storage")
    monkeypatch.setenv(CWD_ENV, str(tmp_path / "home"))
    assert user_path("runs", "storage") == str(tmp_path / "home" / "runs")
    assert user_path("s3://b/runs") == "s3://b/runs"
    assert user_path("/abs/runs") == "/abs/runs"


@pytest.mark.slow
def test_a_shard_that_disagrees_with_its_manifest_fails_at_once_and_the_run_is_failed(
    store, ray_local, digits_url, capsys
):
    data = store / "digits"
    shutil.copytree(digits_url, data)
    manifest = json.loads((data / "manifest.json").read_text())
    shard = data / manifest["splits"]["train"]["shards"][0]["url"]
    raw = bytearray(shard.read_bytes())
    raw[5000:5010] = b"\xff" * 10  # same length, other bytes: only the checksum can tell
    shard.write_bytes(bytes(raw))
    t0 = time.monotonic()
    rc = main(["train", "--config", "digits_resnet20.yaml", f"data.url={data}", "model.name=resnet8",
               "schedule.epochs=1", "scaling.num_workers=1", "checkpoint.max_failures=3",
               "tracking.experiment=bad-shard", "--storage", str(store / "runs")])
    out, err = capsys.readouterr()
    seconds = time.monotonic() - t0
    assert rc == 1
    # Not retried (controller.FailFast): one worker group started, though checkpoint.max_failures=3.
    assert out.count("world size 1 at iteration 0") == 1, out[-3000:]
    assert "error: training failed" in err and shard.name in err, err[-2000:]
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("bad-shard")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert shard.name in runs[0].data.tags["error"]
    # Not retried: three restarts would each start a worker group again (15-30 s apiece here).
    assert seconds < 90, seconds


@pytest.mark.slow
def test_a_driver_with_credentials_the_nodes_lack_stops_before_any_work(store, s3_endpoint, make_bucket):
    """Credentials never travel with a job: when the driver has some and the nodes have none, say how
    to give them to the cluster, before any training starts."""
    from orchestrator.local_cluster import start, stop
    from pipelines.shards import main as shards_cli

    bucket = make_bucket()
    assert shards_cli(["write", "--source", "synthetic:classes=3,size=16,train=12,val=6,test=6",
                       "--out", f"s3://{bucket}/tiny", "--quiet"]) == 0
    bare = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_"))}
    bare["AWS_ENDPOINT_URL"] = s3_endpoint  # a setting, not a secret: the nodes may know where S3 is
    state_file = store / "cluster.json"
    state = start(state_file, num_cpus=1, env=bare)
    try:
        t0 = time.monotonic()
        out = subprocess.run(
            [sys.executable, "-m", "orchestrator.run", "train", "--config", "digits_resnet20.yaml",
             f"data.url=s3://{bucket}/tiny", "scaling.num_workers=1", "--storage", str(store / "runs")],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
            env={**os.environ, "RAY_ADDRESS": state["gcs_address"], "RAY_AUTH_MODE": "token",
                 "MLFLOW_TRACKING_URI": f"sqlite:///{store}/mlflow.db"},
        )
    finally:
        stop(state_file)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert out.returncode == 2, out.stderr[-3000:]
    assert len(errors) == 1 and "have no AWS credentials" in errors[0] and "never sent with a job" in errors[0], errors
    assert time.monotonic() - t0 < 120
