"""The papers' ablation studies as files: load a study, expand it to Tune trials, run it, report.

A study is `orchestrator/configs/ablate_<name>.yaml`:

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
        bases:                      # named base configs: a config file plus dotted overrides
          cifar10: {config: cifar10_resnet.yaml, overrides: [data.url=data/cifar10]}
        rows:                       # the grid: one row per configuration
          - label: ResNet-20        # unique within the scale
            base: cifar10           # which base (optional when there is only one)
            model: resnet20         # a name from models.list_models()
            overrides: {}           # model overrides (shortcut, unit, skip, width, ...)
            train: []               # dotted train-config overrides for this row
            seeds: [0]              # repeats; mean +- std over them in the report
            paper: resnet20         # key into `published` (the number printed beside ours)
            panel: CIFAR-10 residual  # which panel of the error-curve figure (optional)
      demo:                         # the same study shrunk to the bundled digits; not comparable
        ...

Command-line overrides (`key=value`) apply to every trial after the base and row overrides.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from .config import CONFIG_DIR, ConfigError, load_yaml, run_name
from .config import load_train_config as _load_train_config

if TYPE_CHECKING:
    from .tuning import Trial

SCALES = ("paper", "demo")
PUBLISHED_KEYS = ("top1", "top1_std", "top5", "text", "ref", "note")
ROW_KEYS = ("label", "base", "model", "overrides", "train", "seeds", "paper", "panel")


def list_studies() -> list[str]:
    return sorted(p.stem.removeprefix("ablate_") for p in CONFIG_DIR.glob("ablate_*.yaml"))


class UnknownStudy(ConfigError):
    """A study name with no ablate_<name>.yaml; the message lists the valid ones."""


def study_path(name: str) -> Path:
    path = CONFIG_DIR / f"ablate_{name}.yaml"
    if not path.exists():
        raise UnknownStudy(f"unknown study {name!r}; valid studies: {', '.join(list_studies())}")
    return path


# ---------------------------------------------------------------------------------------------
# The study as typed data.


@dataclass
class Published:
    top1: float | None = None
    top1_std: float | None = None
    top5: float | None = None
    text: str = ""  # a published outcome that is not a number ("fails", "only in a figure")
    ref: str = ""
    note: str = ""
    key: str = ""

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
    paper: Published | None = None
    panel: str = ""


@dataclass
class Study:
    name: str
    title: str
    experiment: str
    scale: str
    note: str
    source: str
    bases: dict  # name -> {"config": file, "overrides": [...]}
    rows: list[Row]
    early_stopping: dict
    path: str


def _check_keys(where: str, data: dict, allowed) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(allowed)}")


def load_study(name_or_path: str, scale: str = "demo") -> Study:
    """Read a study by name (`depth`) or file path and pick one scale."""
    if scale not in SCALES:
        raise ConfigError(f"--scale must be one of {', '.join(SCALES)}, got {scale!r}")
    looks_like_file = name_or_path.endswith((".yaml", ".yml")) or "/" in name_or_path
    path = Path(name_or_path) if looks_like_file else study_path(name_or_path)
    data = load_yaml(path)
    _check_keys(str(path), data, ("study", "title", "experiment", "published", "early_stopping", "scales"))
    published = {}
    for key, entry in (data.get("published") or {}).items():
        _check_keys(f"{path}: published.{key}", entry, PUBLISHED_KEYS)
        published[key] = Published(**entry, key=key)
    scales = data.get("scales") or {}
    if scale not in scales:
        raise ConfigError(f"{path}: no scale {scale!r}; it has {', '.join(scales) or 'none'}")
    s = scales[scale]
    _check_keys(f"{path}: scales.{scale}", s, ("note", "source", "bases", "rows"))
    bases = s.get("bases") or {}
    if not bases:
        raise ConfigError(f"{path}: scales.{scale}.bases is empty")
    for bname, base in bases.items():
        _check_keys(f"{path}: scales.{scale}.bases.{bname}", base, ("config", "overrides"))
    rows = []
    for i, r in enumerate(s.get("rows") or []):
        where = f"{path}: scales.{scale}.rows[{i}]"
        _check_keys(where, r, ROW_KEYS)
        if "label" not in r or "model" not in r:
            raise ConfigError(f"{where}: needs label and model")
        base = r.get("base") or (next(iter(bases)) if len(bases) == 1 else None)
        if base not in bases:
            raise ConfigError(f"{where}: base {r.get('base')!r} is not one of {', '.join(bases)}")
        paper = r.get("paper")
        if paper is not None and paper not in published:
            raise ConfigError(f"{where}: paper {paper!r} is not a key of `published`")
        seeds = r.get("seeds", [0])
        if not seeds or not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds):
            raise ConfigError(f"{where}: seeds must be a non-empty list of integers, got {seeds!r}")
        rows.append(
            Row(
                label=str(r["label"]), model=r["model"], base=base, overrides=dict(r.get("overrides") or {}),
                train=list(r.get("train") or []), seeds=list(seeds), paper=published.get(paper),
                panel=str(r.get("panel") or ""),
            )
        )
    labels = [r.label for r in rows]
    if not rows or len(set(labels)) != len(labels):
        raise ConfigError(f"{path}: scales.{scale}.rows must be non-empty with unique labels, got {labels}")
    es = {"enabled": False, "grace_period": 1, "reduction_factor": 3, **(data.get("early_stopping") or {})}
    _check_keys(f"{path}: early_stopping", es, ("enabled", "grace_period", "reduction_factor"))
    return Study(
        name=data.get("study") or path.stem.removeprefix("ablate_"), title=data.get("title", ""),
        experiment=data.get("experiment") or f"ablate-{path.stem}", scale=scale, note=s.get("note", ""),
        source=s.get("source", ""), bases=bases, rows=rows, early_stopping=es, path=str(path),
    )


@dataclass
class StudyTrial:
    row: Row
    seed: int
    trial: Trial  # orchestrator.tuning.Trial: a label and its TrainConfig


def expand(study: Study, overrides: list[str] = ()) -> list[StudyTrial]:
    """Every (row, seed) as a validated TrainConfig; order follows the YAML."""
    from .tuning import Trial  # imports Ray: not needed for --help

    out = []
    for row in study.rows:
        base = study.bases[row.base]
        for seed in row.seeds:
            cli = [
                *base.get("overrides", []),
                f"model.name={row.model}",
                *(f"model.overrides.{k}={json.dumps(v)}" for k, v in row.overrides.items()),
                f"seed={seed}",
                *row.train,
                *overrides,
            ]
            try:
                cfg = _load_train_config(base["config"], cli)
            except ConfigError as e:
                raise ConfigError(f"{study.path}: row {row.label!r} seed {seed}: {e}") from None
            label = row.label if len(row.seeds) == 1 else f"{row.label} seed {seed}"
            out.append(StudyTrial(row, seed, Trial(label, cfg)))
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
        grace_period=int(es["grace_period"]),
        reduction_factor=float(es["reduction_factor"]),
    )


# ---------------------------------------------------------------------------------------------
# Outcomes of the trials, read back from MLflow (the child runs).


@dataclass
class Outcome:
    """What one trial produced: final val errors, or why it has none."""

    top1: float | None = None
    top5: float | None = None
    epochs: int = 0  # epochs logged
    planned: int = 0
    status: str = ""  # MLflow status of the child run ("FINISHED", "RUNNING", "FAILED", "" = none)
    error: str = ""
    run_id: str = ""


def read_outcomes(client, experiment_id: str, trials: list[StudyTrial], errors: dict) -> dict[str, Outcome]:
    """The final (last-epoch) val errors of every trial, by trial label."""
    from .tracking import find_run

    out = {}
    for t in trials:
        name = run_name(t.trial.config)
        run = find_run(client, experiment_id, name)
        o = Outcome(planned=t.trial.config.schedule.epochs, error=str(errors.get(t.trial.label) or "")[:300])
        if run:
            o.run_id, o.status = run.info.run_id, run.info.status
            o.epochs = len(client.get_metric_history(o.run_id, "epoch"))
            for key, attr in (("val_top1_err", "top1"), ("val_top5_err", "top5")):
                hist = client.get_metric_history(o.run_id, key)
                if hist:
                    setattr(o, attr, max(hist, key=lambda m: (m.step, m.timestamp)).value)
        out[t.trial.label] = o
    return out


# ---------------------------------------------------------------------------------------------
# The report: a Markdown table, one row per configuration, and the error-curve figure.


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def _fmt(mean: float | None, std: float | None) -> str:
    if mean is None:
        return ""
    if math.isnan(mean):
        return "nan (diverged)"
    return f"{mean:.2f} +- {std:.2f}" if std is not None else f"{mean:.2f}"


@dataclass
class ReportRow:
    label: str
    model: str
    n: int  # seeds with a result
    seeds: int  # seeds planned
    top1: tuple[float | None, float | None]  # (mean, std) of the final val top-1 error
    top5: tuple[float | None, float | None]
    paper: Published | None
    remark: str


def summarize(study: Study, trials: list[StudyTrial], outcomes: dict[str, Outcome]) -> list[ReportRow]:
    """One entry per configuration (row of the grid), aggregating its seeds."""
    out = []
    for row in study.rows:
        mine = [outcomes.get(t.trial.label, Outcome()) for t in trials if t.row is row]
        done = [o for o in mine if o.top1 is not None]
        remarks = []
        failed = [o for o in mine if o.error or o.status == "FAILED"]
        if failed:
            remarks.append(f"{len(failed)} of {len(mine)} failed: {(failed[0].error or 'see MLflow')[:120]}")
        partial = [o for o in done if o.epochs < o.planned]
        if partial:
            remarks.append(f"{len(partial)} stopped early (after {min(o.epochs for o in partial)} of {partial[0].planned} epochs)")
        missing = len(mine) - len(done) - len([o for o in failed if o.top1 is None])
        if missing > 0:
            remarks.append(f"{missing} without a result")
        top1 = _mean_std([o.top1 for o in done]) if done else (None, None)
        top5s = [o.top5 for o in done if o.top5 is not None]
        top5 = _mean_std(top5s) if top5s else (None, None)
        out.append(ReportRow(row.label, row.model, len(done), len(mine), top1, top5, row.paper, "; ".join(remarks)))
    return out


def _diff(ours: float | None, paper: float | None) -> str:
    if ours is None or paper is None or math.isnan(ours):
        return ""
    return f"{ours - paper:+.2f}"


def render_markdown(study: Study, rows: list[ReportRow], *, split: str = "val", figure: str = "") -> str:
    """The report table (Markdown): ours (mean +- std over seeds) beside the paper's number and the difference."""
    with_top5 = any(r.paper and r.paper.top5 is not None for r in rows)
    lines = [f"# Ablation study `{study.name}` ({study.scale} scale): {study.title}", ""]
    if study.scale == "demo":
        lines += [
            "> **DEMO, NOT COMPARABLE WITH THE PAPER.** Reduced depth, width and epochs on the bundled digits data; "
            "the paper column shows the published number of the configuration each demo row stands in for.",
            "",
        ]
    if study.note:
        lines += [study.note.strip(), ""]
    lines += [
        f"Ours: top-1{' / top-5' if with_top5 else ''} error (%) at the last epoch on the **`{split}` split** that "
        "training evaluated (single view), mean +- std over seeds. Paper: the published error (%) "
        "(test set for CIFAR-10, 10-crop on the validation set for ImageNet); diff = ours - paper.",
        "",
    ]
    head = ["configuration", "model", "seeds", "ours top-1", "paper top-1", "diff top-1"]
    if with_top5:
        head += ["ours top-5", "paper top-5", "diff top-5"]
    head += ["paper source", "remarks"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        p = r.paper
        cells = [
            r.label, f"`{r.model}`", f"{r.n}/{r.seeds}", _fmt(*r.top1) or "-",
            (p.describe("top1") or "-") if p else "-", _diff(r.top1[0], p.top1 if p else None) or "-",
        ]
        if with_top5:
            cells += [_fmt(*r.top5) or "-", (p.describe("top5") or "-") if p else "-",
                      _diff(r.top5[0], p.top5 if p else None) or "-"]
        source = "; ".join(x for x in ((p.ref, p.note) if p else ()) if x)
        if p and study.scale == "demo":
            source = f"stands in for `{p.key}`: {source}"
        cells += [source or "-", r.remark or ""]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    if figure:
        lines += ["", f"Training error (dashed) and {split} error (solid) against iterations: `{figure}`."]
    return "\n".join(lines) + "\n"


def error_curves_png(client, study: Study, trials: list[StudyTrial], outcomes: dict[str, Outcome]) -> bytes:
    """Training (dashed) and val (solid) top-1 error against iterations, one panel per `panel` of the
    grid (e.g. plain | residual, as in v1 Figs. 4 and 6), one colour per configuration (its first seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[str, list[Row]] = {}
    for row in study.rows:
        panels.setdefault(row.panel or study.name, []).append(row)
    ncol = min(2, len(panels))
    nrow = math.ceil(len(panels) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(6 * ncol, 4 * nrow), squeeze=False)
    for ax, (panel, rows) in zip(axes.flat, panels.items(), strict=False):
        for i, row in enumerate(rows):
            first = next(t for t in trials if t.row is row)
            o = outcomes.get(first.trial.label)
            if not o or not o.run_id:
                continue
            color = f"C{i % 10}"
            for key, style in (("train_top1_err", "--"), ("val_top1_err", "-")):
                hist = sorted(client.get_metric_history(o.run_id, key), key=lambda m: m.step)
                if hist:
                    ax.plot([m.step for m in hist], [m.value for m in hist], style, color=color,
                            label=row.label if key == "val_top1_err" else None)
        ax.set_title(panel)
        ax.set_xlabel("iterations")
        ax.set_ylabel("top-1 error (%)")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    demo = "  [DEMO: not comparable with the paper]" if study.scale == "demo" else ""
    fig.suptitle(f"{study.name}: train (dashed) / val (solid) error{demo}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# The whole study: parent run, trials, report.


@dataclass
class StudyResult:
    name: str  # the deterministic study / parent-run name
    parent_run_id: str
    markdown: str
    rows: list[ReportRow]
    outcomes: dict[str, Outcome]
    errors: dict
    report_dir: str  # where report.md and the figure were written ("" when storage is not local)


def run_study(study: Study, overrides: list[str], storage: str, *, asha: bool | None = None,
              experiment: str | None = None) -> StudyResult:
    """Run (or resume) every trial of the study as Ray Tune trials under one MLflow parent run; report."""
    import mlflow

    from . import tracking
    from .cluster import check_fits, ensure_ray
    from .train import ensure_data
    from .tuning import run_trials

    trials = expand(study, overrides)
    ensure_ray()
    for t in trials:  # fail fast, before any run is recorded (raises cluster.ClusterTooSmall)
        s = t.trial.config.scaling
        check_fits(s.num_workers, s.cpus_per_worker, s.use_gpu, f"study {study.name}: trial {t.trial.label!r}")
    for url in sorted({t.trial.config.data.url for t in trials}):
        ensure_data(next(t.trial.config for t in trials if t.trial.config.data.url == url), study.source)

    use_asha = study.early_stopping["enabled"] if asha is None else asha
    name = study_run_name(study, trials, use_asha)
    experiment = experiment or study.experiment
    client = mlflow.tracking.MlflowClient(tracking.tracking_uri())
    params = {"study": study.name, "scale": study.scale, "study_file": study.path, "trials": len(trials),
              "overrides": " ".join(overrides), "storage": storage}
    parent_id, _ = tracking.find_or_create_run(client, experiment, name, params, {"orchestrator.kind": "ablation"})
    print(f"[ablate] study {study.name} ({study.scale}): {len(trials)} trials, parent MLflow run {parent_id} ({name})"
          f"{', ASHA early stopping' if use_asha else ''}", flush=True)
    errors = run_trials(
        [t.trial for t in trials], study=name, storage=storage, experiment=experiment, parent_run_id=parent_id,
        scheduler=asha_scheduler(study, trials) if use_asha else None,
    )

    exp_id = tracking.experiment_id(client, experiment)
    outcomes = read_outcomes(client, exp_id, trials, errors)
    for label, o in outcomes.items():  # ASHA stopped these: Tune will not resume them, so close their runs
        if use_asha and o.status == "RUNNING" and label not in errors:
            tracking.set_tags(client, o.run_id, {"orchestrator.stopped_by": "asha"})
            client.set_terminated(o.run_id, "KILLED")
            o.status = "KILLED"
    rows = summarize(study, trials, outcomes)
    figure = "error_curves.png"
    markdown = render_markdown(study, rows, split=trials[0].trial.config.data.val_split, figure=figure)
    png = error_curves_png(client, study, trials, outcomes)
    client.log_text(parent_id, markdown, "report/report.md")
    _log_bytes(client, parent_id, png, f"report/{figure}")
    tracking.log_dict(client, parent_id, {t.trial.label: vars(outcomes[t.trial.label]) for t in trials},
                      "report/outcomes.json")
    for r in rows:
        if r.top1[0] is not None:
            client.log_metric(parent_id, f"top1_err/{_metric_key(r.label)}", r.top1[0])
    client.set_terminated(parent_id, "FAILED" if errors else "FINISHED")

    report_dir = ""
    if urlparse(storage).scheme in ("", "file"):
        d = Path(urlparse(storage).path if "://" in storage else storage).expanduser().resolve() / "reports" / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "report.md").write_text(markdown)
        (d / figure).write_bytes(png)
        report_dir = str(d)
    return StudyResult(name, parent_id, markdown, rows, outcomes, errors, report_dir)


def _metric_key(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)


def _log_bytes(client, run_id: str, data: bytes, artifact_path: str) -> None:
    import tempfile

    path = Path(artifact_path)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / path.name).write_bytes(data)
        client.log_artifact(run_id, str(Path(tmp) / path.name), str(path.parent))

