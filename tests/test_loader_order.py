"""The training order is a function of the run, not of the cluster (issue 19, part 1): for any world
size W and any number of loader processes n, the same global steps, the same samples per step, the
same augmented tensor per sample; ``start_step`` equals skipping; every planned sample once per epoch.
No Ray: each rank's loader is made in this process, one after the other.
"""

from __future__ import annotations

import functools
import os
import re
import warnings

import numpy as np
import pytest
import torch

import pipelines.reading as reading
from pipelines import (
    SeededImages,
    TrainPlan,
    make_batch_transform,
    make_loader,
    make_transform,
    read_manifest,
    sample_seed,
    step_samples,
    storage,
    write_shards,
)
from pipelines.order import rank_range

GRID = [(w, n) for w in (1, 2, 3, 4) for n in (0, 1, 2)]
G = 26  # not a multiple of 3 or 4: the shares differ by one
SEED, EPOCH = 7, 2


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> str:
    """150 JPEGs of 16-40 px in 14 shards (13 of 11, one of 7)."""
    url = str(tmp_path_factory.mktemp("synthetic"))
    write_shards("synthetic:classes=5,size=16-40,train=150,val=0,format=jpg", url, shard_size=11, progress=False)
    return url


@pytest.fixture(scope="module")
def synthetic_s3(s3_endpoint) -> str:
    import boto3

    boto3.client("s3").create_bucket(Bucket="order-bucket")
    url = "s3://order-bucket/synthetic"
    write_shards("synthetic:classes=3,size=12,train=60,val=0,format=png", url, shard_size=9, progress=False)
    return url


@functools.cache
def keys_in_order(url: str) -> list[str]:
    """The train split's keys by index (manifest order): an evaluation pass reads them in that order."""
    return [k for *_, keys in make_loader(url, "train", 64, shuffle=False, num_workers=0, with_keys=True, decode=False) for k in keys]


def run_epoch(url: str, world_size: int, num_workers: int, *, global_batch_size: int = G, transform=None, batch_transform=None,
              decode: bool | None = None, **kw):
    """Every rank's epoch: ({step: {key: tensor}} over all ranks, [rank][step] -> keys in batch order, [rank] -> len())."""
    by_step: dict[int, dict[str, torch.Tensor]] = {}
    rank_keys, lens = [], []
    for rank in range(world_size):
        loader = make_loader(url, "train", global_batch_size=global_batch_size, rank=rank, world_size=world_size,
                             num_workers=num_workers, epoch=EPOCH, seed=SEED, transform=transform, with_keys=True,
                             decode=batch_transform is None if decode is None else decode, **kw)
        steps = []
        for step, (images, labels, keys) in enumerate(loader, start=loader.start_step):
            assert len(images) == len(labels) == len(keys)
            if not loader.dataset.decode:
                assert isinstance(images, SeededImages) and len(images.seeds) == len(keys)
            if batch_transform is not None:
                images = batch_transform(images)
            for key, image in zip(keys, images, strict=True):
                by_step.setdefault(step, {})[key] = image
            steps.append(keys)
        rank_keys.append(steps)
        lens.append(len(loader))
    return by_step, rank_keys, lens


def check_same_epoch(url, *, grid=GRID, global_batch_size=G, **kw):
    """The grid's runs equal W=1, n=0's run, and each rank's batches are its share of the plan, in order."""
    ref, _, ref_lens = run_epoch(url, 1, 0, global_batch_size=global_batch_size, **kw)
    plan = TrainPlan(read_manifest(url)["splits"]["train"]["shards"], seed=SEED, epoch=EPOCH, global_batch_size=global_batch_size,
                     shuffle_buffer=kw.get("shuffle_buffer", 1000))
    names = keys_in_order(url)
    assert sorted(ref) == list(range(plan.steps)) and ref_lens == [plan.steps]
    for world_size, num_workers in grid:
        got, rank_keys, lens = run_epoch(url, world_size, num_workers, global_batch_size=global_batch_size, **kw)
        where = f"W={world_size} n={num_workers}"
        assert lens == [plan.steps] * world_size, where  # equal step counts on every rank
        assert sorted(got) == sorted(ref), where
        for step in ref:
            assert got[step].keys() == ref[step].keys(), f"{where} step {step}"
            for key, image in ref[step].items():
                assert torch.equal(got[step][key], image), f"{where} step {step} sample {key}"
            sizes = [len(rank_keys[r][step]) for r in range(world_size)]
            assert max(sizes) - min(sizes) == (global_batch_size % world_size > 0), f"{where} step {step} shares {sizes}"
            for r in range(world_size):
                planned = [names[i] for i in plan.step_samples(step, rank=r, world_size=world_size)]
                assert rank_keys[r][step] == planned, f"{where} rank {r} step {step}"


def test_digits_with_the_cifar_train_transform(digits_url):
    m = read_manifest(digits_url)
    check_same_epoch(digits_url, transform=make_transform("cifar", True, mean=m["mean"], std=m["std"]))


def test_many_shards_small_blocks_with_the_imagenet_train_transform(synthetic):
    m = read_manifest(synthetic)
    tf = make_transform("imagenet", True, mean=m["mean"], std=m["std"], size=16)
    check_same_epoch(synthetic, transform=tf, shuffle_buffer=30)  # blocks of 2 samples per stream


def test_decoding_on_the_device_draws_per_sample(synthetic):
    m = read_manifest(synthetic)
    btf = make_batch_transform("imagenet", True, mean=m["mean"], std=m["std"], size=16, device="cpu",
                               generator=torch.Generator().manual_seed(0))  # the seeds win over it
    check_same_epoch(synthetic, batch_transform=btf)
    # the seeds are the samples' own: sample_seed(seed, epoch, index in the split)
    names = keys_in_order(synthetic)
    images, _, keys = next(iter(make_loader(synthetic, "train", global_batch_size=G, num_workers=0, epoch=EPOCH, seed=SEED,
                                            decode=False, with_keys=True)))
    assert images.seeds.tolist() == [sample_seed(SEED, EPOCH, names.index(k)) for k in keys]


def test_s3(synthetic_s3):
    check_same_epoch(synthetic_s3, grid=[(2, 2), (3, 1)], global_batch_size=10)


# -- start_step -----------------------------------------------------------------------------------


def test_start_step_equals_skipping_and_decodes_nothing_before(digits_url, monkeypatch):
    m = read_manifest(digits_url)
    tf = make_transform("cifar", True, mean=m["mean"], std=m["std"])
    ref, _, _ = run_epoch(digits_url, 1, 0, transform=tf)
    steps = len(ref)
    for k, (world_size, num_workers) in [(1, (1, 0)), (20, (2, 1)), (steps - 1, (3, 2)), (steps, (2, 0))]:
        got, _, lens = run_epoch(digits_url, world_size, num_workers, transform=tf, start_step=k)
        assert lens == [steps - k] * world_size and sorted(got) == list(range(k, steps))
        for step in got:
            assert got[step].keys() == ref[step].keys()
            assert all(torch.equal(got[step][key], ref[step][key]) for key in ref[step])

    # in this process (n=0): count images decoded and samples parsed from the tars
    decoded, parsed = [0], [0]
    real_decode, real_iter_tar = reading.decode_rgb, reading.iter_tar

    def counting_decode(*a, **kw):
        decoded[0] += 1
        return real_decode(*a, **kw)

    def counting_iter_tar(stream):
        for item in real_iter_tar(stream):
            parsed[0] += 1
            yield item

    monkeypatch.setattr(reading, "decode_rgb", counting_decode)
    monkeypatch.setattr(reading, "iter_tar", counting_iter_tar)
    list(make_loader(digits_url, "train", global_batch_size=G, num_workers=0, epoch=EPOCH, seed=SEED, transform=tf))
    full = parsed[0]
    assert decoded[0] == steps * G
    k = steps - 3
    decoded[0] = parsed[0] = 0
    loader = make_loader(digits_url, "train", global_batch_size=G, num_workers=0, epoch=EPOCH, seed=SEED, transform=tf, start_step=k)
    assert sum(1 for _ in loader) == 3
    assert decoded[0] == 3 * G  # not one sample of the steps before k
    # parsed: per stream, from the start of the shard holding its block to the end of its segment
    plan = loader.plan
    assert full == plan.reads(1, 0)[1].sum() and parsed[0] == plan.reads(1, 0, start_step=k)[1].sum() < full


# -- the plan -------------------------------------------------------------------------------------


def test_every_planned_sample_is_trained_exactly_once_per_epoch(synthetic):
    names = keys_in_order(synthetic)
    shards = read_manifest(synthetic)["splits"]["train"]["shards"]
    _, rank_keys, _ = run_epoch(synthetic, 3, 2, shuffle_buffer=30, decode=False)
    trained = [k for steps in rank_keys for keys in steps for k in keys]
    planned = [names[i] for t in range(150 // G) for i in step_samples(shards, seed=SEED, epoch=EPOCH, global_batch_size=G, step=t, shuffle_buffer=30)]
    assert len(trained) == len(set(trained)) == (150 // G) * G  # drop-last: 150 % 26 = 20 samples wait for another epoch
    assert sorted(trained) == sorted(planned)


@pytest.mark.parametrize("global_batch_size", [1, 7, 64, 100])
def test_plan_covers_the_split_once_and_changes_with_the_epoch(global_batch_size):
    rng = np.random.default_rng(0)
    shards = [{"url": f"s{i}", "num_samples": int(n)} for i, n in enumerate(rng.integers(1, 40, 37))]
    total = sum(s["num_samples"] for s in shards)

    def epoch_order(epoch: int) -> np.ndarray:
        plan = TrainPlan(shards, seed=1, epoch=epoch, global_batch_size=global_batch_size, shuffle_buffer=50)
        return np.concatenate([plan.step_samples(t) for t in range(plan.steps)])

    first = epoch_order(0)
    assert len(first) == len(np.unique(first)) == total // global_batch_size * global_batch_size
    assert ((0 <= first) & (first < total)).all()
    assert not np.array_equal(first, epoch_order(1)) and np.array_equal(first, epoch_order(0))
    # a step's samples, whatever the world size: the ranks' shares put together, in order
    plan = TrainPlan(shards, seed=1, epoch=0, global_batch_size=global_batch_size, shuffle_buffer=50)
    for world_size in (1, 2, 3, 5):
        if world_size <= global_batch_size:
            shares = [plan.step_samples(0, rank=r, world_size=world_size) for r in range(world_size)]
            assert np.array_equal(np.concatenate(shares), plan.step_samples(0))
            assert [len(s) for s in shares] == [b - a for a, b in (rank_range(global_batch_size, world_size, r) for r in range(world_size))]


def test_shard_opens_match_the_plan(synthetic, monkeypatch):
    opened: list[str] = []
    real = storage.open_stream

    def counting(url, client=None):
        opened.append(os.path.basename(url))
        return real(url, client)

    monkeypatch.setattr(storage, "open_stream", counting)
    for world_size, num_workers in [(1, 0), (3, 0)]:
        opened.clear()
        for rank in range(world_size):
            list(make_loader(synthetic, "train", global_batch_size=G, rank=rank, world_size=world_size, num_workers=num_workers,
                             epoch=EPOCH, seed=SEED, shuffle_buffer=30, decode=False))
        plan = TrainPlan(read_manifest(synthetic)["splits"]["train"]["shards"], seed=SEED, epoch=EPOCH, global_batch_size=G, shuffle_buffer=30)
        opens, parsed = plan.reads(world_size, num_workers)
        names = [os.path.basename(s["url"]) for s in plan.shards]
        assert sorted(opened) == sorted(n for n, c in zip(names, opens, strict=True) for _ in range(c))
        assert (opens <= world_size + 1).all() and parsed.sum() < 2 * 150 * world_size


def test_imagenet_sized_split_reads_each_shard_about_once():
    shards = [{"url": f"train-{i:06d}.tar", "num_samples": 1000 + (i % 7) - 3} for i in range(1281)]
    plan = TrainPlan(shards, seed=0, epoch=0, global_batch_size=256, shuffle_buffer=5000)
    assert plan.streams == 64 and plan.block == 78
    for world_size in (1, 2, 4, 8):  # W divides the 64 streams: a stream has one reader
        opens, _ = plan.reads(world_size, 2)
        assert opens.max() <= 2 and opens.sum() <= len(shards) + plan.streams
    opens, _ = plan.reads(3, 2)  # reader boundaries inside 5 streams: their ~20 shards are read twice
    assert opens.sum() <= len(shards) + plan.streams + 5 * 21


# -- the caller's process, errors, arguments -------------------------------------------------------


def test_loading_in_the_callers_process_leaves_its_rng_alone(digits_url):
    m = read_manifest(digits_url)
    tf = make_transform("cifar", True, mean=m["mean"], std=m["std"])
    torch.manual_seed(123)
    expected = [torch.rand(1) for _ in range(3)]
    torch.manual_seed(123)
    draws = []
    for _ in make_loader(digits_url, "train", global_batch_size=G, num_workers=0, transform=tf, start_step=40):
        draws.append(torch.rand(1))  # the loop body's draws are the caller's sequence
    assert len(draws) == 48 - 40 and torch.equal(torch.cat(draws[:3]), torch.cat(expected))


def test_a_lost_shard_costs_each_rank_its_own_samples_and_no_step(synthetic, tmp_path):
    import shutil

    url = str(tmp_path / "copy")
    shutil.copytree(synthetic, url)
    victim = os.path.join(url, "train-000003.tar")
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    names = keys_in_order(synthetic)
    shards = read_manifest(url)["splits"]["train"]["shards"]
    plan = TrainPlan(shards, seed=SEED, epoch=EPOCH, global_batch_size=G)
    planned = {names[i] for t in range(plan.steps) for i in plan.step_samples(t)}
    lost = planned & set(names[33:44])  # shard 3's samples that this epoch trains
    trained, skipped = [], 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for rank in range(3):
            loader = make_loader(url, "train", global_batch_size=G, rank=rank, world_size=3, num_workers=2, epoch=EPOCH,
                                 seed=SEED, on_error="skip", with_keys=True, decode=False)
            batches = [keys for *_, keys in loader]
            assert len(batches) == len(loader) == plan.steps  # no step lost
            trained += [k for keys in batches for k in keys]
            skipped += loader.skipped
            assert all(e.shard == victim for e in loader.errors)
    assert lost and sorted(trained) == sorted(planned - lost) and skipped == len(lost)  # each lost sample counted once
    assert any(re.search(r"train-000003\.tar: \d+ bytes, the manifest says \d+; whole shard skipped", str(w.message)) for w in caught)


def test_batch_size_arguments():
    with pytest.raises(ValueError, match=r"exactly one of batch_size .*batch_size=8, global_batch_size=16"):
        make_loader("unused", "train", 8, global_batch_size=16)
    with pytest.raises(ValueError, match="batch_size=None, global_batch_size=None"):
        make_loader("unused", "train")
    with pytest.raises(ValueError, match="no sample"):
        make_loader("unused", "train", global_batch_size=2, rank=0, world_size=3)
    with pytest.raises(ValueError, match="evaluation takes batch_size"):
        make_loader("unused", "val", global_batch_size=8)


def test_batch_size_per_rank_is_a_global_batch_of_world_size_times_it(digits_url):
    a = make_loader(digits_url, "train", 16, rank=1, world_size=3, num_workers=0, with_keys=True)
    b = make_loader(digits_url, "train", global_batch_size=48, rank=1, world_size=3, num_workers=0, with_keys=True)
    n = read_manifest(digits_url)["splits"]["train"]["num_samples"]
    assert a.global_batch_size == 48 and a.batch_size == 16 and len(a) == len(b) == a.steps_per_epoch == n // 48
    assert [k for *_, k in a] == [k for *_, k in b]
    with pytest.raises(ValueError, match=rf"start_step {n // 48 + 1} outside \[0, steps_per_epoch={n // 48}\]"):
        a.set_epoch(0, start_step=n // 48 + 1)
