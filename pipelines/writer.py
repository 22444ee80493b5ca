"""Write a source as shards + manifest to a folder or S3 (``write_shards``; CLI: ``pipelines.shards``).

Writes are atomic per shard (local: temp file + ``os.replace``; S3: one upload per object, several
at once, multipart above 16 MiB, retried by botocore) and the manifest is written last, so a reader
sees a finished dataset or none. A rerun re-encodes and skips every shard whose stored sha256
already matches, so it resumes an interrupted run and is a no-op on a finished one.
"""

from __future__ import annotations

import io
import json
import os
import sys
import warnings
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipelines import storage
from pipelines.format import FORMAT, MANIFEST, member_bytes, tar_bytes, write_tar
from pipelines.sources import Source, parse_source

TRAINING_SPLITS = ("train", "trainval")  # shuffled before sharding
# -- writing --------------------------------------------------------------------------------------


def _group(records: list, shard_size: int, max_bytes: int) -> Iterator[list[tuple[str, bytes, str, int, np.ndarray | None]]]:
    """Encode records in order and cut them into shards of at most shard_size samples / max_bytes."""
    shard: list = []
    nbytes = 0
    for rec in records:
        data, ext, pixels = rec.load()
        size = member_bytes(f"{rec.key}.{ext}", len(data)) + member_bytes(f"{rec.key}.cls", len(str(rec.label)))
        if shard and (len(shard) >= shard_size or tar_bytes(nbytes + size) > max_bytes):
            yield shard
            shard, nbytes = [], 0
        shard.append((rec.key, data, ext, rec.label, pixels))
        nbytes += size
    if shard:
        yield shard


class _ChannelStats:
    """Running per-channel mean/std over pixels in [0, 1] (float64 sums)."""

    def __init__(self) -> None:
        self.total = np.zeros(3)
        self.total_sq = np.zeros(3)
        self.count = 0
        self.images = 0

    def add(self, pixels: np.ndarray) -> None:
        x = pixels.reshape(-1, 3).astype(np.float64) / 255.0
        self.total += x.sum(0)
        self.total_sq += (x * x).sum(0)
        self.count += len(x)
        self.images += 1

    def result(self) -> tuple[list[float], list[float]]:
        if not self.count:
            return [0.5] * 3, [0.25] * 3
        mean = self.total / self.count
        std = np.sqrt(np.maximum(self.total_sq / self.count - mean**2, 1e-12))
        return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]


def write_shards(
    source: Source | str,
    out: str,
    *,
    shard_size: int = 1000,
    max_bytes: int = 256 << 20,
    seed: int = 0,
    splits: list[str] | None = None,
    upload_workers: int = 4,
    stats_limit: int = 50_000,
    progress: bool = True,
    client: Any | None = None,
) -> dict:
    """Write ``source`` as shards under ``out`` (a folder or ``s3://bucket/prefix``); return the manifest.

    The training splits (``TRAINING_SPLITS``) are shuffled once with ``seed`` before sharding, so
    every shard holds a mix of classes (the reader's shuffle buffer is small). Mean/std come from the first ``stats_limit``
    train images. Shards whose stored sha256 matches are not written again.
    """
    if isinstance(source, str):
        source = parse_source(source)
    if shard_size < 1 or max_bytes < 1:
        raise ValueError("shard_size and max_bytes must be positive")
    if storage.is_s3(out):
        client = client or storage.make_s3_client(max_pool_connections=4 * upload_workers)
        storage.bucket_exists_check(out, client)
    else:
        os.makedirs(out, exist_ok=True)
    names = splits or list(source.splits)
    unknown = [s for s in names if s not in source.splits]
    if unknown:
        raise ValueError(f"{source.name}: no split(s) {unknown}; valid: {list(source.splits)}")

    stats = _ChannelStats()
    manifest_splits: dict[str, dict] = {}
    skipped = 0
    with ThreadPoolExecutor(max_workers=upload_workers) as pool:
        for split in names:
            records = list(source.splits[split])
            if split in TRAINING_SPLITS:
                order = np.random.default_rng(seed).permutation(len(records))
                records = [records[i] for i in order]
            entries: list[dict] = []
            pending: list[Future] = []
            bar = tqdm(total=len(records), desc=f"{split}", unit="img", file=sys.stderr, disable=not progress)
            for index, shard in enumerate(_group(records, shard_size, max_bytes)):
                if split == "train":
                    for key, data, _ext, _label, pixels in shard:
                        if stats.images >= stats_limit:
                            break
                        if pixels is None:
                            try:
                                with Image.open(io.BytesIO(data)) as im:
                                    pixels = np.asarray(im.convert("RGB"))
                            except (OSError, ValueError) as err:
                                # stored as is; the loader counts and skips it with a warning
                                warnings.warn(f"{source.name}: {key}: undecodable image ({err})", RuntimeWarning, stacklevel=2)
                                continue
                        stats.add(pixels)
                name = f"{split}-{index:06d}.tar"
                url = storage.join(out, name)
                tmp = storage.local_temp_path(url)
                sha = write_tar(tmp, [(k, d, e, lab) for k, d, e, lab, _ in shard])
                nbytes = os.path.getsize(tmp)
                entries.append({"url": name, "num_samples": len(shard), "bytes": nbytes, "sha256": sha})
                if storage.stored_sha256(url, client) == sha:
                    os.remove(tmp)
                    skipped += 1
                else:
                    pending.append(pool.submit(storage.publish_file, tmp, url, client, sha256=sha))
                # bound the temp files waiting for upload
                while len([f for f in pending if not f.done()]) > 2 * upload_workers:
                    next(f for f in pending if not f.done()).result()
                bar.update(len(shard))
            for f in pending:
                f.result()
            bar.close()
            manifest_splits[split] = {"num_samples": sum(e["num_samples"] for e in entries), "shards": entries}

    mean, std = stats.result()
    manifest = {
        "format": FORMAT,
        "source": source.name,
        "classes": source.classes,
        "num_classes": len(source.classes),
        "image_size": list(source.image_size) if source.image_size else None,
        "mean": mean,
        "std": std,
        "seed": seed,
        "splits": manifest_splits,
    }
    storage.write_bytes(storage.join(out, MANIFEST), json.dumps(manifest, indent=1).encode(), client)
    total = sum(len(s["shards"]) for s in manifest_splits.values())
    print(f"wrote {storage.join(out, MANIFEST)}: {total} shard(s), {skipped} shard(s) already up to date", file=sys.stderr)
    return manifest
