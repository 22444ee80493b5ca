"""Registered models are code: `evaluate` loads this project's ensemble without running anything the
model carries, and refuses any other model unless --trust-model.

A real MLflow store (sqlite) with real registered models: a tiny two-member ensemble logged by
`ensemble.log_and_register` (untrained resnet8s: only loading is under test), a foreign pyfunc
model, and an ensemble whose bundled code was tampered with.
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient

import models
import pipelines
from orchestrator import tracking
from orchestrator.batch_eval import (
    OURS_CHECKS,
    EvaluationError,
    artifact_outside,
    lacks_our_metadata,
    load_registered,
    no_description,
    not_a_python_model,
    not_our_class,
    pickled_class,
    why_not_ours,
)
from orchestrator.ensemble import EnsembleConfig, Member, ensemble_metadata, log_and_register
from orchestrator.run import main as run_main

OURS, FOREIGN, TAMPERED = "sec-ensemble", "sec-foreign", "sec-tampered"


class ForeignModel(mlflow.pyfunc.PythonModel):
    """Someone else's pyfunc that even looks like an ensemble (meta, members) once it is loaded."""

    def load_context(self, context) -> None:
        self.meta, self.members = {"foreign": True}, []

    def predict(self, context, model_input, params=None):
        return model_input


def _members() -> list[Member]:
    out = []
    for i, name in enumerate(("resnet8", "resnet8")):
        torch.manual_seed(i)
        spec = {"label": f"m{i}", "model": name, "overrides": {}, "num_classes": 10}
        out.append(Member(spec["label"], spec, models.create_model(name, num_classes=10).state_dict()))
    return out


@pytest.fixture(scope="module")
def registry(tmp_path_factory, digits_url):
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root}/mlflow.db"
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mp = pytest.MonkeyPatch()
    mp.delenv("RESNET_TRUST_MODEL", raising=False)
    mlflow.set_tracking_uri(uri)  # and MLFLOW_TRACKING_URI, for the command and its Ray tasks
    client = MlflowClient(uri)
    experiment = client.create_experiment("security")
    members = _members()
    cfg = EnsembleConfig(name=OURS)
    meta = ensemble_metadata(cfg, members, pipelines.read_manifest(digits_url), digits_url)
    with mlflow.start_run(experiment_id=experiment) as run:
        pass
    log_and_register(cfg, members, meta, run.info.run_id, client)

    with mlflow.start_run(experiment_id=experiment):
        mlflow.pyfunc.log_model(name="model", python_model=ForeignModel(), registered_model_name=FOREIGN)

    # Our class, artifacts and metadata, but the copy of orchestrator/ the model carries (code_paths)
    # writes a file when it is imported: MLflow's own loader would run it.
    code = root / "code"
    shutil.copytree(tracking.PROJECT_ROOT / "orchestrator", code / "orchestrator",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    ran = root / "model-code-ran"
    with open(code / "orchestrator" / "ensemble_model.py", "a") as f:
        f.write(f"\nopen({str(ran)!r}, 'w').close()\n")
    with mlflow.start_run(experiment_id=experiment) as tampered_run:
        pass
    real_root = tracking.PROJECT_ROOT
    mp.setattr(tracking, "PROJECT_ROOT", code)
    shutil.copytree(real_root / "models", code / "models", ignore=shutil.ignore_patterns("__pycache__"))
    log_and_register(EnsembleConfig(name=TAMPERED), members, meta, tampered_run.info.run_id, client)
    mp.setattr(tracking, "PROJECT_ROOT", real_root)
    yield {"uri": uri, "members": members, "ran": ran}
    mlflow.set_tracking_uri(before)  # None: back to MLFLOW_TRACKING_URI / the default, as before
    mp.undo()


def test_our_ensemble_is_rebuilt_from_its_weights(registry):
    meta, nets = load_registered(f"models:/{OURS}/1")
    assert [m["label"] for m in meta["members"]] == ["m0", "m1"]
    assert len(meta["classes"]) == 10
    x = torch.randn(2, 3, 32, 32)
    for net, member in zip(nets, registry["members"], strict=True):
        ref = models.create_model("resnet8", num_classes=10)
        ref.load_state_dict(member.state_dict)
        torch.testing.assert_close(net(x), ref.eval()(x))


def test_a_foreign_model_is_refused_naming_it_and_the_flag(registry):
    uri = f"models:/{FOREIGN}/1"
    with pytest.raises(EvaluationError, match=rf"refusing to load '{uri}'.*ForeignModel.*--trust-model"):
        load_registered(uri)


def test_a_foreign_model_loads_when_trusted(registry, monkeypatch):
    uri = f"models:/{FOREIGN}/1"
    assert load_registered(uri, trust_model=True) == ({"foreign": True}, [])
    monkeypatch.setenv("RESNET_TRUST_MODEL", "1")  # what `evaluate --trust-model` sets
    assert load_registered(uri) == ({"foreign": True}, [])


def test_loading_our_ensemble_runs_none_of_the_code_it_carries(registry):
    uri = f"models:/{TAMPERED}/1"
    _, nets = load_registered(uri)
    assert len(nets) == 2
    assert not registry["ran"].exists()
    # The contrast (in a fresh process, so this one keeps its own modules): MLflow's loader imports
    # the model's copy of orchestrator/, and the file appears.
    load = f"import mlflow; mlflow.pyfunc.load_model({uri!r})"
    subprocess.run([sys.executable, "-c", load], check=True, capture_output=True, cwd=registry["ran"].parent,
                   env={**os.environ, "MLFLOW_TRACKING_URI": registry["uri"]}, timeout=300)  # fmt: skip
    assert registry["ran"].exists()


def test_evaluate_refuses_a_foreign_model(registry, digits_url, tmp_path, capsys):
    argv = ["evaluate", "--model-uri", f"models:/{FOREIGN}/1", "--data", digits_url, "--split", "test",
            "--storage", str(tmp_path)]  # fmt: skip
    assert run_main(argv) == 2
    err = capsys.readouterr().err
    assert f"refusing to load 'models:/{FOREIGN}/1'" in err and "--trust-model" in err
    assert not (tmp_path / "predictions").exists()


@pytest.mark.slow
def test_evaluate_accepts_our_ensemble(registry, ray_local, digits_url, tmp_path):
    argv = ["evaluate", "--model-uri", f"models:/{OURS}/1", "--data", digits_url, "--split", "test",
            "--storage", str(tmp_path)]  # fmt: skip
    assert run_main(argv) == 0
    (written,) = (tmp_path / "predictions").rglob("*.parquet")
    assert (
        pq.read_table(written).num_rows
        == pipelines.read_manifest(digits_url)["splits"]["test"]["num_samples"]
    )


# ---------------------------------------------------------------------------------------------
# The checks `load_registered` makes, one at a time, on a real registered ensemble made wrong in one way.


class Shell:
    """Unpickling it runs a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_the_pickled_class_is_read_without_running_the_pickle(tmp_path, protocol):
    marker = tmp_path / "ran"
    path = tmp_path / "python_model.pkl"
    path.write_bytes(pickle.dumps(Shell(marker), protocol=protocol))
    assert pickled_class(path) == (os.system.__module__, "system")
    assert not marker.exists()
    path.write_bytes(pickle.dumps(ForeignModel(), protocol=protocol))
    # Protocols 0 and 1 pickle an instance through copy_reg: read as that, it is refused (MLflow writes 2+).
    assert pickled_class(path) == ((__name__, "ForeignModel") if protocol >= 2 else ("copy_reg", "_reconstructor"))
    path.write_bytes(pickle.dumps([1, "two"], protocol=protocol))
    assert pickled_class(path) is None


def _foreign_pickle(local: Path, mlmodel) -> None:
    (local / mlmodel.flavors["python_function"]["python_model"]).write_bytes(pickle.dumps(ForeignModel()))


@pytest.mark.parametrize(
    "make_wrong, check, reason",
    [
        (lambda local, m: m.flavors.pop("python_function"), not_a_python_model, "flavours [], not a pyfunc PythonModel"),
        (_foreign_pickle, not_our_class, f"its python_model is {__name__}.ForeignModel, not orchestrator.ensemble_model.ResNetEnsemble"),
        (lambda local, m: m.metadata.pop("classes"), lacks_our_metadata, "its metadata lacks ['classes']"),
        (lambda local, m: m.flavors["python_function"]["artifacts"]["member_0"].update(path="../../elsewhere.pt"),
         artifact_outside, "an artifact path points outside the model"),
        (lambda local, m: m.flavors["python_function"]["artifacts"].pop("ensemble"), no_description, "no 'ensemble' artifact"),
    ],
)
def test_each_check_of_a_registered_model_alone(registry, tmp_path, make_wrong, check, reason):
    from mlflow.artifacts import download_artifacts
    from mlflow.models import Model

    local = Path(download_artifacts(artifact_uri=f"models:/{OURS}/1", dst_path=str(tmp_path)))
    mlmodel = Model.load(str(local / "MLmodel"))
    assert [c(local, mlmodel) for c in OURS_CHECKS] == [None] * len(OURS_CHECKS) and why_not_ours(local, mlmodel) is None
    make_wrong(local, mlmodel)
    assert check(local, mlmodel) == reason
    assert why_not_ours(local, mlmodel) == reason, "the first failing check is the reason given"
