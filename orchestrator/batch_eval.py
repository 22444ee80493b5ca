"""Batch evaluation on the Ray cluster: score a whole split with an ensemble, in parallel over shards.

Each Ray task reads its slice of the split (the loader's evaluation mode: every sample exactly once
across tasks), applies the test protocol (centre crop, 10-crop, multi-scale), and returns every
member's softmax scores per sample key. The driver joins them, computes the errors, writes the
predictions as Parquet and logs the metrics to MLflow.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import torch

import pipelines

from .ensemble_model import build_member, member_probs
from .scoring import error_metrics


class EvaluationError(ValueError):
    """A model, data set or member that cannot be evaluated as asked; the message says why."""


@dataclass
class Scores:
    keys: list[str]
    labels: np.ndarray  # N
    member_probs: np.ndarray  # M x N x K

    @property
    def probs(self) -> np.ndarray:
        """The ensemble: the average of the members' softmax scores (N x K)."""
        return self.member_probs.mean(0)


def transform_spec(meta: dict, protocol: str | None = None) -> dict:
    """What the test transform needs, from an ensemble's metadata."""
    return {
        "kind": meta["data_kind"],
        "size": meta["test_size"],
        "resize": meta.get("resize") or None,
        "protocol": protocol or meta["protocol"],
        "mean": meta["mean"],
        "std": meta["std"],
    }


def _make_test_transform(spec: dict):
    kwargs = {"size": spec["size"], "protocol": spec["protocol"], "mean": spec["mean"], "std": spec["std"]}
    if spec["kind"] == "imagenet" and spec.get("resize"):
        kwargs["resize"] = spec["resize"]
    return pipelines.make_transform(spec["kind"], False, **kwargs)


# ---------------------------------------------------------------------------------------------
# Loading a registered model. A registered model is code: MLflow's loader unpickles its python_model and
# imports the code it carries (code_paths). So this project's ensemble is recognised without running any
# of it, by the checks below (each reads files, none unpickles or imports), and rebuilt by the installed
# code from its JSON and weight files (torch.load(weights_only=True)).

MARKER_METADATA = frozenset({"classes", "protocol", "data_kind", "test_size", "mean", "std"})


def pickled_class(path: Path) -> tuple[str, str] | None:
    """(module, qualname) of the first global a pickle refers to (the pickled object's class), read with
    pickletools, never executed; None when it names none."""
    import pickletools

    strings: list = []
    memo: dict = {}
    for op, arg, _ in pickletools.genops(path.read_bytes()):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
            strings.append(arg)
        elif op.name == "MEMOIZE":
            memo[len(memo)] = strings[-1] if strings else None
        elif op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[arg] = strings[-1] if strings else None
        elif op.name in ("BINGET", "LONG_BINGET"):
            strings.append(memo.get(arg))
        elif op.name == "GLOBAL":
            return tuple(arg.split(" ", 1))
        elif op.name == "STACK_GLOBAL":
            return tuple(strings[-2:]) if len(strings) >= 2 else None
    return None


def _pyfunc(mlmodel) -> dict:
    return mlmodel.flavors.get("python_function") or {}


def model_artifacts(local: Path, mlmodel) -> dict[str, Path]:
    """The pyfunc model's artifacts, by name, as paths under the downloaded model folder `local`."""
    return {k: local / v["path"] for k, v in (_pyfunc(mlmodel).get("artifacts") or {}).items()}


def not_a_python_model(local: Path, mlmodel) -> str | None:
    flavor = _pyfunc(mlmodel)
    if flavor.get("loader_module") != "mlflow.pyfunc.model" or "python_model" not in flavor:
        return f"flavours {sorted(mlmodel.flavors)}, not a pyfunc PythonModel"
    return None


def not_our_class(local: Path, mlmodel) -> str | None:
    from .ensemble_model import ResNetEnsemble

    ours = (ResNetEnsemble.__module__, ResNetEnsemble.__qualname__)
    found = pickled_class(local / _pyfunc(mlmodel)["python_model"])
    if found != ours:
        return f"its python_model is {'.'.join(map(str, found or ('?',)))}, not {'.'.join(ours)}"
    return None


def lacks_our_metadata(local: Path, mlmodel) -> str | None:
    missing = MARKER_METADATA - set(mlmodel.metadata or {})
    return f"its metadata lacks {sorted(missing)}" if missing else None


def artifact_outside(local: Path, mlmodel) -> str | None:
    if any(local.resolve() not in p.resolve().parents for p in model_artifacts(local, mlmodel).values()):
        return "an artifact path points outside the model"
    return None


def no_description(local: Path, mlmodel) -> str | None:
    return None if "ensemble" in model_artifacts(local, mlmodel) else "no 'ensemble' artifact"


# In order: a later check reads what an earlier one vouched for.
OURS_CHECKS = (not_a_python_model, not_our_class, lacks_our_metadata, artifact_outside, no_description)


def why_not_ours(local: Path, mlmodel) -> str | None:
    """Why the downloaded model at `local` is not this project's ensemble, or None when it is."""
    return next((why for check in OURS_CHECKS if (why := check(local, mlmodel))), None)


def load_registered(model_uri: str, tracking_uri: str | None = None, trust_model: bool | None = None):
    """(metadata, [member nets]) of a registered ensemble, with a clear error if the URI is wrong.

    This project's ensemble is rebuilt by the installed code (`why_not_ours` says whether it is one);
    any other model is refused unless `trust_model` (default: RESNET_TRUST_MODEL=1, which `evaluate
    --trust-model` sets), which loads it MLflow's way, running its code.
    """
    import tempfile

    import mlflow
    from mlflow.artifacts import download_artifacts
    from mlflow.models import Model

    if tracking_uri and tracking_uri != mlflow.get_tracking_uri():
        mlflow.set_tracking_uri(tracking_uri)  # in a Ray task; the driver's own setting stays untouched
    if trust_model is None:
        trust_model = os.environ.get("RESNET_TRUST_MODEL") == "1"
    with tempfile.TemporaryDirectory(prefix="registered-model-") as tmp:
        try:
            local = Path(download_artifacts(artifact_uri=model_uri, dst_path=tmp))
            mlmodel = Model.load(str(local / "MLmodel"))  # YAML: nothing of the model runs
        except Exception as e:  # noqa: BLE001 - MLflow raises several kinds for a bad URI
            raise EvaluationError(f"cannot load model {model_uri!r}: {str(e).splitlines()[0]}") from None
        why = why_not_ours(local, mlmodel)
        if why is None:
            python_model = _rebuild_ours(model_artifacts(local, mlmodel), model_uri)
        elif trust_model:
            python_model = _load_trusted(local, model_uri)
        else:
            raise EvaluationError(
                f"refusing to load {model_uri!r}: it is not this project's ResNet ensemble ({why}), and "
                "loading a registered model runs its code. Pass --trust-model (or set RESNET_TRUST_MODEL=1) "
                "only if you trust everyone who can write to the model registry."
            )
    if not hasattr(python_model, "members"):
        raise EvaluationError(f"{model_uri!r} is not a ResNet ensemble registered by this project")
    return python_model.meta, python_model.members


def _rebuild_ours(artifacts: dict[str, Path], model_uri: str):
    """Our ensemble from its files, by the installed code (not the copy the model carries)."""
    from types import SimpleNamespace

    from .ensemble_model import ResNetEnsemble

    python_model = ResNetEnsemble()
    try:
        python_model.load_context(SimpleNamespace(artifacts={k: str(p) for k, p in artifacts.items()}))
    except (KeyError, ValueError, OSError, RuntimeError) as e:
        raise EvaluationError(f"{model_uri!r}: a broken ResNet ensemble: {e}") from None
    return python_model


def _load_trusted(local: Path, model_uri: str):
    """MLflow's own loader: unpickles the model and imports the code it carries (--trust-model only)."""
    import mlflow

    try:
        return mlflow.pyfunc.load_model(str(local)).unwrap_python_model()
    except Exception as e:  # noqa: BLE001 - whatever the trusted model's code raises
        raise EvaluationError(f"cannot load model {model_uri!r}: {str(e).splitlines()[0]}") from None


# ---------------------------------------------------------------------------------------------
# Scoring a split on the cluster.


def members_of(source: dict) -> list[torch.nn.Module]:
    """The member nets of `source`: {"model_uri", "tracking_uri", "trust_model"} (a registered ensemble,
    loaded through `load_registered`'s checks) or {"members": [(spec, state_dict), ...]}."""
    if "model_uri" in source:
        return load_registered(source["model_uri"], source.get("tracking_uri"), source.get("trust_model"))[1]
    return [build_member(s, sd) for s, sd in source["members"]]


def score_slice(members: list, data_url: str, split: str, rank: int, world: int, spec: dict, batch_size: int):
    """(keys, labels, M x n x K probabilities, the manifest's count for the split) of slice `rank` of `world`
    (the loader's evaluation mode: every sample in exactly one slice)."""
    # The real multi-scale test keeps each image's aspect ratio: read one image at a time and batch by shape.
    whole_images = spec["protocol"] == "multi_scale"
    loader = pipelines.make_loader(
        data_url, split, 1 if whole_images else batch_size, rank=rank, world_size=world, num_workers=0,
        shuffle=False, transform=_make_test_transform(spec), with_keys=True,
    )
    keys, labels, probs = [], [], []
    for images, y, k in (batches_by_shape(loader, batch_size) if whole_images else loader):
        probs.append(member_probs(members, images).numpy())
        labels.append(y.numpy())
        keys.extend(k)
    if not keys:
        return [], np.zeros(0, np.int64), None, loader.split_samples
    return keys, np.concatenate(labels), np.concatenate(probs, axis=1), loader.split_samples


def in_task() -> None:
    """Settings of a scoring task or actor: one core each; no progress bar per member file downloaded."""
    torch.set_num_threads(1)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@ray.remote(num_cpus=1)
def _score_slice(source: dict, data_url: str, split: str, rank: int, world: int, spec: dict, batch_size: int):
    in_task()
    return score_slice(members_of(source), data_url, split, rank, world, spec, batch_size)


def batches_by_shape(loader, batch_size: int):
    """Regroup `loader`'s (views, labels, keys) batches into batches of up to `batch_size` images whose
    views all have the same shapes (one aspect ratio), in order of completion; the rest at the end."""
    buckets: dict[tuple, list] = {}

    def merged(items):
        views = tuple(torch.cat([it[0][j] for it in items]) for j in range(len(items[0][0])))
        return views, torch.cat([it[1] for it in items]), [key for it in items for key in it[2]]

    for images, y, k in loader:
        images = tuple(images) if isinstance(images, tuple | list) else (images,)
        for i in range(len(k)):
            one = (tuple(v[i : i + 1] for v in images), y[i : i + 1], [k[i]])
            bucket = buckets.setdefault(tuple(tuple(v.shape[1:]) for v in one[0]), [])
            bucket.append(one)
            if len(bucket) == batch_size:
                yield merged(bucket)
                bucket.clear()
    for bucket in buckets.values():
        if bucket:
            yield merged(bucket)


def score_split(source: dict, data_url: str, split: str, spec: dict, *, batch_size: int = 128, tasks: int = 0) -> Scores:
    """Score `split` of the shards at `data_url` with the members in `source`, in parallel Ray tasks.

    `source` is {"model_uri": ..., "tracking_uri": ...} (a registered ensemble) or
    {"members": [(spec, state_dict), ...]} (weights in hand).
    """
    world = tasks or max(1, int(ray.cluster_resources().get("CPU", 1)))
    ref = ray.put(source)
    futures = [_score_slice.remote(ref, data_url, split, r, world, spec, batch_size) for r in range(world)]
    return joined(ray.get(futures), data_url, split)


def joined(slices: list[tuple], data_url: str, split: str) -> Scores:
    """The slices' scores in key order, after checking that every sample the manifest lists was scored
    exactly once."""
    keys, labels, probs = [], [], []
    expected = set()
    for k, y, p, listed in slices:  # listed: the manifest's count for the split
        expected.add(listed)
        if k:
            keys.extend(k)
            labels.append(y)
            probs.append(p)
    if not keys:
        raise EvaluationError(f"split {split!r} of {data_url} has no samples")
    if len(set(keys)) != len(keys):
        raise EvaluationError(f"split {split!r} of {data_url}: some samples were read twice")
    if expected != {len(keys)}:  # exactly once: every sample the manifest lists was scored
        raise EvaluationError(f"split {split!r} of {data_url}: scored {len(keys)} samples but the manifest lists {sorted(expected)}")
    order = np.argsort(np.asarray(keys), kind="stable")
    return Scores([keys[i] for i in order], np.concatenate(labels)[order], np.concatenate(probs, axis=1)[:, order])


def check_classes(meta: dict, manifest: dict, data_url: str) -> None:
    if list(meta["classes"]) != list(manifest["classes"]):
        ours, theirs = meta["classes"], manifest["classes"]
        raise EvaluationError(
            f"the data set at {data_url} has {len(theirs)} classes {theirs[:10]}{'...' if len(theirs) > 10 else ''} "
            f"but the model was trained on {len(ours)} classes {ours[:10]}{'...' if len(ours) > 10 else ''}"
        )


def predictions(keys: list[str], labels: np.ndarray, probs: np.ndarray) -> dict[str, list]:
    """The predictions' columns: key, label, top-5 classes (the first is the prediction), probabilities."""
    probs = probs.astype(np.float32)
    top5 = np.argsort(-probs, axis=1)[:, : min(5, probs.shape[1])].astype(np.int32)
    return {"key": list(keys), "label": labels.astype(np.int32), "prediction": top5[:, 0], "top5": list(top5),
            "probabilities": list(probs)}


def write_predictions(scores: Scores, url: str) -> str:
    """The predictions (`predictions`) of every sample, as one Parquet file at `url`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .cluster import storage_for_ray

    columns = predictions(scores.keys, scores.labels, scores.probs)
    table = pa.table({
        "key": pa.array(columns["key"], pa.string()),
        "label": pa.array(columns["label"]),
        "prediction": pa.array(columns["prediction"]),
        "top5": pa.array(columns["top5"], pa.list_(pa.int32())),
        "probabilities": pa.array(columns["probabilities"], pa.list_(pa.float32())),
    })
    path, fs = storage_for_ray(url)
    if fs is None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    else:
        fs.create_dir(os.path.dirname(path), recursive=True)
    pq.write_table(table, path, filesystem=fs)
    return url if fs is not None else path


def evaluate_registered(
    model_uri: str, data_url: str, split: str, storage: str, *, protocol: str | None = None,
    experiment: str = "batch-eval", batch_size: int = 128,
) -> dict:
    """The `evaluate` command: check everything first (data, storage, MLflow store, the model, the
    cluster), then `batch_evaluate`."""
    from .preflight import Data, preflight

    before = preflight(data=[Data(data_url, (split,), "--data")], storage=storage, model=model_uri, cluster=True)
    ((data_url, manifest),) = before.manifests.items()
    return batch_evaluate(model_uri, before.model_meta, data_url, manifest, split, before.storage,
                          protocol=protocol, experiment=experiment, batch_size=batch_size)


def batch_evaluate(
    model_uri: str, meta: dict, data_url: str, manifest: dict, split: str, storage: str, *, protocol: str | None = None,
    experiment: str = "batch-eval", parent_run_id: str | None = None, batch_size: int = 128,
) -> dict:
    """Score a checked model on a checked split on the cluster, write the predictions, log a run to MLflow."""
    from . import tracking

    spec = transform_spec(meta, protocol)
    uri = tracking.tracking_uri()
    print(f"[evaluate] {model_uri} on {data_url} [{split}], protocol {spec['protocol']}", flush=True)
    # The tasks decide as the driver did: --trust-model reaches them on a cluster this command did not start.
    trust = os.environ.get("RESNET_TRUST_MODEL") == "1"
    scores = score_split({"model_uri": model_uri, "tracking_uri": uri, "trust_model": trust}, data_url, split, spec,
                         batch_size=batch_size)
    metrics = error_metrics(scores.probs, scores.labels)
    safe = model_uri.replace("models:/", "").replace("@", "-").replace("/", "-").replace(":", "-")
    out = write_predictions(scores, f"{storage.rstrip('/')}/predictions/{safe}-{split}.parquet")
    params = {"model_uri": model_uri, "data": data_url, "split": split, "protocol": spec["protocol"], "n": metrics["n"]}
    run_id = _log_evaluation(uri, experiment, parent_run_id, params, manifest, metrics, out, safe)
    print(
        f"[evaluate] {metrics['n']} samples: top-1 err {metrics['top1_err']:.2f}%  top-5 err {metrics['top5_err']:.2f}%  "
        f"log loss {metrics['log_loss']:.4f}\n[evaluate] predictions: {out}",
        flush=True,
    )
    return {**metrics, "predictions": out, "run_id": run_id}


def _log_evaluation(uri: str, experiment: str, parent_run_id: str | None, params: dict, manifest: dict, metrics: dict,
                    out: str, safe: str) -> str:
    """One MLflow run: the model, data and protocol, the errors, where the predictions are; its id."""
    from mlflow.tracking import MlflowClient

    from . import tracking

    client = MlflowClient(uri)
    split = params["split"]
    tags = {"model_uri": params["model_uri"], "predictions": out, "mlflow.runName": f"evaluate {safe} {split}"}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(tracking.experiment_id(client, experiment), tags={**tracking.source_tags(), **tags})
    try:
        for k, v in params.items():
            client.log_param(run.info.run_id, k, v)
        tracking.log_dataset(client, run.info.run_id, manifest, params["data"], split, "evaluation")
        for k in ("top1_err", "top5_err", "log_loss"):
            client.log_metric(run.info.run_id, f"{split}_{k}", metrics[k])
        client.log_text(run.info.run_id, json.dumps({"predictions": out, **metrics}, indent=2), "evaluation.json")
    except BaseException as e:  # never left RUNNING
        tracking.mark_failed(client, run.info.run_id, e)
        raise
    client.set_terminated(run.info.run_id)
    return run.info.run_id
