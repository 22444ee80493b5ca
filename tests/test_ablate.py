"""Ablation studies: every study file expands to valid trials, the report puts ours beside the paper's
numbers, and a tiny real study runs as nested MLflow runs on a local Ray cluster and resumes."""

import time

import pytest
from mlflow.tracking import MlflowClient

import models
from orchestrator import run
from orchestrator.ablations import (
    SCALES,
    Outcome,
    asha_scheduler,
    expand,
    list_studies,
    load_study,
    render_markdown,
    study_run_name,
    summarize,
)
from orchestrator.config import CONFIG_DIR, ConfigError, run_name
from orchestrator.tracking import RUN_NAME_TAG

STUDIES = list_studies()


def test_the_four_studies_of_the_papers_exist():
    assert STUDIES == ["depth", "shortcuts", "skip", "units"]


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("name", STUDIES)
def test_every_study_loads_and_expands_to_valid_trials(name, scale):
    text = (CONFIG_DIR / f"ablate_{name}.yaml").read_text()
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
    assert by_label["plain-56"].paper.top1 is None and "Fig. 6" in by_label["plain-56"].paper.text
    assert [(r.paper.top1, r.paper.top5) for r in load_study("shortcuts", "paper").rows] == [
        (25.03, 7.76), (24.52, 7.46), (24.19, 7.40)
    ]
    skip = {r.label: r.paper for r in load_study("skip", "paper").rows}
    assert skip["dropout shortcut 0.5"].text == "fails" and skip["exclusive gating -6"].top1 == 8.70
    units = {r.label: r.paper.top1 for r in load_study("units", "paper").rows}
    assert units["ResNet-164 (e) full pre-activation"] == 5.46 and units["ResNet-110 (b) BN after addition"] == 8.17


def test_report_has_one_row_per_configuration_with_mean_std_paper_and_difference():
    study = load_study("depth", "demo")
    trials = expand(study)
    fake = {"plain-8": 30.0, "plain-20": 40.0, "ResNet-8": 20.0,
            "ResNet-20 seed 0": 10.0, "ResNet-20 seed 1": 12.0, "ResNet-20 seed 2": 14.0}
    outcomes = {t.trial.label: Outcome(top1=fake[t.trial.label], top5=1.0, epochs=8, planned=8, status="FINISHED")
                for t in trials}
    rows = summarize(study, trials, outcomes)
    assert [r.label for r in rows] == ["plain-8", "plain-20", "ResNet-8", "ResNet-20"]
    r20 = rows[-1]
    assert r20.n == 3 and r20.top1[0] == pytest.approx(12.0) and r20.top1[1] == pytest.approx(2.0)
    md = render_markdown(study, rows)
    table = [line for line in md.splitlines() if line.startswith("| ")][1:]
    assert len(table) == 4
    assert "| 12.00 +- 2.00 | 6.61 +- 0.16 | +5.39 |" in table[3]
    assert "| 20.00 | 8.75 | +11.25 |" in table[2]
    assert "no number (Fig. 6 only)" in table[0]
    assert "NOT COMPARABLE WITH THE PAPER" in md and "`val` split" in md

    # Top-5 columns where the paper has top-5; text outcomes; failed trials are said so.
    shortcuts = load_study("shortcuts", "paper")
    st = expand(shortcuts)
    outs = {t.trial.label: Outcome(top1=25.5, top5=8.0, epochs=120, planned=120) for t in st}
    outs[st[2].trial.label] = Outcome(error="ClusterTooSmall: boom", status="FAILED", planned=120)
    md = render_markdown(shortcuts, summarize(shortcuts, st, outs))
    assert "ours top-5" in md and "| 25.50 | 25.03 | +0.47 | 8.00 | 7.76 | +0.24 |" in md
    assert "1 of 1 failed: ClusterTooSmall" in md and "DEMO" not in md
    skip = load_study("skip", "demo")
    sk = expand(skip)
    md = render_markdown(skip, summarize(skip, sk, {t.trial.label: Outcome(top1=50.0, epochs=3, planned=8) for t in sk}))
    assert "| 50.00 | fails | - |" in md and "stopped early (after 3 of 8 epochs)" in md


def test_asha_scheduler_covers_the_longest_trial():
    study = load_study("skip", "demo")
    scheduler = asha_scheduler(study, expand(study))
    assert scheduler._max_t == 8 and scheduler._reduction_factor == study.early_stopping["reduction_factor"]


def test_unknown_study_lists_the_valid_ones(capsys):
    assert run.main(["ablate", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown study 'nope'" in err and "depth, shortcuts, skip, units" in err
    assert run.main(["ablate", "depth", "--rows", "ResNet-999"]) == 2
    assert "unknown row(s) ResNet-999; rows: plain-8" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="must be one of paper, demo"):
        load_study("depth", "huge")


# ---------------------------------------------------------------------------------------------
# A real tiny study on a local Ray cluster.


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


@pytest.mark.slow
def test_a_tiny_depth_study_runs_nested_reports_and_resumes(tmp_path, monkeypatch, capsys, mlflow_uri, ray_local, digits_url):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    storage = tmp_path / "runs"
    argv = ["ablate", "depth", "--rows", "plain-8,ResNet-8", "schedule.epochs=2", "schedule.milestones=[1]",
            f"data.url={digits_url}", "--storage", str(storage)]
    assert run.main(argv) == 0
    out = capsys.readouterr().out

    # The report: one row per configuration, ours beside the paper's number.
    table = [line for line in out.splitlines() if line.startswith("| ") and "`" in line]
    assert [line.split(" | ")[0] for line in table] == ["| plain-8", "| ResNet-8"]
    assert "no number (Fig. 6 only)" in table[0] and "| 8.75 |" in table[1]
    assert "NOT COMPARABLE WITH THE PAPER" in out
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
    assert sorted(c.data.tags["model"] for c in children) == ["plain8", "resnet8"]
    assert all(c.info.status == "FINISHED" for c in children)
    epochs = {c.info.run_id: [m.value for m in client.get_metric_history(c.info.run_id, "epoch")] for c in children}
    assert all(sorted(v) == [0.0, 1.0] for v in epochs.values())

    # Re-running the same command finishes quickly without training again: same runs, same epochs.
    t0 = time.perf_counter()
    assert run.main(argv) == 0
    assert time.perf_counter() - t0 < 45
    assert "| 8.75 |" in capsys.readouterr().out
    again = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
    assert {c.info.run_id for c in again} == set(epochs)
    assert {c.info.run_id: [m.value for m in client.get_metric_history(c.info.run_id, "epoch")] for c in again} == epochs
    assert len(client.search_runs([exp.experiment_id], filter_string="tags.`orchestrator.kind` = 'ablation'")) == 1


@pytest.mark.slow
def test_a_study_the_cluster_cannot_hold_fails_fast(capsys, ray_local):
    t0 = time.perf_counter()
    assert run.main(["ablate", "depth", "--scale", "paper", "--rows", "ResNet-18"]) == 2
    err = capsys.readouterr().err
    assert "trial 'ResNet-18' needs 64 CPU, 8 GPU" in err and "scaling.num_workers" in err
    assert time.perf_counter() - t0 < 20
