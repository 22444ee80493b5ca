"""Train an ensemble of ResNets of different depth (v1, Table 5), evaluate every member and the
ensemble (average of softmax scores), register it in MLflow and batch-evaluate it on the test split.

examples:
  python -m orchestrator.run ensemble                       # embedded default: ensemble_digits.yaml
  python -m orchestrator.run ensemble train.schedule.epochs=2 evaluation.protocol=center
  python -m orchestrator.run ensemble --config ensemble_imagenet.yaml --storage s3://bucket/runs
  ray job submit --working-dir . -- python -m orchestrator.run ensemble

Overrides: `train.<key>=value` goes to every member's training recipe (e.g. train.data.url=...,
train.schedule.epochs=3); other keys to the ensemble config (name=..., evaluation.protocol=ten_crop,
registry.alias=...). Members are trained as concurrent Ray Tune trials, or taken from `mlflow_run`
or `checkpoint` entries. Re-running the same command reuses finished members. The alias (default
`champion`) moves to the new version only if it beats the current champion on the same validation split.
"""

from __future__ import annotations


def add_arguments(p) -> None:
    p.add_argument("--config", default=None, help="ensemble YAML (a bare name is looked up in orchestrator/configs/ensembles/; default: ensemble_digits.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (train.* for the members)")
    p.add_argument("--storage", default=None,
                   help="folder or s3://bucket/prefix for results, checkpoints, predictions (default: the config's `storage`, ./runs)")


def main(args) -> int:
    from ..ensemble import run_ensemble
    from ..tracking import tracking_uri

    out = run_ensemble(args.config, args.overrides, args.storage)
    uri = tracking_uri()
    print(f"\n[done] registered {out['model_uri']} ({out['decision']})")
    print(f"[done] test predictions: {out['batch']['predictions']}")
    page = f"#/experiments/{out['experiment_id']}?workflowType=machine_learning"  # the runs table, not GenAI
    if uri.startswith("sqlite:///"):
        print(f"[done] browse the runs: mlflow ui --backend-store-uri {uri}   (then open http://127.0.0.1:5000/{page})")
    else:
        print(f"[done] MLflow: {uri.rstrip('/')}/{page}")
    return 0
