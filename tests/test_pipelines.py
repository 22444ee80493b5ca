"""pipelines: shards written locally and to a real S3 endpoint on loopback, read back per rank."""

from __future__ import annotations

import faulthandler
import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
from collections import Counter

import boto3
import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import (
    DataError,
    ManifestMismatchError,
    StorageError,
    make_loader,
    make_transform,
    read_manifest,
    write_shards,
)
from pipelines.sources import Record, Source, digits_pixels, digits_split_indices, encode, parse_source

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.shards", *args], cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.fixture
def no_hang():
    """Abort the test run with tracebacks instead of hanging forever."""
    faulthandler.dump_traceback_later(120, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def digits_local(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("digits"))
    write_shards("digits", out, shard_size=200, progress=False)
    return out


@pytest.fixture(scope="module")
def digits_s3(s3_endpoint) -> str:
    """Digits written to S3 by the CLI, as a user would."""
    boto3.client("s3").create_bucket(Bucket="digits-bucket")
    url = "s3://digits-bucket/demo/digits"
    result = cli("write", "--source", "digits", "--out", url, "--shard-size", "200", "--quiet")
    assert result.returncode == 0, result.stderr
    return url


def epoch_keys(url, split, batch_size, world_size, num_workers, **kw) -> tuple[list[list[str]], list[int], list[int]]:
    """Keys seen per rank, the number of batches each rank yielded, and each rank's len()."""
    keys, counts, lens = [], [], []
    for rank in range(world_size):
        loader = make_loader(url, split, batch_size, rank=rank, world_size=world_size, num_workers=num_workers, with_keys=True, **kw)
        seen, n = [], 0
        for images, labels, batch_keys in loader:
            assert len(images) == len(labels) == len(batch_keys)
            seen += batch_keys
            n += 1
        keys.append(seen)
        counts.append(n)
        lens.append(len(loader))
    return keys, counts, lens


# -- writing --------------------------------------------------------------------------------------


def test_digits_manifest_counts_checksums_and_stats(digits_local):
    m = read_manifest(digits_local)
    pixels, labels = digits_pixels()
    split = digits_split_indices(labels)
    trainval = m["splits"].pop("trainval")  # train + val, for the final fit (issue 16)
    assert {k: v["num_samples"] for k, v in m["splits"].items()} == {k: len(v) for k, v in split.items()}
    assert sum(v["num_samples"] for v in m["splits"].values()) == 1797
    assert trainval["num_samples"] == len(split["train"]) + len(split["val"])
    assert m["classes"] == [str(d) for d in range(10)] and m["image_size"] == [32, 32]
    for shard in m["splits"]["train"]["shards"]:
        with open(shard["url"], "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == shard["sha256"]
    train = pixels[split["train"]].reshape(-1, 3) / 255.0
    np.testing.assert_allclose(m["mean"], train.mean(0), atol=1e-5)
    np.testing.assert_allclose(m["std"], train.std(0), atol=1e-5)
    # the fixed split is stratified: every class in every split
    for idx in split.values():
        assert set(labels[idx]) == set(range(10))


def test_cli_help_bad_source_and_idempotent_rerun(digits_s3):
    help_text = cli("write", "--help")
    assert help_text.returncode == 0
    for word in ("--source", "--out", "--shard-size", "--max-bytes", "digits", "cifar10:PATH", "imagefolder:PATH", "synthetic:"):
        assert word in help_text.stdout
    bad = cli("write", "--source", "mnist", "--out", "/tmp/never-written")
    assert bad.returncode == 2
    assert "mnist" in bad.stderr and "digits" in bad.stderr and "cifar10:PATH" in bad.stderr
    assert not os.path.exists("/tmp/never-written/manifest.json")
    before = read_manifest(digits_s3)
    rerun = cli("write", "--source", "digits", "--out", digits_s3, "--shard-size", "200", "--quiet")
    assert rerun.returncode == 0, rerun.stderr
    assert "19 shard(s) already up to date" in rerun.stderr  # 7 train, 2 val, 2 test, 8 trainval
    assert read_manifest(digits_s3) == before


def test_max_bytes_cuts_shards(tmp_path):
    m = write_shards("synthetic:classes=2,size=16,train=40,val=0,format=png", str(tmp_path), shard_size=1000, max_bytes=12_000, progress=False)
    shards = m["splits"]["train"]["shards"]
    assert len(shards) > 1 and all(s["bytes"] <= 12_000 for s in shards)
    assert sum(s["num_samples"] for s in shards) == 40


def test_cifar_archive_split_and_pixels(tmp_path):
    rng = np.random.default_rng(0)
    batches = {f"data_batch_{i}": rng.integers(0, 256, (20, 3072), dtype=np.uint8) for i in range(1, 6)}
    batches["test_batch"] = rng.integers(0, 256, (20, 3072), dtype=np.uint8)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:

        def add(name, obj):
            data = pickle.dumps(obj)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add("batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)]})
        for name, data in batches.items():
            add(name, {b"data": data, b"labels": [i % 10 for i in range(20)]})
    src = parse_source(f"cifar10:{archive}")
    assert {k: len(v) for k, v in src.splits.items()} == {"train": 90, "val": 10, "trainval": 100, "test": 20}
    assert [r.key for r in src.splits["trainval"]] == [r.key for r in src.splits["train"] + src.splits["val"]]
    # val is the tail of the training batches; the image is the CHW row reshaped to HWC
    _, ext, pixels = src.splits["val"][-1].load()
    assert ext == "png"
    np.testing.assert_array_equal(pixels, batches["data_batch_5"][-1].reshape(3, 32, 32).transpose(1, 2, 0))


# -- reading: coverage, balance, pixels -----------------------------------------------------------


def test_s3_round_trip_two_ranks_two_workers(digits_s3, no_hang):
    pixels, labels = digits_pixels()
    n_train = read_manifest(digits_s3)["splits"]["train"]["num_samples"]
    batch = 16
    keys, counts, lens = epoch_keys(digits_s3, "train", batch, world_size=2, num_workers=2)
    assert counts == lens == [(n_train // 2) // batch] * 2  # equal batch counts: DDP cannot hang
    everything = keys[0] + keys[1]
    assert len(everything) == len(set(everything)) == 2 * lens[0] * batch  # no sample twice in the epoch
    train_keys = {f"digits_{i:04d}" for i in digits_split_indices(labels)["train"]}
    assert set(everything) <= train_keys
    assert len(train_keys - set(everything)) < 2 * batch  # only the drop-last remainder is left out
    # pixels and labels equal the source (PNG is lossless; no transform gives the stored uint8 pixels)
    loader = make_loader(digits_s3, "train", batch, num_workers=0, with_keys=True)
    images, batch_labels, batch_keys = next(iter(loader))
    assert images.dtype == torch.uint8 and images.shape == (batch, 3, 32, 32)
    for image, label, key in zip(images, batch_labels, batch_keys, strict=True):
        i = int(key.split("_")[1])
        assert int(label) == labels[i]
        np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), pixels[i])


def test_eval_reads_every_sample_once(digits_s3, no_hang):
    keys, counts, lens = epoch_keys(digits_s3, "val", 32, world_size=2, num_workers=2)
    everything = keys[0] + keys[1]
    assert len(everything) == len(set(everything)) == 270
    assert counts == lens and lens == [-(-len(k) // 32) for k in keys]


@pytest.mark.parametrize("split_by", ["shard", "sample", None])
def test_exact_cover_by_shard_by_sample_and_in_training(tmp_path, split_by, no_hang):
    url = str(tmp_path)
    write_shards("synthetic:classes=4,size=8,train=96,val=0,format=png", url, shard_size=12, progress=False)
    # evaluation by shard or by sample; training (split_by None) covers the split too: 96 = 6 x 16
    kw = {"shuffle": False, "split_by": split_by} if split_by else {}
    keys, counts, lens = epoch_keys(url, "train", 8, world_size=2, num_workers=2, seed=3, **kw)
    assert counts == lens == [6, 6]
    assert sorted(keys[0] + keys[1]) == [f"train_{i:07d}" for i in range(96)]
    with pytest.raises(ValueError, match="split_by='shard' is for evaluation"):
        make_loader(url, "train", 8, split_by="shard")


def test_uneven_shards_give_every_rank_equal_steps_and_no_repeats(tmp_path, no_hang):
    url = str(tmp_path)
    write_shards("synthetic:classes=4,size=8,train=100,val=0,format=png", url, shard_size=30, progress=False)  # 30+30+30+10
    keys, counts, lens = epoch_keys(url, "train", 10, world_size=2, num_workers=1)
    assert counts == lens == [5, 5]
    per_rank = [Counter(k) for k in keys]
    assert [len(c) for c in per_rank] == [50, 50] and max(max(c.values()) for c in per_rank) == 1
    assert not set(per_rank[0]) & set(per_rank[1])  # every sample of the split once in the epoch


def test_order_is_deterministic_per_seed_and_epoch(digits_local, no_hang):
    def order(epoch, seed=0):
        loader = make_loader(digits_local, "train", 64, num_workers=2, epoch=epoch, seed=seed, with_keys=True)
        return [k for _, _, keys in loader for k in keys]

    first = order(epoch=0)
    assert order(epoch=0) == first
    other_epoch = order(epoch=1)
    assert other_epoch != first and set(other_epoch) != set() and len(other_epoch) == len(first)
    assert order(epoch=0, seed=1) != first
    loader = make_loader(digits_local, "train", 64, num_workers=2, with_keys=True)
    loader.set_epoch(1)
    assert [k for _, _, keys in loader for k in keys] == other_epoch


# -- bad input ------------------------------------------------------------------------------------


def _folder_with_bad_image(root):
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("val", 4)):
        for cls in ("cat", "dog"):
            os.makedirs(root / split / cls)
            for i in range(n):
                pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
                (root / split / cls / f"img{i}.jpg").write_bytes(encode(pixels, "jpg"))
    (root / "train" / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)


def test_corrupt_image_is_counted_skipped_and_named(tmp_path, no_hang):
    _folder_with_bad_image(tmp_path / "src")
    out = str(tmp_path / "shards")
    with pytest.warns(RuntimeWarning, match="broken"):
        m = write_shards(f"imagefolder:{tmp_path / 'src'}", out, shard_size=5, progress=False)
    # JPEG bytes are stored as they are
    with tarfile.open(os.path.join(out, "val-000000.tar")) as tar:
        assert tar.extractfile("cat/img0.jpg").read() == (tmp_path / "src/val/cat/img0.jpg").read_bytes()
    t = make_transform("cifar", False, mean=m["mean"], std=m["std"], size=16)
    # evaluation never skips: the error names shard and sample, even under on_error="skip"
    loader = make_loader(out, "train", 5, num_workers=0, shuffle=False, transform=t, with_keys=True, on_error="skip")
    with pytest.raises(DataError, match=r"train-\d{6}\.tar: sample 'dog/broken': corrupt png"):
        list(loader)
    # training under on_error="skip" keeps the promised batch count (one batch is a sample short), with workers too
    train = make_loader(out, "train", 5, num_workers=2, transform=t, on_error="skip")
    with pytest.warns(RuntimeWarning, match="dog/broken"):
        assert sum(1 for _ in train) == len(train) == 25 // 5
    assert [(e.key, e.samples) for e in train.errors] == [("dog/broken", 1)] and train.skipped == 1
    with pytest.raises(DataError, match="dog/broken"):  # the default
        list(make_loader(out, "train", 5, num_workers=0, transform=t))


def test_out_of_range_label_is_an_error_or_skipped(tmp_path):
    pixels = np.zeros((8, 8, 3), np.uint8)
    records = [Record(f"s{i}", 7 if i == 3 else i % 2, lambda: (encode(pixels, "png"), "png", pixels)) for i in range(6)]
    write_shards(Source("tiny", ["a", "b"], {"train": records}, (8, 8)), str(tmp_path), progress=False)
    with pytest.raises(DataError, match=r"sample 's3': label 7 outside \[0, 2\)"):
        list(make_loader(str(tmp_path), "train", 4, num_workers=0, shuffle=False))
    loader = make_loader(str(tmp_path), "train", 1, num_workers=0, with_keys=True, on_error="skip", shuffle_buffer=0)
    with pytest.warns(RuntimeWarning, match=r"sample 's3': label 7 outside \[0, 2\)"):
        batches = [keys for *_, keys in loader]
    # the step that held the bad sample is empty; the step count stays
    assert len(batches) == len(loader) == 6 and sorted(len(b) for b in batches) == [0, 1, 1, 1, 1, 1]
    assert {k for b in batches for k in b} == {"s0", "s1", "s2", "s4", "s5"} and loader.skipped == 1


def test_truncated_tar_names_shard_and_does_not_hang(tmp_path, no_hang):
    url = str(tmp_path)
    m = write_shards("synthetic:classes=2,size=16,train=40,val=0,format=png", url, shard_size=10, progress=False)
    victim = os.path.join(url, m["splits"]["train"]["shards"][1]["url"])
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2 + 100)
    loader = make_loader(url, "train", 5, num_workers=2, shuffle=False, with_keys=True)
    with pytest.raises(ManifestMismatchError, match=r"train-000001\.tar: shard disagrees with the manifest: 6 samples"):
        list(loader)
    # under skip, training yields the promised batches, without the lost shard's samples
    train = make_loader(url, "train", 5, num_workers=2, on_error="skip")
    with pytest.warns(RuntimeWarning, match=r"train-000001\.tar: \d+ bytes, the manifest says \d+; whole shard skipped"):
        assert sum(1 for _ in train) == len(train) == 8
    assert train.skipped == 10


def test_checksum_mismatch_names_the_shard(digits_local, tmp_path):
    url = str(tmp_path / "digits")
    shutil.copytree(digits_local, url)
    shutil.copy(os.path.join(url, "train-000001.tar"), os.path.join(url, "train-000000.tar"))  # same count, other bytes
    loader = make_loader(url, "train", 32, num_workers=0, shuffle=False)
    with pytest.raises(ManifestMismatchError, match=r"train-000000\.tar: shard disagrees with the manifest"):
        list(loader)


def test_missing_shard_manifest_and_bucket_name_the_url(digits_local, tmp_path, s3_endpoint, make_bucket):
    url = str(tmp_path / "digits")
    shutil.copytree(digits_local, url)
    os.remove(os.path.join(url, "val-000001.tar"))
    with pytest.raises(ManifestMismatchError, match=r"val-000001\.tar: shard listed in the manifest does not exist"):
        make_loader(url, "val", 8, check_shards=True)  # up front, when asked (once per job in a driver)
    with pytest.raises(ManifestMismatchError, match=r"val-000001\.tar: shard listed in the manifest cannot be read"):
        list(make_loader(url, "val", 8, num_workers=0))  # else at the first read
    with pytest.raises(StorageError, match=r"nowhere/manifest.json: .*python -m pipelines.shards index --split train="):
        read_manifest(str(tmp_path / "nowhere"))  # shards from elsewhere: the error says how to index them
    with pytest.raises(StorageError, match=r"s3://no-such-bucket/data/manifest.json: bucket 'no-such-bucket' does not exist"):
        make_loader("s3://no-such-bucket/data", "train", 8)
    bucket = make_bucket()
    with pytest.raises(StorageError, match=rf"s3://{bucket}/empty/manifest.json: object does not exist"):
        read_manifest(f"s3://{bucket}/empty")
    with pytest.raises(ValueError, match="valid"):
        make_loader(digits_local, "nope", 8)


def test_s3_cache_serves_shards_once_fetched(s3_endpoint, make_bucket, tmp_path, no_hang):
    bucket = make_bucket()
    url = f"s3://{bucket}/syn"
    m = write_shards("synthetic:classes=2,size=8,train=0,val=30,format=png", url, shard_size=10, progress=False)
    cache = str(tmp_path / "cache")
    first = [k for *_, b in make_loader(url, "val", 10, num_workers=2, cache_dir=cache, with_keys=True) for k in b]
    assert sorted(os.listdir(cache)) == sorted(s["sha256"] + ".tar" for s in m["splits"]["val"]["shards"])
    s3 = boto3.client("s3")
    for shard in m["splits"]["val"]["shards"]:
        s3.delete_object(Bucket=bucket, Key=f"syn/{shard['url']}")
    again = [k for *_, b in make_loader(url, "val", 10, num_workers=2, cache_dir=cache, with_keys=True) for k in b]
    assert again == first and len(first) == 30


# -- transforms -----------------------------------------------------------------------------------

MEAN, STD = [0.3, 0.3, 0.3], [0.3, 0.3, 0.3]


@pytest.mark.parametrize(
    ("kind", "train", "protocol", "shape"),
    [
        ("imagenet", True, "center", (3, 32, 32)),
        ("imagenet", False, "center", (3, 32, 32)),
        ("imagenet", False, "ten_crop", (10, 3, 32, 32)),
        ("imagenet", False, "multi_scale_center", [(3, 24, 24), (3, 32, 32), (3, 40, 40)]),
        ("cifar", True, "center", (3, 32, 32)),
        ("cifar", False, "center", (3, 32, 32)),
    ],
)
def test_transform_shapes_and_pickling(kind, train, protocol, shape):
    t = pickle.loads(pickle.dumps(make_transform(kind, train, mean=MEAN, std=STD, size=32, protocol=protocol, scales=(24, 32, 40))))
    image = torch.randint(0, 256, (3, 36, 48), dtype=torch.uint8)
    out = t(image)
    if isinstance(shape, list):
        assert [tuple(o.shape) for o in out] == shape
    else:
        assert type(out) is torch.Tensor and tuple(out.shape) == shape and out.dtype == torch.float32
    # the PIL path (torchvision ImageFolder) gives the same shapes
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    out_pil = t(pil)
    assert [o.shape for o in out_pil] == [o.shape for o in out] if isinstance(shape, list) else out_pil.shape == out.shape


def test_transform_normalises_with_manifest_stats():
    t = make_transform("cifar", False, mean=[0.5, 0.25, 0.0], std=[0.5, 0.25, 1.0], size=4)
    out = t(torch.full((3, 4, 4), 255, dtype=torch.uint8))
    assert torch.allclose(out[:, 0, 0], torch.tensor([1.0, 3.0, 1.0]))


def test_unknown_protocol_and_kind_name_the_valid_ones():
    with pytest.raises(ValueError, match="multi_scale"):
        make_transform("imagenet", False, mean=MEAN, std=STD, protocol="five_crop")
    with pytest.raises(ValueError, match="cifar"):
        make_transform("mnist", False, mean=MEAN, std=STD)


@pytest.mark.parametrize(("protocol", "shapes"), [("ten_crop", [(8, 10, 3, 24, 24)]), ("multi_scale_center", [(8, 3, 24, 24), (8, 3, 32, 32), (8, 3, 40, 40)])])
def test_loader_batches_test_protocols(digits_local, protocol, shapes):
    m = read_manifest(digits_local)
    t = make_transform("imagenet", False, mean=m["mean"], std=m["std"], size=24, resize=32, protocol=protocol, scales=(24, 32, 40))
    images, labels = next(iter(make_loader(digits_local, "test", 8, num_workers=0, transform=t)))
    got = [tuple(x.shape) for x in images] if isinstance(images, tuple) else [tuple(images.shape)]
    assert got == shapes and labels.shape == (8,)


def test_manifest_json_is_what_the_shards_say(digits_local):
    with open(os.path.join(digits_local, "manifest.json")) as f:
        raw = json.load(f)
    name = raw["splits"]["test"]["shards"][0]["url"]
    assert not os.path.isabs(name)  # relative names: the folder can move
    with tarfile.open(os.path.join(digits_local, name)) as tar:
        names = tar.getnames()
    assert len(names) == 2 * raw["splits"]["test"]["shards"][0]["num_samples"]
    assert {names[0].rsplit(".", 1)[1], names[1].rsplit(".", 1)[1]} == {"png", "cls"}  # one sample's two members
    assert names[0].rsplit(".", 1)[0] == names[1].rsplit(".", 1)[0]
