"""Ablation studies: every study file expands to valid trials, the report puts ours beside the paper's
numbers, and a tiny real study runs as nested MLflow runs on a local Ray cluster and resumes."""

import re
import time

import pytest
from mlflow.tracking import MlflowClient

import models
import pipelines
from orchestrator import run
from orchestrator.ablations import (
    SCALES,
    asha_scheduler,
    expand,
    list_studies,
    load_study,
    study_path,
    study_run_name,
)
from orchestrator.config import ConfigError, DegradationSpec, run_name
from orchestrator.study_report import Outcome, render_markdown, summarize, verdicts
from orchestrator.tracking import RUN_NAME_TAG

STUDIES = list_studies()


def test_the_four_studies_of_the_papers_and_the_recipes_study_exist():
    assert STUDIES == ["depth", "recipes", "shortcuts", "skip", "units"]


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("name", STUDIES)
def test_every_study_loads_and_expands_to_valid_trials(name, scale):
    text = study_path(name).read_text()
    assert text.startswith(f"# python -m orchestrator.run ablate {name}"), "a study begins with its command"
    study = load_study(name, scale)
    trials = expand(study)
    assert len(trials) == sum(len(r.seeds) for r in study.rows)
    assert len({run_name(t.trial.config) for t in trials}) == len(trials), "every trial is a distinct run"
    for t in trials:
        cfg = t.trial.config
        models.resolve(cfg.model.name, **cfg.model.overrides)
        assert cfg.model.name == t.row.model and cfg.seed == t.seed
        assert t.row.paper is not None, f"{t.row.label}: every configuration names its published number"
        if scale == "demo":
            assert cfg.data.url.endswith("data/digits") and study.source == "digits"
    assert study_run_name(study, trials) == study_run_name(study, expand(study))  # deterministic: resumable


def test_the_studies_hold_the_published_numbers():
    depth = load_study("depth", "paper")
    by_label = {r.label: r for r in depth.rows}
    assert by_label["ResNet-34"].paper.top1 == 25.03 and by_label["plain-18"].paper.top1 == 27.94
    r110 = by_label["ResNet-110"]
    assert (r110.paper.top1, r110.paper.top1_std, len(r110.seeds)) == (6.61, 0.16, 5)
    assert by_label["plain-56"].paper.top1 is None and "Fig. 6" in by_label["plain-56"].paper.ref
    # Table 6 in full, and plain-110 as the Fig. 6 caption says.
    assert by_label["ResNet-1202"].paper.top1 == 7.93 and by_label["ResNet-1202"].model == "resnet1202"
    assert by_label["plain-110"].paper.text == "> 60 %" and "Fig. 6 caption" in by_label["plain-110"].paper.ref
    assert [(r.paper.top1, r.paper.top5) for r in load_study("shortcuts", "paper").rows] == [
        (25.03, 7.76), (24.52, 7.46), (24.19, 7.40)
    ]
    skip = {r.label: r.paper for r in load_study("skip", "paper").rows}
    assert skip["dropout shortcut 0.5"].text == "fails" and skip["exclusive gating -6"].top1 == 8.70
    units = {r.label: r.paper.top1 for r in load_study("units", "paper").rows}
    assert units["ResNet-164 (e) full pre-activation"] == 5.46 and units["ResNet-110 (b) BN after addition"] == 8.17


def _fake(trials, top1: dict, curves: dict | None = None, protocols=("center",), n=270, epochs=8):
    """Outcomes as read back from MLflow: final scores per protocol, training curves, val error."""
    out = {}
    for t in trials:
        v = top1[t.trial.label]
        out[t.trial.label] = Outcome(
            top1=v + 1.0, top5=1.0, epochs=epochs, planned=epochs, status="FINISHED",
            train_curve=list((curves or {}).get(t.trial.label, [50.0] * epochs)),
            scores={p: {"top1_err": v + i, "top5_err": 1.0 + i, "n": n} for i, p in enumerate(protocols)},
        )
    return out


def test_demo_report_labels_split_and_protocol_and_prints_no_diff_for_stand_ins():
    study = load_study("depth", "demo")
    trials = expand(study)
    fake = {"plain-20": 30.0, "plain-56": 40.0, "ResNet-20": 20.0,
            "ResNet-56 seed 0": 10.0, "ResNet-56 seed 1": 12.0, "ResNet-56 seed 2": 14.0}
    fake = {t.trial.label: fake.get(t.trial.label, 25.0) for t in trials}
    rows = summarize(study, trials, _fake(trials, fake))
    assert [r.label for r in rows] == [r.label for r in study.rows]
    md = render_markdown(study, rows)
    assert "NOT COMPARABLE WITH THE PAPER" in md
    assert "## Scored on the `test` split, single view (270 images)" in md
    header = next(line for line in md.splitlines() if line.startswith("| configuration"))
    assert "ours top-1 (test, single view)" in header and "last-epoch val top-1" in header
    assert "diff" not in header, "demo rows stand in for other configurations on another data set"
    table = [line for line in md.splitlines() if line.startswith("| ") and "`" in line]
    assert len(table) == len(study.rows)
    r20 = next(line for line in table if line.startswith("| ResNet-20 "))
    assert "| 20.00 | 8.75 |" in r20 and "stands in for `resnet20`" in r20
    assert not any(re.search(r"\| [+-]\d", line) for line in table), "no signed difference anywhere"


def test_paper_report_diffs_each_protocol_against_its_own_table():
    shortcuts = load_study("shortcuts", "paper")
    st = expand(shortcuts)
    outs = _fake(st, {t.trial.label: 25.5 for t in st}, protocols=("ten_crop", "multi_scale"), n=50000, epochs=120)
    outs[st[2].trial.label] = Outcome(error="ClusterTooSmall: boom", status="FAILED", planned=120)
    md = render_markdown(shortcuts, summarize(shortcuts, st, outs))
    assert "DEMO" not in md
    assert "## Scored on the `val` split, 10-crop (50000 images)" in md
    assert "## Scored on the `val` split, multi-scale, whole image + flips (50000 images)" in md
    headers = [line for line in md.splitlines() if line.startswith("| configuration")]
    assert "diff top-1 (val, 10-crop)" in headers[0] and "diff top-5 (val, 10-crop)" in headers[0]
    assert "diff top-1 (val, multi-scale, whole image + flips)" in headers[1]
    # Table 3 (10-crop) beside 10-crop, Table 4 (multi-scale) beside multi-scale: 25.5 - 25.03, 26.5 - 21.84.
    assert "| 25.50 | 25.03 | +0.47 | 1.00 | 7.76 | -6.76 |" in md
    assert "| 26.50 | 21.84 | +4.66 | 2.00 | 5.71 | -3.71 |" in md
    assert "1 of 1 failed: ClusterTooSmall" in md
    skip = load_study("skip", "demo")
    sk = expand(skip)
    outs = _fake(sk, {t.trial.label: 50.0 for t in sk})
    for o in outs.values():
        o.epochs = 3
    md = render_markdown(skip, summarize(skip, sk, outs))
    assert "| 50.00 | fails |" in md and "stopped early (after 3 of 8 epochs)" in md


def test_a_run_that_reached_max_iters_is_complete():
    assert Outcome(epochs=164, planned=182, max_iters=64000, last_step=64000).complete
    assert not Outcome(epochs=100, planned=182, max_iters=64000, last_step=39100).complete


def test_the_degradation_verdict_is_computed_from_the_curves():
    study = load_study("depth", "demo")
    trials = expand(study)
    first = {r.label: next(t.trial.label for t in trials if t.row is r) for r in study.rows}
    curves = {first["plain-20"]: [60, 20, 10], first["plain-56"]: [80, 60, 40],
              first["ResNet-20"]: [50, 15, 5], first["ResNet-56"]: [45, 10, 2]}
    curves = {t.trial.label: curves.get(t.trial.label, curves[first[t.row.label]]) for t in trials}
    rows = summarize(study, trials, _fake(trials, {t.trial.label: 1.0 for t in trials}, curves, epochs=3))
    assert verdicts(study, rows) == [
        "degradation reproduced: plain-56 train error 50.00 % > plain-20 15.00 %; "
        "ResNet-56 6.00 % <= ResNet-20 10.00 % (training top-1 error averaged over epochs 2-3 of 3)"
    ]
    assert "**Verdict (v1 sec. 4.1, Fig. 6):** degradation reproduced" in render_markdown(study, rows)
    curves = {k: ([10, 5, 1] if first["plain-56"] == k else v) for k, v in curves.items()}
    rows = summarize(study, trials, _fake(trials, {t.trial.label: 1.0 for t in trials}, curves, epochs=3))
    assert verdicts(study, rows)[0].startswith("not reproduced: plain-56 train error 3.00 % <= plain-20 15.00 %")
    paper = load_study("depth", "paper")
    assert paper.verdict.degradation == DegradationSpec(plain=["plain-20", "plain-56"], residual=["ResNet-20", "ResNet-56"])


def test_asha_stops_the_worse_trials_at_the_grace_period_and_lets_the_best_run_every_epoch():
    """The study's scheduler, driven through Tune's scheduler interface with made-up epoch results."""
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    study = load_study("skip", "demo")
    trials = expand(study)
    longest = max(t.trial.config.schedule.epochs for t in trials)
    scheduler = asha_scheduler(study, trials)
    scheduler.set_search_properties("val_top1_err", "min")
    fake = [Trial("__fake", stub=True) for _ in range(3)]
    for t in fake:
        scheduler.on_trial_add(None, t)
    stopped_at = {}
    for epoch in range(1, longest + 1):
        for i, t in enumerate(fake):
            if i not in stopped_at:
                decision = scheduler.on_trial_result(None, t, {"training_iteration": epoch, "val_top1_err": 10.0 * (i + 1)})
                if decision == TrialScheduler.STOP:
                    stopped_at[i] = epoch
    assert stopped_at[1] == stopped_at[2] == study.early_stopping.grace_period == 2
    assert stopped_at[0] == longest, "the best trial is cut by nothing before the longest trial's last epoch"


def test_unknown_study_lists_the_valid_ones(capsys):
    assert run.main(["ablate", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown study 'nope'" in err and "depth, recipes, shortcuts, skip, units" in err
    assert run.main(["ablate", "depth", "--rows", "ResNet-999"]) == 2
    assert "unknown row(s) ResNet-999; rows: plain-20" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="must be one of paper, demo"):
        load_study("depth", "huge")


# ---------------------------------------------------------------------------------------------
# A real tiny study on a local Ray cluster.


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


@pytest.mark.slow
def test_a_tiny_depth_study_runs_nested_scores_reports_and_resumes(tmp_path, monkeypatch, capsys, mlflow_uri, ray_local, digits_url):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    storage = tmp_path / "runs"
    # 39 iterations per epoch (1,257 train digits, batch 32): max_iters=50 stops in the second of 3 epochs.
    argv = ["ablate", "depth", "--rows", "plain-20,ResNet-20", "schedule.epochs=3", "schedule.max_iters=50",
            "schedule.milestones=[1]", f"data.url={digits_url}", "--storage", str(storage)]
    assert run.main(argv) == 0
    out = capsys.readouterr().out

    # The report: one row per configuration, the final checkpoints scored on the whole test split.
    test_count = pipelines.read_manifest(digits_url)["splits"]["test"]["num_samples"]
    assert f"## Scored on the `test` split, single view ({test_count} images)" in out
    table = [line for line in out.splitlines() if line.startswith("| ") and "`" in line]
    assert [line.split(" | ")[0] for line in table] == ["| plain-20", "| ResNet-20"]
    assert "no number (Fig. 6 only)" in table[0] and "| 8.75 |" in table[1]
    assert "stopped early" not in out, "a run that reached schedule.max_iters is complete"
    assert "**Verdict (v1 sec. 4.1, Fig. 6):** no verdict: no training curve for plain-56, ResNet-56" in out
    reports = list((storage / "reports").glob("ablate-depth-demo-*/report.md"))
    assert len(reports) == 1 and (reports[0].parent / "error_curves.png").stat().st_size > 1000

    # MLflow: a finished parent run with the report, and one nested child run per trial.
    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("ablate-depth")
    parent = client.search_runs([exp.experiment_id], filter_string="tags.`orchestrator.kind` = 'ablation'")
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    parent_id = parent[0].info.run_id
    assert parent[0].data.tags[RUN_NAME_TAG] == reports[0].parent.name
    assert {a.path for a in client.list_artifacts(parent_id, "report")} >= {"report/report.md", "report/error_curves.png"}
    children = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
    assert sorted(c.data.tags["model"] for c in children) == ["plain20", "resnet20"]
    assert all(c.info.status == "FINISHED" for c in children)
    epochs = {c.info.run_id: [m.value for m in client.get_metric_history(c.info.run_id, "epoch")] for c in children}
    assert all(sorted(v) == [0.0, 1.0] for v in epochs.values()), "max_iters ended training in epoch 2 of 3"
    for c in children:
        assert [m.step for m in client.get_metric_history(c.info.run_id, "train_top1_err")][-1] == 50
        # Scored through batch evaluation: every test image once, and the report prints that score.
        assert c.data.metrics["final_test_center_n"] == test_count
        score = c.data.metrics["final_test_center_top1_err"]
        row = next(line for line in table if line.startswith(f"| {'plain-20' if c.data.tags['model'] == 'plain20' else 'ResNet-20'} "))
        assert f"| {score:.2f} |" in row

    # Re-running the same command finishes quickly without training or scoring again: same runs, same epochs.
    t0 = time.perf_counter()
    assert run.main(argv) == 0
    assert time.perf_counter() - t0 < 45
    again_out = capsys.readouterr().out
    assert "| 8.75 |" in again_out and "[ablate] scoring" not in again_out
    again = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
    assert {c.info.run_id for c in again} == set(epochs)
    assert {c.info.run_id: [m.value for m in client.get_metric_history(c.info.run_id, "epoch")] for c in again} == epochs
    assert len(client.search_runs([exp.experiment_id], filter_string="tags.`orchestrator.kind` = 'ablation'")) == 1


@pytest.mark.slow
def test_a_study_the_cluster_cannot_hold_fails_fast(capsys, ray_local, digits_url):
    t0 = time.perf_counter()
    # Data that exists (the preflight checks it first), on a cluster of 2 CPUs and no GPU.
    assert run.main(["ablate", "depth", "--scale", "paper", "--rows", "ResNet-18", f"data.url={digits_url}"]) == 2
    err = capsys.readouterr().err
    assert "trial 'ResNet-18' needs 64 CPU, 8 GPU" in err and "scaling.num_workers" in err
    assert time.perf_counter() - t0 < 20


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("protocols: [center]}      # the digits'", "protocols: [five_crop]}  #",
         "scales.demo.bases.digits.evaluation.protocols: 'five_crop' is not one of center, ten_crop, multi_scale, "
         "multi_scale_center"),
        ("plain: [plain-20, plain-56], residual: [ResNet-20, ResNet-56]}\n    rows:\n      - {label: plain-20",
         "plain: [plain-20, plain-99], residual: [ResNet-20, ResNet-56]}\n    rows:\n      - {label: plain-20",
         "verdict.degradation.plain must be .shallower, deeper. row labels of this scale, got .'plain-20', 'plain-99'.; rows: plain-20"),
        ("{label: ResNet-20, model: resnet20, paper: resnet20, panel: ResNet}",
         "{label: ResNet-20, model: resnet20, paper: {ten_crop: resnet20}, panel: ResNet}",
         "paper for protocol 'ten_crop', but base 'digits' scores with center"),
    ],
)
def test_bad_evaluation_verdict_and_paper_keys_name_the_valid_ones(tmp_path, old, new, message):
    text = study_path("depth").read_text()
    assert text.count(old) == 1
    path = tmp_path / "ablate_bad.yaml"
    path.write_text(text.replace(old, new))
    with pytest.raises(ConfigError, match=message):
        load_study(str(path), "demo")
