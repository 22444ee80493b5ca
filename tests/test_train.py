"""Training on a real local Ray cluster, with a real MLflow store and a real S3 endpoint on loopback."""

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


def test_a_failure_to_delete_an_old_checkpoint_is_a_warning_not_a_failed_run(capsys):
    """Ray Train's checkpoint manager deletes through `_tolerant_delete` (train.py): a transient S3
    error there must not fail a run whose training finished."""
    from ray.train.v2._internal.execution.checkpoint import checkpoint_manager

    class Failing:
        def delete_dir(self, path):
            raise OSError("When listing objects under key 'runs/x/epoch_0001': AWS Error INTERNAL_FAILURE (500)")

        def get_file_info(self, path):
            raise OSError("AWS Error INTERNAL_FAILURE (500)")

    import orchestrator.train  # noqa: F401 - installs the wrapper, as in Ray Train's controller

    checkpoint_manager.delete_fs_path(fs=Failing(), fs_path="bucket/runs/x/epoch_0001")
    assert "could not delete the old checkpoint bucket/runs/x/epoch_0001" in capsys.readouterr().out


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
