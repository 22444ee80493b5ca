"""Batch-evaluate a registered ensemble on a whole data split, in parallel on the Ray cluster: writes
predictions (key, label, top-5 classes, probabilities) as Parquet under the storage URL and logs the
top-1/top-5 error and log loss to MLflow.

examples:
  python -m orchestrator.run evaluate --model-uri models:/resnet-ensemble@champion --data data/digits --split test
  python -m orchestrator.run evaluate --model-uri models:/resnet-ensemble/3 --data s3://bucket/imagenet \\
      --split val --protocol ten_crop --storage s3://bucket/runs

A registered model is code. This project's ensemble is recognised without running any of it and
rebuilt by the installed code from its weights; any other model is refused unless --trust-model,
which loads it MLflow's way and so runs whatever code whoever registered it put in it.
"""

from __future__ import annotations

import os
import sys


def add_arguments(p) -> None:
    p.add_argument("--model-uri", required=True, help="e.g. models:/resnet-ensemble@champion or models:/NAME/VERSION")
    p.add_argument("--data", required=True, help="shards folder or s3://bucket/prefix (with manifest.json)")
    p.add_argument("--split", default="test", help="split of the manifest to score (default: test)")
    from ..config import protocols

    p.add_argument("--protocol", default=None, choices=protocols(),
                   help="test protocol (default: the one the model was registered with)")
    p.add_argument("--storage", default="./runs", help="where predictions/ is written (folder or s3://...)")
    p.add_argument("--experiment", default="batch-eval", help="MLflow experiment for the evaluation run")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--trust-model", action="store_true",
                   help="load a model that is not this project's ensemble, running its pickled code (also: "
                        "RESNET_TRUST_MODEL=1; a cluster this command did not start needs it in the job's env)")


def main(args) -> int:
    from ..batch_eval import evaluate_registered

    if args.trust_model:
        # The driver's check and the Ray tasks of a cluster this process starts read it from here.
        os.environ["RESNET_TRUST_MODEL"] = "1"
        print(f"[evaluate] --trust-model: {args.model_uri} is loaded even if it is not this project's "
              "ensemble, running the code it carries", file=sys.stderr, flush=True)
    evaluate_registered(args.model_uri, args.data, args.split, args.storage, protocol=args.protocol,
                        experiment=args.experiment, batch_size=args.batch_size)
    return 0
