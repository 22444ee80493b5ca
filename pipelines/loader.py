"""Read shards into batches for one DDP rank: ``make_loader``.

Training (``shuffle=True``, the default for split "train")::

    loader = make_loader(url, "train", global_batch_size=G, rank=r, world_size=W, num_workers=n,
                         epoch=e, seed=s, start_step=k, transform=t)
    for images, labels in loader: ...            # len(loader) == loader.steps_per_epoch - k on every rank

* Global step ``t`` trains the same samples whatever ``W`` and ``n`` (``pipelines.order``: the plan,
  ``TrainPlan``/``step_samples``, reads no data). Rank ``r``'s batch is positions
  ``[R_r, R_{r+1})`` of the global batch, ``R_r = r*(G//W) + min(r, G%W)``: shares differ by at
  most one. A ``batch_size`` (per rank) instead of ``global_batch_size`` means ``G = batch_size * W``.
* ``loader.steps_per_epoch = N // G`` (drop-last); every rank yields ``len(loader)`` batches.
* ``start_step=k`` yields exactly what an uninterrupted epoch yields from step ``k`` on. Each stream
  the reader reads starts at the block holding its step-``k`` sample: the shard holding that block's
  start is read from byte 0 to there (tar has no random access) without decoding, and the block's
  samples of earlier steps are read but not kept. No sample of an earlier step is decoded.
* Augmentation: before ``transform`` runs on a sample, the loader seeds torch's default CPU
  generator with ``order.sample_seed(seed, epoch, index)`` (index: the sample's place in the split),
  so every random per-image op (crop, flip, lighting, any v2 transform) draws the same numbers on any
  ``W`` and ``n``. With ``num_workers=0`` this runs in the caller's process, inside
  ``torch.random.fork_rng``: the caller's RNG state is left as it was.
* ``decode=False`` (decode on the GPU): ``images`` is a ``SeededImages``, a ``list`` of 1-D uint8
  tensors (the stored bytes) with a ``seeds`` attribute, an int64 tensor of the images' seeds.
  ``BatchTransform.__call__(images)`` (``pipelines.make_batch_transform``) draws each image's crop,
  flip and lighting from ``torch.Generator().manual_seed(seed)`` when ``seeds`` is there.
* ``on_error="skip"``: a bad sample, or the samples of a shard part that cannot be read, are left out
  of their step: that rank's batch of that step is smaller (it may be empty: ``images`` then has
  length 0), the step counts stay equal on every rank. ``loader.errors`` lists one ``ErrorReport``
  per problem (its ``samples``: how many of this rank's samples it cost), ``loader.skipped`` their sum
  (summed over ranks it counts each lost sample once).

How it reads. A reader is one loader process (``max(n, 1)`` per rank). It reads the streams its
positions touch (``order.TrainPlan.pieces``), each sequentially from shard to shard, one block in
memory per stream, and yields one part per step, possibly empty. PyTorch hands out the items of an
``IterableDataset``'s workers round-robin and in order, so the rank's main process takes ``n`` items
per step and concatenates them: reader ranges are contiguous and ascending, so that is the canonical order.

* Open shards per loader process: one per stream it reads, about ``S / (W * n)`` plus one (S = 64
  streams by default: 32 at W=1, n=2; 4 at W=8, n=2): with S3, one connection each (the default
  client's pool is sized for them).
* Memory per rank: the encoded samples of one block per stream, about ``shuffle_buffer / W`` samples
  (110 MB at ImageNet's 110 kB per JPEG, W=1, shuffle_buffer 1000), ``prefetch_factor`` decoded steps
  per loader process, and a 1 MiB read buffer per open shard.
* Shard reads per epoch: a stream opens each shard of its segment; a shard cut by a segment
  boundary is opened by both streams, and a stream cut by a reader boundary is read by both readers
  (``order.TrainPlan.reads`` counts them; BENCHMARKS.md has the numbers for an ImageNet-sized split).

Evaluation (``shuffle=False``; the default for other splits): every sample is read exactly once across
all ranks (``order.plan_eval``); a rank's batches are full except its last; ``len()`` counts them
(ranks may differ by one batch). Loader processes build full batches; each one's last partial batch
goes to the main process, which merges them. The loader checks it yielded exactly the samples planned.
``decode=False`` yields plain lists of encoded images.

Integrity (``pipelines.reading``). A shard is checked against its manifest entry as it streams: its size when opened (under
"skip"; under "raise" the count check below names what differs), and its sample count and sha256 by
the reader whose range reaches its end (that reader read it from byte 0 anyway), or whose range ends
where the drop-last tail cuts it. Every sample used must decode and carry a label in range. By default
(``on_error="raise"``) anything wrong is an error naming the shard and, where there is one, the
sample: ``ManifestMismatchError`` for the shard, ``DataError`` for a sample. Under ``on_error="skip"``
(training only; evaluation always raises): a shard whose size differs, or that cannot be opened, is
skipped whole before any of it is used; a tar that breaks mid-way loses the rest of its samples; a
shard whose bytes changed at the same size is reported once its hash is known (its samples that
decoded were used). Shards are not checked for existence up front (a stat/HEAD per shard, per epoch,
per rank); a missing shard fails its first read with an error naming it (``check_shards=True``
restores the up-front check). ``cache_dir`` keeps verified copies of S3 shards, named by sha256, written
by the readers that read a shard to its end.

The tar iteration is the ``webdataset`` library's (``pipelines.format.iter_tar``); its pipeline
stages (``split_by_node``, ``shuffle``, ``batched``) are not used: they cannot promise equal step counts
per rank, a world-size-free order, or exactly-once evaluation.

Layout: the plan is ``pipelines.order``, shard reading and checking ``pipelines.reading``; this module
keeps the two datasets (``TrainStream``, ``EvalStream``) beside ``ShardLoader``, whose two iteration
paths take exactly what they yield (one part per step; full and partial batches). About 540 lines of code.
"""

from __future__ import annotations

import functools
import gc
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, get_worker_info

from pipelines import storage
from pipelines.format import read_manifest
from pipelines.order import (
    DEFAULT_STREAMS,
    SPLIT_MODES,
    SlotPlan,
    TrainPlan,
    _key,
    plan_eval,
    rank_range,
    sample_seeds,
)
from pipelines.reading import (
    DataError,
    ErrorReport,
    Lost,
    ShardSource,
    check_shards_exist,
)

ON_ERROR = ("raise", "skip")


class SeededImages(list):
    """Encoded images (1-D uint8 tensors) and ``seeds``, an int64 tensor: each image's augmentation seed."""

    def __init__(self, images: list, seeds: torch.Tensor):
        super().__init__(images)
        self.seeds = seeds


@dataclass
class Encoded:
    """Encoded images back to back in one uint8 buffer; ``lengths[i]`` bytes each."""

    data: torch.Tensor
    lengths: torch.Tensor  # int64 (B,)

    @classmethod
    def pack(cls, blobs: list[torch.Tensor]) -> Encoded:
        if not blobs:
            return cls(torch.zeros(0, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64))
        return cls(torch.cat(blobs), torch.tensor([len(b) for b in blobs], dtype=torch.int64))

    def __len__(self) -> int:
        return len(self.lengths)

    def unpack(self) -> list[torch.Tensor]:
        return list(torch.split(self.data, self.lengths.tolist()))

    def pin_memory(self) -> Encoded:  # DataLoader(pin_memory=True) calls this
        return Encoded(self.data.pin_memory(), self.lengths)


def _stack(items: list) -> Any:
    if not items:
        return torch.zeros(0)
    if isinstance(items[0], tuple):
        return tuple(torch.stack(list(col)) for col in zip(*items, strict=True))
    return torch.stack(items)


def _collate(images: list, decode: bool) -> Any:
    return _stack(images) if decode else Encoded.pack(images)


def _join(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat`` on one thread: NumPy's memcpy. The loader's main process is the trainer's, whose
    intra-op threads would spin for a copy this size (on a busy 2-core machine a third of an epoch's CPU)."""
    try:
        return torch.from_numpy(np.concatenate([t.numpy() for t in tensors]))
    except (TypeError, RuntimeError):  # a dtype NumPy lacks (bfloat16)
        return torch.cat(tensors)


def _cat(parts: list) -> Any:
    if isinstance(parts[0], Encoded):
        return Encoded(_join([p.data for p in parts]), _join([p.lengths for p in parts]))
    if isinstance(parts[0], tuple):
        return tuple(_join(list(col)) for col in zip(*parts, strict=True))
    return _join(parts)


def _pin(images: Any) -> Any:
    """Page-locked copies of a batch's images (Tensor, tuple of Tensors, or Encoded)."""
    if isinstance(images, tuple):
        return tuple(x.pin_memory() for x in images)
    return images.pin_memory()


def _slice(images: Any, start: int, stop: int) -> Any:
    if isinstance(images, Encoded):
        offsets = [0, *torch.cumsum(images.lengths, 0).tolist()]
        return Encoded(images.data[offsets[start] : offsets[stop]], images.lengths[start:stop])
    if isinstance(images, tuple):
        return tuple(x[start:stop] for x in images)
    return images[start:stop]


def _identity(item: Any) -> Any:
    return item


@dataclass
class _Batch:
    """Evaluation: a batch (``full``) or a loader process's last partial batch."""

    images: Any  # Tensor (B, ...), tuple of Tensors, or Encoded
    labels: torch.Tensor
    keys: list[str]
    full: bool


@dataclass
class _Part:
    """Training: one loader process's part of its rank's batch of ``step`` (possibly empty)."""

    step: int
    images: Any  # Tensor (B, ...), tuple of Tensors, or Encoded; None when empty
    labels: list[int]  # plain lists: each tensor an item carries costs a file descriptor passed per step
    keys: list[str]
    seeds: list[int]
    reports: list[ErrorReport] = field(default_factory=list)

    def pin_memory(self) -> _Part:  # DataLoader(pin_memory=True) calls this
        if self.images is not None:
            self.images = _pin(self.images)
        return self


# -- training -------------------------------------------------------------------------------------


class _StreamReader:
    """One reader's rows of one stream: reads the stream's segment in order from the block holding
    step ``start_step``'s first row, and holds one block's wanted samples at a time."""

    def __init__(self, source: TrainStream, plan: TrainPlan, stream: int, lo: int, hi: int, start_step: int):
        self.plan, self.stream, self.lo, self.hi = plan, stream, lo, hi
        self.count = int(plan.counts[stream])
        self.first = int(plan.firsts[stream])
        self.start, self.length = plan.segment(stream)
        self.reports: list[ErrorReport] = []
        self.block, self.order, self.buffer = -1, np.zeros(0, dtype=np.int64), {}
        first_block = (start_step * self.count + lo) // plan.block
        self.items = self._read(source, self.start + first_block * plan.block, self.start + self.length)

    def _read(self, source: TrainStream, u0: int, u1: int) -> Iterator[Any]:
        """One item per ``U``-position in ``[u0, u1)``, shard after shard; the reports go to ``self.reports``."""
        plan = self.plan
        k0, k1 = plan.locate(u0)[0], plan.locate(u1 - 1)[0]
        for k in range(k0, k1 + 1):
            shard = plan.shards[int(plan.order[k])]
            begin = int(plan.starts[k])
            lo, hi = max(u0, begin) - begin, min(u1, int(plan.starts[k + 1])) - begin
            # check the shard where this range reaches its end, or where the drop-last tail cuts it
            verify = hi == shard["num_samples"] or (self.stream == plan.streams - 1 and k == k1)
            for item in source.read_shard(shard, lo, hi, verify=verify):
                if isinstance(item, ErrorReport):
                    self.reports.append(item)
                else:
                    yield item

    def _load(self, block: int, output: int) -> None:
        """Read block ``block``; keep the samples of this reader's rows from output ``output`` on."""
        order = self.plan.block_order(self.stream, block)
        outputs = block * self.plan.block + np.arange(len(order))
        rows = outputs % self.count
        wanted = set(order[(outputs >= output) & (rows >= self.lo) & (rows < self.hi)].tolist())
        self.buffer = {}
        for i in range(len(order)):
            item = next(self.items)
            if i in wanted:
                self.buffer[i] = item
        if (block + 1) * self.plan.block >= self.length:
            for _ in self.items:  # the segment's end: let the last shard be checked and closed
                raise AssertionError("a stream read past its segment")
        self.block, self.order = block, order

    def take(self, step: int) -> list[tuple[int, Any]]:
        """(position in the global batch, sample or ``Lost``) of this reader's rows of ``step``."""
        out = []
        for row in range(self.lo, self.hi):
            output = step * self.count + row
            block = output // self.plan.block
            if block != self.block:
                self._load(block, output)
            out.append((self.first + row, self.buffer.pop(int(self.order[output - block * self.plan.block]))))
        return out


class TrainStream(ShardSource):
    """Runs in each loader process: one ``_Part`` per step, from ``start_step`` to the epoch's end."""

    def __init__(self, manifest: dict, split: str, *, global_batch_size: int, start_step: int, streams: int,
                 shuffle_buffer: int, **kwargs: Any):
        super().__init__(manifest, split, **kwargs)
        self.global_batch_size, self.start_step = global_batch_size, start_step
        self.streams, self.shuffle_buffer = streams, shuffle_buffer
        self._plan: TrainPlan | None = None

    def plan(self) -> TrainPlan:
        """The current epoch's plan, built once (forked loader processes inherit it)."""
        if self._plan is None or self._plan.epoch != self.epoch:
            self._plan = TrainPlan(self.shards, seed=self.seed, epoch=self.epoch, global_batch_size=self.global_batch_size,
                                   streams=self.streams, shuffle_buffer=self.shuffle_buffer)
        return self._plan

    def __iter__(self) -> Iterator[_Part]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        plan = self.plan()
        lo, hi = plan.reader_range(self.rank, self.world_size, worker, max(self.num_workers, 1))
        readers = [_StreamReader(self, plan, p.stream, p.lo, p.hi, self.start_step) for p in plan.pieces(lo, hi)]
        for step in range(self.start_step, plan.steps):
            taken = [item for reader in readers for item in reader.take(step)]
            reports = [r for reader in readers for r in reader.reports]
            for reader in readers:
                reader.reports = []
            if info is None:  # in the caller's process: leave its RNG as it was
                with torch.random.fork_rng(devices=[]):
                    part = self._part(step, taken, reports)
            else:
                part = self._part(step, taken, reports)
            yield part

    def _part(self, step: int, taken: list[tuple[int, Any]], reports: list[ErrorReport]) -> _Part:
        samples = [item for _, item in taken if not isinstance(item, Lost)]
        seeds = sample_seeds(self.seed, self.epoch, np.array([s[1] for s in samples], dtype=np.int64)).tolist()
        lost = Counter((item.shard, item.reason) for _, item in taken if isinstance(item, Lost))
        images, labels, keys, kept = [], [], [], []
        for (url, _, key, fields), seed in zip(samples, seeds, strict=True):
            decoded = self.decode_sample(url, key, fields, seed)
            if isinstance(decoded, ErrorReport):
                reports.append(decoded)
                continue
            images.append(decoded[0])
            labels.append(decoded[1])
            keys.append(key)
            kept.append(seed)
        reports += [ErrorReport(shard, None, reason, n) for (shard, reason), n in lost.items()]
        return _Part(step, _collate(images, self.decode) if images else None, labels, keys, kept, reports)


# -- evaluation -----------------------------------------------------------------------------------


class EvalStream(ShardSource):
    """Runs in each loader process: its slot's samples, each once, in batches of ``batch_size``."""

    def __init__(self, manifest: dict, split: str, *, batch_size: int, split_by: str, **kwargs: Any):
        super().__init__(manifest, split, **kwargs)
        self.batch_size, self.split_by = batch_size, split_by
        self._plans: list[SlotPlan] | None = None

    def plans(self) -> list[SlotPlan]:
        if self._plans is None:
            self._plans = plan_eval(self.shards, rank=self.rank, world_size=self.world_size, num_workers=self.num_workers, split_by=self.split_by)
        return self._plans

    def __iter__(self) -> Iterator[_Batch]:
        info = get_worker_info()
        plan = self.plans()[info.id if info is not None else 0]
        images: list = []
        labels: list[int] = []
        keys: list[str] = []
        for shard in plan.shards:
            mask = plan.keep.mask(shard["offset"], shard["num_samples"]) if plan.keep is not None else None
            if mask is not None and not mask.any():
                continue
            for url, _, key, fields in self.read_shard(shard, mask=mask):  # "raise": no reports in evaluation
                image, label = self.decode_sample(url, key, fields)
                images.append(image)
                labels.append(label)
                keys.append(key)
                if len(images) == self.batch_size:
                    yield _Batch(_collate(images, self.decode), torch.tensor(labels), keys, True)
                    images, labels, keys = [], [], []
        if images:
            yield _Batch(_collate(images, self.decode), torch.tensor(labels), keys, False)


# -- the loader -----------------------------------------------------------------------------------


class ShardLoader:
    """Iterable of ``(images, labels)`` (or ``(images, labels, keys)``) batches for one rank.

    Both kinds: ``len()`` (batches the next iteration yields), ``epoch``, ``set_epoch(e)``,
    ``errors``/``skipped`` (what the last iteration skipped; ``on_error="skip"`` only), ``batch_size``
    (this rank's), ``num_samples`` (samples this rank yields per iteration when nothing is skipped),
    ``split_samples`` (the split's count in the manifest). Training also: ``train`` (True),
    ``global_batch_size``, ``steps_per_epoch``, ``start_step``, ``plan`` (the epoch's ``TrainPlan``).
    """

    def __init__(self, dataset: TrainStream | EvalStream, *, num_workers: int, with_keys: bool, pin_memory: bool,
                 prefetch_factor: int, manifest: dict, url: str):
        self.dataset = dataset
        self.train = isinstance(dataset, TrainStream)
        self.num_workers, self.with_keys = num_workers, with_keys
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self.manifest, self.url = manifest, url
        self.errors: list[ErrorReport] = []
        self.split_samples = int(manifest["splits"][dataset.split]["num_samples"])
        if self.train:
            self.global_batch_size = dataset.global_batch_size
            lo, hi = rank_range(dataset.global_batch_size, dataset.world_size, dataset.rank)
            self.batch_size = hi - lo
        else:
            self.batch_size = dataset.batch_size
            self._eval_samples = sum(p.available for p in dataset.plans())

    @property
    def epoch(self) -> int:
        return self.dataset.epoch

    @property
    def plan(self) -> TrainPlan:
        return self.dataset.plan()

    @property
    def steps_per_epoch(self) -> int:
        return self.plan.steps

    @property
    def start_step(self) -> int:
        return self.dataset.start_step

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Iterate epoch ``epoch`` next (training: from step ``start_step``)."""
        self.dataset.epoch = epoch
        if self.train:
            if not 0 <= start_step <= self.plan.steps:
                raise ValueError(f"start_step {start_step} outside [0, steps_per_epoch={self.plan.steps}]")
            self.dataset.start_step = start_step
        elif start_step:
            raise ValueError("start_step is for training; evaluation reads every sample once")

    def __len__(self) -> int:
        if self.train:
            return self.plan.steps - self.dataset.start_step
        return -(-self._eval_samples // self.batch_size)

    @property
    def num_samples(self) -> int:
        """Samples this rank yields in an iteration when none is skipped (training: from ``start_step``)."""
        return self.batch_size * len(self) if self.train else self._eval_samples

    @property
    def skipped(self) -> int:
        """Samples the last iteration skipped (bad samples, and the samples of skipped shard parts)."""
        return sum(e.samples for e in self.errors)

    def _batches(self, pin_memory: bool) -> Iterator[Any]:
        ds = self.dataset
        # its own generator: PyTorch draws the workers' base seed from it, not from the caller's RNG
        generator = torch.Generator().manual_seed(_key("workers", ds.seed, ds.epoch, ds.rank) >> 1)
        loader = DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=_identity,
            pin_memory=pin_memory,
            prefetch_factor=self.prefetch_factor if self.num_workers else None,
            generator=generator,
        )
        # The workers fork here. Frozen, the manifest's objects (30,000 shard entries) are never scanned
        # by the workers' garbage collector, so their pages are not copied into each worker (gc.freeze's
        # documented use); unfrozen again in this process right after.
        gc.freeze()
        try:
            return iter(loader)
        finally:
            gc.unfreeze()

    def __iter__(self) -> Iterator[tuple]:
        self.errors = []
        return self._iter_train() if self.train else self._iter_eval()

    def _note(self, reports: list[ErrorReport], seen: dict) -> None:
        """Add reports to ``errors``, one entry per problem (samples summed), one warning each."""
        for report in reports:
            known = seen.get((report.shard, report.key, report.reason))
            if known is not None:
                known.samples += report.samples
                continue
            seen[report.shard, report.key, report.reason] = report
            self.errors.append(report)
            what = f"skipped {report.samples} sample(s)" if report.key is not None else "data error (its samples lost are counted in loader.skipped)"
            warnings.warn(f"{what}: {report}", RuntimeWarning, stacklevel=3)

    def _iter_train(self) -> Iterator[tuple]:
        ds: TrainStream = self.dataset  # type: ignore[assignment]
        readers = max(self.num_workers, 1)
        seen: dict = {}
        parts_in = self._batches(self.pin_memory and readers == 1)  # else pinned once merged
        for step in range(ds.start_step, self.plan.steps):
            # (1) PyTorch returns the items of an IterableDataset's workers round-robin, in order; each
            # worker yields exactly one part per step, so these are the rank's parts of this step.
            parts = [next(parts_in, None) for _ in range(readers)]
            if any(p is None or p.step != step for p in parts):
                raise RuntimeError(f"{self.url}: rank {ds.rank}: loader processes out of step at step {step}")
            self._note([r for p in parts for r in p.reports], seen)
            full = [p for p in parts if p.images is not None]
            labels = torch.tensor([y for p in parts for y in p.labels], dtype=torch.int64)
            keys = [k for p in parts for k in p.keys]
            if not full:
                images: Any = Encoded.pack([]) if not ds.decode else torch.zeros(0)
            else:
                images = full[0].images if len(full) == 1 else _cat([p.images for p in full])
                if self.pin_memory and readers > 1:
                    images = _pin(images)
            if isinstance(images, Encoded):
                images = SeededImages(images.unpack(), torch.tensor([x for p in parts for x in p.seeds], dtype=torch.int64))
            yield (images, labels, keys) if self.with_keys else (images, labels)
        if next(parts_in, None) is not None:  # the loader processes stop after the last step
            raise RuntimeError(f"{self.url}: rank {ds.rank}: a loader process yielded more steps than planned")

    def _iter_eval(self) -> Iterator[tuple]:
        ds: EvalStream = self.dataset  # type: ignore[assignment]
        bs = ds.batch_size
        yielded = 0
        parts: list[_Batch] = []
        pending = 0
        for item in self._batches(self.pin_memory):
            if item.full:
                yielded += len(item.labels)
                yield self._out(item.images, item.labels, item.keys)
                continue
            parts.append(item)
            pending += len(item.keys)
            while pending >= bs:
                yielded += bs
                yield self._merge(parts, bs)
                pending = sum(len(p.keys) for p in parts)
        if parts:
            yielded += pending
            yield self._merge(parts, None)
        if yielded != self.num_samples:  # evaluation: each of this rank's samples exactly once
            raise DataError(f"{self.url}: rank {ds.rank} read {yielded} samples of split {ds.split!r}, planned {self.num_samples}")

    def _out(self, images: Any, labels: torch.Tensor, keys: list[str]) -> tuple:
        if isinstance(images, Encoded):
            images = images.unpack()
        return (images, labels, keys) if self.with_keys else (images, labels)

    def _merge(self, parts: list[_Batch], bs: int | None) -> tuple:
        """One batch of ``bs`` (all, if None) from the front of ``parts``; the rest stays there."""
        images = _cat([p.images for p in parts])
        labels = torch.cat([p.labels for p in parts])
        keys = [k for p in parts for k in p.keys]
        n = len(keys) if bs is None else bs
        parts.clear()
        if n < len(keys):
            parts.append(_Batch(_slice(images, n, len(keys)), labels[n:], keys[n:], False))
        return self._out(_slice(images, 0, n), labels[:n], keys[:n])


def make_loader(
    url: str,
    split: str,
    batch_size: int | None = None,
    *,
    global_batch_size: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 2,
    epoch: int = 0,
    seed: int = 0,
    start_step: int = 0,
    streams: int = DEFAULT_STREAMS,
    transform: Callable | None = None,
    shuffle: bool | None = None,
    shuffle_buffer: int = 1000,
    cache_dir: str | None = None,
    on_error: str = "raise",
    with_keys: bool = False,
    split_by: str | None = None,
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
    selects training (a run's order: ``global_batch_size`` or ``batch_size`` per rank, ``epoch``,
    ``seed``, ``start_step``, ``streams``, ``shuffle_buffer``) or evaluation (every sample once:
    ``batch_size`` per rank, ``split_by`` "auto", "shard" or "sample"). See the module docstring.
    ``cache_dir`` keeps verified copies of S3 shards, named by sha256. ``client_factory`` makes the
    boto3 client in each loader process (default ``storage.make_s3_client``, its pool sized for the
    streams). ``decode=False``: images are encoded bytes (``transform`` must be None; in training a
    ``SeededImages`` list); decode them with ``pipelines.make_batch_transform``. ``pin_memory``:
    page-locked batches. ``on_error``: ``"raise"`` (default) or ``"skip"`` (training only).
    ``check_shards``: stat/HEAD every shard now rather than fail at the first read of a missing one.
    """
    train = split == "train" if shuffle is None else shuffle
    if (batch_size is None) == (global_batch_size is None):
        raise ValueError(f"give exactly one of batch_size (per rank) and global_batch_size; got batch_size={batch_size}, global_batch_size={global_batch_size}")
    if not train and global_batch_size is not None:
        raise ValueError(f"evaluation takes batch_size (per rank), not global_batch_size={global_batch_size}")
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error={on_error!r}; valid: {list(ON_ERROR)}")
    if split_by is not None and split_by not in SPLIT_MODES:
        raise ValueError(f"split_by={split_by!r}; valid: {list(SPLIT_MODES)}")
    if train and split_by not in (None, "auto"):
        raise ValueError(f"split_by={split_by!r} is for evaluation; training reads the run's streams (see pipelines.order)")
    if not train and start_step:
        raise ValueError(f"start_step={start_step} is for training; evaluation reads every sample once")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, world_size={world_size})")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    global_batch_size = global_batch_size if global_batch_size is not None else batch_size * world_size
    if train and global_batch_size < world_size:
        raise ValueError(f"global_batch_size {global_batch_size} gives some of the {world_size} ranks no sample")
    if streams < 1:
        raise ValueError(f"streams must be positive, got {streams}")
    if not decode and transform is not None:
        raise ValueError("decode=False yields encoded bytes: a per-image transform cannot apply (use a batch transform)")
    plain_client = client_factory is None
    client_factory = client_factory or storage.make_s3_client
    client = client_factory() if storage.is_s3(url) else None
    manifest = read_manifest(url, client)
    if split not in manifest["splits"]:
        raise ValueError(f"{url}: no split {split!r}; valid: {list(manifest['splits'])}")
    shards = manifest["splits"][split]["shards"]
    for shard, offset in zip(shards, np.cumsum([0] + [s["num_samples"] for s in shards])[:-1].tolist(), strict=True):
        shard["offset"] = offset  # in place: the manifest was read for this loader
    if check_shards:
        check_shards_exist(shards, client)
    common = dict(transform=transform, decode=decode, cache_dir=cache_dir, client_factory=client_factory, rank=rank,
                  world_size=world_size, num_workers=num_workers, epoch=epoch, seed=seed)
    if not train:
        split_by = split_by or "auto"
        dataset: TrainStream | EvalStream = EvalStream(manifest, split, batch_size=batch_size, split_by=split_by, on_error="raise", **common)
    else:
        total = manifest["splits"][split]["num_samples"]
        if total < global_batch_size:
            raise ValueError(f"{url}: split {split!r} has {total} samples, fewer than one global batch of {global_batch_size} ({world_size} ranks)")
        if plain_client:  # one open S3 body (one pooled connection) per stream a loader process reads
            common["client_factory"] = functools.partial(storage.make_s3_client, max_pool_connections=max(16, min(streams, len(shards)) + 2))
        dataset = TrainStream(manifest, split, global_batch_size=global_batch_size, start_step=0, streams=streams,
                              shuffle_buffer=shuffle_buffer, on_error=on_error, **common)
    loader = ShardLoader(dataset, num_workers=num_workers, with_keys=with_keys, pin_memory=pin_memory,
                         prefetch_factor=prefetch_factor, manifest=manifest, url=url)
    if train:
        loader.set_epoch(epoch, start_step)
    return loader
