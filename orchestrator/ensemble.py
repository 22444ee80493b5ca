"""The main job: a ResNet ensemble end to end (v1, Table 5: six models of different depth).

1. members: trained as concurrent Ray Tune trials, or taken from earlier MLflow runs or weight files;
2. evaluation: every member and the ensemble (softmax average) on the validation split, with the
   configured test protocol, on the cluster; a table, and MLflow runs (parent + nested members);
3. registry: one pyfunc model with the members' weights and this project's code; the alias
   `champion` moves to it only if it beats the current champion on the same validation split;
4. batch evaluation of the registered model on the test split (the `evaluate` command's path).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from . import tracking
from .batch_eval import EvaluationError, Scores, batch_evaluate, score_split, transform_spec
from .config import (
    ConfigError,
    EnsembleConfig,
    MemberSpec,
    TrainConfig,
    from_dict,
    load_config,
    load_train_config,
    run_name,
    to_dict,
)
from .ensemble_model import ResNetEnsemble, build_member
from .scoring import error_metrics

DEFAULT_CONFIG = "ensemble_digits.yaml"
# The keys every member sets itself: a `train.` override of one would be silently ignored.
MEMBER_KEYS = {"model.name": "members[*].model", "model.overrides": "members[*].overrides",
               "tracking.experiment": "its `experiment`"}


def load_ensemble_config(path: str | None, overrides: list[str] = ()) -> tuple[EnsembleConfig, list[MemberSpec]]:
    """The ensemble config; `train.<key>=v` overrides go to every member's recipe, others to the ensemble."""
    member_overrides = [o[len("train."):] for o in overrides if o.startswith("train.")]
    for o in member_overrides:
        key = o.split("=", 1)[0]
        owned = next((k for k in MEMBER_KEYS if key == k or key.startswith(k + ".")), None)
        if owned:
            raise ConfigError(
                f"train.{key}: each member sets its own {owned}, so this override would not take effect; "
                f"change the members in the ensemble config ({MEMBER_KEYS[owned]})"
            )
    cfg = load_config("ensemble", path or DEFAULT_CONFIG, [o for o in overrides if not o.startswith("train.")])
    cfg.base_overrides = [*cfg.base_overrides, *member_overrides]
    return cfg, cfg.members


def member_train_config(cfg: EnsembleConfig, m: MemberSpec) -> TrainConfig:
    overrides = [*cfg.base_overrides, f"model.name={m.model}", f"model.overrides={json.dumps(m.overrides)}", *m.train]
    overrides.append(f"tracking.experiment={cfg.experiment}")
    try:
        return load_train_config(cfg.base, overrides)
    except ConfigError as e:
        raise ConfigError(f"member {m.label!r}: {e}") from None


@dataclass
class Member:
    label: str
    spec: dict  # {"label", "model", "overrides", "num_classes"}: enough to rebuild the net
    state_dict: dict
    run_id: str | None = None


def _state_from_file(path: str, member: MemberSpec | None = None) -> dict:
    from .checkpoints import load_checkpoint
    from .cluster import user_path

    path = user_path(path, "member checkpoint")
    if not Path(path).exists():
        raise EvaluationError(f"member checkpoint {path!r} does not exist")
    state = load_checkpoint(Path(path), path)  # verified against its sha256 sidecar when it has one
    ours = isinstance(state, dict) and "model" in state and "optimizer" in state
    if member is not None:
        _check_layout(member, state.get("config") if ours else None, path)
    return state["model"] if ours else state


def _check_layout(m: MemberSpec, train_config: dict | None, path: str) -> None:
    """v1 and torchvision's v1.5 bottlenecks share every parameter name and shape, so the layout must come
    from our checkpoint's metadata (its train config) or from the member's `stride_in_1x1`; else warn."""
    import warnings

    import models

    if train_config is None:
        why = models.unstated_layout(m.model, m.overrides)
        if why:
            warnings.warn(f"member {m.label!r} ({path}): {why} (members[].overrides.stride_in_1x1)", UserWarning, stacklevel=3)
        return
    theirs = train_config["model"]
    want = models.resolve(m.model, **m.overrides)["stride_in_1x1"]
    have = models.resolve(theirs["name"], **theirs.get("overrides", {}))["stride_in_1x1"]
    if want != have:
        raise EvaluationError(
            f"member {m.label!r}: {path} was trained with stride_in_1x1={have} ({theirs['name']}), "
            f"but the member asks for stride_in_1x1={want}; set members[].overrides.stride_in_1x1: {have}"
        )


def _download_checkpoint(client, run_id: str) -> dict:
    from .train import download_checkpoint

    try:
        return download_checkpoint(client, run_id)[1]
    except Exception as e:  # noqa: BLE001
        raise EvaluationError(f"MLflow run {run_id!r} has no checkpoint/checkpoint.pt: {str(e).splitlines()[0]}") from None


def gather_members(cfg: EnsembleConfig, members: list[MemberSpec], classes: list, storage: str, parent_run_id: str, client) -> list[Member]:
    """Load and check the members given as weights first (a bad file fails before any training), then
    train the others as concurrent Tune trials and fetch their final checkpoints from MLflow."""
    from .tuning import Trial, run_trials

    got: dict[str, Member] = {}
    for m in members:
        if m.mlflow_run:
            state = _download_checkpoint(client, m.mlflow_run)
            tcfg = from_dict(TrainConfig, state["config"])
            if list(state["classes"]) != list(classes):
                raise EvaluationError(
                    f"member {m.label!r} (MLflow run {m.mlflow_run}) was trained on classes {state['classes']}, "
                    f"the data set has {classes}"
                )
            spec = {"label": m.label, "model": tcfg.model.name, "overrides": tcfg.model.overrides, "num_classes": len(classes)}
            got[m.label] = Member(m.label, spec, state["model"], m.mlflow_run)
        elif m.checkpoint:
            spec = {"label": m.label, "model": m.model, "overrides": m.overrides, "num_classes": len(classes)}
            got[m.label] = Member(m.label, spec, _state_from_file(m.checkpoint, m))
        else:
            continue
        try:
            build_member(got[m.label].spec, got[m.label].state_dict)  # fail here, naming the member
        except ValueError as e:
            raise EvaluationError(f"{e} (checkpoint {m.checkpoint or 'of run ' + m.mlflow_run})") from None

    to_train = [Trial(m.label, member_train_config(cfg, m)) for m in members if m.label not in got]
    if to_train:
        digest = hashlib.sha256(json.dumps([to_dict(t.config) for t in to_train], sort_keys=True).encode()).hexdigest()
        errors = run_trials(
            to_train, study=f"{cfg.name}-members-{digest[:8]}", storage=storage, experiment=cfg.experiment,
            parent_run_id=parent_run_id,
        )
        if errors:
            raise RuntimeError(f"members failed to train: {', '.join(f'{k}: {v}' for k, v in errors.items())}")
    exp_id = tracking.experiment_id(client, cfg.experiment)
    for t in to_train:
        run = tracking.find_run(client, exp_id, run_name(t.config))
        if run is None:
            raise RuntimeError(f"member {t.label!r}: no MLflow run {run_name(t.config)!r} after training")
        state = _download_checkpoint(client, run.info.run_id)
        spec = {"label": t.label, "model": t.config.model.name, "overrides": t.config.model.overrides,
                "num_classes": len(classes)}
        got[t.label] = Member(t.label, spec, state["model"], run.info.run_id)
    return [got[m.label] for m in members]


def ensemble_metadata(cfg: EnsembleConfig, members: list[Member], manifest: dict, data_url: str) -> dict:
    base = member_train_config(cfg, MemberSpec(label="base", model=members[0].spec["model"]))
    return {
        "members": [m.spec for m in members],
        "classes": list(manifest["classes"]),
        "mean": manifest["mean"],
        "std": manifest["std"],
        "data_kind": base.data.kind,
        "test_size": base.data.test_size or base.data.size,
        "resize": base.data.resize,
        "protocol": cfg.evaluation.protocol,
        "trained_on": data_url,
        "member_runs": {m.label: m.run_id for m in members if m.run_id},
    }


def results_table(members: list[Member], scores: Scores) -> tuple[str, dict]:
    rows = {m.label: error_metrics(scores.member_probs[i], scores.labels) for i, m in enumerate(members)}
    rows["ensemble"] = error_metrics(scores.probs, scores.labels)
    lines = ["| model | top-1 err % | top-5 err % | log loss |", "|---|---:|---:|---:|"]
    for label, r in rows.items():
        name = f"**{label}**" if label == "ensemble" else label
        lines.append(f"| {name} | {r['top1_err']:.2f} | {r['top5_err']:.2f} | {r['log_loss']:.4f} |")
    return "\n".join(lines), rows


def log_and_register(cfg: EnsembleConfig, members: list[Member], meta: dict, parent_run_id: str, client) -> tuple[str, str]:
    """Log the ensemble as one pyfunc model in the parent run and register it; returns (model_uri, version)."""
    import mlflow
    import numpy as np
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    tmp = Path(tempfile.mkdtemp(prefix="ensemble-"))
    artifacts = {"ensemble": str(tmp / "ensemble.json")}
    (tmp / "ensemble.json").write_text(json.dumps(meta, indent=2))
    for i, m in enumerate(members):
        torch.save(m.state_dict, tmp / f"member_{i}.pt")
        artifacts[f"member_{i}"] = str(tmp / f"member_{i}.pt")
    in_ch = int(members[0].state_dict["conv1.weight"].shape[1])
    k = len(meta["classes"])
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, in_ch, -1, -1))]),  # any size: fully convolutional
        outputs=Schema([
            TensorSpec(np.dtype(np.float32), (-1, k), "probabilities"),
            TensorSpec(np.dtype(np.int64), (-1, min(5, k)), "top5"),
        ]),
    )
    with mlflow.start_run(run_id=parent_run_id), tracking.quiet("mlflow.pyfunc"):
        info = mlflow.pyfunc.log_model(
            name="ensemble",
            python_model=ResNetEnsemble(),
            artifacts=artifacts,
            code_paths=[str(tracking.PROJECT_ROOT / "models"), str(tracking.PROJECT_ROOT / "orchestrator")],
            signature=signature,
            metadata={k2: meta[k2] for k2 in ("classes", "protocol", "data_kind", "test_size", "mean", "std")},
            registered_model_name=cfg.name,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy"],
        )
    version = str(info.registered_model_version)
    return f"models:/{cfg.name}/{version}", version


def decide_champion(
    cfg: EnsembleConfig, version: str, new: dict, labels, data_url: str, split: str, spec: dict, client
) -> str:
    """Move the alias to `version` only if it beats the current champion on the same split."""
    alias, name = cfg.registry.alias, cfg.name
    try:
        current = client.get_model_version_by_alias(name, alias)
    except Exception:  # noqa: BLE001 - no such alias yet
        current = None
    tags = {"val_split": f"{data_url} [{split}]", "val_top1_err": f"{new['top1_err']:.4f}", "val_log_loss": f"{new['log_loss']:.6f}"}
    if current is None:
        decision = "promoted: no previous champion"
    elif current.version == version:
        decision = "kept: already champion"
    else:
        old = error_metrics(
            score_split({"model_uri": f"models:/{name}/{current.version}", "tracking_uri": client.tracking_uri},
                        data_url, split, spec).probs,
            labels,
        )
        tags["champion_version"] = current.version
        tags["champion_val_top1_err"] = f"{old['top1_err']:.4f}"
        tags["champion_val_log_loss"] = f"{old['log_loss']:.6f}"
        better = (new["top1_err"], new["log_loss"]) < (old["top1_err"], old["log_loss"])
        decision = (f"promoted: beats v{current.version}" if better else f"not promoted: v{current.version} is as good or better")
        if not better:
            tags["champion_decision"] = decision
            for k, v in tags.items():
                client.set_model_version_tag(name, version, k, v)
            return decision
    client.set_registered_model_alias(name, alias, version)
    tags["champion_decision"] = decision
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, v)
    return decision


def run_ensemble(config_path: str | None, overrides: list[str], storage: str | None = None) -> dict:
    from mlflow.tracking import MlflowClient

    from .cluster import user_path
    from .preflight import Data, Workers, preflight

    # Before any work: the config, the data (written only when it is the local demo folder), the
    # storage, the MLflow store and the cluster, each failing in seconds with one line.
    cfg, members = load_ensemble_config(config_path, overrides)
    base = member_train_config(cfg, MemberSpec(label="base", model=next((m.model for m in members if m.model), "resnet20")))
    data_url = base.data.url = user_path(base.data.url, "train.data.url")
    cfg.base_overrides = [*cfg.base_overrides, f"data.url={data_url}"]
    member_cfgs = [member_train_config(cfg, m) for m in members if not (m.checkpoint or m.mlflow_run)]
    splits = (base.data.train_split, base.data.val_split, cfg.evaluation.split, cfg.batch_eval.split)
    before = preflight(
        data=[Data(data_url, splits, "train.data.url", source=cfg.source)], storage=storage or cfg.storage,
        tracking=True, workers=[Workers.of(c, "an ensemble member") for c in member_cfgs or [base]],
    )
    manifest, storage, uri = before.manifests[data_url], before.storage, before.tracking_uri
    classes = list(manifest["classes"])

    client = MlflowClient(uri)
    cfg_hash = hashlib.sha256(json.dumps(
        {"cfg": to_dict(cfg), "members": [to_dict(m) for m in members]}, sort_keys=True, default=str
    ).encode()).hexdigest()[:8]
    parent_name = f"{cfg.name}-{cfg_hash}"
    parent_run_id, _ = tracking.find_or_create_run(
        client, cfg.experiment, parent_name,
        {"name": cfg.name, "base": cfg.base, "members": ",".join(m.label for m in members),
         "protocol": cfg.evaluation.protocol, "data": data_url},
        {"kind": "ensemble", "mlflow.runName": cfg.name},
    )
    client.set_terminated(parent_run_id, "RUNNING")
    print(f"[ensemble] {parent_name}: {len(members)} members, MLflow run {parent_run_id} at {uri}", flush=True)
    try:
        return _run_ensemble(cfg, members, manifest, classes, data_url, storage, client, parent_run_id)
    except BaseException as e:  # the parent run is never left RUNNING
        from .train import TrainingFailed

        tracking.mark_failed(client, parent_run_id, e)
        if isinstance(e, RuntimeError) and not isinstance(e, TrainingFailed) and str(e).startswith("members failed"):
            raise TrainingFailed(str(e)) from None
        raise


def _run_ensemble(cfg: EnsembleConfig, members: list[MemberSpec], manifest: dict, classes: list, data_url: str,
                  storage: str, client, parent_run_id: str) -> dict:
    tracking.log_dataset(client, parent_run_id, manifest, data_url, cfg.evaluation.split, "validation")
    got = gather_members(cfg, members, classes, storage, parent_run_id, client)
    meta = ensemble_metadata(cfg, got, manifest, data_url)
    spec = transform_spec(meta)
    split = cfg.evaluation.split
    print(f"[ensemble] evaluating {len(got)} members and the ensemble on {split} ({spec['protocol']})", flush=True)
    scores = score_split({"members": [(m.spec, m.state_dict) for m in got]}, data_url, split, spec,
                         batch_size=cfg.evaluation.batch_size)
    table, rows = results_table(got, scores)
    for label, r in rows.items():
        prefix = "ensemble" if label == "ensemble" else f"member.{label}"
        for k in ("top1_err", "top5_err", "log_loss"):
            client.log_metric(parent_run_id, f"{prefix}.{split}_{k}", r[k])
    client.log_text(parent_run_id, table + "\n", "ensemble_table.md")

    model_uri, version = log_and_register(cfg, got, meta, parent_run_id, client)
    decision = decide_champion(cfg, version, rows["ensemble"], scores.labels, data_url, split, spec, client)
    print(f"\n{table}\n\n[registry] {cfg.name} version {version}: {decision}", flush=True)

    alias_uri = f"models:/{cfg.name}@{cfg.registry.alias}"
    evaluated_uri = alias_uri if decision.startswith(("promoted", "kept")) else model_uri
    batch = batch_evaluate(evaluated_uri, meta, data_url, manifest, cfg.batch_eval.split, storage,
                           experiment=cfg.experiment, parent_run_id=parent_run_id)
    description = describe(cfg, got, rows, batch, data_url, decision)
    tracking.set_tags(client, parent_run_id, {"mlflow.note.content": description})
    client.update_model_version(cfg.name, version, description=description)
    client.set_terminated(parent_run_id, "FINISHED")
    return {"table": table, "rows": rows, "model_uri": model_uri, "version": version, "decision": decision,
            "batch": batch, "parent_run_id": parent_run_id, "members": got, "scores": scores,
            "experiment_id": tracking.experiment_id(client, cfg.experiment)}


def describe(cfg: EnsembleConfig, members: list[Member], rows: dict, batch: dict, data_url: str, decision: str) -> str:
    """What the parent run and the registered version say about themselves in the MLflow UI."""
    split, test = cfg.evaluation.split, cfg.batch_eval.split
    lines = [
        f"Ensemble of {len(members)} ResNets (softmax average): "
        + ", ".join(f"{m.label} ({m.spec['model']})" for m in members) + ".",
        f"Data: {data_url}. Protocol: {cfg.evaluation.protocol}.",
        f"{split} top-1 error: ensemble {rows['ensemble']['top1_err']:.2f}% ("
        + ", ".join(f"{k} {v['top1_err']:.2f}%" for k, v in rows.items() if k != "ensemble") + ").",
    ]
    if "top1_err" in batch:
        lines.append(f"{test} top-1 error: {batch['top1_err']:.2f}% (batch evaluation of the registered model).")
    lines.append(f"Registry: {decision}.")
    return "\n\n".join(lines)
