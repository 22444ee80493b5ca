"""Images/s of read + decode + augment: shards (local, S3 on loopback) against ImageFolder and the
``webdataset`` library's own pipeline; and time to the first batch as the shard count grows.

    .venv/bin/python benchmarks/bench_pipelines.py [--images 2000] [--workers 2] [--epochs 5]
                                                   [--first-batch-shards 1000,10000,30000] [--before main]
    .venv/bin/python benchmarks/bench_pipelines.py --shard-reads

``--before REF``: also read with the loader of git revision REF (``git show REF:pipelines/loader.py``
into a temporary file, imported in this process), on the same data, turn about with today's.
``--shard-reads``: no data; print how many times a training epoch opens each shard, from the plan
(``pipelines.order.TrainPlan.reads``), for an ImageNet-sized split and for the digits.

Writes synthetic JPEGs (64-128 px) to a temporary ImageFolder, shards the same files (bytes kept
as they are) to a local folder and to a moto S3 server on 127.0.0.1, then reads each through the
same ImageNet-style train transform (random shorter side, crop, flip, PCA lighting, normalise)
with the same workers and batch size: ImageFolder + DataLoader, our loader (local, S3), and
webdataset's pipeline (``DataPipeline``: shard list, ``split_by_worker``, tar expansion, shuffle
buffer 1000, the same decode + transform, ``batched``; local files, and S3 through a boto3 opener).
The readers take turns for ``--epochs`` epochs; each one's best epoch counts (the first also warms
the page cache). Goals (issue 14): ours >= 1.0x webdataset's pipeline; S3 >= 0.95x local.

Time to first batch: a manifest of N shards (hard links to one small shard, so every one exists),
read by our loader (and, for comparison, with the old per-shard existence check) and by webdataset's
pipeline over the same N files, 2 workers; best of ``--first-batch-repeats`` rounds, every count and
reader in each round, after a warm-up. Goal: N=30,000 within
1.2x of N=1,000.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import logging
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import torch
import webdataset as wds
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder
from torchvision.io import ImageReadMode, decode_image
from webdataset.tariterators import group_by_keys, tar_file_expander

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipelines import TrainPlan, make_loader, make_transform, read_manifest, storage, write_shards  # noqa: E402
from pipelines.sources import synthetic_source  # noqa: E402

# -- webdataset's own pipeline, with our decode and transform -------------------------------------


class DecodeTransform:
    """Sample dict -> (transformed image, label): the same decoder and transform as our loader's."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, sample: dict):
        ext = next(e for e in ("jpg", "jpeg", "png", "webp") if e in sample)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            image = decode_image(torch.frombuffer(bytearray(sample[ext]), dtype=torch.uint8), mode=ImageReadMode.RGB)
        return self.transform(image), int(sample["cls"])


def collate(samples: list) -> tuple:
    return torch.stack([s[0] for s in samples]), torch.tensor([s[1] for s in samples])


def s3_streams(src):
    """webdataset's url_opener for s3:// URLs, through boto3 (one client per worker)."""
    client = storage.make_s3_client()
    for sample in src:
        bucket, key = storage.split_s3(sample["url"])
        yield {**sample, "stream": client.get_object(Bucket=bucket, Key=key)["Body"]}


def expand(src):
    return group_by_keys(tar_file_expander(src))


def wds_loader(urls: list[str], transform, batch_size: int, workers: int, epoch: int = 0) -> wds.WebLoader:
    # the shard list is shuffled by SimpleShardList's seed, the same in every worker: a wds.shuffle
    # stage before split_by_worker draws a different order per worker, so workers overlap or miss shards
    stages = [wds.SimpleShardList(urls, seed=epoch), wds.split_by_worker]
    stages += [s3_streams, expand] if storage.is_s3(urls[0]) else [wds.tarfile_to_samples()]
    stages += [wds.shuffle(1000), wds.map(DecodeTransform(transform)), wds.batched(batch_size, collation_fn=collate, partial=False)]
    return wds.WebLoader(wds.DataPipeline(*stages), batch_size=None, num_workers=workers)


# -- time to first batch --------------------------------------------------------------------------


def first_batch_seconds(make) -> float:
    """Seconds to build a loader and take its first batch (stopping its workers is not counted)."""
    start = time.perf_counter()
    batches = iter(make())
    next(batches)
    elapsed = time.perf_counter() - start
    del batches
    return elapsed


def many_shards(folder: str, source: str, n: int) -> list[str]:
    """A dataset of ``n`` shards at ``folder``: hard links to the first train shard of ``source``."""
    m = read_manifest(source)
    first = m["splits"]["train"]["shards"][0]
    os.makedirs(folder, exist_ok=True)
    names = [f"train-{i:06d}.tar" for i in range(n)]
    for name in names:
        os.link(first["url"], os.path.join(folder, name))
    entry = {k: first[k] for k in ("num_samples", "bytes", "sha256")}
    raw = {k: v for k, v in m.items() if k != "splits"}
    raw["splits"] = {"train": {"num_samples": n * first["num_samples"], "shards": [dict(entry, url=name) for name in names]}}
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        json.dump(raw, f)
    return [os.path.join(folder, name) for name in names]


def write_image_folder(root: str, images: int, classes: int) -> None:
    src = synthetic_source({"classes": str(classes), "size": "64-128", "train": str(images), "val": "0", "format": "jpg"})
    for rec in src.splits["train"]:
        data, _, _ = rec.load()
        folder = os.path.join(root, "train", src.classes[rec.label])
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, rec.key + ".jpg"), "wb") as f:
            f.write(data)


def loader_at(ref: str, folder: str):
    """The ``pipelines.loader`` module of git revision ``ref``, imported from a file in ``folder``."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(folder, "loader_before.py")
    with open(path, "w") as f:
        f.write(subprocess.run(["git", "-C", repo, "show", f"{ref}:pipelines/loader.py"], check=True, capture_output=True, text=True).stdout)
    spec = importlib.util.spec_from_file_location("loader_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["loader_before"] = module  # DataLoader workers are forked: they find it here
    spec.loader.exec_module(module)
    return module


def shard_reads() -> None:
    """Shard opens per training epoch, all ranks' loader processes together, from the plan alone."""
    imagenet = [{"url": f"train-{i:06d}.tar", "num_samples": 1001 if i < 167 else 1000} for i in range(1281)]  # 1,281,167
    with tempfile.TemporaryDirectory() as tmp:
        write_shards("digits", tmp, splits=["train"], progress=False)
        digits = read_manifest(tmp)["splits"]["train"]["shards"]
    cases = [("ImageNet-sized", imagenet, 256, 5000, 8), ("ImageNet-sized", imagenet, 256, 1000, 2), ("digits", digits, 64, 1000, 1)]
    print("shard opens per training epoch (all ranks and loader processes; 'parsed': samples read from tars / N)")
    for name, shards, g, buffer, workers in cases:
        plan = TrainPlan(shards, seed=0, epoch=0, global_batch_size=g, shuffle_buffer=buffer)
        print(f"{name}: {len(shards)} shards, N={plan.num_samples:,}, G={g}, shuffle_buffer={buffer}: S={plan.streams} streams, "
              f"blocks of {plan.block}, {plan.steps} steps; n={workers} loader processes per rank")
        print(f"  {'W':>3s} {'opens':>7s} {'per shard':>9s} {'max':>4s} {'opened >1x':>10s} {'parsed':>7s}")
        for world in (1, 2, 3, 4, 8):
            opens, parsed = plan.reads(world, workers)
            print(f"  {world:3d} {opens.sum():7d} {opens.mean():9.3f} {opens.max():4d} {(opens > 1).sum():10d} {parsed.sum() / plan.num_samples:6.3f}x")


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (loader processes are joined at an epoch's end)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def rates(readers: dict, epochs: int) -> dict[str, tuple[float, int, float]]:
    """Per reader over ``epochs`` full passes (worker start-up included): the best images/s, the
    images per epoch, and the median images per CPU-second (this process and its loader processes;
    on a machine shared with other work, the steadier measure of what a reader costs).

    The readers take turns epoch by epoch, so a burst of load from elsewhere on the machine hits
    them alike rather than one of them.
    """
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in readers}
    counts = {}
    for epoch in range(epochs):
        for name, make_iterable in readers.items():
            iterable = make_iterable(epoch)
            start, cpu = time.perf_counter(), cpu_seconds()
            count = counts[name] = sum(len(labels) for _, labels in iterable)
            wall = time.perf_counter() - start
            del iterable
            gc.collect()  # the loader processes exit and are joined, so their CPU time is counted
            runs[name].append((count / wall, count / (cpu_seconds() - cpu)))
    return {name: (max(r[0] for r in rs), counts[name], statistics.median(r[1] for r in rs)) for name, rs in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--shard-size", type=int, default=250)
    parser.add_argument("--first-batch-shards", default="1000,10000,30000", help="shard counts for the time to first batch")
    parser.add_argument("--first-batch-repeats", type=int, default=3)
    parser.add_argument("--before", default=None, metavar="REF", help="also read with the loader of git revision REF (e.g. main)")
    parser.add_argument("--shard-reads", action="store_true", help="only print the shard opens per epoch from the plan")
    parser.add_argument("--only-shards", action="store_true", help="only our loader (and --before's): no ImageFolder, no webdataset")
    args = parser.parse_args()
    if args.shard_reads:
        shard_reads()
        return

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1"
    )
    import boto3

    boto3.client("s3").create_bucket(Bucket="bench")

    with tempfile.TemporaryDirectory() as tmp:
        folder, local = os.path.join(tmp, "folder"), os.path.join(tmp, "shards")
        write_image_folder(folder, args.images, args.classes)
        write_shards(f"imagefolder:{folder}", local, shard_size=args.shard_size, progress=False)
        write_shards(f"imagefolder:{folder}", "s3://bench/shards", shard_size=args.shard_size, progress=False)
        m = read_manifest(local)
        transform = make_transform("imagenet", True, mean=m["mean"], std=m["std"], size=56, scale_range=(64, 120))
        bs, workers = args.batch_size, args.workers

        def image_folder(epoch: int) -> DataLoader:
            return DataLoader(ImageFolder(os.path.join(folder, "train"), transform=transform), batch_size=bs, shuffle=True, num_workers=workers, drop_last=True)

        def shards(url: str):
            return lambda epoch: make_loader(url, "train", bs, num_workers=workers, epoch=epoch, transform=transform)

        local_urls = [s["url"] for s in m["splits"]["train"]["shards"]]
        s3_urls = [s["url"] for s in read_manifest("s3://bench/shards")["splits"]["train"]["shards"]]

        def webdataset(urls: list[str]):
            return lambda epoch: wds_loader(urls, transform, bs, workers, epoch)

        readers = {
            "ImageFolder + DataLoader": image_folder,
            "shards, local folder": shards(local),
            "shards, S3 (moto, loopback)": shards("s3://bench/shards"),
            "webdataset pipeline, local": webdataset(local_urls),
            "webdataset pipeline, S3 (boto3)": webdataset(s3_urls),
        }
        if args.only_shards:
            readers = {k: v for k, v in readers.items() if k.startswith("shards")}
        if args.before:
            before = loader_at(args.before, tmp)

            def shards_before(url: str):
                return lambda epoch: before.make_loader(url, "train", bs, num_workers=workers, epoch=epoch, transform=transform)

            readers[f"shards, local ({args.before})"] = shards_before(local)
            readers[f"shards, S3 ({args.before})"] = shards_before("s3://bench/shards")
        results = rates(readers, args.epochs)

        # every shard count in every round, so a burst of load from elsewhere hits them alike
        counts = [int(v) for v in args.first_batch_shards.split(",") if v]
        folders = {n: os.path.join(tmp, f"many-{n}") for n in counts}
        urls = {n: many_shards(folders[n], local, n) for n in counts}
        variants = {
            "ours": lambda n: make_loader(folders[n], "train", bs, num_workers=workers, transform=transform),
            "checked": lambda n: make_loader(folders[n], "train", bs, num_workers=workers, transform=transform, check_shards=True),
            "webdataset": lambda n: wds_loader(urls[n], transform, bs, workers),
        }
        for name in variants if counts else []:  # warm-up: imports, caches
            first_batch_seconds(lambda name=name: variants[name](counts[0]))
        best = {(n, name): float("inf") for n in counts for name in variants}
        for _ in range(args.first_batch_repeats):
            for n in counts:
                for name, make in variants.items():
                    best[n, name] = min(best[n, name], first_batch_seconds(lambda make=make, n=n: make(n)))
        first_batch = {n: tuple(best[n, name] for name in variants) for n in counts}
        for folder in folders.values():
            shutil.rmtree(folder)
    server.stop()

    print(f"pipelines benchmark: {args.images} JPEGs 64-128 px, {len(m['splits']['train']['shards'])} shards, "
          f"train transform to 56 px, batch {bs}, {workers} workers, best of {args.epochs} epochs")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    for name, (ips, n, per_cpu) in results.items():
        print(f"  {name:30s} {ips:8.0f} images/s  {per_cpu:6.0f} images/CPU-s  ({n} images/epoch)")
    if args.before:
        for where, url_name in (("local", "shards, local folder"), ("S3", "shards, S3 (moto, loopback)")):
            now, then = results[url_name], results[f"shards, {where} ({args.before})"]
            print(f"  ratio today / {args.before}, {where}: {now[0] / then[0]:.2f}x images/s, {now[2] / then[2]:.2f}x images/CPU-s")
    if args.only_shards:
        return
    folder_ips = results["ImageFolder + DataLoader"][0]
    local_ips = results["shards, local folder"][0]
    s3_ips = results["shards, S3 (moto, loopback)"][0]
    wds_local = results["webdataset pipeline, local"][0]
    wds_s3 = results["webdataset pipeline, S3 (boto3)"][0]
    print(f"  ratio shards-local / ImageFolder:            {local_ips / folder_ips:.2f}x (goal >= 1.0)")
    print(f"  ratio ours / webdataset pipeline, local:     {local_ips / wds_local:.2f}x (goal >= 1.0)")
    print(f"  ratio ours / webdataset pipeline, S3:        {s3_ips / wds_s3:.2f}x (goal >= 1.0)")
    print(f"  ratio S3 / shards-local:                     {s3_ips / local_ips:.2f}x (goal >= 0.95)")
    if first_batch:
        print(f"time to first batch (best of {args.first_batch_repeats}), {workers} workers, batch {bs}:")
        print(f"  {'shards':>8s} {'ours':>8s} {'ours + per-shard check (old)':>30s} {'webdataset':>11s}")
        for n, (ours, checked, theirs) in first_batch.items():
            print(f"  {n:8,d} {ours:7.2f}s {checked:29.2f}s {theirs:10.2f}s")
        counts = sorted(first_batch)
        if len(counts) > 1:
            lo, hi = first_batch[counts[0]][0], first_batch[counts[-1]][0]
            print(f"  ours at {counts[-1]:,} / at {counts[0]:,} shards: {hi / lo:.2f}x (goal <= 1.2)")


if __name__ == "__main__":
    main()
