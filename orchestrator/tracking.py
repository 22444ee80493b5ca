"""MLflow: one run per training, found again by its deterministic name so a rerun continues it.

Clients are made here and passed around; only the driver and rank 0 call these functions.
"""

from __future__ import annotations

import io
import json
import subprocess
import time
from pathlib import Path

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

RUN_NAME_TAG = "orchestrator.run_name"
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI when set, else MLflow's default local SQLite store (made absolute, so Ray
    workers with another working directory write to the same store)."""
    return mlflow.get_tracking_uri()


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def experiment_id(client: MlflowClient, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    return exp.experiment_id if exp else client.create_experiment(name)


def find_run(client: MlflowClient, exp_id: str, name: str):
    """The newest run tagged with the deterministic run `name` in experiment `exp_id`, or None."""
    found = client.search_runs(
        [exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{name}'", order_by=["attributes.start_time DESC"]
    )
    return found[0] if found else None


def find_or_create_run(
    client: MlflowClient, experiment: str, name: str, params: dict, tags: dict, parent_run_id: str | None = None
):
    """The run tagged with `name` in `experiment`, or a new one with params and tags logged.

    Returns (run_id, finished): `finished` means an earlier invocation completed this run.
    """
    exp_id = experiment_id(client, experiment)
    run = find_run(client, exp_id, name)
    if run:
        return run.info.run_id, run.info.status == "FINISHED"
    all_tags = {RUN_NAME_TAG: name, "git_commit": git_commit(), "mlflow.runName": name, **tags}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp_id, run_name=name, tags=all_tags)
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[i : i + 100])
    return run.info.run_id, False


def log_dict(client: MlflowClient, run_id: str, data: dict, path: str) -> None:
    client.log_text(run_id, json.dumps(data, indent=2, sort_keys=True, default=str), path)


class EpochLogger:
    """Per-epoch metrics from rank 0, idempotent by epoch: after a restart from a checkpoint, epochs
    that an earlier attempt already logged are not logged again (no epoch counted twice)."""

    def __init__(self, uri: str, run_id: str):
        self.client = MlflowClient(uri)
        self.run_id = run_id
        self.logged = {int(m.value) for m in self.client.get_metric_history(run_id, "epoch")}

    def log(self, epoch: int, step: int, metrics: dict) -> None:
        if epoch in self.logged:
            return
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        batch.append(Metric("epoch", float(epoch), now, step))  # last: marks the epoch as logged
        self.client.log_batch(self.run_id, metrics=batch)
        self.logged.add(epoch)


def error_plot_png(client: MlflowClient, run_id: str, title: str) -> bytes:
    """Training and validation top-1 error against iterations, like the papers' figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, style in (("train_top1_err", "--"), ("val_top1_err", "-")):
        hist = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        if hist:
            ax.plot([m.step for m in hist], [m.value for m in hist], style, label=key.replace("_", " "))
    ax.set_xlabel("iterations")
    ax.set_ylabel("top-1 error (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def set_tags(client: MlflowClient, run_id: str, tags: dict) -> None:
    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
