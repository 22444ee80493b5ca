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
BASE_KEYS = ("config", "overrides", "evaluation")
VERDICTS = ("degradation",)
# The test protocols in words, per data kind (v1 sec. 3.4 and 4.2).
PROTOCOL_NAMES = {
    ("cifar", "center"): "single view",
    ("imagenet", "center"): "centre crop",
    ("imagenet", "ten_crop"): "10-crop",
    ("imagenet", "multi_scale"): "multi-scale, whole image + flips",
    ("imagenet", "multi_scale_center"): "multi-scale centre crops",
}


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
    paper: Published | None = None  # the published number for the base's first protocol
    panel: str = ""
    papers: dict = field(default_factory=dict)  # protocol -> Published


@dataclass
class Evaluation:
    """How a base's final checkpoints are scored: the paper's split and test protocols."""

    split: str = "test"
    protocols: list = field(default_factory=lambda: ["center"])


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
    evaluations: dict = field(default_factory=dict)  # base name -> Evaluation
    verdict: dict = field(default_factory=dict)  # e.g. {"degradation": {"plain": [...], "residual": [...]}}

    @property
    def stands_in(self) -> bool:
        """Demo rows stand in for other configurations on another data set: no numeric diff."""
        return self.scale == "demo"


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
    _check_keys(f"{path}: scales.{scale}", s, ("note", "source", "bases", "rows", "verdict"))
    bases = s.get("bases") or {}
    if not bases:
        raise ConfigError(f"{path}: scales.{scale}.bases is empty")
    evaluations = {}
    for bname, base in bases.items():
        where = f"{path}: scales.{scale}.bases.{bname}"
        _check_keys(where, base, BASE_KEYS)
        ev = base.get("evaluation") or {}
        _check_keys(f"{where}.evaluation", ev, ("split", "protocols"))
        evaluations[bname] = Evaluation(str(ev.get("split", "test")), list(ev.get("protocols") or ["center"]))
        bad = [p for p in evaluations[bname].protocols if p not in {p for _, p in PROTOCOL_NAMES}]
        if bad:
            valid = ", ".join(dict.fromkeys(p for _, p in PROTOCOL_NAMES))
            raise ConfigError(f"{where}.evaluation.protocols: unknown {', '.join(map(repr, bad))}; valid: {valid}")
    rows = []
    for i, r in enumerate(s.get("rows") or []):
        where = f"{path}: scales.{scale}.rows[{i}]"
        _check_keys(where, r, ROW_KEYS)
        if "label" not in r or "model" not in r:
            raise ConfigError(f"{where}: needs label and model")
        base = r.get("base") or (next(iter(bases)) if len(bases) == 1 else None)
        if base not in bases:
            raise ConfigError(f"{where}: base {r.get('base')!r} is not one of {', '.join(bases)}")
        protocols = evaluations[base].protocols
        paper = r.get("paper")
        papers = dict(paper) if isinstance(paper, dict) else ({protocols[0]: paper} if paper is not None else {})
        for proto, key in papers.items():
            if proto not in protocols:
                raise ConfigError(f"{where}: paper for protocol {proto!r}, but base {base!r} scores with {', '.join(protocols)}")
            if key not in published:
                raise ConfigError(f"{where}: paper {key!r} is not a key of `published`")
        seeds = r.get("seeds", [0])
        if not seeds or not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds):
            raise ConfigError(f"{where}: seeds must be a non-empty list of integers, got {seeds!r}")
        rows.append(
            Row(
                label=str(r["label"]), model=r["model"], base=base, overrides=dict(r.get("overrides") or {}),
                train=list(r.get("train") or []), seeds=list(seeds), paper=published.get(papers.get(protocols[0])),
                panel=str(r.get("panel") or ""), papers={p: published[k] for p, k in papers.items()},
            )
        )
    labels = [r.label for r in rows]
    if not rows or len(set(labels)) != len(labels):
        raise ConfigError(f"{path}: scales.{scale}.rows must be non-empty with unique labels, got {labels}")
    es = {"enabled": False, "grace_period": 1, "reduction_factor": 3, **(data.get("early_stopping") or {})}
    _check_keys(f"{path}: early_stopping", es, ("enabled", "grace_period", "reduction_factor"))
    verdict = s.get("verdict") or {}
    _check_keys(f"{path}: scales.{scale}.verdict", verdict, VERDICTS)
    for kind, spec in verdict.items():
        _check_keys(f"{path}: scales.{scale}.verdict.{kind}", spec, ("plain", "residual"))
        for group in ("plain", "residual"):
            pair = spec.get(group)
            if not isinstance(pair, list) or len(pair) != 2 or any(x not in labels for x in pair):
                raise ConfigError(
                    f"{path}: scales.{scale}.verdict.{kind}.{group} must be [shallower, deeper] row labels "
                    f"of this scale, got {pair!r}; rows: {', '.join(labels)}"
                )
    return Study(
        name=data.get("study") or path.stem.removeprefix("ablate_"), title=data.get("title", ""),
        experiment=data.get("experiment") or f"ablate-{path.stem}", scale=scale, note=s.get("note", ""),
        source=s.get("source", ""), bases={k: {x: v[x] for x in ("config", "overrides") if x in v} for k, v in bases.items()},
        rows=rows, early_stopping=es, path=str(path), evaluations=evaluations, verdict=verdict,
    )


@dataclass
class StudyTrial:
    row: Row
    seed: int
    trial: Trial  # orchestrator.tuning.Trial: a label and its TrainConfig
    evaluation: Evaluation = field(default_factory=Evaluation)  # how its final checkpoint is scored


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
            out.append(StudyTrial(row, seed, Trial(label, cfg), study.evaluations.get(row.base, Evaluation())))
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
# Outcomes of the trials, read back from MLflow (the child runs), and their final checkpoints scored.


@dataclass
class Outcome:
    """What one trial produced: its curves, its final checkpoint's scores, or why it has none."""

    top1: float | None = None  # last-epoch error on the training's val split (training's own single-view check)
    top5: float | None = None
    epochs: int = 0  # epochs logged
    planned: int = 0
    status: str = ""  # MLflow status of the child run ("FINISHED", "RUNNING", "FAILED", "" = none)
    error: str = ""
    run_id: str = ""
    max_iters: int = 0  # schedule.max_iters: a run that reached it is complete before its last epoch
    last_step: int = 0
    train_curve: list = field(default_factory=list)  # training top-1 error (%) per logged epoch, in order
    scores: dict = field(default_factory=dict)  # protocol -> {"top1_err", "top5_err", "n"} on the evaluation split

    @property
    def complete(self) -> bool:
        return self.epochs >= self.planned or bool(self.max_iters and self.last_step >= self.max_iters)


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
# The report: one Markdown table per (split, protocol), one row per configuration; the verdict; the figure.


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def _fmt(mean: float | None, std: float | None) -> str:
    if mean is None:
        return ""
    if math.isnan(mean):
        return "nan (diverged)"
    return f"{mean:.2f} +- {std:.2f}" if std is not None else f"{mean:.2f}"


def _agg(values: list) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    return _mean_std(values) if values else (None, None)


@dataclass
class ReportRow:
    label: str
    model: str
    n: int  # seeds with a final score
    seeds: int  # seeds planned
    scores: dict  # protocol -> {"top1": (mean, std), "top5": (mean, std), "n": images scored}
    val: tuple[float | None, float | None]  # last-epoch error on the training's val split (mean, std)
    train_end: tuple[float | None, float | None]  # training error of the last epoch (mean, std)
    train_late: tuple[float | None, float | None]  # training error averaged over the second half of the epochs
    papers: dict  # protocol -> Published
    remark: str
    split: str = "test"  # the evaluation split
    kind: str = "cifar"  # the data kind (names the protocol)
    val_split: str = "val"
    epochs: int = 0  # epochs of the training curve (first seed)


def summarize(study: Study, trials: list[StudyTrial], outcomes: dict[str, Outcome]) -> list[ReportRow]:
    """One entry per configuration (row of the grid), aggregating its seeds."""
    out = []
    for row in study.rows:
        mine_t = [t for t in trials if t.row is row]
        mine = [outcomes.get(t.trial.label, Outcome()) for t in mine_t]
        ev = mine_t[0].evaluation
        remarks = []
        failed = [o for o in mine if o.error or o.status == "FAILED"]
        if failed:
            remarks.append(f"{len(failed)} of {len(mine)} failed: {(failed[0].error or 'see MLflow')[:120]}")
        partial = [o for o in mine if o.epochs and not o.complete]
        if partial:
            remarks.append(f"{len(partial)} stopped early (after {min(o.epochs for o in partial)} of {partial[0].planned} epochs)")
        scored = [o for o in mine if o.scores]
        missing = len(mine) - len(scored) - len(failed)
        if missing > 0:
            remarks.append(f"{missing} without a final score")
        scores = {}
        for protocol in ev.protocols:
            got = [o.scores[protocol] for o in mine if protocol in o.scores]
            scores[protocol] = {"top1": _agg([g["top1_err"] for g in got]), "top5": _agg([g["top5_err"] for g in got]),
                                "n": int(got[0]["n"]) if got else 0}
        curves = [o.train_curve for o in mine if o.train_curve]
        out.append(ReportRow(
            row.label, row.model, len(scored), len(mine), scores, _agg([o.top1 for o in mine]),
            _agg([c[-1] for c in curves]), _agg([late_mean(c) for c in curves]), row.papers,
            "; ".join(remarks), ev.split, mine_t[0].trial.config.data.kind, mine_t[0].trial.config.data.val_split,
            len(curves[0]) if curves else 0,
        ))
    return out


def _diff(ours: float | None, paper: float | None) -> str:
    if ours is None or paper is None or math.isnan(ours):
        return ""
    return f"{ours - paper:+.2f}"


def protocol_name(kind: str, protocol: str) -> str:
    return PROTOCOL_NAMES.get((kind, protocol), protocol)


def late_mean(curve: list[float]) -> float:
    """The training error averaged over the second half of the epochs: through training, past the first
    epochs' transient (where a deeper net of either kind starts slower), up to the end."""
    return statistics.fmean(curve[len(curve) // 2 :])


def degradation_verdict(spec: dict, rows: list[ReportRow]) -> str:
    """v1 sec. 4.1 / Fig. 6, from the measured training curves: the deeper plain net has the higher
    training error and the deeper ResNet does not. Compared through training: each net's training
    error averaged over the second half of its epochs (`late_mean`), mean over seeds."""
    by = {r.label: r for r in rows}
    (p_lo, p_hi), (r_lo, r_hi) = spec["plain"], spec["residual"]
    missing = [x for x in (p_lo, p_hi, r_lo, r_hi) if x not in by or by[x].train_late[0] is None]
    if missing:
        return f"no verdict: no training curve for {', '.join(missing)}"
    epochs = {by[x].epochs for x in (p_lo, p_hi, r_lo, r_hi)}
    if len(epochs) != 1:
        return f"no verdict: the nets were not trained the same number of epochs ({sorted(epochs)})"
    n = epochs.pop()
    v = {x: by[x].train_late[0] for x in (p_lo, p_hi, r_lo, r_hi)}
    plain_degrades, residual_holds = v[p_hi] > v[p_lo], v[r_hi] <= v[r_lo]
    ok = plain_degrades and residual_holds
    head = "degradation reproduced" if ok else "not reproduced"
    return (
        f"{head}: {p_hi} train error {v[p_hi]:.2f} % {'>' if plain_degrades else '<='} {p_lo} {v[p_lo]:.2f} %; "
        f"{r_hi} {v[r_hi]:.2f} % {'<=' if residual_holds else '>'} {r_lo} {v[r_lo]:.2f} % "
        f"(training top-1 error averaged over epochs {n // 2 + 1}-{n} of {n})"
    )


def verdicts(study: Study, rows: list[ReportRow]) -> list[str]:
    return [degradation_verdict(spec, rows) for kind, spec in study.verdict.items() if kind == "degradation"]


def render_markdown(study: Study, rows: list[ReportRow], *, figure: str = "") -> str:
    """The report: per (split, protocol) a table of our scores of the final checkpoints beside the papers'
    numbers, every score column labelled with its split and protocol; a diff only for rows that are the
    paper's configuration on the paper's data (never for demo rows, which stand in for them)."""
    lines = [f"# Ablation study `{study.name}` ({study.scale} scale): {study.title}", ""]
    if study.stands_in:
        lines += [
            "> **DEMO, NOT COMPARABLE WITH THE PAPER.** Narrower (in some studies shallower) nets trained for a few "
            "epochs on the bundled digits data; "
            "each row stands in for a configuration of the paper on another data set, so the paper column shows "
            "that configuration's published number and no difference is computed.",
            "",
        ]
    if study.note:
        lines += [study.note.strip(), ""]
    for verdict in verdicts(study, rows):
        lines += [f"**Verdict (v1 sec. 4.1, Fig. 6):** {verdict}", ""]
    lines += [
        "Ours: the final checkpoint of each run scored on the evaluation split with the named protocol, through the "
        "ensemble's batch evaluation (mean +- std over seeds). Train err: training top-1 error (%) of the last epoch. "
        "The last column is training's own per-epoch check on its val split, for reference only.",
        "",
    ]
    groups: dict[tuple, list[tuple[ReportRow, str]]] = {}
    for r in rows:
        for protocol in r.scores:
            groups.setdefault((r.split, r.kind, protocol), []).append((r, protocol))
    for (split, kind, protocol), members in groups.items():
        where = f"{split}, {protocol_name(kind, protocol)}"
        n = {r.scores[p]["n"] for r, p in members if r.scores[p]["n"]}
        count = f" ({', '.join(str(x) for x in sorted(n))} images)" if n else ""
        lines += [f"## Scored on the `{split}` split, {protocol_name(kind, protocol)}{count}", ""]
        with_top5 = any(r.papers.get(p) and r.papers[p].top5 is not None for r, p in members)
        diff = not study.stands_in
        paper_head = f"paper top-1 ({where})" if diff else "paper top-1 (stood-in row, see source)"
        head = ["configuration", "model", "seeds", f"ours top-1 ({where})", paper_head]
        head += [f"diff top-1 ({where})"] if diff else []
        if with_top5:
            head += [f"ours top-5 ({where})", paper_head.replace("top-1", "top-5")]
            head += [f"diff top-5 ({where})"] if diff else []
        val_splits = sorted({r.val_split for r, _ in members})
        head += ["train err (last epoch)", f"last-epoch {'/'.join(val_splits)} top-1 (training's check)", "paper source", "remarks"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r, p in members:
            pub, sc = r.papers.get(p), r.scores[p]
            cells = [r.label, f"`{r.model}`", f"{r.n}/{r.seeds}", _fmt(*sc["top1"]) or "-", (pub.describe("top1") or "-") if pub else "-"]
            cells += [_diff(sc["top1"][0], pub.top1 if pub else None) or "-"] if diff else []
            if with_top5:
                cells += [_fmt(*sc["top5"]) or "-", (pub.describe("top5") or "-") if pub else "-"]
                cells += [_diff(sc["top5"][0], pub.top5 if pub else None) or "-"] if diff else []
            source = "; ".join(x for x in ((pub.ref, pub.note) if pub else ()) if x)
            if pub and study.stands_in:
                source = f"stands in for `{pub.key}`: {source}"
            cells += [_fmt(*r.train_end) or "-", _fmt(*r.val) or "-", source or "-", r.remark or ""]
            lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
        lines.append("")
    if figure:
        lines += [f"Training error (dashed) and val-split error (solid) against iterations: `{figure}`."]
    return "\n".join(lines).rstrip("\n") + "\n"


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

    from . import preflight, tracking
    from .cluster import check_fits, ensure_ray, storage_url, user_path
    from .train import check_cluster, ensure_data
    from .tuning import run_trials

    # Before any run is recorded: paths, data, storage, MLflow store and cluster, one line per failure.
    trials = expand(study, overrides)
    for t in trials:
        t.trial.config.data.url = user_path(t.trial.config.data.url, "data.url")
    for url in sorted({t.trial.config.data.url for t in trials}):
        cfg0 = next(t.trial.config for t in trials if t.trial.config.data.url == url)
        ensure_data(cfg0, study.source)
        preflight.check_data(url, sorted({s for t in trials if t.trial.config.data.url == url
                                          for s in (t.trial.config.data.train_split, t.trial.config.data.val_split,
                                                    t.evaluation.split)}))
    storage = storage_url(storage)
    preflight.check_storage(storage)
    preflight.check_tracking(tracking.tracking_uri())
    ensure_ray()
    for t in trials:  # the message names the trial that does not fit (raises cluster.ClusterTooSmall)
        sc = t.trial.config.scaling
        check_fits(sc.num_workers, sc.cpus_per_worker, sc.use_gpu, f"study {study.name}: trial {t.trial.label!r}")
    check_cluster([t.trial.config for t in trials], f"study {study.name}: a trial")

    use_asha = study.early_stopping["enabled"] if asha is None else asha
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

        exp_id = tracking.experiment_id(client, experiment)
        outcomes = read_outcomes(client, exp_id, trials, errors)
        for label, o in outcomes.items():  # ASHA stopped these: Tune will not resume them, so close their runs
            if use_asha and o.status == "RUNNING" and label not in errors:
                tracking.set_tags(client, o.run_id, {"orchestrator.stopped_by": "asha"})
                client.set_terminated(o.run_id, "KILLED")
                o.status = "KILLED"
        score_outcomes(client, trials, outcomes)
        rows = summarize(study, trials, outcomes)
        figure = "error_curves.png"
        markdown = render_markdown(study, rows, figure=figure)
        png = error_curves_png(client, study, trials, outcomes)
        client.log_text(parent_id, markdown, "report/report.md")
        _log_bytes(client, parent_id, png, f"report/{figure}")
        tracking.log_dict(client, parent_id, {t.trial.label: vars(outcomes[t.trial.label]) for t in trials},
                          "report/outcomes.json")
        for r in rows:
            for protocol, sc in r.scores.items():
                if sc["top1"][0] is not None:
                    client.log_metric(parent_id, f"{r.split}_{protocol}_top1_err/{_metric_key(r.label)}", sc["top1"][0])
        for i, verdict in enumerate(verdicts(study, rows)):
            client.set_tag(parent_id, f"verdict.{i}", verdict[:5000])
        client.set_terminated(parent_id, "FAILED" if errors else "FINISHED")
    except BaseException as e:
        tracking.mark_failed(client, parent_id, e)
        raise

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

