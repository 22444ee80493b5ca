"""Images/s of read + decode + augment: shards (local, S3 on loopback) against ImageFolder.

    .venv/bin/python benchmarks/bench_pipelines.py [--images 2000] [--workers 2] [--epochs 5]

Writes synthetic JPEGs (64-128 px) to a temporary ImageFolder, shards the same files (bytes kept
as they are) to a local folder and to a moto S3 server on 127.0.0.1, then reads each through the
same ImageNet-style train transform (random shorter side, crop, flip, PCA lighting, normalise)
with the same workers and batch size. The readers take turns for ``--epochs`` epochs; each one's best
epoch counts (the first also warms the page cache). Prints images/s and the ratios
shards-local/ImageFolder (goal >= 1.0) and S3/local (goal >= 0.9).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import socket
import sys
import tempfile
import time

import torch
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipelines import make_loader, make_transform, read_manifest, write_shards  # noqa: E402
from pipelines.sources import synthetic_source  # noqa: E402


def write_image_folder(root: str, images: int, classes: int) -> None:
    src = synthetic_source({"classes": str(classes), "size": "64-128", "train": str(images), "val": "0", "format": "jpg"})
    for rec in src.splits["train"]:
        data, _, _ = rec.load()
        folder = os.path.join(root, "train", src.classes[rec.label])
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, rec.key + ".jpg"), "wb") as f:
            f.write(data)


def rates(readers: dict, epochs: int) -> dict[str, tuple[float, int]]:
    """Best images/s of each reader over ``epochs`` full passes (worker start-up included).

    The readers take turns epoch by epoch, so a burst of load from elsewhere on the machine hits
    them alike rather than one of them.
    """
    best = {name: (0.0, 0) for name in readers}
    for epoch in range(epochs):
        for name, make_iterable in readers.items():
            iterable = make_iterable(epoch)
            start = time.perf_counter()
            count = sum(len(labels) for _, labels in iterable)
            best[name] = (max(best[name][0], count / (time.perf_counter() - start)), count)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--shard-size", type=int, default=250)
    args = parser.parse_args()

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

        readers = {
            "ImageFolder + DataLoader": image_folder,
            "shards, local folder": shards(local),
            "shards, S3 (moto, loopback)": shards("s3://bench/shards"),
        }
        results = rates(readers, args.epochs)
    server.stop()

    print(f"pipelines benchmark: {args.images} JPEGs 64-128 px, {len(m['splits']['train']['shards'])} shards, "
          f"train transform to 56 px, batch {bs}, {workers} workers, best of {args.epochs} epochs")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    for name, (ips, n) in results.items():
        print(f"  {name:30s} {ips:8.0f} images/s  ({n} images/epoch)")
    folder_ips = results["ImageFolder + DataLoader"][0]
    local_ips = results["shards, local folder"][0]
    s3_ips = results["shards, S3 (moto, loopback)"][0]
    print(f"  ratio shards-local / ImageFolder: {local_ips / folder_ips:.2f}x (goal >= 1.0)")
    print(f"  ratio S3 / shards-local:          {s3_ips / local_ips:.2f}x (goal >= 0.9)")


if __name__ == "__main__":
    main()
