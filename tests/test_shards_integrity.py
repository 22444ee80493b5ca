"""Shard integrity (issue 14), standard WebDataset input, flat start-up, and S3 outages (issue 12).

Every corruption kind is an error naming shard and sample by default and is counted under
``on_error="skip"``; evaluation counts what it scored against the manifest; shards written by
``webdataset.ShardWriter`` are indexed and trained on as they are; a shard read survives its S3
server being killed and restarted mid-stream.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import tracemalloc

import boto3
import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from orchestrator.local_cluster import free_ports
from pipelines import (
    DataError,
    ManifestMismatchError,
    TrainPlan,
    make_loader,
    make_s3_client,
    plan_eval,
    read_manifest,
    s3_compat_env,
    storage,
    write_shards,
)
from pipelines.order import keyed_permutation
from pipelines.shards import main as shards_cli
from pipelines.sources import synthetic_pixels

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- every corruption kind ------------------------------------------------------------------------


def _member(path: str, suffix: str, index: int) -> tarfile.TarInfo:
    """The ``index``-th member of the tar whose name ends with ``suffix``."""
    with tarfile.open(path) as tar:
        return [m for m in tar.getmembers() if m.name.endswith(suffix)][index]


def _patch(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _without_member(path: str, name: str) -> None:
    """Rewrite the tar without one member (the tar stays valid; it is 1 KiB shorter)."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers() if m.name != name]
    with tarfile.open(path, "w") as tar:
        for m, data in members:
            tar.addfile(m, io.BytesIO(data))


def corrupt(path: str, kind: str) -> str | None:
    """Damage the shard at ``path``; return the key of the damaged sample (None: not one sample)."""
    if kind == "truncated":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2 + 100)
        return None
    image = _member(path, ".png", 2)
    key = image.name.rsplit(".", 1)[0]
    if kind == "image_garbage":  # same length: only the sha256 and the decoder can tell
        _patch(path, image.offset_data, np.random.default_rng(0).integers(0, 256, image.size, dtype=np.uint8).tobytes())
    elif kind == "label_missing":
        _without_member(path, f"{key}.cls")
    elif kind == "label_out_of_range":  # "0" or "1" -> "7": same length
        _patch(path, _member(path, f"{key}.cls", 0).offset_data, b"7")
    return key


@pytest.fixture
def small(tmp_path) -> str:
    """24 train samples (3 shards of 8), 2 classes, 8 px PNGs."""
    url = str(tmp_path / "small")
    write_shards("synthetic:classes=2,size=8,train=24,val=0,format=png", url, shard_size=8, progress=False)
    return url


# kind -> (error in evaluation order, samples skipped under on_error="skip" in training)
KINDS = {
    "truncated": (ManifestMismatchError, 8),  # the size differs: the whole shard is skipped before use
    "image_garbage": (DataError, 1),  # same size: the sample fails to decode, then the sha256 is reported
    "label_missing": (DataError, 1),  # 1 KiB fewer members, same size (tars are padded to 10 KiB records)
    "label_out_of_range": (DataError, 1),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_corruption_is_an_error_by_default_and_counted_under_skip(small, kind):
    victim = os.path.join(small, "train-000001.tar")
    key = corrupt(victim, kind)
    error, lost = KINDS[kind]
    # the default, training order: a stream holds a block of the shard's samples, so the shard's own
    # check (size, count, sha256) may speak before the sample is decoded; either error names the shard
    with pytest.raises((DataError, ManifestMismatchError), match=r"train-000001\.tar: "):
        list(make_loader(small, "train", 4, num_workers=0))
    # evaluation order decodes as it reads: the error names the sample; it raises even when asked to skip
    name = r"train-000001\.tar: " + (f"sample '{key}'" if error is DataError else "shard disagrees with the manifest")
    with pytest.raises(error, match=name):
        list(make_loader(small, "train", 4, num_workers=0, shuffle=False, on_error="skip"))
    # skip: every promised batch still comes, smaller by the samples lost, which are counted and named
    loader = make_loader(small, "train", 4, num_workers=0, on_error="skip")
    with pytest.warns(RuntimeWarning, match=r"train-000001\.tar"):
        sizes = [len(labels) for _, labels in loader]
    assert len(sizes) == len(loader) == 6 and sum(sizes) == 24 - lost
    assert loader.skipped == lost, loader.errors
    assert all(e.shard == victim for e in loader.errors)
    if kind != "truncated":  # same length: the changed bytes are reported too
        assert any("sha256" in e.reason and e.key is None for e in loader.errors), loader.errors


def test_a_clean_epoch_skips_nothing(small):
    loader = make_loader(small, "train", 4, num_workers=2, on_error="skip")
    assert sum(1 for _ in loader) == len(loader) == 6 and loader.errors == [] and loader.skipped == 0


def test_bad_on_error_names_the_valid_values(small):
    with pytest.raises(ValueError, match=r"on_error='warn'; valid: \['raise', 'skip'\]"):
        make_loader(small, "train", 4, on_error="warn")


# -- exactly-once evaluation ----------------------------------------------------------------------


def test_evaluation_counts_against_the_manifest(tmp_path):
    from orchestrator.step import evaluate

    url = str(tmp_path)
    write_shards("synthetic:classes=3,size=8,train=0,val=21,format=png", url, shard_size=5, progress=False)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(3))
    model(torch.zeros(1, 3, 8, 8))

    def batches(loader):  # float images, as the model wants (the loader gives the stored uint8 pixels)
        class Floats:
            def __iter__(self):
                return ((x.float() / 255, y) for x, y in loader)

        Floats.loader = loader  # what orchestrator.train's Transformed exposes
        return Floats()

    whole = make_loader(url, "val", 4, num_workers=2)
    assert evaluate(model, batches(whole), "cpu")["n"] == 21 == whole.split_samples
    # one rank's half scored alone (its peer never reduced its count): the count check catches it
    half = make_loader(url, "val", 4, rank=0, world_size=2, num_workers=0)
    with pytest.raises(DataError, match="evaluation scored 11 samples but the manifest lists 21"):
        evaluate(model, batches(half), "cpu")


# -- planning: nothing per sample, nothing per shard per epoch ------------------------------------


@pytest.mark.parametrize("total", [1, 2, 7, 64, 1000, 4097])
def test_permutation_is_a_bijection(total):
    out = keyed_permutation(total, 12345)
    assert sorted(out.tolist()) == list(range(total))
    if total >= 64:
        assert (out != np.arange(total)).mean() > 0.9  # actually shuffled
        assert not np.array_equal(out, keyed_permutation(total, 12346))  # another key, another order


def test_sample_mode_eval_plans_cover_exactly():
    shards = [{"url": f"s{i}", "num_samples": n} for i, n in enumerate([5, 9, 1, 12, 3])]
    owned = np.zeros(30, int)
    for rank in range(2):
        for plan in plan_eval(shards, rank=rank, world_size=2, num_workers=2, split_by="sample"):
            masks = [plan.keep.mask(s["offset"], s["num_samples"]) for s in sorted(plan.shards, key=lambda s: s["offset"])]
            owned += np.concatenate(masks)
            assert int(np.concatenate(masks).sum()) == plan.available
    assert owned.tolist() == [1] * 30  # each sample has exactly one slot


def test_training_plan_costs_no_memory_per_sample():
    # 38M samples in 38,000 shards: the plan holds numbers per shard and per stream, none per sample
    big = [{"url": f"s3://b/train-{i:06d}.tar", "num_samples": 1000} for i in range(38_000)]
    tracemalloc.start()
    plan = TrainPlan(big, seed=0, epoch=0, global_batch_size=256, shuffle_buffer=5000)
    share = plan.step_samples(plan.steps - 1, rank=3, world_size=64)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 20 << 20, f"{peak / 2**20:.0f} MiB"
    assert plan.steps == 38_000_000 // 256 and len(share) == 4 and ((0 <= share) & (share < 38_000_000)).all()


def test_no_shard_is_stat_ed_per_epoch(small, monkeypatch):
    def no_stat(*_):
        raise AssertionError("a shard was stat-ed/HEAD-ed")

    monkeypatch.setattr(storage, "size", no_stat)
    loader = make_loader(small, "train", 4, num_workers=0)
    assert sum(1 for _ in loader) == 6
    os.remove(os.path.join(small, "train-000002.tar"))
    with pytest.raises(ManifestMismatchError, match=r"train-000002\.tar: shard listed in the manifest cannot be read"):
        list(make_loader(small, "train", 4, num_workers=0))


# -- standard WebDataset input --------------------------------------------------------------------


def write_with_shardwriter(folder: str, counts: dict[str, int], *, size: int = 32, classes: int = 3) -> None:
    """Shards as the webdataset library writes them: png/cls/json keys, its own tar layout."""
    rng = np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    for split, n in counts.items():
        with wds.ShardWriter(os.path.join(folder, f"{split}-%06d.tar"), maxcount=16, verbose=0) as sink:
            for i in range(n):
                label = i % classes
                buf = io.BytesIO()
                Image.fromarray(synthetic_pixels(label, classes, size, size, rng)).save(buf, format="PNG")
                sink.write({"__key__": f"{split}/{i:05d}", "png": buf.getvalue(), "cls": label, "json": {"label": label, "i": i}})


def test_index_shardwriter_output_local_then_read_it(tmp_path):
    shards = str(tmp_path / "wds")
    write_with_shardwriter(shards, {"train": 40, "val": 20})
    classes = tmp_path / "classes.txt"
    classes.write_text("red\ngreen\nblue\n")
    out = str(tmp_path / "index")
    assert shards_cli(["index", "--split", f"train={shards}/train-{{000000..000002}}.tar", "--split", f"val={shards}/val-{{000000..000001}}.tar",
                       "--classes", str(classes), "--out", out, "--quiet"]) == 0
    m = read_manifest(out)
    assert m["classes"] == ["red", "green", "blue"] and m["image_size"] == [32, 32] and m["label_key"] == "cls"
    assert {k: (v["num_samples"], len(v["shards"])) for k, v in m["splits"].items()} == {"train": (40, 3), "val": (20, 2)}
    with open(os.path.join(out, "manifest.json")) as f:
        assert json.load(f)["splits"]["val"]["shards"][0]["url"] == f"{shards}/val-000000.tar"  # absolute: read where they are
    assert all(0.05 < v < 0.95 for v in m["mean"] + m["std"])
    keys = [k for *_, batch in make_loader(out, "val", 8, num_workers=2, with_keys=True) for k in batch]
    assert sorted(keys) == [f"val/{i:05d}" for i in range(20)]
    # json labels, manifest beside the shards (relative names)
    assert shards_cli(["index", "--split", f"train={shards}/train-{{000000..000002}}.tar", "--label-key", "json:label", "--out", shards, "--quiet"]) == 0
    m = read_manifest(shards)
    assert m["classes"] == ["0", "1", "2"] and m["splits"]["train"]["shards"][0]["name"] == "train-000000.tar"
    labels = torch.cat([y for _, y in make_loader(shards, "train", 8, num_workers=0, shuffle=False)])
    assert labels.tolist() == [i % 3 for i in range(40)]


def test_index_errors_name_the_bad_input(tmp_path, capsys):
    shards = str(tmp_path / "wds")
    write_with_shardwriter(shards, {"train": 16})
    assert shards_cli(["index", "--split", f"train={shards}/train-000000.tar", "--label-key", "json", "--out", shards, "--quiet"]) == 2
    assert "label key 'json'; valid: cls, json:FIELD" in capsys.readouterr().err
    assert shards_cli(["index", "--split", f"train={shards}/train-000000.tar", "--label-key", "json:nope", "--out", shards, "--quiet"]) == 2
    assert "train-000000.tar: sample 'train/00000': missing or unreadable label: no integer field 'nope'" in capsys.readouterr().err
    assert shards_cli(["index", "--split", f"train={shards}/train-{{000000..000003}}.tar", "--out", shards, "--quiet"]) == 2
    assert "train-000001.tar" in capsys.readouterr().err
    assert shards_cli(["index", "--split", "train", "--out", shards]) == 2
    assert "expected NAME=PATTERN" in capsys.readouterr().err


def test_index_shards_on_s3(s3_endpoint, make_bucket, tmp_path):
    local = str(tmp_path / "wds")
    write_with_shardwriter(local, {"train": 20, "val": 10}, size=16)
    bucket = make_bucket()
    s3 = boto3.client("s3")
    for name in os.listdir(local):
        s3.upload_file(os.path.join(local, name), bucket, f"public/imagenet-style/{name}")
    src = f"s3://{bucket}/public/imagenet-style"
    out = f"s3://{bucket}/ours"
    assert shards_cli(["index", "--split", f"train={src}/train-{{000000..000001}}.tar", "--split", f"val={src}/val-000000.tar", "--out", out, "--quiet"]) == 0
    m = read_manifest(out)
    assert m["splits"]["val"]["shards"][0]["name"] == f"{src}/val-000000.tar"
    assert sum(len(y) for _, y in make_loader(out, "val", 4, num_workers=0)) == 10


@pytest.mark.slow
def test_train_on_shardwriter_output_with_a_bad_sample_skipped(tmp_path, monkeypatch, ray_local):
    from mlflow.tracking import MlflowClient

    from orchestrator.config import load_train_config
    from orchestrator.train import fit

    shards = str(tmp_path / "wds")
    write_with_shardwriter(shards, {"train": 64, "val": 16})
    assert shards_cli(["index", "--split", f"train={shards}/train-{{000000..000003}}.tar", "--split", f"val={shards}/val-000000.tar", "--out", shards, "--quiet"]) == 0
    corrupt(os.path.join(shards, "train-000002.tar"), "image_garbage")  # the default (raise) is tested above without Ray
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    overrides = [f"data.url={shards}", "model.name=resnet8", "schedule.epochs=1", "schedule.milestones=[]", "optim.batch_size=16",
                 "data.num_workers=0", "tracking.experiment=test-shards-integrity"]
    result = fit(load_train_config("digits_resnet20.yaml", [*overrides, "data.on_error=skip"]), str(tmp_path / "runs"))
    history = MlflowClient(uri).get_metric_history(result.run_id, "skipped_samples")
    assert [m.value for m in history] == [1.0]  # one epoch, one bad sample, counted once across both ranks
    assert result.metrics["skipped_samples"] == 1.0


# -- S3: compatible endpoints, outages ------------------------------------------------------------


def test_s3_compat_settings_follow_the_endpoint(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    for k in ("AWS_REQUEST_CHECKSUM_CALCULATION", "AWS_RESPONSE_CHECKSUM_VALIDATION"):  # botocore reads them too
        monkeypatch.delenv(k, raising=False)
    for endpoint, compat in [(None, False), ("https://s3.eu-west-1.amazonaws.com", False), ("http://127.0.0.1:9000", True), ("https://minio.example.org", True)]:
        if endpoint:
            monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        else:
            monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
        env = s3_compat_env()
        assert env == ({"AWS_REQUEST_CHECKSUM_CALCULATION": "when_required", "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required"} if compat else {})
        config = make_s3_client().meta.config
        assert (config.request_checksum_calculation == "when_required") == compat
        assert ((config.s3 or {}).get("addressing_style") == "path") == compat
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "https://s3.amazonaws.com")  # the S3-specific setting wins
    assert s3_compat_env() == {}


def test_s3_objects_written_through_a_compat_client_read_back_exactly(s3_endpoint, make_bucket):
    bucket = make_bucket()
    client = make_s3_client()
    storage.write_bytes(f"s3://{bucket}/a.json", b'{"a":1}', client)
    assert storage.read_bytes(f"s3://{bucket}/a.json", client) == b'{"a":1}'
    assert boto3.client("s3").get_object(Bucket=bucket, Key="a.json")["Body"].read() == b'{"a":1}'


WITHOUT_BOTO3 = """
import sys


class NoBoto3:  # as on a node where boto3 is not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("boto3", "botocore", "s3transfer"):
            raise ImportError(f"No module named {name!r} (blocked by the test)")


sys.meta_path.insert(0, NoBoto3())
"""


def test_local_shards_and_the_training_step_need_no_boto3(tmp_path):
    """boto3 and botocore are imported only when an S3 URL is used: a GPU node without them imports
    `pipelines` and `orchestrator.step`, writes, indexes and reads local shards; an S3 URL says why it fails."""
    code = WITHOUT_BOTO3 + f"""
import pipelines, orchestrator.step
from pipelines import storage
out = {str(tmp_path / "tiny")!r}
pipelines.write_shards("synthetic:classes=3,size=16,train=12,val=6", out, progress=False)
loader = pipelines.make_loader(out, "train", 4, num_workers=0)
assert sum(len(y) for _, y in loader) == 12
assert not [m for m in sys.modules if m.startswith(("boto3", "botocore"))]
try:
    storage.read_bytes("s3://bucket/manifest.json")
except ImportError as e:
    print("s3:", e)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "s3: No module named 'boto3'" in out.stdout


def test_one_s3_retry_budget_sizes_boto3_retries_and_ray_s_filesystem():
    """PIPELINES_S3_RETRY_SECONDS is the budget of every S3 call: boto3 calls retry for that long, and the
    pyarrow filesystem Ray writes checkpoints through gets as many attempts as wait that long on average,
    also in the copy Ray unpickles on another process; the old ORCHESTRATOR_S3_ATTEMPTS still counts."""
    code = """
import pickle
from pipelines import storage
path, fs = storage.arrow_filesystem("s3://bucket/runs/")
copy = pickle.loads(pickle.dumps(fs))
print(path, storage.RETRY_SECONDS, storage.arrow_attempts(), copy.__reduce__()[1][1])
"""
    def run(env):
        env = {k: v for k, v in {**os.environ, **env}.items() if v is not None}
        return subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, env=env, timeout=120)

    default = run({"PIPELINES_S3_RETRY_SECONDS": None, "ORCHESTRATOR_S3_ATTEMPTS": None})
    assert default.stdout.split() == ["bucket/runs", "60.0", "16", "16"], default.stderr
    assert storage.arrow_attempts(60) == 16 and storage.arrow_attempts(10) < storage.arrow_attempts(60)
    short = run({"PIPELINES_S3_RETRY_SECONDS": "10", "ORCHESTRATOR_S3_ATTEMPTS": None})
    assert short.stdout.split() == ["bucket/runs", "10.0", str(storage.arrow_attempts(10)), str(storage.arrow_attempts(10))]
    old = run({"PIPELINES_S3_RETRY_SECONDS": None, "ORCHESTRATOR_S3_ATTEMPTS": "15"})
    assert old.stdout.split()[2:] == ["15", "15"] and "replaced by PIPELINES_S3_RETRY_SECONDS" in old.stderr


def test_transient_errors_are_retried_until_the_budget(monkeypatch):
    from botocore.exceptions import ClientError, EndpointConnectionError

    calls, sleeps = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 4:
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1")
        return "ok"

    assert storage.with_retries(flaky, "s3://b/k", seconds=60, sleep=sleeps.append) == "ok"
    assert sleeps == [0.5, 1.0, 2.0]
    missing = ClientError({"Error": {"Code": "NoSuchKey"}, "ResponseMetadata": {"HTTPStatusCode": 404}}, "GetObject")
    with pytest.raises(ClientError):  # not transient: no retry
        storage.with_retries(lambda: (_ for _ in ()).throw(missing), "s3://b/k", sleep=sleeps.append)
    assert len(sleeps) == 3
    start = time.monotonic()
    with pytest.raises(EndpointConnectionError):  # the budget ends it
        storage.with_retries(lambda: (_ for _ in ()).throw(EndpointConnectionError(endpoint_url="x")), "s3://b/k", seconds=1.2)
    assert time.monotonic() - start < 3


SERVER = """
import logging, sys, boto3
from moto.server import ThreadedMotoServer
port, staging, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
logging.getLogger("werkzeug").setLevel(logging.ERROR)
# moto keeps its state in this process: fill it through a staging port, then serve it on `port`, so the
# restarted server has the object before its first request
stage = ThreadedMotoServer(ip_address="127.0.0.1", port=staging, verbose=False)
stage.start()
s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{staging}")
s3.create_bucket(Bucket="outage")
with open(path, "rb") as f:
    s3.put_object(Bucket="outage", Key="shard.tar", Body=f.read())
stage.stop()
ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False).start()
print("ready", flush=True)
sys.stdin.read()
"""


@pytest.fixture(scope="module")
def outage_server(tmp_path_factory):
    """start(): a moto S3 server (its own process) on a fixed port holding s3://outage/shard.tar;
    SIGKILL it and start() again to restart it on the same port."""
    folder = tmp_path_factory.mktemp("outage")
    payload = np.random.default_rng(0).integers(0, 256, 24 << 20, dtype=np.uint8).tobytes()
    (folder / "shard.tar").write_bytes(payload)
    (folder / "server.py").write_text(SERVER)
    port = free_ports(1)[0]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    env.pop("AWS_ENDPOINT_URL", None)
    procs: list[subprocess.Popen] = []

    def start() -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, str(folder / "server.py"), str(port), str(free_ports(1)[0]), str(folder / "shard.tar")],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd=REPO, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "ready"
        return proc

    yield port, payload, start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_shard_read_resumes_with_a_ranged_get_after_the_server_restarts(outage_server, monkeypatch):
    port, payload, start = outage_server
    server = start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    reader = storage.RetryingS3Reader("s3://outage/shard.tar", make_s3_client(read_timeout=5), seconds=60)
    got = bytearray(reader.read(1 << 20))
    os.kill(server.pid, signal.SIGKILL)  # mid-read: the connection dies with the server
    server.wait()
    down = time.monotonic()
    restarted: list[float] = []

    def restart_later():
        time.sleep(3)
        start()
        restarted.append(time.monotonic() - down)

    import threading

    thread = threading.Thread(target=restart_later)
    thread.start()
    while chunk := reader.read(1 << 20):
        got += chunk
    thread.join()
    reader.close()
    assert bytes(got) == payload  # every byte, in order, once
    assert reader.resumes >= 1 and restarted and restarted[0] >= 3
