"""The GPU check (benchmarks/gpu_check.py) in its CPU mode, run as the GPU machine would run it: Ray and
MLflow cannot be imported, and of the other packages that machine lacks only those that gpu_check.sh
carries there as wheels. A part that fails fails the test; so do numbers that are not sane."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "benchmarks" / "gpu_check.py"

# Put on PYTHONPATH as sitecustomize, it runs first in every process of the check (the children, and
# their loader processes inherit it): an import of a blocked top-level module raises ImportError.
BLOCKER = '''
import importlib.abc
import os
import sys

BLOCKED = set(os.environ["GPU_CHECK_TEST_BLOCKED"].split(","))


class NotOnTheGpuMachine(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ImportError(f"No module named {name!r} (not on the GPU machine; blocked by tests/test_gpu_check.py)")
        return None


sys.meta_path.insert(0, NotOnTheGpuMachine())
'''


def load_check():
    spec = importlib.util.spec_from_file_location("gpu_check", CHECK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gpu_check = load_check()


@pytest.fixture(scope="module")
def device_env(tmp_path_factory) -> dict:
    """The environment of a process that sees only what the GPU machine would have."""
    wheels = subprocess.run([sys.executable, str(CHECK), "--print-wheels"], capture_output=True, text=True, timeout=300)
    assert wheels.returncode == 0, wheels.stderr
    carried = {w.partition("==")[0] for w in wheels.stdout.split()}
    assert {"webdataset", "braceexpand"} <= carried, wheels.stdout  # pipelines.format reads tars with webdataset
    blocked = [*gpu_check.NEVER_THERE, *(m for d, m in gpu_check.MAY_TRAVEL.items() if d not in carried)]
    site = tmp_path_factory.mktemp("site")
    (site / "sitecustomize.py").write_text(BLOCKER)
    import os

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]), "GPU_CHECK_TEST_BLOCKED": ",".join(blocked)}
    env.pop("OUT", None)
    return env


def test_ray_and_mlflow_are_blocked(device_env):
    for module in ("ray", "mlflow"):
        r = subprocess.run([sys.executable, "-c", f"import {module}"], env=device_env, capture_output=True, text=True, timeout=60)
        assert r.returncode != 0 and "blocked by tests/test_gpu_check.py" in r.stderr, (module, r.stderr)


def sane(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


def test_cpu_check_passes_where_ray_and_mlflow_are_missing(device_env, tmp_path):
    r = subprocess.run([sys.executable, str(CHECK), "--cpu", "--out", str(tmp_path)], env=device_env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"exit code {r.returncode}\n{r.stdout[-6000:]}\n{r.stderr[-4000:]}"
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    sizes = gpu_check.CPU
    assert report["mode"] == "cpu" and report["ok"] is True
    assert report["selected"] == list(gpu_check.PARTS)
    assert report["env"]["torch"] and report["env"]["device"] == "cpu"
    for name, part in report["parts"].items():
        assert part["ok"] is True and part["error"] is None, (name, part)
        assert part["results"], f"{name} reported no number"
    got = {(p, r["name"]): r for p, part in report["parts"].items() for r in part["results"]}

    assert got["data", "photos"]["photos"] >= 2
    assert got["data", "photos"]["images"] == sizes.train_images + sizes.val_images + sizes.test_images
    assert sane(got["model", "matmul_peak"]["tflops"])
    for net in (*sizes.imagenet_nets, *sizes.cifar_nets):
        r = got["model", net]
        assert all(sane(r[k]) for k in ("img_s", "tflops", "mfu", "gmacs", "loss")), r
        assert r["precision"] == "fp32" and r["compiled"] is False  # the CPU fallbacks of bf16 autocast
    for decode_on in ("gpu", "cpu"):
        for procs in sizes.loader_procs:
            r = got["loader", f"{decode_on}-{procs}"]
            assert sane(r["img_s"]) and r["images"] > 0, r
    e2e = got["e2e", "resnet50"]
    assert all(sane(e2e[k]) for k in ("end_to_end_img_s", "model_only_img_s", "ratio"))
    assert got["eval", "ten_crop"]["n"] == sizes.val_images and sane(got["eval", "ten_crop"]["img_s"])
    assert got["eval", "multi_scale"]["n"] == sizes.test_images and sane(got["eval", "multi_scale"]["img_s"])
    conv = got["converge", "resnet20"]
    assert conv["val_err"] <= conv["target_err"] == sizes.converge_target and sane(conv["seconds_to_target"])
    ddp = got["ddp", "ddp"]
    assert ddp["backend"] == "gloo" and ddp["allreduce_ok"] and ddp["buckets"] >= 1 and ddp["values"] == ddp["params"]
    for net in sizes.compile_nets:
        r = got["compile", net]
        assert r["compiled"] is True and sane(r["img_s"]) and sane(r["vs_eager"]) and sane(r["compile_s"])
    goals = {g["goal"]: g["met"] for g in report["goals"]}
    assert any("val err" in g and met is True for g, met in goals.items()), goals
    assert all(met is None for g, met in goals.items() if "val err" not in g), "speed goals do not apply on a CPU"
    assert (tmp_path / "gpu_check.txt").read_text().rstrip().endswith("gpu_check: all parts passed")


def test_a_part_that_crashes_or_hangs_fails_and_the_next_one_still_runs(device_env, tmp_path):
    """The parent restarts its child after a crash, and kills a part that overruns its limit."""
    out = tmp_path / "out"
    r = subprocess.run(
        [sys.executable, str(CHECK), "--cpu", "--out", str(out), "--work", str(tmp_path / "work"), "--parts", "model,eval,ddp",
         "--drill", "model=crash", "--drill", "eval=hang", "--limit", "eval=1"],
        env=device_env, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 1, r.stdout[-4000:] + r.stderr[-4000:]
    parts = json.loads((out / "gpu_check.json").read_text())["parts"]
    assert parts["model"]["ok"] is False and "process died (exit code 9)" in parts["model"]["error"]
    assert parts["eval"]["ok"] is False and "over its 1 s limit" in parts["eval"]["error"]
    assert parts["ddp"]["ok"] is True and parts["ddp"]["results"][0]["allreduce_ok"] is True
