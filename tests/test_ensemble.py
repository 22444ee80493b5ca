"""The main job end to end on a tiny digits ensemble: a real local Ray cluster and a real MLflow store."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient

import models
import pipelines
from orchestrator.batch_eval import EvaluationError, evaluate_registered
from orchestrator.config import ConfigError, load_train_config
from orchestrator.ensemble import load_ensemble_config, run_ensemble
from orchestrator.ensemble_model import build_member
from orchestrator.scoring import error_metrics
from pipelines.shards import main as shards_cli

pytestmark = pytest.mark.slow
NAME = "test-ensemble"


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    yield uri
    mp.undo()


def overrides(digits, members):
    return [
        f"name={NAME}",
        "experiment=test-ensemble",
        f"members={json.dumps(members)}",
        f"train.data.url={digits}",
        "train.schedule.epochs=3",
        "train.schedule.milestones=[2]",
        "train.optim.lr=0.2",
        "train.scaling.cpus_per_worker=0.6",
    ]


@pytest.fixture(scope="module")
def first(ray_local, digits_url, tracking, tmp_path_factory):
    # Two trained members of different depth, plus one brought as a torchvision-layout state_dict file.
    own = tmp_path_factory.mktemp("weights") / "resnet8.pt"
    torch.manual_seed(3)
    torch.save(models.create_model("resnet8", num_classes=10).state_dict(), own)
    members = [
        {"label": "r8", "model": "resnet8"},
        {"label": "r14", "model": "resnet14"},
        {"label": "own", "model": "resnet8", "checkpoint": str(own)},
    ]
    storage = str(tmp_path_factory.mktemp("runs"))
    return run_ensemble(None, overrides(digits_url, members), storage), members, storage


def test_registered_with_alias_and_nested_runs(first, tracking):
    out, members, _ = first
    client = MlflowClient(tracking)
    champion = client.get_model_version_by_alias(NAME, "champion")
    assert str(champion.version) == out["version"] and out["decision"].startswith("promoted")
    assert champion.tags["champion_decision"] == out["decision"]
    children = client.search_runs(
        [client.get_experiment_by_name("test-ensemble").experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{out['parent_run_id']}'",
    )
    assert len(children) >= 3  # two trained members and the batch evaluation
    parent = client.get_run(out["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert "ensemble.val_top1_err" in parent.data.metrics and "member.r14.val_log_loss" in parent.data.metrics


def test_the_table_is_each_member_and_their_softmax_average_scored_on_the_whole_val_split(first, digits_url):
    """The numbers of the table, recomputed here without the cluster: every member scored alone on every
    val image, and the ensemble as the average of their softmax scores."""
    out, members, _ = first
    rows = out["rows"]
    manifest = pipelines.read_manifest(digits_url)
    size = load_train_config("digits_resnet20.yaml").data.size
    view = pipelines.make_transform("cifar", False, size=size, protocol="center", mean=manifest["mean"], std=manifest["std"])
    nets = [build_member(m.spec, m.state_dict) for m in out["members"]]
    probs, labels = [], []
    with torch.no_grad():
        for x, y in pipelines.make_loader(digits_url, "val", 64, num_workers=0, shuffle=False, transform=view):
            probs.append(torch.stack([torch.softmax(net(x), 1) for net in nets]))
            labels.append(y)
    member_probs, labels = torch.cat(probs, 1).numpy(), torch.cat(labels).numpy()
    assert len(labels) == manifest["splits"]["val"]["num_samples"] == rows["ensemble"]["n"]
    for i, m in enumerate(members):
        assert rows[m["label"]]["log_loss"] == pytest.approx(error_metrics(member_probs[i], labels)["log_loss"], abs=1e-4)
    ensemble = error_metrics(member_probs.mean(0), labels)
    assert rows["ensemble"]["log_loss"] == pytest.approx(ensemble["log_loss"], abs=1e-4)
    assert rows["ensemble"]["top1_err"] == pytest.approx(ensemble["top1_err"])
    trained = [rows["r8"]["top1_err"], rows["r14"]["top1_err"]]
    assert min(trained) < 60.0, rows  # three epochs already beat chance (90 %) clearly


def test_pyfunc_in_a_fresh_process_predicts_the_members_average(first, tracking, tmp_path):
    out = first[0]
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    script = textwrap.dedent(f"""
        import numpy as np, mlflow
        mlflow.set_tracking_uri({tracking!r})
        model = mlflow.pyfunc.load_model("models:/{NAME}@champion")
        pred = model.predict(np.load({str(tmp_path / 'x.npy')!r}))
        np.save({str(tmp_path / 'p.npy')!r}, pred["probabilities"])
        np.save({str(tmp_path / 't.npy')!r}, pred["top5"])
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    nets = [build_member(m.spec, m.state_dict) for m in out["members"]]
    with torch.no_grad():
        direct = torch.stack([torch.softmax(n(torch.from_numpy(x)), 1) for n in nets]).mean(0).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "p.npy"), direct, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.load(tmp_path / "t.npy")[:, 0], direct.argmax(1))


def test_batch_evaluation_writes_one_prediction_per_test_sample(first, digits_url):
    table = pq.read_table(first[0]["batch"]["predictions"]).to_pandas()
    n_test = pipelines.read_manifest(digits_url)["splits"]["test"]["num_samples"]
    assert len(table) == n_test == table["key"].nunique()
    assert all(len(t) == 5 for t in table["top5"]) and all(abs(sum(p) - 1) < 1e-4 for p in table["probabilities"])
    assert (table["prediction"] == [t[0] for t in table["top5"]]).all()


def test_rerun_reuses_members_and_keeps_the_champion_unless_beaten(first, digits_url, tracking):
    out, members, storage = first
    again = run_ensemble(None, overrides(digits_url, members), storage)
    assert [m.run_id for m in again["members"]] == [m.run_id for m in out["members"]]  # not retrained
    assert again["version"] != out["version"]
    assert again["decision"].startswith("not promoted")  # identical scores do not beat the champion
    client = MlflowClient(tracking)
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == out["version"]
    tags = client.get_model_version(NAME, again["version"]).tags
    assert str(tags["champion_version"]) == out["version"] and "champion_val_top1_err" in tags


def test_bad_model_uri_and_mismatched_classes_are_clear_errors(first, tracking, tmp_path, digits_url):
    with pytest.raises(EvaluationError, match="cannot load model 'models:/no-such-model@champion'"):
        evaluate_registered("models:/no-such-model@champion", digits_url, "test", str(tmp_path))
    other = tmp_path / "three"
    assert shards_cli(["write", "--source", "synthetic:classes=3,size=16,train=12,val=6,test=6", "--out", str(other), "--quiet"]) == 0
    with pytest.raises(EvaluationError, match="has 3 classes .* trained on 10 classes"):
        evaluate_registered(f"models:/{NAME}@champion", str(other), "test", str(tmp_path))


def test_member_checkpoint_that_does_not_match_its_architecture(ray_local, digits_url, tracking, tmp_path):
    wrong = tmp_path / "resnet14.pt"
    torch.save(models.create_model("resnet14", num_classes=10).state_dict(), wrong)
    members = [{"label": "claims-r8", "model": "resnet8", "checkpoint": str(wrong)}]
    with pytest.raises(EvaluationError, match="member 'claims-r8'.*resnet8.*unexpected keys"):
        run_ensemble(None, overrides(digits_url, members), str(tmp_path / "runs"))


@pytest.mark.parametrize(
    "bad, message",
    [
        (["evaluation.protocol=five_crop"], "center, ten_crop, multi_scale"),
        (['members=[{"label": "x"}]'], "give `model`"),
        (["members=[]"], "at least one member"),
        (['members=[{"model": "resnet8"}, {"model": "resnet8"}]'], "labels must be unique"),
        (["registry.aliass=x"], "registry.aliass"),
    ],
)
def test_bad_ensemble_config(bad, message):
    with pytest.raises(ConfigError, match=message):
        load_ensemble_config(None, bad)
