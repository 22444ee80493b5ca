"""The shard format: tar files of samples (webdataset layout) and ``manifest.json``.

Each sample is ``<key>.jpg`` or ``<key>.png`` (the encoded image) and ``<key>.cls`` (the integer
label as text), consecutive in the tar. ``URL/manifest.json`` lists, per split, every shard with its
sample count, size and sha256 (names relative to URL), and the class names, image size and the
train split's per-channel mean/std in [0, 1] units. ``pipelines.writer`` writes it,
``pipelines.loader`` reads it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterator
from typing import IO, Any

from pipelines import storage

MANIFEST = "manifest.json"
FORMAT = "resnet-orchestrator-shards/1"


# -- the tar format -------------------------------------------------------------------------------


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # fixed metadata: the same samples give the same bytes, hence the same sha256 on a rerun
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def member_bytes(name: str, size: int) -> int:
    """Bytes a member takes in a GNU tar: header, data padded to 512, long-name blocks if any."""
    blocks = 1 + -(-size // 512)
    if len(name.encode()) > 99:  # GNU long name: an extra header and the name, padded
        blocks += 1 + -(-(len(name.encode()) + 1) // 512)
    return blocks * 512


def tar_bytes(members: int) -> int:
    """File size of a tar whose members take ``members`` bytes: two end blocks, padded to 10 KiB records."""
    return -(-(members + 1024) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def write_tar(path: str, samples: list[tuple[str, bytes, str, int]]) -> str:
    """Write ``(key, image bytes, ext, label)`` samples to a tar at ``path``; return its sha256."""
    with open(path, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for key, data, ext, label in samples:
            _add_member(tar, f"{key}.{ext}", data)
            _add_member(tar, f"{key}.cls", str(label).encode())
    return storage.file_sha256(path)


def split_name(name: str) -> tuple[str, str]:
    """``a/b.c.d`` -> (``a/b``, ``c.d``): the key ends at the first dot of the base name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


class HashingReader:
    """Passes reads through and hashes every byte, so a streamed shard is checked without a second read."""

    def __init__(self, stream: Any):
        self.stream = stream
        self.sha = hashlib.sha256()
        self.nbytes = 0

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.sha.update(data)
        self.nbytes += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def iter_tar(stream: IO[bytes] | Any) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Stream ``(key, {ext: bytes})`` samples from a tar stream (no seeking, no temp file).

    Raises ``tarfile.TarError`` or ``EOFError`` on a truncated or corrupt archive.
    """
    key, fields = None, {}
    # 1 MiB reads: an S3 body read in tarfile's default 10 KiB pieces costs a call per piece
    with tarfile.open(fileobj=stream, mode="r|", bufsize=1 << 20) as tar:
        for member in tar:
            if not member.isfile():
                continue
            k, ext = split_name(member.name)
            if k != key and key is not None:
                yield key, fields
                fields = {}
            key = k
            fields[ext] = tar.extractfile(member).read()
    if key is not None:
        yield key, fields


# -- reading the manifest -------------------------------------------------------------------------


def manifest_url(url: str) -> str:
    return url if url.endswith(".json") else storage.join(url, MANIFEST)


def read_manifest(url: str, client: Any | None = None) -> dict:
    """The manifest of the dataset at ``url`` (folder, ``s3://bucket/prefix`` or the json itself).

    Shard URLs in the result are absolute (``shard["url"]``), with the stored name in ``shard["name"]``.
    """
    murl = manifest_url(url)
    if storage.is_s3(murl):
        client = client or storage.make_s3_client()
        storage.bucket_exists_check(murl, client)
    try:
        manifest = json.loads(storage.read_bytes(murl, client))
    except json.JSONDecodeError as err:
        raise storage.StorageError(f"{murl}: not a valid manifest ({err})") from err
    if manifest.get("format") != FORMAT or "splits" not in manifest:
        raise storage.StorageError(f"{murl}: not a {FORMAT} manifest")
    base = murl.rsplit("/", 1)[0] if storage.is_s3(murl) else os.path.dirname(murl)
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            shard["name"] = shard["url"]
            shard["url"] = storage.join(base, shard["url"])
    return manifest
