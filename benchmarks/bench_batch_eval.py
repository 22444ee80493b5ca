"""Batch evaluation of a registered ensemble, two ways, in one process on the same cluster, data and model:

  tasks     the product's path (`orchestrator.batch_eval`): one Ray task per slice of the split, each
            loading the model through `load_registered`; the driver joins the slices, checks that every
            sample the manifest lists was scored exactly once, computes the errors and writes one Parquet
            file (`score_split` + `write_predictions`)
  ray data  Ray Data: a dataset of the same slices, `map_batches` with an actor pool whose actors load
            the model once each (through `load_registered`, checks included) and score a slice with the
            product's `score_slice`; the same exactly-once check and errors on the materialized rows, and
            `write_parquet`

The rounds alternate (tasks, ray data, tasks, ...); each line is one round's seconds from start to the
written predictions. The model: `--members` untrained nets of the zoo, registered as this project's
ensemble in a temporary MLflow store (untrained: only the time is under test).

    .venv/bin/python benchmarks/bench_batch_eval.py                       # digits test split, 3 rounds
    .venv/bin/python benchmarks/bench_batch_eval.py --rounds 5 --members resnet8,resnet14,resnet20
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np


def register(members: list[str], data_url: str, manifest: dict, uri: str) -> str:
    """`members` (untrained) registered as this project's ensemble; its model URI."""
    import mlflow
    import torch

    import models
    from orchestrator.config import EnsembleConfig
    from orchestrator.ensemble import Member, ensemble_metadata, log_and_register

    mlflow.set_tracking_uri(uri)
    nets = []
    for i, name in enumerate(members):
        torch.manual_seed(i)
        spec = {"label": f"{name}-{i}", "model": name, "overrides": {}, "num_classes": len(manifest["classes"])}
        nets.append(Member(spec["label"], spec, models.create_model(name, num_classes=spec["num_classes"]).state_dict()))
    cfg = EnsembleConfig(name="bench-batch-eval", experiment="bench-batch-eval")
    with mlflow.start_run(experiment_id=mlflow.set_experiment(cfg.experiment).experiment_id) as run:
        pass
    uri_, _ = log_and_register(cfg, nets, ensemble_metadata(cfg, nets, manifest, data_url), run.info.run_id,
                               mlflow.tracking.MlflowClient(uri))
    return uri_


def with_tasks(source: dict, data_url: str, split: str, spec: dict, batch_size: int, out: str) -> dict:
    from orchestrator.batch_eval import score_split, write_predictions
    from orchestrator.scoring import error_metrics

    scores = score_split(source, data_url, split, spec, batch_size=batch_size)
    write_predictions(scores, out)
    return error_metrics(scores.probs, scores.labels)


class Scorer:
    """A Ray Data actor: the model loaded once (through `load_registered`), then one slice per call."""

    def __init__(self, source: dict, data_url: str, split: str, world: int, spec: dict, batch_size: int):
        from orchestrator.batch_eval import in_task, members_of

        in_task()
        self.members = members_of(source)
        self.args = (data_url, split, world, spec, batch_size)

    def __call__(self, batch: dict) -> dict:
        from orchestrator.batch_eval import predictions, score_slice

        data_url, split, world, spec, batch_size = self.args
        (rank,) = batch["id"]
        keys, labels, probs, listed = score_slice(self.members, data_url, split, int(rank), world, spec, batch_size)
        if not keys:
            return {"key": np.array([], dtype=object), "listed": np.array([], dtype=np.int64)}
        columns = predictions(keys, labels, probs.mean(0))
        return {**{k: np.array(v) if k != "key" else np.array(v, dtype=object) for k, v in columns.items()},
                "listed": np.full(len(keys), listed)}


def with_ray_data(source: dict, data_url: str, split: str, spec: dict, batch_size: int, out: str) -> dict:
    import ray
    import ray.data

    from orchestrator.batch_eval import EvaluationError
    from orchestrator.scoring import error_metrics

    world = max(1, int(ray.cluster_resources().get("CPU", 1)))
    # The slices made in the driver (from_items): a read task would wait for a CPU the actors hold.
    ds = ray.data.from_items([{"id": rank} for rank in range(world)], override_num_blocks=world).map_batches(
        Scorer, fn_constructor_kwargs={"source": source, "data_url": data_url, "split": split, "world": world,
                                       "spec": spec, "batch_size": batch_size},
        batch_size=1, compute=ray.data.ActorPoolStrategy(size=world), num_cpus=1,
    ).materialize()
    rows = ds.to_pandas()
    if rows["key"].nunique() != len(rows) or set(rows["listed"]) != {len(rows)}:  # exactly once, as score_split
        raise EvaluationError(f"scored {len(rows)} rows ({rows['key'].nunique()} keys), the manifest lists {set(rows['listed'])}")
    ds.drop_columns(["listed"]).write_parquet(out)
    return error_metrics(np.stack(rows["probabilities"].to_numpy()), rows["label"].to_numpy())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data/digits", help="shards (written from the digits if missing)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--members", default="resnet8,resnet14", help="comma-separated zoo names")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=128)
    args = ap.parse_args()

    from orchestrator.batch_eval import transform_spec
    from orchestrator.cluster import ensure_ray
    from orchestrator.preflight import Data, preflight

    before = preflight(data=[Data(args.data, (args.split,), "--data", source="digits", asked=True)])
    ((data_url, manifest),) = before.manifests.items()
    with tempfile.TemporaryDirectory(prefix="bench-batch-eval-") as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        os.environ["MLFLOW_TRACKING_URI"] = uri
        model_uri = register(args.members.split(","), data_url, manifest, uri)
        ensure_ray()
        from orchestrator.batch_eval import load_registered

        spec = transform_spec(load_registered(model_uri, uri)[0])
        source = {"model_uri": model_uri, "tracking_uri": uri, "trust_model": False}
        n = manifest["splits"][args.split]["num_samples"]
        print(f"{model_uri} ({args.members}) on {data_url} [{args.split}], {n} images", flush=True)
        times: dict[str, list[float]] = {"tasks": [], "ray data": []}
        metrics = {}
        for r in range(args.rounds):
            for name, fn in (("tasks", with_tasks), ("ray data", with_ray_data)):
                t0 = time.perf_counter()
                metrics[name] = fn(source, data_url, args.split, spec, args.batch_size, f"{tmp}/{name}-{r}.parquet")
                times[name].append(time.perf_counter() - t0)
                print(f"round {r + 1} {name:8s} {times[name][-1]:6.2f} s  ({metrics[name]['n']} scored, "
                      f"top-1 err {metrics[name]['top1_err']:.2f} %)", flush=True)
        a, b = metrics["tasks"], metrics["ray data"]
        assert (a["n"], a["top1_err"]) == (b["n"], b["top1_err"]) and abs(a["log_loss"] - b["log_loss"]) < 1e-5, metrics
        for name, t in times.items():
            print(f"{name:8s} median {statistics.median(t):6.2f} s, best {min(t):6.2f} s over {len(t)} rounds")
    return 0


if __name__ == "__main__":
    from orchestrator.run import command_environment

    command_environment()
    sys.exit(main())
