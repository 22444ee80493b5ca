"""The production topology on one box, and the faults it must survive.

One fixture for the whole module: three Ray nodes on loopback (1 CPU each, started as
`scripts/run.sh` starts one), an S3 server (moto's, over HTTP) holding the shards, the checkpoints
and MLflow's artifacts, and an MLflow tracking server with S3 artifacts. Jobs go through
`python -m orchestrator.submit`, i.e. `ray job submit --working-dir`. The nodes' environment holds
the S3 credentials, with a sentinel secret that must never leave it (issue 13).

Each drill asserts what a user would check: the run FINISHED (or failed with a one-line error), each
epoch is in MLflow exactly once, no run is left RUNNING, the checkpoint loads. Wall times and
restarts spent are printed (pytest -s) for the record.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import boto3
import psutil
import pytest
import torch
from mlflow.tracking import MlflowClient

from orchestrator.local_cluster import add_node, cluster_processes, free_ports, start, stop
from orchestrator.ray_compat import enable_token_auth

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow
BUCKET = "topology"
SENTINEL = f"sentinel-{uuid.uuid4().hex}"


class S3Server:
    """moto's S3 over HTTP on a fixed loopback port; stop() and start() keep its objects (in-process state)."""

    def __init__(self, port: int):
        from moto.server import ThreadedMotoServer

        self.port, self._cls, self.server = port, ThreadedMotoServer, None

    def start(self) -> None:
        self.server = self._cls(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        self.server.stop()


class MlflowServer:
    def __init__(self, port: int, base: Path, env: dict):
        self.port, self.base, self.env, self.proc = port, base, env, None
        self.uri = f"http://127.0.0.1:{port}"

    def start(self) -> None:
        mlflow_bin = str(Path(sys.executable).with_name("mlflow"))
        self.proc = subprocess.Popen(
            [mlflow_bin, "server", "--backend-store-uri", f"sqlite:///{self.base}/mlflow.db",
             "--artifacts-destination", f"s3://{BUCKET}/mlartifacts", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1"],
            env=self.env, stdout=open(self.base / "mlflow.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        wait_for(lambda: _http_ok(f"{self.uri}/health"), 300, "the MLflow server to answer")

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=30)


def _http_ok(url: str) -> bool:
    import urllib.request

    try:
        urllib.request.urlopen(url, timeout=2).read()
        return True
    except OSError:
        return False


def wait_for(check, timeout: float, what: str, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def topology(tmp_path_factory):
    base = tmp_path_factory.mktemp("topology")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    s3_port, mlflow_port = free_ports(2)
    s3 = S3Server(s3_port)
    s3.start()
    endpoint = f"http://127.0.0.1:{s3_port}"
    secret_env = {"AWS_ACCESS_KEY_ID": "topology", "AWS_SECRET_ACCESS_KEY": SENTINEL, "AWS_SESSION_TOKEN": SENTINEL + "-t"}
    # What a node has: its own credentials and settings (never sent with a job).
    node_env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "RAY_"))}
    node_env.update(secret_env)
    node_env["PATH"] = f"{Path(sys.executable).parent}:{node_env.get('PATH', '')}"  # the nodes' python has the project
    node_env.update({"AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": "us-east-1", "MLFLOW_S3_ENDPOINT_URL": endpoint,
                     "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",
                     # Short enough for the lost-node drill; the default is 60 s a try.
                     "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "15",
                     # These nodes are drained in the preemption drill (private clusters leave it off).
                     "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1"})
    s3c = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="topology", aws_secret_access_key=SENTINEL,
                       region_name="us-east-1")
    s3c.create_bucket(Bucket=BUCKET)
    mlflow_server = MlflowServer(mlflow_port, base, node_env)
    mlflow_server.start()

    from pipelines.shards import main as shards_cli

    saved = dict(os.environ)
    os.environ.update({k: node_env[k] for k in ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", *secret_env)})
    try:
        assert shards_cli(["write", "--source", "digits", "--out", f"s3://{BUCKET}/digits", "--quiet"]) == 0
    finally:
        os.environ.clear()
        os.environ.update(saved)

    state_file = base / "cluster.json"
    state = start(state_file, num_cpus=1, resources={"node_a": 1}, env=node_env)
    state = add_node(state_file, num_cpus=1, resources={"node_b": 1}, env=node_env)
    state = add_node(state_file, num_cpus=1, resources={"node_c": 1}, env=node_env)  # the elastic drills' node
    # The driver's side: the user's shell with the same credentials, the cluster's dashboard address.
    driver_env = {**node_env, "RAY_ADDRESS": f"http://127.0.0.1:{state['dashboard_port']}", "RAY_AUTH_MODE": "token"}
    topo = {"base": base, "s3": s3, "s3c": s3c, "mlflow": mlflow_server, "state": state, "state_file": state_file,
            "driver_env": driver_env, "node_env": node_env, "endpoint": endpoint, "times": {}}
    yield topo
    stop(state_file)
    mlflow_server.stop()
    s3.stop()
    for name, seconds in topo["times"].items():
        print(f"[topology] {name}: {seconds}")


class Job:
    """One `python -m orchestrator.submit -- COMMAND` (ray job submit --working-dir), output captured."""

    def __init__(self, topo, args: list[str]):
        self.log = topo["base"] / f"job-{uuid.uuid4().hex[:8]}.log"
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.submit", "--", *args], cwd=str(topo["base"]), env=topo["driver_env"],
            stdout=open(self.log, "wb"), stderr=subprocess.STDOUT,
        )

    def wait(self, timeout: float = 600) -> tuple[int, str]:
        rc = self.proc.wait(timeout=timeout)
        self.seconds = time.monotonic() - self.t0
        return rc, self.log.read_text(errors="replace")


def train_args(name: str, epochs: int = 4, *extra: str) -> list[str]:
    return ["train", "--config", "digits_resnet20.yaml", f"data.url=s3://{BUCKET}/digits", "model.name=resnet8",
            f"schedule.epochs={epochs}", f"schedule.milestones=[{epochs - 1}]", "scaling.num_workers=2",
            "scaling.cpus_per_worker=1", "optim.batch_size=64", "checkpoint.keep_best=1",
            f"tracking.run_name={name}", "tracking.experiment=topology", *extra, "--storage", f"s3://{BUCKET}/runs"]


def the_run(topo, name: str):
    client = MlflowClient(topo["mlflow"].uri)
    exp = client.get_experiment_by_name("topology")
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("orchestrator.run_name") == name] if exp else []
    return client, (runs[0] if runs else None)


def epochs_logged(topo, name: str) -> list[float]:
    try:
        client, run = the_run(topo, name)
        return sorted(m.value for m in client.get_metric_history(run.info.run_id, "epoch")) if run else []
    except Exception:  # noqa: BLE001 - the server may be the thing that is down
        return []


def check_finished(topo, name: str, epochs: int):
    client, run = the_run(topo, name)
    assert run.info.status == "FINISHED", run.info.status
    assert epochs_logged(topo, name) == [float(e) for e in range(epochs)], "each epoch exactly once"
    local = client.download_artifacts(run.info.run_id, "checkpoint/checkpoint.pt", str(topo["base"] / uuid.uuid4().hex))
    state = torch.load(local, weights_only=True, map_location="cpu")
    assert state["epoch"] == epochs - 1


def no_run_left_running(topo):
    client = MlflowClient(topo["mlflow"].uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    running = [r.info.run_name for r in client.search_runs(exps) if r.info.status == "RUNNING"]
    assert running == [], running


def seconds_lost(topo, name: str) -> float:
    """The slowest epoch minus the median epoch, from the times MLflow recorded each epoch at."""
    client, run = the_run(topo, name)
    times = sorted(m.timestamp for m in client.get_metric_history(run.info.run_id, "epoch"))
    gaps = sorted((b - a) / 1000 for a, b in zip(times, times[1:], strict=False))
    return gaps[-1] - gaps[len(gaps) // 2] if gaps else float("nan")


def restarts(log: str) -> int:
    return log.count("] resume from epoch")


def _cmdline(p) -> str:
    try:
        return " ".join(p.cmdline())
    except (psutil.Error, OSError):  # gone meanwhile
        return ""


def workers(topo) -> list:
    return [p for p in cluster_processes(topo["state"]) if "RayTrainWorker" in _cmdline(p)]


def test_every_listening_socket_of_both_nodes_is_loopback(topology):
    listening = []
    for p in cluster_processes(topology["state"]):
        try:
            listening += [(p.name(), c.laddr.ip, c.laddr.port) for c in p.net_connections(kind="inet")
                          if c.status == psutil.CONN_LISTEN]
        except (psutil.Error, OSError):
            continue
    assert len({ip for _, ip, _ in listening}) >= 1 and len(listening) >= 8, listening
    outside = [s for s in listening if s[1] not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
    assert outside == [], outside


# ---------------------------------------------------------------------------------------------
# Elastic training and preemption (node C, the third node, goes and comes back).


def _raylet(topo, port: int) -> list:
    return [p for p in cluster_processes(topo["state"]) if "raylet" in _cmdline(p).split(" ")[0]
            and f"--node_manager_port={port}" in _cmdline(p)]


def _kill_node(topo, port: int, may_be_gone: bool = False) -> bool:
    """SIGKILL a node's raylet and its children: a machine that is gone (Ray does not kill drained nodes).
    A drained node's raylet exits by itself once it is idle (its workers gone before the deadline): with
    `may_be_gone` that is no error. Returns whether there was a raylet to kill."""
    procs = _raylet(topo, port)
    if not procs and may_be_gone:
        return False
    assert procs, f"no raylet on port {port}"
    for p in procs:
        for child in p.children(recursive=True):
            child.send_signal(signal.SIGKILL)
        p.send_signal(signal.SIGKILL)
    psutil.wait_procs(procs, timeout=10)
    return True


def _node_c_back(topo) -> int:
    """Node C again (a replacement machine, with a new node id); returns its raylet's port."""
    state = add_node(topo["state_file"], num_cpus=1, resources={"node_c": 1}, env=topo["node_env"])
    topo["state"] = state
    return state["node_manager_ports"][-1]


def _node_c_id(topo) -> str:
    from ray.util.state import list_nodes

    enable_token_auth()  # a client of the cluster, as `ray list nodes` is
    nodes = list_nodes(address=topo["driver_env"]["RAY_ADDRESS"], detail=True, limit=100)
    return next(n.node_id for n in nodes if n.state == "ALIVE" and "node_c" in (n.resources_total or {}))


def elastic_args(name: str, trace: Path, epochs: int, *extra: str) -> list[str]:
    return [*train_args(name, epochs, "scaling.num_workers=[2, 3]", "scaling.resize_interval_s=5",
                        "optim.batch_size=60", f"debug.trace_dir={trace}", *extra)]


def _log_of(job) -> str:
    return job.log.read_text(errors="replace")


def _traces(trace: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(trace.glob("*.jsonl")) for line in f.read_text().splitlines()]


def _check_every_sample_trained(topo, trace: Path, epochs: int, batch: int) -> tuple[int, set]:
    """Every planned sample of every epoch was trained, whatever the world size of the attempt that trained
    it; returns (steps trained more than once, the world sizes that trained)."""
    from pipelines import make_loader
    from pipelines.order import TrainPlan

    saved = dict(os.environ)
    os.environ.update({"AWS_ENDPOINT_URL": topo["endpoint"], "AWS_ACCESS_KEY_ID": "topology",
                       "AWS_SECRET_ACCESS_KEY": SENTINEL, "AWS_DEFAULT_REGION": "us-east-1"})
    try:  # the key of each sample index of the split (evaluation order is manifest order)
        keys = [k for *_, ks in make_loader(f"s3://{BUCKET}/digits", "train", 64, shuffle=False, num_workers=0,
                                            with_keys=True) for k in ks]
        shards = make_loader(f"s3://{BUCKET}/digits", "train", 64, shuffle=False, num_workers=0).manifest["splits"]["train"]["shards"]
    finally:
        os.environ.clear()
        os.environ.update(saved)
    lines = _traces(trace)
    by_step: dict = {}
    for line in lines:
        by_step.setdefault((line["epoch"], line["step"]), {}).setdefault(line["attempt"], set()).update(line["keys"])
    redone = 0
    for epoch in range(epochs):
        plan = TrainPlan(shards, seed=0, epoch=epoch, global_batch_size=batch, shuffle_buffer=1000)
        for step in range(plan.steps):
            attempts = by_step.get((epoch, step), {})
            assert attempts, f"epoch {epoch} step {step} was never trained"
            planned = {keys[i] for i in plan.step_samples(step)}
            for got in attempts.values():
                assert got == planned, (epoch, step)
            redone += len(attempts) - 1
    return redone, {line["world"] for line in lines}


def test_an_elastic_run_shrinks_grows_back_and_checkpoints_before_a_preemption_deadline(topology):
    """3 nodes of 1 CPU, `scaling.num_workers=[2, 3]`; one run through both ways a node goes:

    1. node C's raylet is SIGKILLed mid-epoch (a machine that fails without notice): the run goes on with
       2 workers from its last step checkpoint;
    2. a node C comes back (a new node id): the run grows to 3 at Ray's next resize check;
    3. that node is drained for preemption (`ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION`, a 30 s
       deadline) and killed at the deadline: every rank checkpoints at its next poll, and again at the
       last poll that leaves time before the deadline; the run resumes from the last of them on 2 workers.

    The run FINISHES; the world size went 3 -> 2 -> 3 -> 2 (its log lines and MLflow); each epoch is in
    MLflow once; every sample of every epoch was trained, whatever the world size (the order is the run's,
    not the cluster's); the steps redone are counted. `debug.min_step_seconds` paces the steps so that the
    run outlasts the events on a fast machine too. This drill runs first in the module: an elastic run
    starts only with resources that Ray's autoscaling coordinator has not reserved for earlier runs (seen:
    57 s of waiting after the ensemble drill's runs)."""
    name, epochs, trace = "elastic", 16, topology["base"] / "trace-elastic"  # the drain near iteration 100 of 320
    t0 = time.monotonic()
    job = Job(topology, elastic_args(name, trace, epochs, "checkpoint.every_steps=25", f"checkpoint.every_epochs={epochs}",
                                     "checkpoint.preemption_poll_steps=2", "debug.min_step_seconds=0.2"))
    wait_for(lambda: "world size 3 at iteration 0" in _log_of(job), 300, "three workers")
    wait_for(lambda: any(k.split("/")[-2].startswith("step_") for k in _checkpoint_keys(topology, name)), 300,
             "a checkpoint between epochs")
    # 1. A node fails.
    killed_at = time.monotonic()
    _kill_node(topology, topology["state"]["node_manager_ports"][2])
    wait_for(lambda: "world size 3 -> 2" in _log_of(job), 300, "the run to go on with two workers")
    shrunk = time.monotonic() - killed_at
    # 2. It comes back.
    port = _node_c_back(topology)
    back_at = time.monotonic()
    wait_for(lambda: "world size 2 -> 3" in _log_of(job), 300, "the run to grow back to three workers")
    grown = time.monotonic() - back_at
    # 3. It is preempted.
    node = _node_c_id(topology)
    drain = subprocess.run(
        [str(Path(sys.executable).with_name("ray")), "drain-node", "--address", topology["state"]["gcs_address"],
         "--node-id", node, "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot reclaim drill",
         "--deadline-remaining-seconds", "30"],
        env={**topology["driver_env"], "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}, capture_output=True, text=True, timeout=60)
    drained = time.monotonic()
    assert drain.returncode == 0, drain.stderr[-2000:]
    wait_for(lambda: "will be preempted" in _log_of(job), 60, "the preemption notice")
    notice = next(line for line in _log_of(job).splitlines() if "will be preempted" in line)
    jit = int(notice.split("checkpoint at iteration ")[1].split()[0])
    wait_for(lambda: any(f"step_{jit:08d}" in k for k in _checkpoint_keys(topology, name)), 30, "the checkpoint")
    committed = time.monotonic() - drained
    time.sleep(max(0.0, 30 - (time.monotonic() - drained)))
    before_kill = {k.split("/")[-2] for k in _checkpoint_keys(topology, name)}
    killed = _kill_node(topology, port, may_be_gone=True)
    assert "will be preempted" in _log_of(job) and job.proc.poll() is None, "the run outlasted the deadline"

    rc, log = job.wait(timeout=900)
    assert rc == 0, log[-3000:]
    assert committed < 30, "checkpointed before the deadline"
    assert "world size 3 -> 2" in log and "world size 2 -> 3" in log, log[-3000:]
    check_finished(topology, name, epochs)
    client, run = the_run(topology, name)
    sizes = [int(m.value) for m in sorted(client.get_metric_history(run.info.run_id, "world_size"), key=lambda m: m.step)]
    assert sizes == [3, 2, 3, 2], sizes
    resumes = [line.split("resume from ")[1] for line in log.splitlines() if "resume from" in line]
    resumed_at = int(resumes[-1].split("(iteration ")[1].split(")")[0])
    assert resumed_at >= jit and f"step_{resumed_at:08d}" in before_kill, (resumes, sorted(before_kill))
    redone, worlds = _check_every_sample_trained(topology, trace, epochs, 60)
    assert worlds == {2, 3}, worlds
    lost = len({(t["epoch"], t["step"]) for t in _traces(trace) if t["iteration"] >= resumed_at and t["world"] == 3})
    topology["times"]["elastic 3 -> 2 -> 3, then preempted -> 2"] = (
        f"finished, {time.monotonic() - t0:.0f} s; 2 workers {shrunk:.0f} s after the kill; 3 again {grown:.0f} s "
        f"after node C's return; preemption checkpoints at iteration {jit} ({committed:.0f} s after the drain) and "
        f"{resumed_at} (the last before the deadline), {lost} steps trained after it redone; node C "
        + ("killed at the deadline" if killed else "had shut itself down before the deadline (drained and idle)")
        + f"; {redone} steps redone in all; resumed from: {'; '.join(r.split(' on ')[0] for r in resumes)}; "
        f"world_size by iteration: {run.data.tags.get('world_size_by_iteration')}")


def test_a_run_across_nodes_survives_a_killed_worker_then_s3_and_mlflow_down_for_30_s(topology):
    """Two workers, one per node. A worker SIGKILLed mid-epoch costs one restart, from the last checkpoint.
    Then S3 (the shards, the checkpoints, MLflow's artifacts) and the MLflow server are both stopped for 30 s
    mid-epoch: botocore's, pyarrow's and MLflow's retries ride it out (no restart spent), and no epoch is
    lost or logged twice. (One run for the three faults: a run's fixed cost is most of a drill's time.)"""
    name, epochs = "across-nodes", 6
    job = Job(topology, train_args(name, epochs, "debug.min_step_seconds=0.25"))  # 5 s an epoch at least
    wait_for(lambda: len(workers(topology)) == 2, 180, "two training workers")
    assert len({p.ppid() for p in workers(topology)}) == 2, "one worker on each node"
    wait_for(lambda: len(epochs_logged(topology, name)) >= 1, 300, "the first epoch")
    time.sleep(2)  # mid-epoch
    workers(topology)[-1].send_signal(signal.SIGKILL)
    wait_for(lambda: restarts(_log_of(job)) == 1, 300, "the resume after the killed worker")
    resumed = len(epochs_logged(topology, name))
    wait_for(lambda: len(epochs_logged(topology, name)) > resumed, 300, "an epoch after the resume")
    time.sleep(2)  # mid-epoch
    down = time.monotonic()
    topology["mlflow"].stop()
    topology["s3"].stop()
    time.sleep(30)
    topology["s3"].start()
    topology["mlflow"].start()  # returns once the server answers again
    down = time.monotonic() - down
    rc, log = job.wait()
    assert rc == 0, log[-3000:]
    assert restarts(log) == 1, "the kill cost one restart, the outage none"
    check_finished(topology, name, epochs)
    topology["times"]["worker SIGKILL, then S3 + MLflow stopped 30 s"] = (
        f"finished, {restarts(log)} restart, {job.seconds:.0f} s, down {down:.0f} s, "
        f"slowest epoch {seconds_lost(topology, name):.0f} s over the median")


def _kill_driver(topo, name: str) -> None:
    drivers = [p for p in cluster_processes(topo["state"]) if "orchestrator.run" in _cmdline(p)
               and f"tracking.run_name={name}" in _cmdline(p)]
    assert drivers, "the job's driver process"
    for p in drivers:
        p.send_signal(signal.SIGKILL)


def _checkpoint_keys(topo, name: str) -> list[str]:
    """The checkpoints Ray Train has committed (its snapshot is written after the checkpoint's upload)."""
    got = topo["s3c"].list_objects_v2(Bucket=BUCKET, Prefix=f"runs/{name}/").get("Contents", [])
    keys = [o["Key"] for o in got]
    if f"runs/{name}/checkpoint_manager_snapshot.json" not in keys:
        return []
    return sorted(k for k in keys if k.endswith("/checkpoint.pt"))


def test_a_killed_driver_then_a_rerun_resumes(topology):
    t0 = time.monotonic()
    job = Job(topology, train_args("driver-kill", 4, "debug.min_step_seconds=0.15"))
    wait_for(lambda: _checkpoint_keys(topology, "driver-kill"), 300, "a checkpoint in S3")
    _kill_driver(topology, "driver-kill")
    rc, _ = job.wait()
    assert rc != 0
    again = Job(topology, train_args("driver-kill", 4, "debug.min_step_seconds=0.15"))
    rc, log = again.wait()
    assert rc == 0, log[-3000:]
    assert restarts(log) == 1, "the rerun resumed from the checkpoint"
    check_finished(topology, "driver-kill", 4)
    topology["times"]["driver SIGKILL + rerun"] = f"finished, {time.monotonic() - t0:.0f} s in all"


def test_an_overwritten_checkpoint_is_a_clear_error_on_resume(topology):
    job = Job(topology, train_args("overwritten", 4, "debug.min_step_seconds=0.15"))
    wait_for(lambda: _checkpoint_keys(topology, "overwritten"), 300, "a checkpoint in S3")
    _kill_driver(topology, "overwritten")
    job.wait()
    # Every checkpoint of the run overwritten, so whichever the resume picks is damaged, the way a store
    # that keeps aws-chunked framing damages it.
    keys = _checkpoint_keys(topology, "overwritten")
    for key in keys:
        body = topology["s3c"].get_object(Bucket=BUCKET, Key=key)["Body"].read()
        topology["s3c"].put_object(Bucket=BUCKET, Key=key, Body=b"7\r\n" + body[:-20] + b"\r\n0\r\nx-amz-checksum:x")
    again = Job(topology, train_args("overwritten", 4, "debug.min_step_seconds=0.15"))
    rc, log = again.wait()
    assert rc != 0
    # One line (ray job submit repeats the job's last lines once more when a job fails).
    errors = sorted({line for line in log.splitlines() if line.startswith("error: ")})
    assert len(errors) == 1 and "is corrupt" in errors[0], errors or log[-3000:]
    assert any(f"s3://{BUCKET}/{key}" in errors[0] for key in keys), (keys, errors[0])
    assert restarts(log) == 0 or "resume" not in errors[0]
    client, run = the_run(topology, "overwritten")
    assert run.info.status == "FAILED" and "corrupt" in run.data.tags["error"]
    topology["times"]["checkpoint overwritten in S3"] = f"one-line error in {again.seconds:.0f} s: {errors[0][:140]}"


def test_the_ensemble_and_evaluate_end_to_end_with_artifacts_in_s3(topology):
    members = [{"label": "r8", "model": "resnet8"}, {"label": "r14", "model": "resnet14"}]
    job = Job(topology, ["ensemble", f"train.data.url=s3://{BUCKET}/digits", f"members={json.dumps(members)}",
                         "train.schedule.epochs=1", "train.scaling.cpus_per_worker=1", "experiment=topology-ensemble",
                         "--storage", f"s3://{BUCKET}/runs"])
    rc, log = job.wait()
    assert rc == 0, log[-3000:]
    ev = Job(topology, ["evaluate", "--model-uri", "models:/resnet-ensemble@champion", "--data", f"s3://{BUCKET}/digits",
                        "--split", "test", "--storage", f"s3://{BUCKET}/runs"])
    rc, elog = ev.wait()
    assert rc == 0, elog[-3000:]
    s3c = topology["s3c"]
    keys = [o["Key"] for o in s3c.list_objects_v2(Bucket=BUCKET, Prefix="runs/predictions/").get("Contents", [])
            if o["Key"].endswith(".parquet")]
    assert keys, "predictions in S3"
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(s3c.get_object(Bucket=BUCKET, Key=keys[0])["Body"].read()))
    manifest = json.loads(s3c.get_object(Bucket=BUCKET, Key="digits/manifest.json")["Body"].read())
    assert table.num_rows == manifest["splits"]["test"]["num_samples"]
    artifacts = [o["Key"] for o in s3c.list_objects_v2(Bucket=BUCKET, Prefix="mlartifacts/").get("Contents", [])]
    assert any("member_0.pt" in k for k in artifacts), "the registered ensemble's files are in S3"
    no_run_left_running(topology)
    topology["times"]["ensemble + evaluate"] = f"finished, {job.seconds:.0f} s + {ev.seconds:.0f} s"


def test_no_secret_leaves_the_nodes(topology):
    """The sentinel secret is in the nodes' and the driver's environment only: not in Ray's session
    folder, its state API, the jobs' runtime env, MLflow's params, tags and text artifacts, or the outputs."""
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_actors, list_jobs, list_tasks

    needle = SENTINEL.encode()
    found = []
    state_now = json.loads(topology["state_file"].read_text()) if topology["state_file"].exists() else topology["state"]
    folders = [state_now["temp_dir"], *state_now.get("node_temp_dirs", [])]
    for path in (p for f in folders for p in Path(f).rglob("*")):
        try:
            if path.is_file() and not path.is_symlink() and needle in path.read_bytes():
                found.append(str(path))
        except OSError:
            continue
    address = topology["driver_env"]["RAY_ADDRESS"]
    enable_token_auth()  # a client of the cluster, as `ray list actors` is
    state = json.dumps([
        [a for a in list_actors(address=address, detail=True, limit=10000)],
        [j for j in list_jobs(address=address, detail=True)],
        [t for t in list_tasks(address=address, detail=True, limit=10000)],
    ], default=str)
    if SENTINEL in state:
        found.append("state API")
    jobs = JobSubmissionClient(address).list_jobs()
    if SENTINEL in json.dumps([j.runtime_env for j in jobs], default=str):
        found.append("a job's runtime env")
    assert jobs, "the drills ran jobs"
    client = MlflowClient(topology["mlflow"].uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert runs
    for run in runs:
        if SENTINEL in json.dumps([run.data.params, run.data.tags]):
            found.append(f"MLflow run {run.info.run_name} params/tags")
    s3c = topology["s3c"]
    for obj in s3c.list_objects_v2(Bucket=BUCKET).get("Contents", []):
        if obj["Size"] < 5_000_000 and needle in s3c.get_object(Bucket=BUCKET, Key=obj["Key"])["Body"].read():
            found.append(f"s3://{BUCKET}/{obj['Key']}")  # run outputs, checkpoints and MLflow's text artifacts
    assert found == [], found


def test_a_lost_node_fails_after_a_bounded_wait(topology):
    """Node B's raylet dies mid-run: Ray Train cannot place two workers again; the run fails after
    checkpoint.node_wait_s with a one-line error instead of retrying every minute forever."""
    job = Job(topology, train_args("lost-node", 6, "checkpoint.node_wait_s=30"))
    wait_for(lambda: len(epochs_logged(topology, "lost-node")) >= 1, 300, "the first epoch")
    head_raylets = {p.ppid() for p in workers(topology)}
    port_b = str(topology["state"]["node_manager_ports"][1])
    node_b = [p for p in cluster_processes(topology["state"]) if "raylet" in _cmdline(p).split(" ")[0]
              and port_b in _cmdline(p)]
    assert node_b and head_raylets
    for p in node_b:
        for child in p.children(recursive=True):
            child.send_signal(signal.SIGKILL)
        p.send_signal(signal.SIGKILL)
    lost = time.monotonic()
    rc, log = job.wait(timeout=600)
    assert rc != 0
    errors = sorted({line for line in log.splitlines() if line.startswith("error: ")})
    assert len(errors) == 1, log[-3000:]
    waited = time.monotonic() - lost
    assert waited < 240, waited
    no_run_left_running(topology)
    topology["times"]["node lost mid-run"] = f"failed after {waited:.0f} s: {errors[0][:160]}"
    psutil.wait_procs(node_b, timeout=10)
