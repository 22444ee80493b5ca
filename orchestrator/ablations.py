"""The papers' ablation studies as files: load a study, expand it to Tune trials, run it, score and report
(the report itself: `orchestrator.study_report`).

A study is `orchestrator/configs/studies/ablate_<name>.yaml`; its schema, with every key typed and
commented, is `config.StudyConfig`:

    study: depth                    # the name on the command line
    title: ...                      # the report's heading
    experiment: ablate-depth        # MLflow experiment of the parent run and of every child run
    published:                      # the papers' numbers, error %, one entry per configuration
      resnet20: {top1: 8.75, ref: "v1 Table 6"}
      resnet110: {top1: 6.61, top1_std: 0.16, ref: "v1 Table 6, mean of 5 runs", note: "best 6.43"}
      plain20: {text: "only in a figure (v1 Fig. 6)", ref: "v1 Fig. 6"}   # no number: text instead
      # keys: top1, top1_std, top5, text (an outcome that is not a number, e.g. "fails"), ref, note
    early_stopping:                 # ASHA on val_top1_err, for a ranking only (--asha / --no-asha)
      enabled: false
      grace_period: 2               # epochs every trial runs before it may be stopped
      reduction_factor: 3
    scales:
      paper:                        # the papers' recipes on the user's data
        note: ...                   # printed in the report header
        source: ""                  # a pipelines source written to data.url when missing ("" = none)
        bases:                      # named base configs: a config file plus dotted overrides, and how the
          cifar10:                  # final checkpoints are scored (the paper's split and test protocols)
            config: cifar10_resnet.yaml
            overrides: [data.url=data/cifar10]
            evaluation: {split: test, protocols: [center]}   # ImageNet: {split: val, protocols: [ten_crop]}
        verdict:                    # optional: a claim computed from the measured training curves
          degradation: {plain: [plain-20, plain-56], residual: [ResNet-20, ResNet-56]}
        rows:                       # the grid: one row per configuration
          - label: ResNet-20        # unique within the scale
            base: cifar10           # which base (optional when there is only one)
            model: resnet20         # a name from models.list_models()
            overrides: {}           # model overrides (shortcut, unit, skip, width, ...)
            train: []               # dotted train-config overrides for this row
            seeds: [0]              # repeats; mean +- std over them in the report
            paper: resnet20         # key into `published` (the number printed beside ours), or one key per
                                    # protocol: {ten_crop: resnet34_B, multi_scale: resnet34_B_multi_scale}
            panel: CIFAR-10 residual  # which panel of the error-curve figure (optional)
      demo:                         # the same study shrunk to the bundled digits; not comparable
        ...

Command-line overrides (`key=value`) apply to every trial after the base and row overrides.

After training, every final checkpoint is scored through the ensemble's batch evaluation
(`batch_eval.score_split`) on its base's `evaluation` split with each of its protocols; the report
compares only those scores with the papers' numbers, one table per (split, protocol). Demo rows stand
in for other configurations on another data set: their tables print the published number beside
ours but no difference.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from .config import (
    CONFIG_DIR,
    FOLDERS,
    SCALES,
    BaseSpec,
    ConfigError,
    EarlyStoppingSpec,
    EvaluationSpec,
    VerdictSpec,
    list_configs,
    load_config,
    run_name,
    to_dict,
)
from .config import load_train_config as _load_train_config
from .study_report import Outcome, ReportRow, figure_panels, render_markdown, summarize, verdicts

if TYPE_CHECKING:
    from .tuning import Trial

__all__ = ["SCALES", "Outcome", "load_study", "expand", "run_study", "list_studies"]


def list_studies() -> list[str]:
    return [n.removeprefix("ablate_").removesuffix(".yaml") for n in list_configs("study") if n.startswith("ablate_")]


class UnknownStudy(ConfigError):
    """A study name with no ablate_<name>.yaml; the message lists the valid ones."""


def study_path(name: str) -> Path:
    path = CONFIG_DIR / FOLDERS["study"] / f"ablate_{name}.yaml"
    if not path.exists():
        raise UnknownStudy(f"unknown study {name!r}; valid studies: {', '.join(list_studies())}")
    return path


# ---------------------------------------------------------------------------------------------
# One scale of a study file, resolved: rows with their published numbers.


@dataclass
class Published:
    top1: float | None = None
    top1_std: float | None = None
    top5: float | None = None
    text: str = ""  # a published outcome that is not a number ("fails", "only in a figure")
    ref: str = ""
    note: str = ""
    key: str = ""  # its key in the file's `published`

    def describe(self, metric: str = "top1") -> str:
        value = getattr(self, metric)
        if value is None:
            return self.text if metric == "top1" else ""
        std = self.top1_std if metric == "top1" else None
        return f"{value:.2f} +- {std:.2f}" if std is not None else f"{value:.2f}"


@dataclass
class Row:
    label: str
    model: str
    base: str
    overrides: dict = field(default_factory=dict)
    train: list = field(default_factory=list)
    seeds: list = field(default_factory=lambda: [0])
    paper: Published | None = None  # the published number for the base's first protocol
    panel: str = ""
    papers: dict = field(default_factory=dict)  # protocol -> Published


@dataclass
class Study:
    name: str
    title: str
    experiment: str
    scale: str
    note: str
    source: str
    bases: dict[str, BaseSpec]
    rows: list[Row]
    early_stopping: EarlyStoppingSpec
    path: str
    verdict: VerdictSpec = field(default_factory=VerdictSpec)

    @property
    def stands_in(self) -> bool:
        """Demo rows stand in for other configurations on another data set: no numeric diff."""
        return self.scale == "demo"


def load_study(name_or_path: str, scale: str = "demo") -> Study:
    """Read a study by name (`depth`) or file (a bare file name is looked up in configs/studies/) and
    pick one scale. The file is checked as a whole (every scale) by its schema, `config.StudyConfig`."""
    if scale not in SCALES:
        raise ConfigError(f"--scale must be one of {', '.join(SCALES)}, got {scale!r}")
    looks_like_file = name_or_path.endswith((".yaml", ".yml")) or "/" in name_or_path
    path = Path(name_or_path) if looks_like_file else study_path(name_or_path)
    try:
        spec = load_config("study", path)
    except ConfigError as e:
        raise type(e)(f"{path}: {e}") from None
    if scale not in spec.scales:
        raise ConfigError(f"{path}: no scale {scale!r}; it has {', '.join(spec.scales) or 'none'}")
    s = spec.scales[scale]
    published = {k: Published(**to_dict(v), key=k) for k, v in spec.published.items()}
    rows = []
    for r in s.rows:
        protocols = s.bases[r.base].evaluation.protocols
        papers = {p: published[k] for p, k in r.papers(protocols).items()}
        rows.append(Row(r.label, r.model, r.base, r.overrides, r.train, r.seeds, papers.get(protocols[0]), r.panel, papers))
    name = spec.study or Path(path).stem.removeprefix("ablate_")
    return Study(
        name=name, title=spec.title, experiment=spec.experiment or f"ablate-{name}", scale=scale, note=s.note,
        source=s.source, bases=s.bases, rows=rows, early_stopping=spec.early_stopping, path=str(path), verdict=s.verdict,
    )


@dataclass
class StudyTrial:
    row: Row
    seed: int
    trial: Trial  # orchestrator.tuning.Trial: a label and its TrainConfig
    evaluation: EvaluationSpec = field(default_factory=EvaluationSpec)  # how its final checkpoint is scored


def expand(study: Study, overrides: list[str] = ()) -> list[StudyTrial]:
    """Every (row, seed) as a validated TrainConfig; order follows the YAML."""
    from .tuning import Trial  # imports Ray: not needed for --help

    out = []
    for row in study.rows:
        base = study.bases[row.base]
        for seed in row.seeds:
            cli = [
                *base.overrides,
                f"model.name={row.model}",
                *(f"model.overrides.{k}={json.dumps(v)}" for k, v in row.overrides.items()),
                f"seed={seed}",
                *row.train,
                *overrides,
            ]
            try:
                cfg = _load_train_config(base.config, cli)
            except ConfigError as e:
                raise ConfigError(f"{study.path}: row {row.label!r} seed {seed}: {e}") from None
            label = row.label if len(row.seeds) == 1 else f"{row.label} seed {seed}"
            out.append(StudyTrial(row, seed, Trial(label, cfg), base.evaluation))
    return out


def study_run_name(study: Study, trials: list[StudyTrial], asha: bool = False) -> str:
    """`ablate-<study>-<scale>-<hash>`: the same grid and overrides give the same name, so a rerun resumes.
    Early stopping is part of the name: Tune never re-runs a trial that ASHA stopped."""
    key = json.dumps([study.name, study.scale, [run_name(t.trial.config) for t in trials]] + (["asha"] if asha else []))
    return f"ablate-{study.name}-{study.scale}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def asha_scheduler(study: Study, trials: list[StudyTrial]):
    from ray.tune.schedulers import ASHAScheduler

    es = study.early_stopping
    return ASHAScheduler(
        time_attr="training_iteration",  # one Tune iteration per reported epoch
        max_t=max(t.trial.config.schedule.epochs for t in trials),
        grace_period=es.grace_period,
        reduction_factor=es.reduction_factor,
    )


# ---------------------------------------------------------------------------------------------
# Outcomes of the trials, read back from MLflow (the child runs), and their final checkpoints scored.


def _score_key(split: str, protocol: str, metric: str) -> str:
    return f"final_{split}_{protocol}_{metric}"


def _last(client, run_id: str, key: str) -> float | None:
    hist = client.get_metric_history(run_id, key)
    return max(hist, key=lambda m: (m.step, m.timestamp)).value if hist else None


def read_outcomes(client, experiment_id: str, trials: list[StudyTrial], errors: dict) -> dict[str, Outcome]:
    """Every trial's curves, last-epoch val errors and (already computed) final scores, by trial label."""
    from .tracking import find_run

    out = {}
    for t in trials:
        cfg = t.trial.config
        run = find_run(client, experiment_id, run_name(cfg))
        o = Outcome(planned=cfg.schedule.epochs, max_iters=cfg.schedule.max_iters,
                    error=str(errors.get(t.trial.label) or "")[:300])
        if run:
            o.run_id, o.status = run.info.run_id, run.info.status
            o.epochs = len(client.get_metric_history(o.run_id, "epoch"))
            o.top1, o.top5 = _last(client, o.run_id, "val_top1_err"), _last(client, o.run_id, "val_top5_err")
            curve = sorted(client.get_metric_history(o.run_id, "train_top1_err"), key=lambda m: (m.step, m.timestamp))
            o.train_curve = [m.value for m in curve]
            o.last_step = int(curve[-1].step) if curve else 0
            for protocol in t.evaluation.protocols:
                got = {m: _last(client, o.run_id, _score_key(t.evaluation.split, protocol, m))
                       for m in ("top1_err", "top5_err", "n")}
                if got["top1_err"] is not None:
                    o.scores[protocol] = got
        out[t.trial.label] = o
    return out


def score_outcomes(client, trials: list[StudyTrial], outcomes: dict[str, Outcome], *, batch_size: int = 128) -> None:
    """Score every finished trial's final checkpoint on its evaluation split with each protocol, through
    the ensemble's batch evaluation on the cluster (one pass over the data for all the checkpoints that
    share data, split and protocol); log the scores on the trial's run, so a rerun does not score again."""
    import pipelines

    from .batch_eval import score_split
    from .scoring import error_metrics
    from .train import download_checkpoint

    groups: dict[tuple, list[StudyTrial]] = {}
    for t in trials:
        o = outcomes[t.trial.label]
        if o.status != "FINISHED" or not o.run_id:
            continue
        d = t.trial.config.data
        for protocol in t.evaluation.protocols:
            if protocol not in o.scores:
                key = (d.url, t.evaluation.split, protocol, d.kind, d.test_size or d.size, d.resize)
                groups.setdefault(key, []).append(t)
    for (url, split, protocol, kind, size, resize), group in groups.items():
        manifest = pipelines.read_manifest(url)
        if split not in manifest["splits"]:
            raise ConfigError(f"{url} has no split {split!r} to score on; splits: {', '.join(manifest['splits'])}")
        members = []
        for t in group:
            _, state = download_checkpoint(client, outcomes[t.trial.label].run_id)
            spec = {"label": t.trial.label, "model": t.trial.config.model.name,
                    "overrides": t.trial.config.model.overrides, "num_classes": len(state["classes"])}
            members.append((spec, state["model"]))
        spec = {"kind": kind, "size": size, "resize": resize or None, "protocol": protocol,
                "mean": manifest["mean"], "std": manifest["std"]}
        print(f"[ablate] scoring {len(members)} final checkpoint(s) on {url} [{split}], {protocol}", flush=True)
        # Whole images at five scales and flipped: a smaller batch of one shape keeps a task's memory modest.
        batch = min(batch_size, 16) if protocol == "multi_scale" else batch_size
        scores = score_split({"members": members}, url, split, spec, batch_size=batch)
        for i, t in enumerate(group):
            m = error_metrics(scores.member_probs[i], scores.labels)
            o = outcomes[t.trial.label]
            o.scores[protocol] = {"top1_err": m["top1_err"], "top5_err": m["top5_err"], "n": m["n"]}
            for k, v in o.scores[protocol].items():
                client.log_metric(o.run_id, _score_key(split, protocol, k), float(v))


# ---------------------------------------------------------------------------------------------
# The whole study: checks, parent run, trials, scores, report.


@dataclass
class StudyResult:
    name: str  # the deterministic study / parent-run name
    parent_run_id: str
    markdown: str
    rows: list[ReportRow]
    outcomes: dict[str, Outcome]
    errors: dict
    report_dir: str  # where report.md and the figure were written ("" when storage is not local)


FIGURE = "error_curves.png"


def check_study(study: Study, trials: list[StudyTrial], storage: str) -> str:
    """Before any run is recorded: every trial's data (demo shards written where the study says) with the
    splits it trains, validates and is scored on; the storage; the MLflow store; the cluster holds every
    trial. Returns the storage, resolved."""
    from .cluster import user_path
    from .preflight import Data, Workers, preflight

    data, workers = [], []
    for t in trials:
        d = t.trial.config.data
        d.url = user_path(d.url, "data.url")  # where the user ran the command: the trials run elsewhere
        data.append(Data(d.url, (d.train_split, d.val_split, t.evaluation.split), source=study.source))
        workers.append(Workers.of(t.trial.config, f"study {study.name}: trial {t.trial.label!r}"))
    return preflight(data=data, storage=storage, tracking=True, workers=workers).storage


def run_study(study: Study, overrides: list[str], storage: str, *, asha: bool | None = None,
              experiment: str | None = None) -> StudyResult:
    """Run (or resume) every trial of the study as Ray Tune trials under one MLflow parent run; report."""
    import mlflow

    from . import tracking
    from .tuning import run_trials

    trials = expand(study, overrides)
    storage = check_study(study, trials, storage)
    use_asha = study.early_stopping.enabled if asha is None else asha
    name = study_run_name(study, trials, use_asha)
    experiment = experiment or study.experiment
    client = mlflow.tracking.MlflowClient(tracking.tracking_uri())
    params = {"study": study.name, "scale": study.scale, "study_file": study.path, "trials": len(trials),
              "overrides": " ".join(overrides), "storage": storage}
    parent_id, _ = tracking.find_or_create_run(client, experiment, name, params, {"orchestrator.kind": "ablation"})
    print(f"[ablate] study {study.name} ({study.scale}): {len(trials)} trials, parent MLflow run {parent_id} ({name})"
          f"{', ASHA early stopping' if use_asha else ''}", flush=True)
    try:  # the parent run is never left RUNNING
        errors = run_trials(
            [t.trial for t in trials], study=name, storage=storage, experiment=experiment, parent_run_id=parent_id,
            scheduler=asha_scheduler(study, trials) if use_asha else None,
        )
        outcomes = read_outcomes(client, tracking.experiment_id(client, experiment), trials, errors)
        if use_asha:
            close_stopped(client, outcomes, errors)
        score_outcomes(client, trials, outcomes)
        rows = summarize(study, trials, outcomes)
        markdown = render_markdown(study, rows, figure=FIGURE)
        demo = "  [DEMO: not comparable with the paper]" if study.stands_in else ""
        png = tracking.error_curves_png(client, figure_panels(study, trials, outcomes),
                                        f"{study.name}: train (dashed) / val (solid) error{demo}")
        log_report(client, parent_id, trials, outcomes, rows, verdicts(study, rows), markdown, png)
        client.set_terminated(parent_id, "FAILED" if errors else "FINISHED")
    except BaseException as e:
        tracking.mark_failed(client, parent_id, e)
        raise
    return StudyResult(name, parent_id, markdown, rows, outcomes, errors, write_local_report(storage, name, markdown, png))


def close_stopped(client, outcomes: dict[str, Outcome], errors: dict) -> None:
    """ASHA stopped these: Tune will not resume them, so their runs are closed (KILLED, tagged)."""
    from .tracking import set_tags

    for label, o in outcomes.items():
        if o.status == "RUNNING" and label not in errors:
            set_tags(client, o.run_id, {"orchestrator.stopped_by": "asha"})
            client.set_terminated(o.run_id, "KILLED")
            o.status = "KILLED"


def log_report(client, parent_id: str, trials: list[StudyTrial], outcomes: dict[str, Outcome], rows: list[ReportRow],
               verdict_lines: list[str], markdown: str, png: bytes) -> None:
    """The report, figure, outcomes, final scores (one metric per configuration) and verdicts on the parent run."""
    from .tracking import log_dict

    client.log_text(parent_id, markdown, "report/report.md")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / FIGURE).write_bytes(png)
        client.log_artifact(parent_id, str(Path(tmp) / FIGURE), "report")
    log_dict(client, parent_id, {t.trial.label: vars(outcomes[t.trial.label]) for t in trials}, "report/outcomes.json")
    for r in rows:
        for protocol, sc in r.scores.items():
            if sc["top1"][0] is not None:
                client.log_metric(parent_id, f"{r.split}_{protocol}_top1_err/{_metric_key(r.label)}", sc["top1"][0])
    for i, verdict in enumerate(verdict_lines):
        client.set_tag(parent_id, f"verdict.{i}", verdict[:5000])


def write_local_report(storage: str, name: str, markdown: str, png: bytes) -> str:
    """report.md and the figure under <storage>/reports/<name>/ for a local storage; the folder, or ""."""
    if urlparse(storage).scheme not in ("", "file"):
        return ""
    d = Path(urlparse(storage).path if "://" in storage else storage).expanduser().resolve() / "reports" / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "report.md").write_text(markdown)
    (d / FIGURE).write_bytes(png)
    return str(d)


def _metric_key(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
