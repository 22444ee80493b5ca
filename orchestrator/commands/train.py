"""Train any registered ResNet on Ray Train (DDP: gloo on CPU, NCCL on GPU), with checkpoints,
automatic resume and MLflow tracking.

examples:
  python -m orchestrator.run train --config digits_resnet20.yaml --source digits
  python -m orchestrator.run train --config cifar10_resnet.yaml model.name=resnet56 --storage s3://bucket/runs
  ray job submit --working-dir . -- python -m orchestrator.run train --config digits_resnet20.yaml

Overrides are dotted keys with YAML values: schedule.epochs=3 optim.lr=0.05 scaling.num_workers=4
model.overrides.shortcut=B. Re-running the same command (same config, same --storage) continues the
run from its last checkpoint, or returns at once if it finished. MLflow: MLFLOW_TRACKING_URI, else
./mlflow.db in the working directory (browse with: mlflow ui).
"""

from __future__ import annotations


def add_arguments(p) -> None:
    p.add_argument("--config", required=True, help="a YAML file (a bare name is looked up in orchestrator/configs/recipes/)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    p.add_argument("--storage", default="./runs", help="folder or s3://bucket/prefix for results and checkpoints")
    p.add_argument(
        "--source", default=None, help="write shards from this pipelines source (e.g. digits) if data.url has none yet"
    )


def main(args) -> int:
    from ..config import load_train_config
    from ..preflight import ensure_data
    from ..train import fit

    cfg = load_train_config(args.config, args.overrides)
    cfg.data.url = ensure_data(cfg.data.url, args.source, asked=True)
    fit(cfg, args.storage)
    return 0
