"""Reading shards as the manifest describes them: ``ShardSource``, the base of the loader's datasets.

A shard is streamed from its first byte (tar has no random access): ``ShardSource.read_shard`` yields
a range of its samples and, when asked to verify, reads on to its end and checks it against its
manifest entry: size (when opened, under "skip"), sample count and sha256. ``ShardSource.decode_sample``
checks a sample (an image field, a label in range, an image that decodes) and applies the transform,
seeding torch's CPU generator with the sample's seed first. By default (``on_error="raise"``)
anything wrong is an error naming the shard and, where there is one, the sample:
``ManifestMismatchError`` for the shard, ``DataError`` for a sample. Under ``on_error="skip"`` a
problem is an ``ErrorReport``, and each planned sample a shard problem costs is a ``Lost`` in its
place, so a reader's positions stay aligned; the loader counts a ``Lost`` when a step needs it.

``cache_dir`` keeps verified copies of S3 shards, named by sha256: a reader that reads a shard to
its end copies it to a temporary file as it reads and publishes it once the shard checked out.
"""

from __future__ import annotations

import io
import os
import tarfile
import tempfile
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset
from torchvision.io import ImageReadMode, decode_image

from pipelines import storage
from pipelines.format import HashingReader, error_text, iter_tar, read_label
from pipelines.order import with_offsets

IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")


class DataError(RuntimeError):
    """A sample or shard that cannot be used (corrupt image, bad label, truncated tar)."""


class ManifestMismatchError(RuntimeError):
    """A shard that is missing or disagrees with the manifest (checksum, sample count)."""


@dataclass
class ErrorReport:
    """A skipped sample (``key``) or a problem with a shard (``key`` None); ``samples``: how many of
    this rank's samples it cost."""

    shard: str
    key: str | None
    reason: str
    samples: int = 1

    def __str__(self) -> str:
        return f"{self.shard}: sample {self.key!r}: {self.reason}" if self.key is not None else f"{self.shard}: {self.reason}"


@dataclass(frozen=True)
class Lost:
    """A planned sample that could not be read; counted by the reader whose step needs it."""

    shard: str
    reason: str


class _Tee:
    """Copy a stream into a cache temp file while it is read; ``publish`` renames it into place."""

    def __init__(self, stream: Any, final_path: str):
        self.stream = stream
        self.final_path = final_path
        fd, self.tmp_path = tempfile.mkstemp(dir=os.path.dirname(final_path), prefix=os.path.basename(final_path) + ".", suffix=".part")
        self.file = os.fdopen(fd, "wb")

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.file.write(data)
        return data

    def close(self) -> None:
        self.stream.close()
        if not self.file.closed:
            self.file.close()
        if os.path.exists(self.tmp_path):
            os.remove(self.tmp_path)

    def publish(self) -> None:
        self.file.close()
        os.replace(self.tmp_path, self.final_path)


class ShardSource(IterableDataset):
    """Reads shards and decodes samples, checking them against the manifest (module docstring)."""

    def __init__(self, manifest: dict, split: str, *, transform: Callable | None, decode: bool, cache_dir: str | None,
                 on_error: str, client_factory: Callable[[], Any], rank: int, world_size: int, num_workers: int,
                 epoch: int, seed: int):
        self.split = split
        self.shards = with_offsets(manifest["splits"][split]["shards"])
        self.num_classes = manifest["num_classes"]
        self.label_key = manifest.get("label_key", "cls")
        self.transform, self.decode = transform, decode
        self.cache_dir, self.on_error, self.client_factory = cache_dir, on_error, client_factory
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.epoch, self.seed = epoch, seed
        self._client = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_client"] = None  # boto3 clients do not cross processes; each worker makes its own
        return state

    def _client_for(self, url: str) -> Any:
        if not storage.is_s3(url):
            return None
        if self._client is None:
            self._client = self.client_factory()
        return self._client

    def _open(self, shard: dict, tee: bool) -> tuple[Any, str | None, int | None]:
        """(stream over the shard, cache path to fill or None, its size in bytes if known); from the
        cache when there. A shard that cannot be opened is a ``ManifestMismatchError`` naming it."""
        url = shard["url"]
        try:
            if self.cache_dir and storage.is_s3(url):
                cached = os.path.join(self.cache_dir, shard["sha256"] + ".tar")
                if os.path.exists(cached):
                    f = open(cached, "rb")
                    return f, None, os.fstat(f.fileno()).st_size
                os.makedirs(self.cache_dir, exist_ok=True)
                stream = storage.open_stream(url, self._client_for(url))
                return stream, cached if tee else None, stream.size
            stream = storage.open_stream(url, self._client_for(url))
        except storage.StorageError as err:
            raise ManifestMismatchError(f"{url}: shard listed in the manifest cannot be read ({err})") from err
        nbytes = os.fstat(stream.fileno()).st_size if hasattr(stream, "fileno") else stream.size
        return stream, None, nbytes

    def _report(self, shard: str, key: str | None, reason: str, samples: int = 1, *, shard_level: bool = False) -> ErrorReport:
        report = ErrorReport(shard, key, reason, samples)
        if self.on_error == "raise":
            raise (ManifestMismatchError if shard_level else DataError)(str(report))
        return report

    def _lose(self, url: str, reason: str, count: int) -> Iterator[ErrorReport | Lost]:
        """Under "raise": the error. Under "skip": the report (counting nothing yet) and a ``Lost`` for
        each of ``count`` planned samples."""
        yield self._report(url, None, reason, 0, shard_level=True)
        lost = Lost(url, reason)
        for _ in range(count):
            yield lost

    def read_shard(self, shard: dict, lo: int = 0, hi: int | None = None, *, mask: np.ndarray | None = None,
                   verify: bool = True) -> Iterator[tuple[str, int, str, dict] | ErrorReport | Lost]:
        """Samples ``lo .. hi-1`` of ``shard`` (those with ``mask[i]`` when a mask is given) as
        ``(url, index in split, key, fields)``, read from the shard's first byte. ``verify``: read on to
        its end and check sample count, size and sha256. Under "skip" each planned sample that cannot be
        read is a ``Lost`` (one per position, so a training reader stays aligned) and each problem an
        ``ErrorReport``; under "raise" a problem raises, naming the shard."""
        url, expected = shard["url"], shard["num_samples"]
        hi = expected if hi is None else hi
        try:
            stream, cache_path, nbytes = self._open(shard, tee=verify)
        except ManifestMismatchError as err:
            if self.on_error == "raise":
                raise
            yield from self._lose(url, f"{err}; whole shard skipped", hi - lo)
            return
        if nbytes is not None and nbytes != shard["bytes"] and self.on_error == "skip":
            stream.close()
            yield from self._lose(url, f"{nbytes} bytes, the manifest says {shard['bytes']}; whole shard skipped", hi - lo)
            return
        tee = _Tee(stream, cache_path) if cache_path else stream
        reader = HashingReader(tee) if verify else tee  # a partial read is not checked: no hashing
        count = 0
        key = None
        try:
            try:
                for key, fields in iter_tar(reader):
                    if count == expected:  # more samples than the manifest says
                        count += 1
                        break
                    if lo <= count < hi and (mask is None or mask[count]):
                        yield url, shard["offset"] + count, key, fields
                    count += 1
                    if count == hi and not verify:
                        return
            except (tarfile.TarError, EOFError, ValueError, storage.StorageError) as err:
                after = f"after sample {key!r}" if key is not None else "at its start"
                reason = f"truncated or corrupt tar {after} ({error_text(err)}); rest of shard lost"
                yield from self._lose(url, reason, max(0, hi - max(count, lo)))
                return
            if not verify:  # the tar ended before sample ``hi``
                reason = f"shard disagrees with the manifest: it ends after {count} samples (manifest: {expected} samples); rewrite the dataset"
                yield from self._lose(url, reason, hi - max(count, lo))
                return
            reader.drain()
            sha = reader.sha.hexdigest()
            if count != expected or reader.nbytes != shard["bytes"] or sha != shard["sha256"]:
                reason = (
                    f"shard disagrees with the manifest: {count} samples, {reader.nbytes} bytes, sha256 {sha[:12]}... "
                    f"(manifest: {expected} samples, {shard['bytes']} bytes, sha256 {shard['sha256'][:12]}...)"
                    f"{'; its samples that decoded were used' if self.on_error == 'skip' and count <= expected else ''}; rewrite the dataset"
                )
                yield from self._lose(url, reason, max(0, hi - max(count, lo)))
                return
            if cache_path:
                tee.publish()
        finally:
            if cache_path:
                tee.close()
            else:
                stream.close()

    def decode_sample(self, url: str, key: str, fields: dict, seed: int | None = None) -> tuple[Any, int] | ErrorReport:
        """(image, label) or the report of why not; ``seed``: torch's CPU generator is seeded with it
        right before ``transform`` runs, so the sample's random augmentation is keyed by it."""
        ext = next((e for e in IMAGE_FIELDS if e in fields), None)
        if ext is None:
            return self._report(url, key, f"no image field {list(IMAGE_FIELDS)} (has {sorted(fields)})")
        label = read_label(fields, self.label_key)
        if isinstance(label, str):
            return self._report(url, key, label)
        if not 0 <= label < self.num_classes:
            return self._report(url, key, f"label {label} outside [0, {self.num_classes})")
        if not self.decode:  # the bytes as stored, for a decoder downstream (on the GPU)
            return torch.frombuffer(bytearray(fields[ext]), dtype=torch.uint8), label
        try:
            image = decode_rgb(fields[ext], ext)
        except (RuntimeError, ValueError, OSError) as err:
            return self._report(url, key, f"corrupt {ext} image ({str(err).splitlines()[0][:120]})")
        if self.transform is None:
            return image, label
        if seed is not None:
            torch.default_generator.manual_seed(seed)
        return self.transform(image), label


def decode_rgb(data: bytes, ext: str) -> torch.Tensor:
    """uint8 (3, H, W). JPEG and WebP through torchvision (libjpeg-turbo: the fastest path here); PNG
    through Pillow, because torchvision 0.29's libpng error handler ends the whole process on a corrupt
    PNG ("libpng error: bad adaptive filter value", measured) instead of raising, so a damaged shard
    killed a loader process with no word of which shard, instead of being a `DataError` naming it."""
    if ext == "png":
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            return torch.from_numpy(np.asarray(im.convert("RGB"))).permute(2, 0, 1).contiguous()
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its decoders in favour of torchcodec (not a dependency)
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


def check_shards_exist(shards: list[dict], client: Any | None) -> None:
    """Every shard named by the manifest exists (one stat/HEAD each, in parallel)."""
    with ThreadPoolExecutor(max_workers=16) as pool:
        sizes = list(pool.map(lambda s: storage.size(s["url"], client), shards))
    missing = [s["url"] for s, n in zip(shards, sizes, strict=True) if n is None]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ManifestMismatchError(f"{missing[0]}{more}: shard listed in the manifest does not exist")
