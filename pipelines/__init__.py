"""Data pipelines: image sources -> tar shards + manifest (local or S3) -> per-rank batches.

    python -m pipelines.shards write --source digits --out data/digits   # write
    loader = make_loader("data/digits", "train", global_batch_size=128, rank=r, world_size=n, epoch=e,
                         start_step=k, transform=make_transform("cifar", True, mean=m["mean"], std=m["std"]))

    python -m pipelines.shards index --split train='s3://b/in/train-{000000..001281}.tar' \
        --split val='s3://b/in/val-{000000..000049}.tar' --out s3://b/in-index   # WebDataset made elsewhere

Modules: ``sources`` (digits, CIFAR, image folders, synthetic), ``format`` (tar + manifest), ``writer``
(``write_shards``, ``index_shards``), ``shards`` (the CLI), ``storage`` (local + S3 byte I/O, Ray's S3 filesystem,
one retry budget, ``s3_compat_env``), ``order`` (which samples each step trains on: ``TrainPlan``,
``step_samples``, ``sample_seed``; evaluation's ``plan_eval``), ``reading`` (a shard's samples, checked
against the manifest), ``loader`` (``make_loader``), ``transforms`` (per image, ``make_batch_transform`` for
decoding on the GPU, and ``BatchMix``: MixUp / CutMix of a batch).
"""

from pipelines.format import read_manifest
from pipelines.loader import Encoded, SeededImages, ShardLoader, make_loader
from pipelines.order import TrainPlan, plan_eval, sample_seed, step_samples
from pipelines.reading import DataError, ErrorReport, ManifestMismatchError
from pipelines.sources import parse_source
from pipelines.storage import StorageError, make_s3_client, s3_compat_env
from pipelines.transforms import BatchMix, make_batch_transform, make_transform
from pipelines.writer import index_shards, write_shards

__all__ = [
    "BatchMix",
    "DataError",
    "Encoded",
    "ErrorReport",
    "index_shards",
    "ManifestMismatchError",
    "SeededImages",
    "ShardLoader",
    "StorageError",
    "make_batch_transform",
    "make_loader",
    "make_s3_client",
    "make_transform",
    "parse_source",
    "plan_eval",
    "read_manifest",
    "s3_compat_env",
    "sample_seed",
    "step_samples",
    "TrainPlan",
    "write_shards",
]
