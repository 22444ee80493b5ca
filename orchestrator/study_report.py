"""The report of an ablation study: one Markdown table per (split, protocol) with our scores of the final
checkpoints beside the papers' numbers, the verdicts computed from the training curves, and the figure.

Pure functions of the study and its outcomes (read back from MLflow by `orchestrator.ablations`): no Ray,
no training, so they are tested on made-up outcomes.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .config import DegradationSpec

if TYPE_CHECKING:
    from .ablations import Study, StudyTrial

# The test protocols in words, per data kind (v1 sec. 3.4 and 4.2).
PROTOCOL_NAMES = {
    ("cifar", "center"): "single view",
    ("imagenet", "center"): "centre crop",
    ("imagenet", "ten_crop"): "10-crop",
    ("imagenet", "multi_scale"): "multi-scale, whole image + flips",
    ("imagenet", "multi_scale_center"): "multi-scale centre crops",
}


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


def degradation_verdict(spec: DegradationSpec, rows: list[ReportRow]) -> str:
    """v1 sec. 4.1 / Fig. 6, from the measured training curves: the deeper plain net has the higher
    training error and the deeper ResNet does not. Compared through training: each net's training
    error averaged over the second half of its epochs (`late_mean`), mean over seeds."""
    by = {r.label: r for r in rows}
    (p_lo, p_hi), (r_lo, r_hi) = spec.plain, spec.residual
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
    return [degradation_verdict(study.verdict.degradation, rows)] if study.verdict.degradation else []


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


def figure_panels(study: Study, trials: list[StudyTrial], outcomes: dict[str, Outcome]) -> dict[str, list[tuple[str, str]]]:
    """The error-curve figure's panels (e.g. plain | residual, as in v1 Figs. 4 and 6): panel -> [(label,
    run id)], one configuration each (its first seed), for `tracking.error_curves_png`."""
    panels: dict[str, list[tuple[str, str]]] = {}
    for row in study.rows:
        first = next(t for t in trials if t.row is row)
        o = outcomes.get(first.trial.label)
        panels.setdefault(row.panel or study.name, [])
        if o and o.run_id:
            panels[row.panel or study.name].append((row.label, o.run_id))
    return panels
