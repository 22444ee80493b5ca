"""Run one of the papers' ablation studies as concurrent Ray Tune trials, tracked in MLflow, and print a
report: each final checkpoint scored with the paper's protocol on the paper's split (batch evaluation on
the cluster), mean +- std over seeds, beside the published number and, for the paper's own configurations,
the difference; one table per (split, protocol). The depth study also computes a verdict on the
degradation problem from the measured training curves.

studies (orchestrator/configs/studies/ablate_<name>.yaml):
  depth      plain vs residual nets across depth: ImageNet 18/34 (v1 Table 2), CIFAR-10 20..110 (v1 Table 6)
  recipes    ResNet-50 under v1's, torchvision's v2, ResNet-strikes-back A3 and FFCV recipes (their published numbers)
  shortcuts  shortcut options A / B / C on ResNet-34 (v1 Table 3, top-1 and top-5)
  skip       shortcut variants on ResNet-110: scaling, gating, 1x1 conv, dropout (v2 Table 1)
  units      activation arrangements on ResNet-110 and ResNet-164 (v2 Table 2)

scales:
  demo   (default) reduced width and epochs on the bundled digits (shards written to data/digits if
         missing); minutes on a laptop; NOT comparable with the paper: no differences are printed.
         `ablate depth` trains plain/ResNet-20 and plain/ResNet-56 alike (v1 Fig. 6); `ablate recipes`
         ResNet-20 under v1's CIFAR recipe and with MixUp + EMA + label smoothing + cosine
  paper  the papers' recipes (imagenet_v1 / cifar10_resnet / cifar10_resnet110 / cifar10_preact configs; for
         `recipes`, imagenet_tv2 / imagenet_rsb_a3 / imagenet_fast too);
         point data.url at your shards, e.g. data.url=s3://YOUR-BUCKET/cifar10

examples:
  python -m orchestrator.run ablate depth
  python -m orchestrator.run ablate depth --rows plain-20,ResNet-20 schedule.epochs=2
  python -m orchestrator.run ablate skip --scale paper data.url=s3://YOUR-BUCKET/cifar10 --storage s3://YOUR-BUCKET/runs
  python -m orchestrator.run ablate --config my_study.yaml --asha

Overrides (key.sub=value) apply to every trial. Re-running the same command resumes the study: finished
trials are not trained again. MLflow: one parent run per study (ablate-<study>-<scale>-<hash>) with a
nested child run per trial; the report (report/report.md, report/error_curves.png) is logged on the
parent and, for a local --storage, written to <storage>/reports/<name>/.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(p) -> None:
    from ..ablations import SCALES, list_studies

    p.add_argument("study", nargs="?", metavar="STUDY", help=f"one of: {', '.join(list_studies())}")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="train-config overrides for every trial")
    p.add_argument("--config", default=None, help="a study YAML file instead of ablate_<STUDY>.yaml (a bare name is looked up in configs/studies/)")
    p.add_argument("--scale", choices=SCALES, default="demo", help="demo (digits, minutes) or paper (the recipes)")
    p.add_argument("--storage", default="./runs", help="folder or s3://bucket/prefix for Tune results and checkpoints")
    p.add_argument("--rows", default=None, help="comma-separated row labels: run only these configurations")
    p.add_argument("--experiment", default=None, help="MLflow experiment (default: the study file's)")
    p.add_argument(
        "--asha", action=argparse.BooleanOptionalAction, default=None,
        help="ASHA early stopping on val error (for a ranking only); default: the study file's early_stopping",
    )

    # STUDY, options and key=value overrides in any order (`ablate depth --rows a,b k=v`): plain parsing
    # takes positionals only up to the first option. The parent parser calls p.parse_known_args.
    def intermixed(args=None, namespace=None):
        del p.parse_known_args  # back to the class's method, which the intermixed parse calls itself
        try:
            return p.parse_known_intermixed_args(args, namespace)
        finally:
            p.parse_known_args = intermixed

    p.parse_known_args = intermixed


def main(args) -> int:
    from ..ablations import list_studies, load_study, run_study
    from ..config import ConfigError

    overrides = list(args.overrides)
    study_arg = args.study
    if study_arg and "=" in study_arg:  # `ablate --config f.yaml k=v`: argparse put the override first
        overrides.insert(0, study_arg)
        study_arg = None
    source = args.config or study_arg
    if not source:
        raise ConfigError(f"name a study ({', '.join(list_studies())}) or give --config FILE")
    study = load_study(source, args.scale)
    if args.rows:
        wanted = [r.strip() for r in args.rows.split(",") if r.strip()]
        unknown = [w for w in wanted if w not in {r.label for r in study.rows}]
        if unknown:
            raise ConfigError(f"--rows: unknown row(s) {', '.join(unknown)}; rows: {', '.join(r.label for r in study.rows)}")
        study.rows = [r for r in study.rows if r.label in wanted]
    result = run_study(study, overrides, args.storage, asha=args.asha, experiment=args.experiment)
    print("\n" + result.markdown, flush=True)
    where = f" and {result.report_dir}" if result.report_dir else ""
    print(f"[ablate] report logged on MLflow run {result.parent_run_id} ({result.name}){where}", flush=True)
    if result.errors:
        print(f"error: {len(result.errors)} trial(s) failed: {', '.join(result.errors)}", file=sys.stderr)
        return 1
    return 0
