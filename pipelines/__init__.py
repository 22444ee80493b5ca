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

import importlib

# Imported on first use (PEP 562): `import pipelines.storage` (S3 settings, in every Tune trial's driver)
# no longer imports the loader and the transforms, i.e. torchvision and, through it, torch._dynamo
# (1.2 CPU-s measured, in processes that never read an image).
_EXPORTS = {
    "read_manifest": "pipelines.format",
    "Encoded": "pipelines.loader", "SeededImages": "pipelines.loader", "ShardLoader": "pipelines.loader",
    "make_loader": "pipelines.loader",
    "TrainPlan": "pipelines.order", "plan_eval": "pipelines.order", "sample_seed": "pipelines.order",
    "step_samples": "pipelines.order",
    "DataError": "pipelines.reading", "ErrorReport": "pipelines.reading", "ManifestMismatchError": "pipelines.reading",
    "parse_source": "pipelines.sources",
    "StorageError": "pipelines.storage", "make_s3_client": "pipelines.storage", "s3_compat_env": "pipelines.storage",
    "BatchMix": "pipelines.transforms", "make_batch_transform": "pipelines.transforms",
    "make_transform": "pipelines.transforms",
    "index_shards": "pipelines.writer", "write_shards": "pipelines.writer",
}
MODULES = ("format", "loader", "order", "reading", "sources", "storage", "transforms", "writer", "shards")


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in MODULES:
        value = importlib.import_module(f"pipelines.{name}")
    else:
        raise AttributeError(f"module 'pipelines' has no attribute {name!r}")
    globals()[name] = value
    return value


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
