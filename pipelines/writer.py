"""Write a source as shards + manifest to a folder or S3 (``write_shards``; CLI: ``pipelines.shards``),
or write only the manifest for WebDataset shards made elsewhere (``index_shards``).

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
import tarfile
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

    def merge(self, other: _ChannelStats) -> None:
        self.total += other.total
        self.total_sq += other.total_sq
        self.count += other.count
        self.images += other.images

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
    client = _prepare_out(out, client, 4 * upload_workers)
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
            bar = tqdm(total=len(records), desc=f"{split}", unit="img", file=sys.stderr, disable=not progress)
            entries: list[dict] = []
            pending: list[Future] = []
            for index, shard in enumerate(_group(records, shard_size, max_bytes)):
                if split == "train":
                    _add_stats(stats, shard, stats_limit, source.name)
                entry, upload = _stage_shard(out, f"{split}-{index:06d}.tar", shard, client)
                entries.append(entry)
                if upload is None:
                    skipped += 1
                else:
                    pending.append(pool.submit(storage.publish_file, *upload, client, sha256=entry["sha256"]))
                while len([f for f in pending if not f.done()]) > 2 * upload_workers:  # bound the temp files waiting
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
    total = sum(len(s["shards"]) for s in manifest_splits.values())
    _publish_manifest(out, manifest, client, f"{total} shard(s), {skipped} shard(s) already up to date")
    return manifest


def _prepare_out(out: str, client: Any | None, connections: int) -> Any | None:
    """The dataset folder made, or the bucket checked (with a client for `connections` at once)."""
    if not storage.is_s3(out):
        os.makedirs(out, exist_ok=True)
        return client
    client = client or storage.make_s3_client(max_pool_connections=connections)
    storage.bucket_exists_check(out, client)
    return client


def _publish_manifest(out: str, manifest: dict, client: Any | None, summary: str) -> None:
    """The manifest, written last: a reader never sees a dataset whose shards are not all there."""
    url = storage.join(out, MANIFEST)
    storage.write_bytes(url, json.dumps(manifest, indent=1).encode(), client)
    print(f"wrote {url}: {summary}", file=sys.stderr)


def _add_stats(stats: _ChannelStats, shard: list, limit: int, source_name: str) -> None:
    """The shard's images into the mean/std, until `limit` images have been counted."""
    for key, data, _ext, _label, pixels in shard:
        if stats.images >= limit:
            return
        if pixels is None:
            try:
                with Image.open(io.BytesIO(data)) as im:
                    pixels = np.asarray(im.convert("RGB"))
            except (OSError, ValueError) as err:  # stored as is; the loader counts and skips it with a warning
                warnings.warn(f"{source_name}: {key}: undecodable image ({err})", RuntimeWarning, stacklevel=3)
                continue
        stats.add(pixels)


def _stage_shard(out: str, name: str, shard: list, client: Any | None) -> tuple[dict, tuple[str, str] | None]:
    """The shard written to a temp file and hashed: (its manifest entry, (temp file, URL) to publish, or None
    when what is stored there already has that sha256).

    One webdataset TarWriter per shard (format.write_tar) rather than its ShardWriter: ShardWriter opens
    its output itself, while a shard here goes to a temp file first, is hashed, then published atomically
    (os.replace or one S3 upload), skipped if unchanged."""
    url = storage.join(out, name)
    tmp = storage.local_temp_path(url)
    sha = write_tar(tmp, [(k, d, e, lab) for k, d, e, lab, _ in shard])
    entry = {"url": name, "num_samples": len(shard), "bytes": os.path.getsize(tmp), "sha256": sha}
    if storage.stored_sha256(url, client) == sha:
        os.remove(tmp)
        return entry, None
    return entry, (tmp, url)


# -- indexing shards written elsewhere ------------------------------------------------------------


def expand_pattern(pattern: str) -> list[str]:
    """``s3://b/train-{000000..000002}.tar`` -> the three URLs (brace expansion, as webdataset does)."""
    from braceexpand import braceexpand

    urls = list(braceexpand(pattern))
    if not urls or not all(u.endswith((".tar", ".tar.gz", ".tgz")) for u in urls):
        raise ValueError(f"{pattern!r}: expected a brace pattern of .tar shards, e.g. s3://bucket/train-{{000000..000099}}.tar")
    return urls


def _scan_shard(url: str, label_key: str, stats_images: int, client: Any | None) -> dict:
    """One pass over a shard: size, sha256, per-sample labels, image sizes, pixel sums of the first
    ``stats_images`` images. A sample without an image or a label is an error naming it."""
    from pipelines.format import HashingReader, error_text, iter_tar, read_label
    from pipelines.reading import IMAGE_FIELDS

    stats = _ChannelStats()
    labels: list[int] = []
    sizes: set[tuple[int, int]] = set()
    with storage.open_stream(url, client) as stream:
        reader = HashingReader(stream)
        key = None
        try:
            for key, fields in iter_tar(reader):
                ext = next((e for e in IMAGE_FIELDS if e in fields), None)
                if ext is None:
                    raise ValueError(f"{url}: sample {key!r}: no image field {list(IMAGE_FIELDS)} (has {sorted(fields)})")
                label = read_label(fields, label_key)
                if isinstance(label, str):
                    raise ValueError(f"{url}: sample {key!r}: {label} (label key {label_key!r}; see --label-key)")
                labels.append(label)
                try:
                    with Image.open(io.BytesIO(fields[ext])) as im:
                        sizes.add((im.height, im.width))  # the header only
                        if stats.images < stats_images:
                            stats.add(np.asarray(im.convert("RGB")))
                except (OSError, ValueError) as err:
                    raise ValueError(f"{url}: sample {key!r}: undecodable {ext} image ({err})") from err
        except (tarfile.TarError, EOFError) as err:
            after = f"after sample {key!r}" if key is not None else "at its start"
            raise ValueError(f"{url}: truncated or corrupt tar {after} ({error_text(err)})") from err
        reader.drain()
    return {"url": url, "num_samples": len(labels), "bytes": reader.nbytes, "sha256": reader.sha.hexdigest(),
            "labels": labels, "sizes": sizes, "stats": stats}


def _relative(url: str, out: str) -> str:
    """``url`` relative to the dataset folder ``out`` when inside it, else absolute (so it is read where it is)."""
    if storage.is_s3(url) != storage.is_s3(out):
        return url if storage.is_s3(url) else os.path.abspath(url)
    if storage.is_s3(url):
        base = out.rstrip("/") + "/"
        return url[len(base) :] if url.startswith(base) else url
    path, folder = os.path.abspath(url), os.path.abspath(out)
    return os.path.relpath(path, folder) if path.startswith(folder + os.sep) else path


def index_shards(splits: dict[str, str], out: str, *, label_key: str = "cls", classes: list[str] | None = None,
                 workers: int = 8, stats_limit: int = 50_000, progress: bool = True, client: Any | None = None) -> dict:
    """Write our manifest for WebDataset shards made elsewhere (e.g. by ``webdataset.ShardWriter``).

    ``splits`` maps a split name to a brace pattern of shards (local or S3). Every shard is read once,
    ``workers`` at a time: sample count, size, sha256, labels (``label_key``: ``cls`` or
    ``json:FIELD``), image sizes, and mean/std from the first ``stats_limit`` images of the train
    split (spread over its shards). Classes are ``classes`` (names in label order) or ``"0".."K-1"``
    for the largest label K-1. The manifest goes to ``out`` (folder or ``s3://``); shards outside
    ``out`` are listed by absolute URL, so the loader reads them where they are.
    """
    from pipelines.format import check_label_key

    check_label_key(label_key)
    if not splits:
        raise ValueError("no splits given; e.g. --split train=/data/train-{000000..000009}.tar")
    urls = {name: expand_pattern(pattern) for name, pattern in splits.items()}
    if any(storage.is_s3(u) for us in urls.values() for u in us) and client is None:
        client = storage.make_s3_client(max_pool_connections=max(16, 2 * workers))
    client = _prepare_out(out, client, max(16, 2 * workers))
    stats_split = "train" if "train" in urls else next(iter(urls))
    scanned = _scan_splits(urls, label_key, stats_split, stats_limit, workers, client, progress)
    classes = _label_classes([lab for results in scanned.values() for r in results for lab in r["labels"]], classes)
    stats = _ChannelStats()
    for r in scanned[stats_split]:
        stats.merge(r["stats"])
    sizes = set().union(*(r["sizes"] for results in scanned.values() for r in results))
    mean, std = stats.result()
    manifest = {
        "format": FORMAT,
        "source": "webdataset",
        "classes": classes,
        "num_classes": len(classes),
        "image_size": list(next(iter(sizes))) if len(sizes) == 1 else None,
        "mean": mean,
        "std": std,
        "seed": None,
        "label_key": label_key,
        "splits": {
            name: {
                "num_samples": sum(r["num_samples"] for r in results),
                "shards": [
                    {"url": _relative(r["url"], out), "num_samples": r["num_samples"], "bytes": r["bytes"], "sha256": r["sha256"]}
                    for r in results
                ],
            }
            for name, results in scanned.items()
        },
    }
    counts = ", ".join(f"{n}: {s['num_samples']} samples in {len(s['shards'])} shard(s)" for n, s in manifest["splits"].items())
    _publish_manifest(out, manifest, client, f"{counts}; {len(classes)} classes")
    return manifest


def _scan_splits(urls: dict[str, list[str]], label_key: str, stats_split: str, stats_limit: int, workers: int,
                 client: Any | None, progress: bool) -> dict[str, list[dict]]:
    """Every shard of every split scanned once (`_scan_shard`), `workers` at a time; the first
    `stats_limit` images of `stats_split`, spread over its shards, count towards mean/std."""
    bar = tqdm(total=sum(len(u) for u in urls.values()), desc="index", unit="shard", file=sys.stderr, disable=not progress)
    scanned: dict[str, list[dict]] = {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for name, split_urls in urls.items():
            per_shard = -(-stats_limit // len(split_urls)) if name == stats_split else 0
            futures = [pool.submit(_scan_shard, u, label_key, per_shard, client if storage.is_s3(u) else None) for u in split_urls]
            results = []
            for f in futures:
                try:
                    results.append(f.result())
                except storage.StorageError as err:
                    raise ValueError(f"split {name!r}: {err}") from err
                bar.update(1)
            scanned[name] = results
    bar.close()
    return scanned


def _label_classes(labels: list[int], classes: list[str] | None) -> list[str]:
    """`classes`, or "0".."K-1" for the largest label K-1, after checking every label fits."""
    if not labels:
        raise ValueError("no samples in the shards given")
    bad = [lab for lab in labels if lab < 0 or (classes is not None and lab >= len(classes))]
    if bad:
        limit = f"[0, {len(classes)})" if classes is not None else "labels >= 0"
        raise ValueError(f"label {bad[0]} outside {limit}; {len(bad)} such sample(s) (check --classes / --label-key)")
    return classes if classes is not None else [str(i) for i in range(max(labels) + 1)]
