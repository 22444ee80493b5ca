"""Who reads what, and in which order: pure functions of the manifest and the run's settings.

Nothing here reads data; the loader (``pipelines.loader``), the trainer and the tests call the same
functions, so they agree without talking.

Training (``TrainPlan``; ``step_samples`` for one step). The samples of global step ``t`` of an
epoch, and their order, depend only on the split's shards (the manifest), ``seed``, ``epoch``, the
global batch ``G``, and two run constants: ``streams`` (default 64) and ``shuffle_buffer`` (the
config's ``data.shuffle_buffer``). Not on the world size ``W``, the loader processes per rank ``n``,
or the nodes:

1. The shards are shuffled by (seed, epoch) and seen as one sequence ``U`` of their samples.
2. ``steps = N // G`` (drop-last). The last ``N % G`` samples of ``U`` are not trained in this epoch;
   which samples those are changes with the shard order every epoch.
3. ``U``'s first ``steps * G`` samples are cut into ``S = min(streams, G, shards)`` contiguous
   segments, the streams (as MosaicML streaming's ``num_canonical_nodes``). Stream ``j`` gives
   ``c_j = G // S + (j < G % S)`` samples to every step, so its segment holds ``steps * c_j``.
4. Each segment is shuffled in blocks of ``B = max(1, shuffle_buffer // S)`` consecutive samples,
   by a keyed permutation per (seed, epoch, stream, block). A reader holds one block per stream.
5. Global batch ``t`` is stream 0's outputs ``t*c_0 .. (t+1)*c_0 - 1``, then stream 1's, and so on:
   positions ``0 .. G-1``, the canonical order.

Who reads: rank ``r`` trains positions ``[R_r, R_{r+1})`` of every global batch,
``R_r = r * (G // W) + min(r, G % W)`` (``rank_range``), so shares differ by at most one sample. The
rank's range is cut the same way among its ``n`` loader processes (``reader_range``). A reader
reads every stream its range touches. Ranges are contiguous, so a stream is read by one reader,
except where a reader boundary falls inside a stream: at most ``W * n - 1`` streams are read by two.
(Dealing positions ``i % W == r`` instead would make every stream read by up to ``W`` ranks whenever
``W`` does not divide ``S``.) Shards are read sequentially: a stream opens each shard of its segment
once, from byte 0, so a shard cut by a segment boundary is opened by both streams (``TrainPlan.reads``
counts opens and samples parsed). An ImageNet-sized split (1,281 shards, G=256, S=64) opens 1,344
shards per epoch (1.05 per shard) for W = 1, 2, 4 and 8, and 1,449 (n=2) or 1,722 (n=8) for W=3. A
split of few shards (segments about one shard long) parses up to about twice its samples.

Augmentation: ``sample_seed(seed, epoch, index)`` keys each sample's random draws by its index in
the split (manifest order), so an augmented sample is the same for any ``W`` and ``n``.

Memory: a plan holds a few numbers per shard and per stream (38,000 shards: under 1 MB); blocks are
permuted when needed (``B`` numbers). Nothing is held per sample of the split.

Evaluation (``plan_eval``): every sample exactly once across ranks, in manifest order. Slots: rank
``r``'s loader process ``w`` is slot ``w * world_size + r`` of ``world_size * max(num_workers, 1)``.
``split_by="shard"`` deals whole shards to slots; ``"sample"`` has every slot read every shard and
keep the samples ``i`` with ``i % slots == slot``; ``"auto"`` picks shard mode when there are at least 4
shards per slot or the shards divide evenly among slots, else sample mode.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

DEFAULT_STREAMS = 64
SPLIT_MODES = ("auto", "shard", "sample")


# -- keyed hashing and permutations ---------------------------------------------------------------


def _mix(x: np.ndarray, key: int) -> np.ndarray:
    """A keyed 64-bit mixer (splitmix64's finaliser); uint64 arithmetic wraps, as meant."""
    with np.errstate(over="ignore"):
        x = (np.asarray(x, dtype=np.uint64) ^ np.uint64(key)) * np.uint64(0x9E3779B97F4A7C15)
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        return x ^ (x >> np.uint64(31))


def _key(*parts: object) -> int:
    """A 64-bit key for a purpose and its inputs (stable across Python and NumPy versions)."""
    return int.from_bytes(hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest(), "little")


def keyed_permutation(n: int, key: int) -> np.ndarray:
    """A permutation of ``range(n)`` chosen by ``key``: positions sorted by a keyed hash (all
    permutations reachable, NumPy-version independent). ``O(n log n)``; used for blocks and shards."""
    return np.argsort(_mix(np.arange(n, dtype=np.uint64), key), kind="stable")


def sample_seeds(seed: int, epoch: int, indices: np.ndarray) -> np.ndarray:
    """The augmentation seeds (int64, >= 0) of the samples at ``indices`` of the split (manifest order)."""
    return (_mix(np.asarray(indices, dtype=np.uint64), _key("augment", seed, epoch)) >> np.uint64(1)).astype(np.int64)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of sample ``index``'s random augmentation in ``epoch``: ``torch`` generators seeded with
    it crop, flip and light a sample alike on any world size and any number of loader processes."""
    return int(sample_seeds(seed, epoch, np.array([index]))[0])


def split_range(total: int, parts: int, i: int) -> tuple[int, int]:
    """The ``i``-th of ``parts`` contiguous ranges that cut ``range(total)``; sizes differ by at most one."""
    q, rem = divmod(total, parts)
    return i * q + min(i, rem), (i + 1) * q + min(i + 1, rem)


def rank_range(global_batch_size: int, world_size: int, rank: int) -> tuple[int, int]:
    """Positions ``[lo, hi)`` of each global batch that ``rank`` trains."""
    return split_range(global_batch_size, world_size, rank)


def with_offsets(shards: list[dict]) -> list[dict]:
    """The shards with ``offset`` (index of their first sample in the split): as given when they have
    it (``make_loader`` sets it on every shard at once), else copies; no per-epoch copy of a 30,000-shard list."""
    if not shards or ("offset" in shards[0] and "offset" in shards[-1]):
        return shards
    offsets = np.cumsum([0] + [s["num_samples"] for s in shards])
    return [dict(s, offset=int(o)) for s, o in zip(shards, offsets[:-1].tolist(), strict=True)]


# -- training -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Piece:
    """Rows ``[lo, hi)`` of stream ``stream``'s ``c_j`` rows per step: global-batch positions
    ``firsts[stream] + lo`` to ``firsts[stream] + hi``."""

    stream: int
    lo: int
    hi: int


class TrainPlan:
    """One training epoch's order (see the module docstring); build it once per epoch and ask it.

    Attributes: ``num_samples`` (N), ``steps`` (``N // G``), ``streams`` (S in use), ``block`` (B),
    ``counts[j]`` (``c_j``), ``firsts[j]`` (stream ``j``'s first position in a global batch; ``firsts[S] = G``),
    ``order`` (shard indices in the order of ``U``) and ``starts`` (``U``-position of each of them; one more at the end).
    """

    def __init__(
        self,
        shards: list[dict],
        *,
        seed: int,
        epoch: int,
        global_batch_size: int,
        streams: int = DEFAULT_STREAMS,
        shuffle_buffer: int = 1000,
    ):
        if global_batch_size < 1 or streams < 1:
            raise ValueError(f"global_batch_size ({global_batch_size}) and streams ({streams}) must be positive")
        self.shards = with_offsets(shards)
        self.seed, self.epoch, self.global_batch_size = seed, epoch, global_batch_size
        sizes = np.array([s["num_samples"] for s in self.shards], dtype=np.int64)
        self._offsets = np.array([s["offset"] for s in self.shards], dtype=np.int64)
        self.num_samples = int(sizes.sum())
        self.steps = self.num_samples // global_batch_size
        self.order = keyed_permutation(len(self.shards), _key("shards", seed, epoch))
        self.starts = np.concatenate([[0], np.cumsum(sizes[self.order])]).astype(np.int64)
        self.streams = max(1, min(streams, global_batch_size, len(self.shards)))
        self.block = max(1, shuffle_buffer // self.streams)
        q, rem = divmod(global_batch_size, self.streams)
        self.counts = np.full(self.streams, q, dtype=np.int64) + (np.arange(self.streams) < rem)
        self.firsts = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self._block_key = _key("blocks", seed, epoch)

    # -- a stream ---------------------------------------------------------------------------------

    def segment(self, stream: int) -> tuple[int, int]:
        """(first ``U``-position, length) of the stream's segment."""
        return self.steps * int(self.firsts[stream]), self.steps * int(self.counts[stream])

    def block_order(self, stream: int, block: int) -> np.ndarray:
        """Output ``p`` of the stream's block ``block`` is the block's input ``block_order(...)[p]``."""
        length = self.segment(stream)[1]
        size = min(self.block, length - block * self.block)
        key = int(_mix(np.uint64(stream << 32 | block), self._block_key))
        return keyed_permutation(size, key)

    def stream_positions(self, stream: int, outputs: np.ndarray) -> np.ndarray:
        """``U``-positions of the stream's outputs (its ``m``-th sample is step ``m // c_j``'s row ``m % c_j``)."""
        outputs = np.asarray(outputs, dtype=np.int64)
        start = self.segment(stream)[0]
        out = np.empty(len(outputs), dtype=np.int64)
        blocks = outputs // self.block
        for b in np.unique(blocks).tolist():
            sel = blocks == b
            out[sel] = start + b * self.block + self.block_order(stream, b)[outputs[sel] - b * self.block]
        return out

    # -- U-positions and the split ----------------------------------------------------------------

    def locate(self, u: int) -> tuple[int, int]:
        """(index into ``order``, sample within that shard) of ``U``-position ``u``."""
        k = int(np.searchsorted(self.starts, u, side="right")) - 1
        return k, u - int(self.starts[k])

    def indices(self, u: np.ndarray) -> np.ndarray:
        """Split sample indices (manifest order) of ``U``-positions."""
        u = np.asarray(u, dtype=np.int64)
        k = np.searchsorted(self.starts, u, side="right") - 1
        return self._offsets[self.order[k]] + (u - self.starts[k])

    # -- steps and readers ------------------------------------------------------------------------

    def pieces(self, lo: int, hi: int) -> list[Piece]:
        """The stream rows behind global-batch positions ``[lo, hi)``, in position order."""
        out = []
        for j in range(int(np.searchsorted(self.firsts, lo, side="right")) - 1, self.streams):
            first = int(self.firsts[j])
            if first >= hi:
                break
            a, b = max(lo - first, 0), min(hi - first, int(self.counts[j]))
            if a < b:
                out.append(Piece(j, a, b))
        return out

    def reader_range(self, rank: int, world_size: int, worker: int, workers: int) -> tuple[int, int]:
        """Positions of each global batch that loader process ``worker`` of ``workers`` of ``rank`` reads."""
        lo, hi = rank_range(self.global_batch_size, world_size, rank)
        a, b = split_range(hi - lo, workers, worker)
        return lo + a, lo + b

    def step_positions(self, step: int, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """``U``-positions of global batch ``step``'s positions ``[lo, hi)``, in canonical order."""
        if not 0 <= step < self.steps:
            raise ValueError(f"step {step} outside [0, {self.steps})")
        hi = self.global_batch_size if hi is None else hi
        parts = [
            self.stream_positions(p.stream, step * int(self.counts[p.stream]) + np.arange(p.lo, p.hi))
            for p in self.pieces(lo, hi)
        ]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def step_samples(self, step: int, *, rank: int | None = None, world_size: int = 1) -> np.ndarray:
        """Split sample indices of global step ``step`` (or of ``rank``'s share of it), in batch order."""
        lo, hi = (0, self.global_batch_size) if rank is None else rank_range(self.global_batch_size, world_size, rank)
        return self.indices(self.step_positions(step, lo, hi))

    def reads(self, world_size: int, num_workers: int, start_step: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Per shard (manifest order): how many times all ranks' loader processes together open it in
        the epoch from ``start_step`` on, and how many of its samples they parse in total. A reader
        reads each stream it needs from the block holding its first row of ``start_step``: from the
        start of the shard holding that block's start (tar has no random access) to the end of the
        stream's segment, and on to the end of the shard the drop-last tail cuts (to check it)."""
        opens = np.zeros(len(self.shards), dtype=np.int64)
        parsed = np.zeros(len(self.shards), dtype=np.int64)
        workers = max(num_workers, 1)
        for rank in range(world_size):
            for w in range(workers):
                for piece in self.pieces(*self.reader_range(rank, world_size, w, workers)):
                    start, length = self.segment(piece.stream)
                    u0 = start + (start_step * int(self.counts[piece.stream]) + piece.lo) // self.block * self.block
                    if start_step >= self.steps:
                        continue
                    k0, k1 = self.locate(u0)[0], self.locate(start + length - 1)[0]
                    for k in range(k0, k1 + 1):
                        tail = piece.stream == self.streams - 1 and k == k1
                        to = int(self.starts[k + 1]) if tail else min(start + length, int(self.starts[k + 1]))
                        opens[self.order[k]] += 1
                        parsed[self.order[k]] += to - int(self.starts[k])
        return opens, parsed


def step_samples(
    shards: list[dict],
    *,
    seed: int,
    epoch: int,
    global_batch_size: int,
    step: int,
    streams: int = DEFAULT_STREAMS,
    shuffle_buffer: int = 1000,
    rank: int | None = None,
    world_size: int = 1,
) -> np.ndarray:
    """Split sample indices (manifest order) of global step ``step`` of ``epoch``, in the order the
    ranks' batches hold them; with ``rank``, that rank's share (of ``world_size``). Pure: reads no
    data. Build a ``TrainPlan`` to ask about many steps of one epoch."""
    plan = TrainPlan(shards, seed=seed, epoch=epoch, global_batch_size=global_batch_size, streams=streams, shuffle_buffer=shuffle_buffer)
    return plan.step_samples(step, rank=rank, world_size=world_size)


# -- evaluation -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Selection:
    """Sample mode: a slot keeps sample ``i`` of the split when ``i % slots == slot``."""

    total: int
    slots: int
    slot: int

    def mask(self, offset: int, count: int) -> np.ndarray:
        return np.arange(offset, offset + count, dtype=np.int64) % self.slots == self.slot

    def owned(self) -> int:
        return self.total // self.slots + (self.slot < self.total % self.slots)


@dataclass
class SlotPlan:
    """What one (rank, loader process) slot reads in an evaluation."""

    shards: list[dict]  # in read order
    keep: Selection | None  # sample mode: which samples are the slot's; None = every sample of the shards
    available: int  # samples it reads


def choose_mode(split_by: str, num_shards: int, slots: int) -> str:
    if split_by != "auto":
        return split_by
    return "shard" if num_shards >= 4 * slots or (num_shards >= slots and num_shards % slots == 0) else "sample"


def plan_eval(shards: list[dict], *, rank: int, world_size: int, num_workers: int, split_by: str = "auto") -> list[SlotPlan]:
    """The evaluation plans of rank ``rank``'s loader processes: each sample of the split exactly once over all ranks."""
    workers = max(num_workers, 1)
    slots = world_size * workers
    shards = with_offsets(shards)
    total = shards[-1]["offset"] + shards[-1]["num_samples"] if shards else 0
    plans = []
    for slot in (w * world_size + rank for w in range(workers)):
        if choose_mode(split_by, len(shards), slots) == "shard":
            mine = shards[slot::slots]
            plans.append(SlotPlan(mine, None, sum(s["num_samples"] for s in mine)))
        else:
            keep = Selection(total, slots, slot)
            plans.append(SlotPlan(shards, keep, keep.owned()))
    return plans
