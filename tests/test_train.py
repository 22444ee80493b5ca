"""Training on a real local Ray cluster, with a real MLflow store and a real S3 endpoint on loopback."""

import os
import shutil
import threading
import time

import boto3
import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from orchestrator.cluster import ClusterTooSmall
from orchestrator.config import load_train_config
from orchestrator.train import fit

pytestmark = pytest.mark.slow


def test_train_learns_survives_a_worker_kill_and_records_everything(
    tmp_path, monkeypatch, ray_local, digits_url, make_bucket
):
    bucket = make_bucket()
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    marker = tmp_path / "killed"
    cfg = load_train_config(
        "digits_resnet20.yaml",
        [
            f"data.url={digits_url}",
            "model.name=resnet8",
            "schedule.epochs=5",
            "schedule.milestones=[4]",
            "optim.lr=0.2",
            "debug.kill_worker_at_epoch=2",
            f"debug.kill_marker={marker}",
            "tracking.experiment=test-train",
        ],
    )
    result = fit(cfg, f"s3://{bucket}/runs")

    # The worker really died once, and the run still finished every epoch.
    assert marker.exists()
    # It learns: digits have 10 classes, chance is 90 % error.
    assert result.metrics["val_top1_err"] < 40.0, result.metrics

    client = MlflowClient(uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    epochs = sorted(m.value for m in client.get_metric_history(result.run_id, "epoch"))
    assert epochs == [0.0, 1.0, 2.0, 3.0, 4.0], "every epoch logged exactly once despite the restart"
    for key in ("train_loss", "train_top1_err", "val_top1_err", "val_top5_err", "lr", "images_per_sec"):
        assert len(client.get_metric_history(result.run_id, key)) == 5, key
    assert run.data.params["model.name"] == "resnet8"
    assert run.data.params["derived.per_worker_batch"] == "32"
    assert run.data.tags["git_commit"]
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"config", "checkpoint", "error_curves.png"} <= artifacts, artifacts
    # The final model is an MLflow (PyTorch flavour) model of this run, with a signature; it loads and predicts.
    logged = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{result.run_id}'", output_format="list"
    )
    assert [m.name for m in logged] == ["model"]
    net = mlflow.pytorch.load_model(logged[0].model_uri).eval()
    with torch.no_grad():
        assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert mlflow.models.get_model_info(logged[0].model_uri).signature is not None

    # Checkpoints and results live on S3.
    s3 = boto3.client("s3")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="runs/")["Contents"]]
    assert any(k.endswith(f"{result.name}/epoch_0004/checkpoint.pt") for k in keys), keys

    # The checkpoint loads with weights_only=True and holds the resolved config.
    state = torch.load(result.checkpoint_path, weights_only=True)
    assert state["epoch"] == 4 and state["config"]["model"]["name"] == "resnet8"

    # Re-running the same command continues the run instead of training again.
    again = fit(cfg, f"s3://{bucket}/runs")
    assert again.run_id == result.run_id and again.metrics == result.metrics
    assert sorted(m.value for m in client.get_metric_history(result.run_id, "epoch")) == epochs


def test_a_request_the_cluster_cannot_hold_fails_fast(ray_local, digits_url, tmp_path):
    cfg = load_train_config("digits_resnet20.yaml", [f"data.url={digits_url}", "scaling.num_workers=16"])
    with pytest.raises(ClusterTooSmall, match="needs 16 CPU"):
        fit(cfg, str(tmp_path))
    gpu = load_train_config("digits_resnet20.yaml", [f"data.url={digits_url}", "scaling.use_gpu=true"])
    with pytest.raises(ClusterTooSmall, match="GPU"):
        fit(gpu, str(tmp_path))


def _tiny(digits_url: str, name: str, *extra: str):
    """Two epochs of ResNet-8 on the digits, 2 workers, a checkpoint every 5 of the 19 steps of an epoch."""
    return load_train_config("digits_resnet20.yaml", [
        f"data.url={digits_url}", "model.name=resnet8", "schedule.epochs=2", "schedule.milestones=[1]",
        "checkpoint.every_steps=5", "checkpoint.keep_best=1", f"tracking.run_name={name}", "tracking.experiment=exact",
        "tracking.log_model=false", *extra])


def test_a_checkpoint_ray_cannot_delete_does_not_fail_the_run(tmp_path, monkeypatch, ray_local, digits_url, capsys):
    """Ray's checkpoint manager fails its controller when an old checkpoint it deletes is already gone
    (FileNotFoundError) or S3 answers 500: the driver resumes the run from the last checkpoint instead."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    runs = tmp_path / "runs"
    snapshot = runs / "deleted" / "checkpoint_manager_snapshot.json"
    removed = []

    def remove_the_first_step_checkpoint():  # once Ray committed it, and before the next one replaces it
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not removed:
            if snapshot.exists() and "step_00000005" in snapshot.read_text(errors="replace"):
                shutil.rmtree(runs / "deleted" / "step_00000005")
                removed.append(True)
            time.sleep(0.02)

    thread = threading.Thread(target=remove_the_first_step_checkpoint, daemon=True)
    thread.start()
    result = fit(_tiny(digits_url, "deleted"), str(runs))
    thread.join(timeout=5)
    out = capsys.readouterr().out
    assert removed
    assert "the run's controller failed" in out and "resuming from the last checkpoint" in out, out[-3000:]
    run = MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_run(result.run_id)
    assert run.info.status == "FINISHED"
    left = sorted(p.name for p in (runs / "deleted").iterdir() if p.name.startswith(("epoch_", "step_")))
    assert left == ["epoch_0001"], left  # the latest is kept; what Ray's retention left behind is pruned


def test_checkpoints_carry_a_checksum_that_is_checked_on_load(tmp_path):
    from orchestrator.checkpoints import (
        CHECKPOINT_FILE,
        CheckpointIntegrityError,
        load_checkpoint,
        save_checkpoint,
    )

    save_checkpoint({"epoch": 3, "model": {"w": torch.ones(2)}}, tmp_path)
    assert load_checkpoint(tmp_path / CHECKPOINT_FILE, "here")["epoch"] == 3
    raw = (tmp_path / CHECKPOINT_FILE).read_bytes()
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"7\r\n" + raw + b"\r\n0\r\nx-amz-checksum-crc64nvme:AAAA\r\n")
    with pytest.raises(CheckpointIntegrityError, match="s3://b/runs/r/epoch_0003/checkpoint.pt is corrupt.*when_required"):
        load_checkpoint(tmp_path / CHECKPOINT_FILE, "s3://b/runs/r/epoch_0003/checkpoint.pt")


# Today's recipes in one tiny run: MixUp + CutMix, TrivialAugmentWide, random erasing, progressive resizing
# (24 px in epoch 1, 32 in epoch 2), LAMB with BCE, no decay on norm/bias, warm-up + cosine, and an EMA per step.
RECIPE_KEYS = ("data.mixup_alpha=0.2", "data.cutmix_alpha=1.0", "data.auto_augment=trivial_augment_wide",
               "data.random_erasing=0.25", "data.progressive.min_size=24", "data.progressive.end_epoch=1",
               "data.progressive.multiple=8", "optim.optimizer=lamb", "optim.lr=0.004", "optim.weight_decay=0.02",
               "optim.loss=bce", "optim.bce_target_threshold=0.2", "optim.no_weight_decay=norm_and_bias",
               "schedule.kind=cosine", "schedule.warmup_epochs=1", "ema.decay=0.9", "ema.every_steps=1",
               "ema.adjust=false")


def test_a_run_killed_between_two_step_checkpoints_resumes_bit_for_bit(tmp_path, monkeypatch, ray_local, digits_url, capsys):
    """SIGKILL of a worker at iteration 23, after the checkpoint of iteration 20 and before that of 25: Ray
    restarts the worker group, the run resumes at iteration 20 (mid-epoch) and ends with the very weights of
    an uninterrupted run (CPU, same world size, 2 Ray workers). With every mechanism of today's recipes on,
    over the papers' step: the EMA of the weights (and its count), the trained weights, LAMB's state and the
    epoch's sums survive the kill; MixUp/CutMix and the augmentations draw alike after the resume. (One pair
    of runs: the papers' recipe takes the same resume path with fewer states; test_recipes checks its step.)"""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    plain = fit(_tiny(digits_url, "recipe-plain", *RECIPE_KEYS), str(tmp_path / "runs"))
    marker = tmp_path / "killed"
    killed = fit(_tiny(digits_url, "recipe-killed", *RECIPE_KEYS, "debug.kill_worker_at_step=23",
                       f"debug.kill_marker={marker}"), str(tmp_path / "runs"))
    out = capsys.readouterr().out
    assert marker.exists() and "resume from epoch 2 step 1 (iteration 20)" in out, out[-3000:]
    a, b = (torch.load(r.checkpoint_path, weights_only=True) for r in (plain, killed))
    for key in ("model", "raw_model"):  # the EMA (the run's model) and the trained weights
        assert [k for k in a[key] if not torch.equal(a[key][k], b[key][k])] == [], key
    assert a["ema"] == b["ema"] == {"n_averaged": 19}  # one update per step; epoch 1 is warm-up (restarts)
    assert any(not torch.equal(a["model"][k], a["raw_model"][k]) for k in a["model"]), "the average is not the weights"
    assert killed.metrics["train_loss"] == plain.metrics["train_loss"]
    assert killed.metrics["val_top1_err_ema"] == plain.metrics["val_top1_err_ema"]
    run = MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_run(killed.run_id)
    assert run.data.params["derived.train_sizes"] == "24 px epoch 1; 32 px epoch 2"
    assert run.data.params["derived.ema_decay_per_update"] == "0.9"
    assert "EMA" in out and "val_top1_err_ema" in run.data.metrics
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    assert sorted(m.value for m in client.get_metric_history(killed.run_id, "epoch")) == [0.0, 1.0]
    steps = [m.step for m in client.get_metric_history(killed.run_id, "step_train_loss")]
    assert steps and len(steps) == len(set(steps)), "each step metric logged once"
