"""Entry point: `python -m orchestrator.run <command> ...` (also inside `ray job submit -- ...`).

Commands:
  train     train one network of the zoo with a recipe from orchestrator/configs/
"""

from __future__ import annotations

import argparse
import sys

from .config import ConfigError, load_train_config

TRAIN_HELP = """\
Train any registered ResNet on Ray Train (DDP: gloo on CPU, NCCL on GPU), with checkpoints,
automatic resume and MLflow tracking.

examples:
  python -m orchestrator.run train --config orchestrator/configs/digits_resnet20.yaml
  python -m orchestrator.run train --config cifar10_resnet.yaml model.name=resnet56 --storage s3://bucket/runs
  ray job submit --working-dir . -- python -m orchestrator.run train --config digits_resnet20.yaml

Overrides are dotted keys with YAML values: schedule.epochs=3 optim.lr=0.05 scaling.num_workers=4
model.overrides.shortcut=B. Re-running the same command (same config, same --storage) continues the
run from its last checkpoint. MLflow: MLFLOW_TRACKING_URI, else ./mlflow.db (see: mlflow ui).
"""


def _train(args) -> int:
    from .train import ensure_data, fit

    cfg = load_train_config(args.config, args.overrides)
    ensure_data(cfg, args.source)
    fit(cfg, args.storage)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m orchestrator.run",
        description="Train, ablate and ensemble the ResNet family on Ray, tracked in MLflow.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    train = sub.add_parser(
        "train", help="train one network", description=TRAIN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    train.add_argument("--config", required=True, help="a YAML file (a bare name is looked up in orchestrator/configs/)")
    train.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    train.add_argument("--storage", default="./runs", help="folder or s3://bucket/prefix for results and checkpoints")
    train.add_argument(
        "--source", default=None, help="write shards from this pipelines source (e.g. digits) if data.url has none yet"
    )
    train.set_defaults(func=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
