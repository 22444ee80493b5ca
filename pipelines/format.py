"""The shard format: tar files of samples (webdataset layout) and ``manifest.json``.

Each sample is ``<key>.jpg`` or ``<key>.png`` (the encoded image) and ``<key>.cls`` (the integer
label as text), consecutive in the tar. ``URL/manifest.json`` lists, per split, every shard with its
sample count, size and sha256 (names relative to URL, or absolute URLs for shards kept elsewhere),
and the class names, image size and the train split's per-channel mean/std in [0, 1] units.
``label_key`` (default ``cls``) says where the label is: ``cls``, or ``json:FIELD`` for a field of
the sample's ``json``. ``pipelines.writer`` writes it, ``pipelines.shards index`` writes it for
shards made elsewhere, ``pipelines.loader`` reads it.

Tars are written and read with the ``webdataset`` library (``TarWriter``; ``tar_file_iterator`` +
``group_by_keys``), so any WebDataset reader reads ours and ours reads theirs.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterator
from typing import IO, Any

import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_iterator

from pipelines import storage

MANIFEST = "manifest.json"
FORMAT = "resnet-orchestrator-shards/1"


# -- the tar format -------------------------------------------------------------------------------


def member_bytes(name: str, size: int) -> int:
    """Bytes a member takes in a tar: header, data padded to 512, long-name blocks if any."""
    blocks = 1 + -(-size // 512)
    if len(name.encode()) > 99 or not name.isascii():  # PAX extended header: a header and "NN path=NAME\n", padded
        blocks += 1 + -(-(len(name.encode()) + 16) // 512)
    return blocks * 512


def tar_bytes(members: int) -> int:
    """File size of a tar whose members take ``members`` bytes: two end blocks, padded to 10 KiB records."""
    return -(-(members + 1024) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def write_tar(path: str, samples: list[tuple[str, bytes, str, int]]) -> str:
    """Write ``(key, image bytes, ext, label)`` samples to a tar at ``path``; return its sha256.

    webdataset's ``TarWriter`` with fixed metadata (mtime 0, no owner names): the same samples give
    the same bytes, hence the same sha256 on a rerun. (Its ``format`` argument does not reach
    ``tarfile.open``, so members are in tarfile's default PAX format; ``member_bytes`` allows for it.)
    """
    with open(path, "wb") as f, wds.TarWriter(f, encoder=False, mtime=0, user="", group="", mode=0o644) as tar:
        for key, data, ext, label in samples:
            tar.write({"__key__": key, ext: data, "cls": str(label).encode()})
    return storage.file_sha256(path)


def split_name(name: str) -> tuple[str, str]:
    """``a/b.c.d`` -> (``a/b``, ``c.d``): the key ends at the first dot of the base name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


class HashingReader(io.RawIOBase):
    """Passes reads through and hashes every byte, so a streamed shard is checked without a second read."""

    def __init__(self, stream: Any):
        super().__init__()
        self.stream = stream
        self.sha = hashlib.sha256()
        self.nbytes = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.sha.update(data)
        self.nbytes += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def _reraise(err: Exception) -> bool:
    raise err


def iter_tar(stream: IO[bytes] | Any) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Stream ``(key, {ext: bytes})`` samples from a tar stream (no seeking, no temp file), with
    webdataset's own iteration and grouping (the key ends at the first dot of the base name).

    Raises ``tarfile.TarError``, ``EOFError`` or ``ValueError`` (a name twice in one sample) on a
    truncated or corrupt archive.
    """
    # 1 MiB reads: tarfile reads 10 KiB at a time, and an S3 body read in such pieces costs a call each
    buffered = stream if isinstance(stream, io.BufferedReader) else io.BufferedReader(_Raw(stream), 1 << 20)
    files = ({**f, "__url__": ""} for f in tar_file_iterator(buffered, handler=_reraise))
    for sample in group_by_keys(files, handler=_reraise):
        yield sample["__key__"], {k: v for k, v in sample.items() if not k.startswith("__")}


class _Raw(io.RawIOBase):
    """Any object with ``read(n)`` as a raw stream, for ``io.BufferedReader``."""

    def __init__(self, stream: Any):
        super().__init__()
        self.stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.stream.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


LABEL_KEYS = ("cls", "json:FIELD")


def check_label_key(label_key: str) -> str:
    """``label_key`` itself if valid (``cls`` or ``json:FIELD``), else a ValueError naming the valid forms."""
    kind, sep, field = label_key.partition(":")
    if label_key == "cls" or (kind == "json" and sep and field):
        return label_key
    raise ValueError(f"label key {label_key!r}; valid: {', '.join(LABEL_KEYS)} (e.g. json:label)")


def read_label(fields: dict[str, bytes], label_key: str = "cls") -> int | str:
    """The sample's integer label, or a string saying why there is none."""
    if label_key == "cls":
        raw = fields.get("cls")
        if raw is None:
            return f"missing label: no 'cls' (has {sorted(fields)})"
        try:
            return int(raw.decode().strip())
        except (ValueError, UnicodeDecodeError):
            return f"unreadable label {raw[:40]!r} in 'cls'"
    name = label_key.partition(":")[2]
    raw = fields.get("json")
    if raw is None:
        return f"missing label: no 'json' (has {sorted(fields)})"
    try:
        value = json.loads(raw)[name]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return f"missing or unreadable label: no integer field {name!r} in 'json' {raw[:60]!r}"
    if isinstance(value, bool) or not isinstance(value, int):
        return f"label {value!r} in json field {name!r} is not an integer"
    return value


def error_text(err: BaseException) -> str:
    """The first line of an error from the tar reader, without the stream repr webdataset appends."""
    text = str(err.args[0]) if err.args else type(err).__name__
    return text.split(" @ ")[0].splitlines()[0][:200] or type(err).__name__


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
    except storage.StorageError as err:
        if murl.endswith(MANIFEST) and storage.size(murl, client) is None:  # shards from elsewhere have none yet
            raise storage.StorageError(
                f"{err}; WebDataset shards written elsewhere need one first: python -m pipelines.shards index "
                f"--split train='{murl[: -len(MANIFEST)]}train-{{000000..000009}}.tar' ... --out {url}"
            ) from err
        raise
    if manifest.get("format") != FORMAT or "splits" not in manifest:
        raise storage.StorageError(f"{murl}: not a {FORMAT} manifest")
    manifest.setdefault("label_key", "cls")
    base = murl.rsplit("/", 1)[0] if storage.is_s3(murl) else os.path.dirname(murl)
    prefix = base.rstrip("/") + "/" if base else ""
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            name = shard["name"] = shard["url"]
            # relative names (the common case) by concatenation: join() per shard costs 3 us x 30,000
            absolute = name.startswith(("s3://", "/"))
            shard["url"] = storage.join(base, name) if absolute else prefix + name
    return manifest
