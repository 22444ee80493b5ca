"""A user's first run: the README's main command from a clean home, what it leaves behind, and what
the MLflow UI then shows. One run of `scripts/run.sh` (two members, one epoch) serves every test here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from orchestrator.local_cluster import free_ports

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow
SENTINEL = "sentinel-first-run-" + os.urandom(8).hex()
MEMBERS = [{"label": "resnet8", "model": "resnet8"}, {"label": "resnet14", "model": "resnet14"}]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """`bash scripts/run.sh` as a new user runs it: an empty HOME (no ~/.ray, no token), free ports
    chosen by the script, pip's cache kept usable. Outputs go to a temporary folder."""
    base = tmp_path_factory.mktemp("first-run")
    home = base / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "AWS_"))}
    env.update({
        "HOME": str(home),
        "PIP_CACHE_DIR": os.environ.get("PIP_CACHE_DIR") or str(Path.home() / ".cache" / "pip"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{base}/mlflow.db",
        "STORAGE": str(base / "runs"),
        "DATA": str(base / "data" / "digits"),
        # A user's credentials in their shell: they must not travel with the job (issue 13).
        "AWS_ACCESS_KEY_ID": "first-run", "AWS_SECRET_ACCESS_KEY": SENTINEL,
    })
    started = time.monotonic()
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "run.sh"), "train.schedule.epochs=1", f"members={json.dumps(MEMBERS)}"],
        env=env, capture_output=True, text=True, timeout=900, cwd=str(base),
    )
    log = out.stdout + out.stderr
    (base / "run.log").write_text(log)
    return {"rc": out.returncode, "log": log, "base": base, "home": home, "env": env,
            "seconds": time.monotonic() - started, "uri": env["MLFLOW_TRACKING_URI"]}


def test_exits_0_from_a_clean_home_with_a_private_token(first_run):
    assert first_run["rc"] == 0, first_run["log"][-3000:]
    assert "Attempting to recover" not in first_run["log"]
    token = first_run["home"] / ".ray" / "auth_token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert stat.S_IMODE(token.parent.stat().st_mode) == 0o700


def test_each_epoch_line_once_with_its_member_label_and_an_eta(first_run):
    log = first_run["log"]
    for m in MEMBERS:
        lines = [line for line in log.splitlines() if f"[{m['label']}] epoch 1/1" in line]
        assert len(lines) == 1, (m["label"], lines)
        assert "ETA" in lines[0]
    for noise in ("State API may be temporarily unavailable", "PYTHON worker processes have been started",
                  "Add type hints to the `predict` method", "Downloading artifacts"):
        assert noise not in log, noise


def _temp_dirs(first_run) -> set[str]:
    return set(re.findall(r"logs (/tmp/ray-[A-Za-z0-9_]+)/session_latest/logs", first_run["log"]))


def test_none_of_its_cluster_remains(first_run):
    """run.sh stopped its cluster (all of it: the GCS ignores SIGTERM while raylets are up) before it exited."""
    from orchestrator.local_cluster import cluster_processes

    clusters = re.findall(r"GCS (127\.0\.0\.1:\d+), logs (/tmp/ray-[A-Za-z0-9_]+)/session_latest/logs", first_run["log"])
    assert clusters, "run.sh names its cluster's GCS and log folder"
    for gcs, temp_dir in clusters:
        left = [" ".join(p.cmdline())[:120] for p in cluster_processes({"temp_dir": temp_dir, "gcs_address": gcs})]
        assert left == [], left


def test_the_user_s_secret_is_nowhere_in_ray_s_session_mlflow_or_the_outputs(first_run):
    assert first_run["rc"] == 0
    needle = SENTINEL.encode()
    places = [Path(d) for d in _temp_dirs(first_run)] + [first_run["base"]]
    found = [str(p) for root in places for p in root.rglob("*")
             if p.is_file() and not p.is_symlink() and p.name != "run.log" and needle in p.read_bytes()]
    assert found == [], found


def test_the_champion_loads_in_a_fresh_process_after_ray_s_session_folder_is_gone(first_run):
    assert first_run["rc"] == 0
    # The job ran inside Ray's package cache, under the cluster's temp dir: remove all of it.
    temp_dirs = _temp_dirs(first_run)
    assert temp_dirs, "run.sh names its cluster's log folder"
    for d in temp_dirs:
        shutil.rmtree(d, ignore_errors=True)
    code = (
        "import mlflow, numpy as np; m = mlflow.pyfunc.load_model('models:/resnet-ensemble@champion'); "
        "p = m.predict(np.zeros((2, 3, 32, 32), dtype=np.float32)); "
        "print(np.asarray(p['probabilities']).shape)"
    )
    env = {**first_run["env"], "HOME": str(first_run["home"])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "(2, 10)" in out.stdout

    # Every artifact of every run is listed, and lives beside mlflow.db, not in a temporary folder.
    client = MlflowClient(first_run["uri"])
    exps = client.search_experiments()
    assert "Default" in {e.name for e in exps}
    for exp in exps:  # Default too: a notebook that logs to it keeps its artifacts (it was in Ray's package cache)
        assert exp.artifact_location.startswith((first_run["base"] / "mlartifacts").as_uri()), exp.artifact_location
        if exp.name != "Default":
            assert exp.tags.get("mlflow.experimentKind") == "custom_model_development"
    runs = client.search_runs([e.experiment_id for e in exps])
    assert runs
    for run in runs:
        assert "/tmp/ray-" not in run.info.artifact_uri
        files = _all_artifacts(client, run.info.run_id)
        for path in files:
            local = Path(run.info.artifact_uri.removeprefix("file://")) / path
            assert local.exists(), local


def _all_artifacts(client, run_id, path=None):
    out = []
    for a in client.list_artifacts(run_id, path):
        out += _all_artifacts(client, run_id, a.path) if a.is_dir else [a.path]
    return out


def test_predictions_have_one_row_per_test_sample(first_run):
    assert first_run["rc"] == 0
    manifest = json.loads((first_run["base"] / "data" / "digits" / "manifest.json").read_text())
    files = list((first_run["base"] / "runs" / "predictions").glob("*.parquet"))
    assert len(files) == 1, files
    table = pq.read_table(files[0])
    assert table.num_rows == manifest["splits"]["test"]["num_samples"]
    assert len(set(table.column("key").to_pylist())) == table.num_rows


def test_mlflow_metadata_worth_browsing(first_run):
    assert first_run["rc"] == 0
    client = MlflowClient(first_run["uri"])
    exp = client.get_experiment_by_name("ensemble-digits")
    runs = client.search_runs([exp.experiment_id])
    by_name = {r.info.run_name: r for r in runs}
    assert {"resnet-ensemble", "resnet8", "resnet14"} <= set(by_name), sorted(by_name)
    parent = by_name["resnet-ensemble"]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    for r in runs:
        assert r.info.status == "FINISHED", (r.info.run_name, r.info.status)
        assert r.data.tags.get("mlflow.user") not in (None, "", "unknown")
        assert r.data.tags.get("mlflow.source.name", "").startswith("python -m orchestrator.run")
        if commit:
            assert r.data.tags["git_commit"] == commit, "the submitting side passes the commit in"
    for label in ("resnet8", "resnet14"):
        assert by_name[label].data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert by_name[label].inputs.dataset_inputs, "the data each run reads is an MLflow dataset input"
    note = parent.data.tags.get("mlflow.note.content", "")
    assert "resnet8" in note and "val top-1 error" in note and "test top-1 error" in note, note
    version = client.get_model_version_by_alias("resnet-ensemble", "champion")
    assert version.description == note


@pytest.mark.skipif(not shutil.which("chromium"), reason="needs Debian's chromium (scripts/test.sh installs it)")
def test_the_mlflow_ui_opens_on_the_training_runs_with_members_nested(first_run, tmp_path):
    """What a user sees: `mlflow ui` on the store, the experiment opened in headless Chromium."""
    assert first_run["rc"] == 0
    client = MlflowClient(first_run["uri"])
    exp = client.get_experiment_by_name("ensemble-digits")
    port = free_ports(1)[0]
    mlflow_bin = str(Path(sys.executable).with_name("mlflow"))
    server = subprocess.Popen(
        [mlflow_bin, "ui", "--backend-store-uri", first_run["uri"], "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        import urllib.request

        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
                break
            except OSError:
                time.sleep(0.5)
        printed = re.search(r"then open http://127\.0\.0\.1:5000/(#/experiments/\d+\S*)\)", first_run["log"])
        assert printed, "the job prints the page of its runs"
        url = f"http://127.0.0.1:{port}/{printed.group(1)}"
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1400,900", "--virtual-time-budget=20000"]
        dom = subprocess.run(["chromium", *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
        shot = tmp_path / "experiment.png"
        subprocess.run(["chromium", *flags, f"--screenshot={shot}", url], capture_output=True, timeout=120)
        shutil.copy(shot, first_run["base"] / "experiment.png") if shot.exists() else None
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    # The runs table of model training, not the GenAI overview of traces: the parent run is a row, its
    # members are nested under it (collapsed: not rows of their own), and the table counts them all.
    text = re.sub(r"<[^>]+>", " ", re.sub(r"<script.*?</script>|<style.*?</style>", "", dom, flags=re.S))
    text = re.sub(r"\s+", " ", text)
    (first_run["base"] / "experiment.txt").write_text(text)
    assert "resnet-ensemble" in text, text[-2000:]
    assert "Model training" in text and "Traces" in text
    assert "No data available for the selected time range" not in text, "the GenAI overview"
    total = len(client.search_runs([exp.experiment_id]))
    assert re.search(rf"\b{total} matching runs\b", text), (total, text[-1500:])
    assert "resnet14" not in text, "members are nested under the ensemble's row, not listed beside it"


def test_commands_started_at_once_in_a_new_home_agree_on_one_token(tmp_path):
    """Eight processes create ~/.ray/auth_token at once (two commands, or two test workers, in a new HOME):
    every one of them reads the same token back, a 0600 file."""
    code = ("import os, sys, time; from pathlib import Path; from orchestrator.local_cluster import ensure_token\n"
            "while not os.path.exists(sys.argv[2]): pass\n"  # all at once: each spins until the start file appears
            "print(ensure_token(Path(sys.argv[1])).read_text())")
    path, go = tmp_path / ".ray" / "auth_token", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path), str(go)], stdout=subprocess.PIPE, text=True)
             for _ in range(8)]
    time.sleep(1.5)  # every process imported and spinning
    go.touch()
    tokens = {p.communicate(timeout=60)[0].strip() for p in procs}
    assert len(tokens) == 1 and len(tokens.pop()) == 64
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["auth_token"], "no temporary file left"
