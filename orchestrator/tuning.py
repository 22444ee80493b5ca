"""Several trainings at once as Ray Tune trials (ablation studies, ensemble members).

Ray 2.60 (Train V2): each Tune trial runs a small driver function, on a sliver of CPU, that calls
`fit()`, which builds its own TorchTrainer. Trials run as concurrently as the cluster allows. An
interrupted study is resumed by re-running it: Tune restores the study, and every trial's `fit()`
finds its own checkpoints and MLflow run by its deterministic name, so finished trials are not re-run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import ray
from ray import tune

from .cluster import check_fits, ensure_ray, storage_for_ray, storage_url
from .config import TrainConfig, from_dict, run_name, to_dict
from .ray_compat import keep_credentials_out_of_trials
from .tracking import tracking_uri
from .train import fit

DRIVER_CPU = 0.01  # the trial's driver only waits on its TorchTrainer; 0 is refused by Tune


@dataclass
class Trial:
    label: str  # a readable name for reports ("resnet20", "plain56 seed 2", ...)
    config: TrainConfig


def max_concurrent(trials: list[Trial]) -> int:
    """How many trials fit side by side on the cluster, from each trial's scaling config."""
    have = ray.cluster_resources()
    per = max(t.config.scaling.max_workers * t.config.scaling.cpus_per_worker for t in trials)
    n = math.floor(have.get("CPU", 0.0) / (per + DRIVER_CPU) + 1e-9)
    if any(t.config.scaling.use_gpu for t in trials):
        gpus = max(t.config.scaling.max_workers for t in trials if t.config.scaling.use_gpu)
        n = min(n, math.floor(have.get("GPU", 0.0) / gpus))
    return max(1, min(n, len(trials)))


def _trial_driver(params: dict, storage: str, experiment: str, parent_run_id: str | None, tracking_uri: str,
                  manifests: dict | None = None, report_epochs: bool = True) -> None:
    import os

    import mlflow

    # Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (Ray's default 2 s):
    # a trial noticed its last report and then its end up to two polls late. Ray Train passes this process's
    # setting on to the controller that fit() starts. (With the reuse below: last step to the trial's end
    # 6.0 -> 2.0 s, BENCHMARKS.md, issue 20.)
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    mlflow.set_tracking_uri(tracking_uri)  # Tune runs trials in their own working directories
    cfg = from_dict(TrainConfig, params["trial"]["train"])
    result = fit(cfg, storage, parent_run_id=parent_run_id, experiment=experiment, label=params["trial"]["label"],
                 checked=True, manifest=(manifests or {}).get(cfg.data.url), report_epochs=report_epochs)
    tune.report({**{k: v for k, v in result.metrics.items() if isinstance(v, int | float)}, "finished": 1})


def _manifests(trials: list[Trial]) -> dict[str, dict]:
    """Each data set's manifest, read and checked once here for all the trials that train on it (its
    splits present), instead of once in every trial's driver, where reading it imported the loader and
    torchvision (1.2 CPU-s)."""
    from .preflight import check_data

    urls = sorted({t.config.data.url for t in trials})
    return {url: check_data(url, sorted({s for t in trials if t.config.data.url == url
                                          for s in (t.config.data.train_split, t.config.data.val_split)}))
            for url in urls}


def run_trials(
    trials: list[Trial],
    *,
    study: str,
    storage: str,
    experiment: str,
    parent_run_id: str | None = None,
    scheduler=None,
    max_concurrent_trials: int | None = None,
    callbacks: list | None = None,
) -> dict[str, object]:
    """Train every trial (resuming an interrupted study); returns the errors of the trials that failed, by
    label (what their drivers raised).

    Each finished trial's numbers are read back from MLflow by its run name (`run_name(cfg)`).
    `max_concurrent_trials` caps how many run at once (default: as many as the cluster holds);
    `callbacks`: Ray Tune callbacks (e.g. the trial clock of benchmarks/bench_trials.py).
    """
    ensure_ray()
    keep_credentials_out_of_trials()  # see ray_compat
    labels = [t.label for t in trials]
    if len(set(labels)) != len(labels):
        raise ValueError(f"trial labels must be unique, got {labels}")
    names = [run_name(t.config) for t in trials]
    if len(set(names)) != len(names):
        raise ValueError("two trials have identical configs (give repeats different seeds)")
    for t in trials:  # fail fast: a trial that can never be scheduled would wait forever
        check_fits(t.config.scaling.min_workers, t.config.scaling.cpus_per_worker, t.config.scaling.use_gpu,
                   f"trial {t.label!r}")
    concurrent = min(max_concurrent(trials), max_concurrent_trials or len(trials))
    print(f"[tune] study {study}: {len(trials)} trials, up to {concurrent} at a time", flush=True)

    storage_path, fs = storage_for_ray(storage)
    trainable = tune.with_resources(
        tune.with_parameters(
            _trial_driver, storage=storage_url(storage), experiment=experiment, parent_run_id=parent_run_id,
            tracking_uri=tracking_uri(), manifests=_manifests(trials),
            # Per-epoch reports to Tune are for a scheduler (ASHA); without one, the trial reports its final
            # metrics and Ray Tune starts no queue actor per trial for the epochs.
            report_epochs=scheduler is not None,
        ),
        {"CPU": DRIVER_CPU},
    )
    space = {"trial": tune.grid_search([{"label": t.label, "train": to_dict(t.config)} for t in trials])}
    path = f"{storage_path.rstrip('/')}/{study}"
    if tune.Tuner.can_restore(path, storage_filesystem=fs):
        print(f"[tune] resuming study {study} from {storage}/{study}", flush=True)
        tuner = tune.Tuner.restore(
            path, trainable, resume_unfinished=True, resume_errored=True, param_space=space, storage_filesystem=fs
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                max_concurrent_trials=concurrent,
                # A finished trial's driver process runs the next trial: its start-up (a Ray worker, then
                # importing Tune, Ray Train, torch and MLflow, and matplotlib and mlflow.pytorch for the final
                # model) is paid once per slot. Measured: 6-8 CPU-s a trial in a new process, 0.3 reused.
                reuse_actors=True,
                scheduler=scheduler,
                metric="val_top1_err" if scheduler else None,
                mode="min" if scheduler else None,
            ),
            run_config=tune.RunConfig(name=study, storage_path=storage_path, storage_filesystem=fs, verbose=0,
                                      callbacks=callbacks),
        )
    grid = tuner.fit()
    errors = {}
    for result in grid:
        label = result.config["trial"]["label"]
        if result.error:
            errors[label] = _raised(result.error)
    return errors


class TrialError(RuntimeError):
    """A trial's error whose own message spans lines, in one line: its type and its first line."""


def _raised(err: BaseException) -> BaseException:
    """What the trial's driver raised (e.g. `train.TrainingFailed`, whose message is the root cause in one
    line), without Ray's wrapping: the actor's name, pid and ids, then the traceback, on many lines. An
    error of many lines (SQLAlchemy's add the statement and its parameters) becomes a `TrialError`."""
    while isinstance(err, ray.exceptions.RayTaskError) and getattr(err, "cause", None) is not None:
        err = err.cause
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if len(lines) > 1:
        return TrialError(f"{type(err).__name__}: {lines[0]}")
    return err
