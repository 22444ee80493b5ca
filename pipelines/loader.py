"""Read shards into ``(images, labels)`` batches for one DDP rank: ``make_loader``.

Who reads what, per epoch (all derived from the manifest, so every rank and worker agrees without
talking):

* Slots: rank ``r``'s data-loader worker ``w`` is slot ``w * world_size + r`` of
  ``world_size * max(num_workers, 1)`` (interleaved like ``DistributedSampler``).
* ``split_by="shard"``: the split's shards (shuffled by ``seed`` + ``epoch`` in training) are dealt
  to slots; each slot reads whole shards. ``"sample"``: every slot reads every shard and keeps the
  samples whose (per-epoch permuted) index falls in its slot: exact balance at the cost of reading
  each shard once per slot. The permutation is a keyed bijection computed per shard as it is read
  (``_permute``), so planning costs nothing per sample, however large the split. ``"auto"`` picks shard mode when there are at least 4 shards per slot or
  the shard count divides evenly among slots, else sample mode (the demo's few digit shards).
* Training (``shuffle=True``): every rank yields exactly ``len(loader) = (N // world_size) //
  batch_size`` full batches, N the split's sample count, so DDP never waits on a rank that ran
  dry. A slot that owns fewer samples than its quota (uneven shards, skipped bad samples) starts
  over on its own samples, reshuffled: those repeats are the only duplicates in an epoch. A slot
  that owns more stops at its quota. Order comes from shard shuffle + a sample shuffle buffer,
  both seeded by (seed, epoch, slot, pass).
* Evaluation (``shuffle=False``): every sample is read exactly once across all ranks; a rank's
  batches are full except its last; ``len()`` counts them (ranks may differ by one batch).

Workers build full batches; each worker's last partial batch goes to the main process, which merges
them, so batch boundaries do not waste samples per worker.

``decode=False`` skips decoding and the transform: batches hold the stored (encoded) image bytes,
for a decoder on the accelerator (``pipelines.make_batch_transform``). A worker packs a batch's bytes
into one buffer (``Encoded``), one shared-memory transfer per batch rather than one per image; the
loader hands out a list of 1-D uint8 tensors, views into that buffer.

Integrity: a shard is checked against its manifest entry as it streams (size when opened; sample
count and sha256 at its end), and every sample must decode and carry a label in range. By default
(``on_error="raise"``) anything wrong is an error naming the shard and, where there is one, the
sample: ``ManifestMismatchError`` for the shard, ``DataError`` for a sample. ``on_error="skip"``
(training only; evaluation always raises) skips instead and reports each loss as an
``ErrorReport`` (``loader.errors``, ``loader.skipped`` samples, one warning each): a shard whose size
differs is skipped whole before any of it is used; a tar that breaks mid-way loses the rest of its
samples; a shard whose bytes changed at the same size is reported once its hash is known (its
samples that decoded were used). Evaluation checks it yielded exactly the samples the manifest lists.

Shards are not checked for existence up front (that cost a stat/HEAD per shard, per epoch, per
rank); a missing shard fails its first read with an error naming it (``check_shards=True``
restores the up-front check, e.g. once per job in a driver).

The tar iteration is the ``webdataset`` library's (``pipelines.format.iter_tar``). Its pipeline
stages (``split_by_node``/``split_by_worker``, ``shuffle``, ``batched``) are not used: they cannot
promise equal batch counts per rank (DDP would hang) nor exactly-once evaluation, so the planning
and batching below are ours.
"""

from __future__ import annotations

import gc
import hashlib
import os
import tarfile
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.io import ImageReadMode, decode_image

from pipelines import storage
from pipelines.format import HashingReader, error_text, iter_tar, read_label, read_manifest

IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")
SPLIT_MODES = ("auto", "shard", "sample")
ON_ERROR = ("raise", "skip")


class DataError(RuntimeError):
    """A sample or shard that cannot be used (corrupt image, bad label, truncated tar)."""


class ManifestMismatchError(RuntimeError):
    """A shard that is missing or disagrees with the manifest (checksum, sample count)."""


@dataclass
class ErrorReport:
    """A skipped sample (``key``) or part of a shard (``key`` None); ``samples``: how many were lost."""

    shard: str
    key: str | None
    reason: str
    samples: int = 1

    def __str__(self) -> str:
        return f"{self.shard}: sample {self.key!r}: {self.reason}" if self.key is not None else f"{self.shard}: {self.reason}"


@dataclass
class _Batch:
    images: Any  # Tensor (B, ...) or tuple of Tensors
    labels: torch.Tensor
    keys: list[str]
    full: bool


def _mix(x: np.ndarray, key: int) -> np.ndarray:
    """A keyed 64-bit mixer (splitmix64's finaliser); uint64 arithmetic wraps, as meant."""
    x = (x ^ np.uint64(key)) * np.uint64(0x9E3779B97F4A7C15)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    return x ^ (x >> np.uint64(31))


def _permute(index: np.ndarray, total: int, keys: tuple[int, ...]) -> np.ndarray:
    """A keyed bijection of ``[0, total)`` evaluated at ``index`` (any subset): a 4-round Feistel
    network on the smallest even bit width that covers ``total``, cycle-walking values that land
    outside (fewer than 4 steps on average). Each shard's samples are permuted as it is read, so a
    38M-sample split costs no per-sample memory to plan."""
    half = max(1, ((max(total, 2) - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    shift = np.uint64(half)

    def feistel(x: np.ndarray) -> np.ndarray:
        left, right = x >> shift, x & mask
        for k in keys:
            left, right = right, left ^ (_mix(right, k) & mask)
        return (left << shift) | right

    y = feistel(index.astype(np.uint64))
    outside = y >= np.uint64(total)
    while outside.any():
        y[outside] = feistel(y[outside])
        outside = y >= np.uint64(total)
    return y


@dataclass(frozen=True)
class Selection:
    """Sample mode: a slot keeps global sample ``i`` when ``order(i) % slots == slot``, ``order`` the
    epoch's permutation in training (identity in evaluation): exactly balanced, never materialised."""

    total: int
    slots: int
    slot: int
    keys: tuple[int, ...] | None  # Feistel keys; None = identity

    def mask(self, offset: int, count: int) -> np.ndarray:
        index = np.arange(offset, offset + count, dtype=np.uint64)
        order = _permute(index, self.total, self.keys) if self.keys is not None else index
        return order % np.uint64(self.slots) == np.uint64(self.slot)

    def owned(self) -> int:
        return self.total // self.slots + (self.slot < self.total % self.slots)


@dataclass
class SlotPlan:
    """What one (rank, worker) slot reads in one epoch."""

    shards: list[dict]  # in read order
    keep: Selection | None  # sample mode: which samples are the slot's; None = every sample of the shards
    available: int  # samples it owns
    quota: int | None  # training: samples to yield (with wraparound); eval: None = each owned sample once


def _choose_mode(split_by: str, num_shards: int, slots: int) -> str:
    if split_by != "auto":
        return split_by
    return "shard" if num_shards >= 4 * slots or (num_shards >= slots and num_shards % slots == 0) else "sample"


def _quotas(available: list[int], total: int) -> list[int]:
    """Split ``total`` samples among workers: at most what each owns while that suffices,
    proportionally; the excess (wraparound) proportionally to what each owns."""
    owned = sum(available)
    if owned == 0:
        return [0] * len(available)
    if total >= owned:
        extra = [(total - owned) * a // owned for a in available]
        quotas = [a + e for a, e in zip(available, extra, strict=True)]
        order = sorted(range(len(available)), key=lambda w: -available[w])
        for i in range(total - sum(quotas)):
            quotas[order[i % len(order)]] += 1
        return quotas
    quotas = [total * a // owned for a in available]
    while sum(quotas) < total:
        w = max(range(len(available)), key=lambda w: available[w] - quotas[w])
        quotas[w] += 1
    return quotas


def _with_offsets(shards: list[dict]) -> list[dict]:
    """The shards with ``offset`` (index of their first sample in the split): as given when they have
    it (``make_loader`` sets it on every shard at once), else copies; no per-epoch copy of a 30,000-shard list."""
    if not shards or ("offset" in shards[0] and "offset" in shards[-1]):
        return shards
    offsets = np.cumsum([0] + [s["num_samples"] for s in shards])
    return [dict(s, offset=int(o)) for s, o in zip(shards, offsets[:-1].tolist(), strict=True)]


def plan_epoch(
    shards: list[dict],
    *,
    rank: int,
    world_size: int,
    num_workers: int,
    epoch: int,
    seed: int,
    train: bool,
    batch_size: int,
    split_by: str = "auto",
) -> list[SlotPlan]:
    """The plans of rank ``rank``'s workers for one epoch (pure function of the manifest + arguments)."""
    workers = max(num_workers, 1)
    slots = world_size * workers
    shards = _with_offsets(shards)
    total = shards[-1]["offset"] + shards[-1]["num_samples"] if shards else 0
    mode = _choose_mode(split_by, len(shards), slots)
    rng = np.random.default_rng([seed, epoch])
    order = [int(i) for i in rng.permutation(len(shards))] if train else list(range(len(shards)))
    my_slots = [w * world_size + rank for w in range(workers)]
    plans: list[SlotPlan] = []
    if mode == "shard":
        for slot in my_slots:
            mine = [shards[i] for i in order[slot::slots]]
            plans.append(SlotPlan(mine, None, sum(s["num_samples"] for s in mine), None))
    else:
        keys = tuple(int(k) for k in rng.integers(0, 2**63, size=4)) if train else None
        ordered = [shards[i] for i in order]
        for slot in my_slots:
            keep = Selection(total, slots, slot, keys)
            plans.append(SlotPlan(ordered, keep, keep.owned(), None))
    if train:
        per_rank = (total // world_size) // batch_size * batch_size
        for plan, quota in zip(plans, _quotas([p.available for p in plans], per_rank), strict=True):
            plan.quota = quota
    return plans


@dataclass
class Encoded:
    """Encoded images back to back in one uint8 buffer; ``lengths[i]`` bytes each."""

    data: torch.Tensor
    lengths: torch.Tensor  # int64 (B,)

    @classmethod
    def pack(cls, blobs: list[torch.Tensor]) -> Encoded:
        return cls(torch.cat(blobs), torch.tensor([len(b) for b in blobs], dtype=torch.int64))

    def __len__(self) -> int:
        return len(self.lengths)

    def unpack(self) -> list[torch.Tensor]:
        return list(torch.split(self.data, self.lengths.tolist()))

    def pin_memory(self) -> Encoded:  # DataLoader(pin_memory=True) calls this
        return Encoded(self.data.pin_memory(), self.lengths)


def _stack(items: list) -> Any:
    if isinstance(items[0], tuple):
        return tuple(torch.stack(list(col)) for col in zip(*items, strict=True))
    return torch.stack(items)


def _cat(parts: list) -> Any:
    if isinstance(parts[0], Encoded):
        return Encoded(torch.cat([p.data for p in parts]), torch.cat([p.lengths for p in parts]))
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(list(col)) for col in zip(*parts, strict=True))
    return torch.cat(parts)


def _slice(images: Any, start: int, stop: int) -> Any:
    if isinstance(images, Encoded):
        offsets = [0, *torch.cumsum(images.lengths, 0).tolist()]
        return Encoded(images.data[offsets[start] : offsets[stop]], images.lengths[start:stop])
    if isinstance(images, tuple):
        return tuple(x[start:stop] for x in images)
    return images[start:stop]


def _identity(item: Any) -> Any:
    return item


class ShardStream(IterableDataset):
    """Runs in each DataLoader worker: read its slot's shards, shuffle, decode, transform, batch."""

    def __init__(
        self,
        manifest: dict,
        split: str,
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        num_workers: int,
        epoch: int,
        seed: int,
        train: bool,
        transform: Callable | None,
        shuffle_buffer: int,
        cache_dir: str | None,
        on_error: str,
        split_by: str,
        client_factory: Callable[[], Any],
        decode: bool = True,
    ):
        self.split = split
        self.shards = _with_offsets(manifest["splits"][split]["shards"])
        self._plans: tuple[int, list[SlotPlan]] | None = None
        self.num_classes = manifest["num_classes"]
        self.label_key = manifest.get("label_key", "cls")
        self.batch_size = batch_size
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.epoch, self.seed, self.train = epoch, seed, train
        self.transform = transform
        self.decode = decode
        self.shuffle_buffer = shuffle_buffer
        self.cache_dir = cache_dir
        self.on_error = on_error
        self.split_by = split_by
        self.client_factory = client_factory
        self._client = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_client"] = None  # boto3 clients do not cross processes; each worker makes its own
        return state

    def plans(self) -> list[SlotPlan]:
        """This rank's plans for the current epoch, computed once (forked workers inherit them)."""
        if self._plans is not None and self._plans[0] == self.epoch:
            return self._plans[1]
        plans = plan_epoch(
            self.shards,
            rank=self.rank,
            world_size=self.world_size,
            num_workers=self.num_workers,
            epoch=self.epoch,
            seed=self.seed,
            train=self.train,
            batch_size=self.batch_size,
            split_by=self.split_by,
        )
        self._plans = (self.epoch, plans)
        return plans

    # -- reading -----------------------------------------------------------------------------------

    def _client_for(self, url: str) -> Any:
        if not storage.is_s3(url):
            return None
        if self._client is None:
            self._client = self.client_factory()
        return self._client

    def _open(self, shard: dict) -> tuple[Any, str | None, int | None]:
        """(stream over the shard, cache temp path or None, its size in bytes if known); from the
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
                return stream, cached, stream.size
            stream = storage.open_stream(url, self._client_for(url))
        except storage.StorageError as err:
            raise ManifestMismatchError(f"{url}: shard listed in the manifest cannot be read ({err})") from err
        nbytes = os.fstat(stream.fileno()).st_size if hasattr(stream, "fileno") else stream.size
        return stream, None, nbytes

    def _read_shard(self, shard: dict, keep: Selection | None, report: bool = True) -> Iterator[tuple[str, str, dict] | ErrorReport]:
        """The slot's samples of one shard, checked against the manifest entry (see the module
        docstring); ``report=False`` (a wraparound pass) drops reports already made in the first."""
        url = shard["url"]
        expected = shard["num_samples"]
        mask = keep.mask(shard["offset"], expected) if keep is not None else None
        mine = int(mask.sum()) if mask is not None else expected
        if mine == 0:
            return
        try:
            stream, cache_path, nbytes = self._open(shard)
        except ManifestMismatchError as err:
            if self.on_error == "raise":
                raise
            if report:
                yield ErrorReport(url, None, f"{err}; whole shard skipped", mine)
            return
        if nbytes is not None and nbytes != shard["bytes"] and self.on_error == "skip":
            stream.close()
            if report:
                yield ErrorReport(url, None, f"{nbytes} bytes, the manifest says {shard['bytes']}; whole shard skipped", mine)
            return
        tee = _Tee(stream, cache_path) if cache_path else stream
        reader = HashingReader(tee)
        count = used = 0
        key = None
        try:
            try:
                for key, fields in iter_tar(reader):
                    if count == expected:  # more samples than the manifest says
                        count += 1
                        break
                    if mask is None or mask[count]:
                        used += 1
                        yield url, key, fields
                    count += 1
            except (tarfile.TarError, EOFError, ValueError, storage.StorageError) as err:
                after = f"after sample {key!r}" if key is not None else "at its start"
                item = self._report(url, None, f"truncated or corrupt tar {after} ({error_text(err)}); rest of shard lost", mine - used, shard_level=True)
                if report:
                    yield item
                return
            reader.drain()
            sha = reader.sha.hexdigest()
            if count != expected or reader.nbytes != shard["bytes"] or sha != shard["sha256"]:
                item = self._report(
                    url,
                    None,
                    f"shard disagrees with the manifest: {count} samples, {reader.nbytes} bytes, sha256 {sha[:12]}... "
                    f"(manifest: {expected} samples, {shard['bytes']} bytes, sha256 {shard['sha256'][:12]}...)"
                    f"{'; its samples that decoded were used' if self.on_error == 'skip' and count <= expected else ''}; rewrite the dataset",
                    max(0, mine - used),
                    shard_level=True,
                )
                if report:
                    yield item
                return
            if cache_path:
                tee.publish()
        finally:
            if cache_path:
                tee.close()
            else:
                stream.close()

    def _report(self, shard: str, key: str | None, reason: str, samples: int = 1, *, shard_level: bool = False) -> ErrorReport:
        report = ErrorReport(shard, key, reason, samples)
        if self.on_error == "raise":
            raise (ManifestMismatchError if shard_level else DataError)(str(report))
        return report

    def _decode(self, url: str, key: str, fields: dict) -> tuple[Any, int] | ErrorReport:
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
            with warnings.catch_warnings():
                # torchvision 0.29 deprecates its decoders in favour of torchcodec (not a dependency);
                # they remain the fastest JPEG/PNG path here (libjpeg-turbo, no PIL round trip)
                warnings.simplefilter("ignore", DeprecationWarning)
                image = decode_image(torch.frombuffer(bytearray(fields[ext]), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except (RuntimeError, ValueError) as err:
            return self._report(url, key, f"corrupt {ext} image ({str(err).splitlines()[0][:120]})")
        return (self.transform(image) if self.transform is not None else image), label

    def _samples(self, plan: SlotPlan, slot: int, rounds: int | None) -> Iterator[tuple[str, str, dict] | ErrorReport]:
        """Raw samples of the slot, shuffled in training; ``rounds`` passes (None: until stopped)."""
        round_ = 0
        while rounds is None or round_ < rounds:
            rng = np.random.default_rng([self.seed, self.epoch, slot, round_])
            shards = plan.shards
            if self.train and round_ > 0:
                shards = [shards[i] for i in rng.permutation(len(shards))]
            buffer: list = []
            good = 0
            for shard in shards:
                for item in self._read_shard(shard, plan.keep, report=round_ == 0):
                    if isinstance(item, ErrorReport) or not self.train or self.shuffle_buffer <= 0:
                        good += not isinstance(item, ErrorReport)
                        yield item
                        continue
                    good += 1
                    if len(buffer) < self.shuffle_buffer:
                        buffer.append(item)
                        continue
                    i = int(rng.integers(len(buffer)))
                    buffer[i], item = item, buffer[i]
                    yield item
            rng.shuffle(buffer)
            yield from buffer
            if self.train and good == 0:
                raise DataError(f"slot {slot}: no readable sample in {len(shards)} shard(s) (first: {shards[0]['url'] if shards else '-'})")
            round_ += 1

    def __iter__(self) -> Iterator[_Batch | ErrorReport]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        plan = self.plans()[worker]
        slot = worker * self.world_size + self.rank
        if not plan.shards or (self.train and not plan.quota) or plan.available == 0:
            return
        quota = plan.quota if self.train else None
        images: list = []
        labels: list[int] = []
        keys: list[str] = []
        produced = 0
        reported: set[tuple[str, str]] = set()
        for item in self._samples(plan, slot, rounds=None if self.train else 1):
            if isinstance(item, ErrorReport):
                yield item
                continue
            url, key, fields = item
            decoded = self._decode(url, key, fields)
            if isinstance(decoded, ErrorReport):
                if (url, key) not in reported:  # a wraparound pass meets it again: count it once
                    reported.add((url, key))
                    yield decoded
                continue
            images.append(decoded[0])
            labels.append(decoded[1])
            keys.append(key)
            produced += 1
            if len(images) == self.batch_size:
                yield _Batch(self._collate(images), torch.tensor(labels), keys, True)
                images, labels, keys = [], [], []
            if quota is not None and produced == quota:
                break
        if images:
            yield _Batch(self._collate(images), torch.tensor(labels), keys, False)

    def _collate(self, images: list) -> Any:
        return _stack(images) if self.decode else Encoded.pack(images)


class _Tee:
    """Copy a stream into a cache temp file while it is read; ``publish`` renames it into place."""

    def __init__(self, stream: Any, final_path: str):
        self.stream = stream
        self.final_path = final_path
        self.tmp_path = f"{final_path}.{os.getpid()}.part"
        self.file = open(self.tmp_path, "wb")

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.file.write(data)
        return data

    def close(self) -> None:
        self.stream.close()
        if not self.file.closed:
            self.file.close()
        if os.path.exists(self.tmp_path) and not os.path.exists(self.final_path):
            os.remove(self.tmp_path)

    def publish(self) -> None:
        self.file.close()
        os.replace(self.tmp_path, self.final_path)


class ShardLoader:
    """Iterable of ``(images, labels)`` (or ``(images, labels, keys)``) batches for one rank.

    ``len()`` is this rank's batch count per epoch. ``set_epoch(e)`` picks the epoch's order.
    ``errors`` lists what the last iteration skipped (``ErrorReport``s; ``on_error="skip"`` only),
    ``skipped`` the samples lost with them. ``num_samples``: samples this rank yields per epoch;
    ``split_samples``: the split's count in the manifest (all ranks together read it once in evaluation).
    """

    def __init__(self, dataset: ShardStream, *, num_workers: int, with_keys: bool, pin_memory: bool, prefetch_factor: int, manifest: dict, url: str):
        self.dataset = dataset
        self.num_workers = num_workers
        self.with_keys = with_keys
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        self.manifest = manifest
        self.url = url
        self.errors: list[ErrorReport] = []
        self.split_samples = int(manifest["splits"][dataset.split]["num_samples"])
        self._yielded = 0
        plans = dataset.plans()
        self.num_samples = sum(p.quota if dataset.train else p.available for p in plans)
        bs = dataset.batch_size
        self._len = self.num_samples // bs if dataset.train else -(-self.num_samples // bs)

    @property
    def epoch(self) -> int:
        return self.dataset.epoch

    def set_epoch(self, epoch: int) -> None:
        self.dataset.epoch = epoch

    def __len__(self) -> int:
        return self._len

    @property
    def skipped(self) -> int:
        """Samples the last iteration skipped (bad samples, and the samples of skipped shard parts)."""
        return sum(e.samples for e in self.errors)

    def _out(self, images: Any, labels: torch.Tensor, keys: list[str]) -> tuple:
        self._yielded += len(labels)
        if isinstance(images, Encoded):
            images = images.unpack()
        return (images, labels, keys) if self.with_keys else (images, labels)

    def __iter__(self) -> Iterator[tuple]:
        ds = self.dataset
        bs = ds.batch_size
        generator = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(f"{ds.seed}/{ds.epoch}/{ds.rank}".encode()).digest()[:7], "little"))
        loader = DataLoader(
            ds,
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=_identity,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor if self.num_workers else None,
            generator=generator,  # seeds the workers' torch RNG: augmentation repeats with (seed, epoch, rank)
        )
        self.errors = []
        self._yielded = 0
        parts: list[_Batch] = []
        pending = 0
        # The workers fork here. Frozen, the manifest's objects (30,000 shard entries) are never scanned
        # by the workers' garbage collector, so their pages are not copied into each worker (gc.freeze's
        # documented use); unfrozen again in this process right after.
        gc.freeze()
        try:
            batches = iter(loader)
        finally:
            gc.unfreeze()
        for item in batches:
            if isinstance(item, ErrorReport):
                self.errors.append(item)
                warnings.warn(f"skipped {item.samples} sample(s): {item}", RuntimeWarning, stacklevel=2)
                continue
            if item.full:
                yield self._out(item.images, item.labels, item.keys)
                continue
            parts.append(item)
            pending += len(item.keys)
            while pending >= bs:
                yield from self._merge(parts, bs)
                pending = sum(len(p.keys) for p in parts)
        if parts and not ds.train:
            yield from self._merge(parts, None)
        if not ds.train and self._yielded != self.num_samples:  # evaluation: each of this rank's samples exactly once
            raise DataError(f"{self.url}: rank {ds.rank} read {self._yielded} samples of split {ds.split!r}, planned {self.num_samples}")

    def _merge(self, parts: list[_Batch], bs: int | None) -> Iterator[tuple]:
        """Yield one batch of ``bs`` (all, if None) from the front of ``parts``; keep the rest there."""
        images = _cat([p.images for p in parts])
        labels = torch.cat([p.labels for p in parts])
        keys = [k for p in parts for k in p.keys]
        n = len(keys) if bs is None else bs
        parts.clear()
        if n < len(keys):
            parts.append(_Batch(_slice(images, n, len(keys)), labels[n:], keys[n:], False))
        yield self._out(_slice(images, 0, n), labels[:n], keys[:n])


def _check_shards(shards: list[dict], client: Any | None) -> None:
    """Every shard named by the manifest exists (one stat/HEAD each, in parallel)."""
    with ThreadPoolExecutor(max_workers=16) as pool:
        sizes = list(pool.map(lambda s: storage.size(s["url"], client), shards))
    missing = [s["url"] for s, n in zip(shards, sizes, strict=True) if n is None]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ManifestMismatchError(f"{missing[0]}{more}: shard listed in the manifest does not exist")


def make_loader(
    url: str,
    split: str,
    batch_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 2,
    epoch: int = 0,
    seed: int = 0,
    transform: Callable | None = None,
    shuffle: bool | None = None,
    shuffle_buffer: int = 1000,
    cache_dir: str | None = None,
    on_error: str = "raise",
    with_keys: bool = False,
    split_by: str = "auto",
    check_shards: bool = False,
    pin_memory: bool = False,
    prefetch_factor: int = 2,
    client_factory: Callable[[], Any] | None = None,
    decode: bool = True,
) -> ShardLoader:
    """A loader over ``split`` of the shards at ``url`` (a folder or ``s3://bucket/prefix``) for one rank.

    Yields ``(images, labels)`` — or ``(images, labels, keys)`` with ``with_keys`` — where images are
    ``transform``'s output stacked along dim 0 (uint8 ``(B, C, H, W)`` when ``transform`` is None:
    the stored pixels, all images must share a size). ``shuffle`` defaults to ``split == "train"`` and
    selects training semantics (equal batch counts per rank, drop-last, wraparound) or evaluation
    semantics (every sample once). See the module docstring for how work is divided.
    ``cache_dir`` keeps verified copies of S3 shards, named by sha256. ``client_factory`` makes the
    boto3 client in each worker (default ``storage.make_s3_client``). ``decode=False``: images are a
    list of 1-D uint8 tensors, the encoded bytes as stored (``transform`` must be None); decode them
    with ``pipelines.make_batch_transform``. ``pin_memory``: page-locked batches, for non-blocking
    copies to the GPU. ``on_error``: ``"raise"`` (default) or ``"skip"`` bad samples and shards,
    counted in ``loader.errors``/``loader.skipped`` (training only: evaluation always raises).
    ``check_shards``: stat/HEAD every shard now rather than fail at the first read of a missing one.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error={on_error!r}; valid: {list(ON_ERROR)}")
    if split_by not in SPLIT_MODES:
        raise ValueError(f"split_by={split_by!r}; valid: {list(SPLIT_MODES)}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, world_size={world_size})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not decode and transform is not None:
        raise ValueError("decode=False yields encoded bytes: a per-image transform cannot apply (use a batch transform)")
    client_factory = client_factory or storage.make_s3_client
    client = client_factory() if storage.is_s3(url) else None
    manifest = read_manifest(url, client)
    if split not in manifest["splits"]:
        raise ValueError(f"{url}: no split {split!r}; valid: {list(manifest['splits'])}")
    shards = manifest["splits"][split]["shards"]
    for shard, offset in zip(shards, np.cumsum([0] + [s["num_samples"] for s in shards])[:-1].tolist(), strict=True):
        shard["offset"] = offset  # in place: the manifest was read for this loader
    if check_shards:
        _check_shards(shards, client)
    train = split == "train" if shuffle is None else shuffle
    if not train:
        on_error = "raise"  # an evaluation that skipped samples would report a wrong error rate
    total = manifest["splits"][split]["num_samples"]
    if train and total // world_size < batch_size:
        raise ValueError(f"{url}: split {split!r} has {total} samples, fewer than batch_size {batch_size} per rank x {world_size} ranks")
    if _choose_mode(split_by, len(shards), world_size * max(num_workers, 1)) == "shard" and train and len(shards) < world_size:
        raise ValueError(f"{url}: {len(shards)} shard(s) cannot feed {world_size} ranks by shard; use split_by='sample'")
    dataset = ShardStream(
        manifest,
        split,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        epoch=epoch,
        seed=seed,
        train=train,
        transform=transform,
        shuffle_buffer=shuffle_buffer if train else 0,
        cache_dir=cache_dir,
        on_error=on_error,
        split_by=split_by,
        client_factory=client_factory,
        decode=decode,
    )
    return ShardLoader(dataset, num_workers=num_workers, with_keys=with_keys, pin_memory=pin_memory, prefetch_factor=prefetch_factor, manifest=manifest, url=url)
