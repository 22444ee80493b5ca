"""MLflow: one run per training, found again by its deterministic name so a rerun continues it.

Clients are made here and passed around; only the driver and rank 0 call these functions.
"""

from __future__ import annotations

import contextlib
import getpass
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

RUN_NAME_TAG = "orchestrator.run_name"
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI when set, else `mlflow.db` in the user's folder. A relative SQLite or file
    path is made absolute against the folder the user ran the command in (never against Ray's copy
    of the working directory, which Ray deletes), and exported, so Ray workers use the same store."""
    from .cluster import user_path

    uri = os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + user_path(uri[len("sqlite:///"):], "MLflow store")
    elif urlparse(uri).scheme in ("", "file"):
        uri = user_path(uri, "MLflow store")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    if mlflow.get_tracking_uri() != uri:  # the fluent API (log_model, start_run) uses the same store
        mlflow.set_tracking_uri(uri)
    if uri.startswith("sqlite:///"):
        _create_sqlite_store(uri)
    return uri


def _create_sqlite_store(uri: str) -> None:
    """A new SQLite store is created here, its `Default` experiment's artifacts beside it
    (`mlartifacts/Default/0`). MLflow puts them in `./mlruns` of the folder the first client ran in:
    under `ray job submit` that was Ray's package cache, which Ray deletes (found after
    `bash scripts/run.sh`), and a notebook logging to `Default` with the same store lost its artifacts."""
    db = Path(uri[len("sqlite:///"):])
    if db.exists() or not db.parent.is_dir():  # a missing folder is the preflight's error to report
        return
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    SqlAlchemyStore(uri, artifact_root(uri, "Default"))


def artifact_root(uri: str, name: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a local SQLite store (`mlartifacts/`), an
    absolute and durable folder; a tracking server decides for itself (None)."""
    if uri.startswith("sqlite:///"):
        folder = re.sub(r"[^A-Za-z0-9._-]+", "_", name)
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts" / folder).resolve().as_uri()
    return None


def git_commit() -> str:
    """The code's commit: passed in by the submitting side under `ray job submit` (which leaves .git
    out of the upload), else read from the checkout."""
    if os.environ.get("ORCHESTRATOR_GIT_COMMIT"):
        return os.environ["ORCHESTRATOR_GIT_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# The MLflow UI opens an experiment on its GenAI trace overview unless it is marked as model training.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


def experiment_id(client: MlflowClient, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp:
        if exp.tags.get("mlflow.experimentKind") != EXPERIMENT_TAGS["mlflow.experimentKind"]:
            for k, v in EXPERIMENT_TAGS.items():
                client.set_experiment_tag(exp.experiment_id, k, v)
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_root(client.tracking_uri, name), tags=EXPERIMENT_TAGS)
    except mlflow.exceptions.MlflowException:  # created meanwhile by a concurrent trial
        return client.get_experiment_by_name(name).experiment_id


def source_tags() -> dict:
    """Who ran what, for the runs table: user, source (the command), git commit."""
    commit = git_commit()
    tags = {
        "mlflow.user": os.environ.get("ORCHESTRATOR_USER") or _user(),
        "mlflow.source.name": os.environ.get("ORCHESTRATOR_COMMAND") or "python -m orchestrator.run " + " ".join(sys.argv[1:2]),
        "mlflow.source.type": "JOB",
        "git_commit": commit,
    }
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit
    return tags


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


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
    all_tags = {RUN_NAME_TAG: name, **source_tags(), "mlflow.runName": name, **tags}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp_id, run_name=all_tags["mlflow.runName"], tags=all_tags)
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
        self.step_logged: dict[str, int] = {}  # per step metric: the last step logged

    def log(self, epoch: int, step: int, metrics: dict) -> None:
        if epoch in self.logged:
            return
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        batch.append(Metric("epoch", float(epoch), now, step))  # last: marks the epoch as logged
        self.client.log_batch(self.run_id, metrics=batch)
        self.logged.add(epoch)

    def log_step(self, step: int, metrics: dict) -> None:
        """Metrics at a global step (between epochs), each (metric, step) once: steps that a restart trains
        again after the last checkpoint are not logged again."""
        now = int(time.time() * 1000)
        batch = []
        for key, value in metrics.items():
            if key not in self.step_logged:
                self.step_logged[key] = max((m.step for m in self.client.get_metric_history(self.run_id, key)), default=-1)
            if step > self.step_logged[key]:
                batch.append(Metric(key, float(value), now, step))
                self.step_logged[key] = step
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)


def error_curves_png(client: MlflowClient, panels: dict[str, list[tuple[str, str]]], title: str) -> bytes:
    """Training (dashed) and validation (solid) top-1 error against iterations, like the papers' figures:
    one panel per entry of `panels` (panel title -> [(label, run id)]), one colour per run."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncol = min(2, len(panels))
    nrow = math.ceil(len(panels) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(6 * ncol, 4 * nrow), squeeze=False)
    for ax, (panel, runs) in zip(axes.flat, panels.items(), strict=False):
        for i, (label, run_id) in enumerate(runs):
            for key, style in (("train_top1_err", "--"), ("val_top1_err", "-")):
                hist = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
                if hist:
                    ax.plot([m.step for m in hist], [m.value for m in hist], style, color=f"C{i % 10}",
                            label=label if key == "val_top1_err" and label else None)
        ax.set_title(panel)
        ax.set_xlabel("iterations")
        ax.set_ylabel("top-1 error (%)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def error_plot_png(client: MlflowClient, run_id: str, title: str) -> bytes:
    """The figure every training run logs: its own curves."""
    return error_curves_png(client, {title: [("", run_id)]}, "train (dashed) / val (solid) error")


def set_tags(client: MlflowClient, run_id: str, tags: dict) -> None:
    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def mark_failed(client: MlflowClient, run_id: str, error: BaseException | str) -> None:
    """A run whose job failed: FAILED, with the error's first line as a tag (best effort: the error
    being reported matters more than this bookkeeping)."""
    text = str(error).strip().splitlines()
    try:
        set_tags(client, run_id, {"error": (text[0] if text else type(error).__name__)[:4000]})
        client.set_terminated(run_id, "FAILED")
    except Exception as e:  # noqa: BLE001
        print(f"[mlflow] could not mark run {run_id} FAILED: {e}", file=sys.stderr, flush=True)


def log_dataset(client: MlflowClient, run_id: str, manifest: dict, url: str, split: str, context: str) -> None:
    """The data a run reads, as an MLflow dataset input (the runs table's Dataset column): the
    manifest's URL and split, with a digest of the split's shard checksums."""
    import hashlib

    from mlflow.entities import Dataset, DatasetInput, InputTag

    entry = manifest.get("splits", {}).get(split, {})
    sums = "".join(sh.get("sha256", "") for sh in entry.get("shards", []))
    ds = Dataset(
        name=f"{Path(urlparse(url).path).name or url}/{split}",
        digest=hashlib.sha256(sums.encode()).hexdigest()[:12],
        source_type="s3" if url.startswith("s3://") else "local",
        source=json.dumps({"uri": f"{url.rstrip('/')}/manifest.json", "split": split}),
        profile=json.dumps({"num_samples": entry.get("num_samples"), "num_classes": len(manifest.get("classes", []))}),
    )
    client.log_inputs(run_id, datasets=[DatasetInput(ds, tags=[InputTag("mlflow.data.context", context)])])


@contextlib.contextmanager
def quiet(*loggers: str):
    """MLflow's logger warnings that a user cannot act on, silenced for one call: the pickle advice
    when logging our models (pickle is deliberate: the nets stay fully convolutional)."""
    import logging

    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in loggers]
    for lg, _ in saved:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in saved:
            lg.setLevel(level)
