"""The training benchmark (benchmarks/bench_train.py) and the GPU fast path, on CPU with tiny sizes: real
shards, a real MLflow store, one real Ray Train run on the shared test cluster (the bench's end-to-end
part) and the recipe in Ray Train's local mode."""

import os
import subprocess
import sys
from pathlib import Path

import bench_train
import pytest
import throughput as bench
import torch
from mlflow.tracking import MlflowClient
from torch import nn

import pipelines
from orchestrator import step, tracking, train
from orchestrator.config import ConfigError, derived, load_train_config, to_dict
from orchestrator.run import run_command

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """JPEGs of varied sides (20-40 px), 4 classes: 64 train, 16 val."""
    out = tmp_path_factory.mktemp("shards")
    pipelines.write_shards("synthetic:classes=4,size=20-40,train=64,val=16,format=jpg", str(out), shard_size=16, progress=False)
    return str(out)


def tiny(url: str, *overrides: str):
    """The bench's config (ImageNet v1 recipe) shrunk: resnet8, 16 px crops, batch 8, one loader process."""
    return load_train_config("imagenet_v1.yaml", [
        "model.name=resnet8", f"data.url={url}", "data.size=16", "data.scale_range=[]", "data.num_workers=1",
        "optim.batch_size=8", "scaling.num_workers=1", "scaling.use_gpu=false", "scaling.cpus_per_worker=1",
        *overrides,
    ])


# --- MFU ----------------------------------------------------------------------------------------


def test_mfu_math_on_a_known_flop_count():
    # One 3x3 conv, 3 -> 8 channels, on 4x4 pixels: 8 * 16 outputs x 27 multiply-adds each.
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False))
    assert bench.train_flops_per_image(net, 4) == 3 * 2 * 8 * 16 * 27
    achieved, u = bench.mfu(1e12, 500.0, 989.0)  # 1 TFLOP per image at 500 img/s
    assert achieved == pytest.approx(500.0) and u == pytest.approx(500 / 989)
    assert bench.mfu(1e12, 500.0, None) == (pytest.approx(500.0), None)


@pytest.mark.parametrize(
    "name, precision, peak",
    [("NVIDIA H100 80GB HBM3", "bf16", 989.0), ("NVIDIA H200", "bf16", 989.0), ("NVIDIA H100 PCIe", "bf16", 756.0),
     ("NVIDIA A100-SXM4-80GB", "bf16", 312.0), ("NVIDIA A100-SXM4-80GB", "tf32", 156.0), ("2-core x86_64 CPU", "fp32", None)],
)
def test_peak_table(name, precision, peak):
    assert bench.peak_tflops(name, precision) == peak
    assert bench.peak_tflops(name, precision, override=1.5) == 1.5


# --- the fast path's pieces -------------------------------------------------------------------------


def test_sgd_is_fused_on_cuda_and_foreach_on_cpu():
    assert step.optimizer_impl(torch.device("cuda", 0)) == {"fused": True}
    assert step.optimizer_impl(torch.device("cpu")) == {"foreach": True}
    cfg = load_train_config("digits_resnet20.yaml")
    opt = step.make_optimizer(nn.Linear(2, 2), cfg, 0.1, torch.device("cpu"))
    assert opt.defaults["foreach"] is True and not opt.defaults["fused"]
    assert opt.defaults["weight_decay"] == cfg.optim.weight_decay and opt.defaults["momentum"] == cfg.optim.momentum
    if torch.cuda.is_available():
        assert step.make_optimizer(nn.Linear(2, 2).cuda(), cfg, 0.1, torch.device("cuda")).defaults["fused"] is True


def test_fast_path_config_keys():
    cfg = load_train_config("imagenet_v1.yaml", ["data.decode_on=gpu", "scaling.compile=true"])
    assert cfg.data.decode_on == "gpu" and cfg.scaling.compile is True
    assert load_train_config("digits_resnet20.yaml").data.decode_on == "cpu", "the CPU path is the default"
    with pytest.raises(ConfigError, match="data.kind=imagenet"):
        load_train_config("digits_resnet20.yaml", ["data.decode_on=gpu"])
    with pytest.raises(ConfigError, match="cpu, gpu"):
        load_train_config("imagenet_v1.yaml", ["data.decode_on=tpu"])


def test_loader_yields_encoded_bytes_merged_across_workers(shards):
    # Two loader processes, batch 6: each worker's partial last batch is merged in the main process.
    loader = pipelines.make_loader(shards, "train", 6, num_workers=2, decode=False, with_keys=True)
    seen = []
    for images, labels, keys in loader:
        assert isinstance(images, list) and len(images) == len(labels) == len(keys) == 6
        assert all(x.dtype == torch.uint8 and x.dim() == 1 and x[:2].tolist() == [0xFF, 0xD8] for x in images)
        seen += keys
    assert len(seen) == len(loader) * 6 == 60 and len(set(seen)) == 60
    with pytest.raises(ValueError, match="batch transform"):
        pipelines.make_loader(shards, "train", 6, decode=False, transform=lambda x: x)


def test_gpu_decode_transform_run_on_cpu_matches_the_cpu_path(tmp_path):
    # Fixed 24 px images and a shorter side of exactly 24: the crop is the whole image, so the batch
    # transform must give the per-image transform's pixels (up to the random flip).
    url = str(tmp_path / "fixed")
    pipelines.write_shards("synthetic:classes=3,size=24,train=16,val=8,format=jpg", url, shard_size=8, progress=False)
    m = pipelines.read_manifest(url)
    common = {"mean": m["mean"], "std": m["std"], "size": 24, "scale_range": (24, 24), "lighting": 0.0}
    cpu = pipelines.make_loader(url, "train", 8, num_workers=0, shuffle_buffer=0, transform=pipelines.make_transform("imagenet", True, **common))
    raw = pipelines.make_loader(url, "train", 8, num_workers=0, shuffle_buffer=0, decode=False)
    gpu_tf = pipelines.make_batch_transform("imagenet", True, device="cpu", generator=torch.Generator().manual_seed(0), **common)
    flips = 0
    for (x, y), (blobs, y2) in zip(cpu, raw, strict=True):
        assert torch.equal(y, y2)
        z = gpu_tf(blobs)
        assert z.shape == x.shape == (8, 3, 24, 24) and z.dtype == torch.float32 and z.device.type == "cpu"
        for a, b in zip(z, x, strict=True):
            same = torch.allclose(a, b, atol=1e-5)
            flipped = torch.allclose(a, b.flip(-1), atol=1e-5)
            assert same or flipped
            flips += flipped and not same
    assert 0 < flips < 16, "flips are random"

    # Test view (shorter side to 27, centre 24 crop) on the same images: the same pixels.
    test_tf = pipelines.make_transform("imagenet", False, mean=m["mean"], std=m["std"], size=24, resize=24)
    (x, _), (blobs, _) = next(iter(pipelines.make_loader(url, "val", 8, num_workers=0, transform=test_tf))), next(
        iter(pipelines.make_loader(url, "val", 8, num_workers=0, decode=False))
    )
    z = pipelines.make_batch_transform("imagenet", False, mean=m["mean"], std=m["std"], size=24, resize=24)(blobs)
    assert torch.allclose(z, x, atol=1e-5)


def test_gpu_decode_transform_on_varied_sizes_normalises_like_the_cpu_path(shards):
    m = pipelines.read_manifest(shards)
    common = {"mean": m["mean"], "std": m["std"], "size": 16, "lighting": 0.1}
    cpu_tf = pipelines.make_transform("imagenet", True, **common)
    x = torch.cat([b for b, _ in pipelines.make_loader(shards, "train", 16, num_workers=0, transform=cpu_tf)])
    gpu_tf = pipelines.make_batch_transform("imagenet", True, generator=torch.Generator().manual_seed(0), **common)
    z = torch.cat([gpu_tf(b) for b, _ in pipelines.make_loader(shards, "train", 16, num_workers=0, decode=False)])
    assert z.shape == x.shape == (64, 3, 16, 16)
    # Normalised with the manifest's statistics: per-channel mean near 0 and std near 1 on both paths.
    for t in (x, z):
        assert t.mean(dim=(0, 2, 3)).abs().max() < 0.35 and (t.std(dim=(0, 2, 3)) - 1).abs().max() < 0.35
    assert (x.mean(dim=(0, 2, 3)) - z.mean(dim=(0, 2, 3))).abs().max() < 0.1
    with pytest.raises(ValueError, match="imagenet"):
        pipelines.make_batch_transform("cifar", True, mean=m["mean"], std=m["std"])
    with pytest.raises(ValueError, match="only 'center'"):
        pipelines.make_batch_transform("imagenet", False, mean=m["mean"], std=m["std"], protocol="ten_crop")


# --- the bench's pieces -----------------------------------------------------------------------------


@pytest.mark.parametrize("decode_on", ["cpu", "gpu"])
def test_rates_are_the_timed_steps_images_over_their_time_through_the_product_step(shards, decode_on, monkeypatch):
    """images/s = timed steps x per-worker batch / the seconds they took (the warm-up is not counted), and
    every step is `orchestrator.step.train_step` with the recipe's options and learning rate."""
    spec = bench.BenchSpec(tiny(shards, f"data.decode_on={decode_on}"), steps=3, warmup=2)
    per_worker = derived(spec.cfg)["per_worker_batch"]
    calls = []
    real_step = step.train_step

    def counted(model, opt, images, labels, lr, options):
        calls.append((len(labels), lr, options))
        return real_step(model, opt, images, labels, lr, options)

    monkeypatch.setattr(step, "train_step", counted)
    ticks = iter([100.0, 104.0, 200.0, 202.0])  # start and end of the timed steps: 4 s, then 2 s
    monkeypatch.setattr(bench, "clock", lambda: next(ticks))
    assert bench.model_rate(spec, num_classes=4) == pytest.approx(3 * per_worker / 4.0)
    assert calls == [(per_worker, derived(spec.cfg)["lr_scaled"], step.StepOptions.of(spec.cfg, torch.device("cpu"), 1))] * 5
    assert bench.loader_rate(spec) == pytest.approx(3 * per_worker / 2.0)


@pytest.mark.slow
def test_compile_trains_a_tiny_model_on_cpu(shards, monkeypatch):
    """scaling.compile=true compiles the step's model. Inductor's C++ code generation for resnet8 took
    42-70 s cold (12 s with a warm cache) on a loaded 2-core machine, so by default the graph is captured
    by dynamo and AOTAutograd (forward and backward) but run eagerly; RESNET_TEST_INDUCTOR=1 runs inductor."""
    import os

    calls = []
    real_compile = torch.compile

    def compile_(model, **kwargs):
        calls.append(model)
        backend = "inductor" if os.environ.get("RESNET_TEST_INDUCTOR") == "1" else "aot_eager"
        return real_compile(model, backend=backend, **kwargs)

    monkeypatch.setattr(torch, "compile", compile_)
    spec = bench.BenchSpec(tiny(shards, "scaling.compile=true", "optim.batch_size=4"), steps=1, warmup=1)
    assert bench.model_rate(spec, num_classes=4) > 0
    assert len(calls) == 1


def test_benchmarks_md_entry_is_well_formed(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    bench.append_entry(path, "bench: resnet8 at 16 px on CPU", "python benchmarks/bench_train.py --size 16", "(1) model only: 12.5 img/s\nline two", ["x 0.99 (goal >= 0.95): met"])
    bench.append_entry(path, "second", "cmd2", "out2", [])
    text = path.read_text()
    assert text.startswith("# Benchmarks\n") and text.count("# Benchmarks") == 1
    first = text.split("## ")[1]
    assert first.startswith("bench: resnet8 at 16 px on CPU\n")
    for field in ("- date: ", "- machine: ", "- versions: torch ", "- load average", "- command: `python benchmarks/bench_train.py --size 16`"):
        assert field in first, field
    assert "```text\n(1) model only: 12.5 img/s\nline two\n```" in first
    assert "Goal: x 0.99 (goal >= 0.95): met" in first
    assert text.count("```text") == 2 and text.rstrip().endswith("```")


def test_results_go_to_mlflow(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = bench.BenchResult(
        {"model_only_img_s": 12.5, "loader_img_s": 99.0}, {"device": "2-core x86_64 CPU", "model": "resnet8", "size": 16, "version.torch": torch.__version__},
        ["line"], ["goal"],
    )
    run_id = bench.log_mlflow(result, "python benchmarks/bench_train.py", uri=uri)
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics == {"model_only_img_s": 12.5, "loader_img_s": 99.0}
    assert run.data.params["command"] == "python benchmarks/bench_train.py" and run.data.params["version.torch"] == torch.__version__
    assert MlflowClient(uri).get_experiment(run.info.experiment_id).name == "bench"


# --- end to end -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_bench_command_on_cpu_measures_records_and_logs(tmp_path, monkeypatch, capsys, ray_local):
    """The whole command at the tiniest sizes: model, loader, plain DDP and one Ray Train run on the shared
    test cluster, with the GPU-decode path on CPU; the numbers land in MLflow and in the BENCHMARKS.md entry."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    record = tmp_path / "BENCHMARKS.md"
    argv = ["--model", "resnet8", "--size", "16", "--batch-size", "8", "--images", "48", "--steps", "2",
            "--warmup", "1", "--loader-workers", "1", "--decode-on", "gpu", "--record", str(record), "scaling.cpus_per_worker=1"]
    assert run_command(bench_train.main, bench_train.parser().parse_args(argv)) == 0
    out = capsys.readouterr().out
    for needle in ("(1) model only", "(2) loader", "plain DDP", "(3) end to end on Ray Train", "Ray Train / plain DDP", "MFU n/a"):
        assert needle in out, needle
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("bench")
    (run,) = client.search_runs([exp.experiment_id])
    for key in ("model_only_img_s", "loader_img_s", "plain_ddp_img_s", "end_to_end_img_s"):
        assert run.data.metrics[key] > 0, key
    m = run.data.metrics
    assert m["data_stall_ratio"] == pytest.approx(m["end_to_end_img_s"] / m["model_only_img_s"])
    assert m["ray_over_ddp"] == pytest.approx(m["end_to_end_img_s"] / m["plain_ddp_img_s"])
    assert run.data.params["device"].endswith("CPU") and run.data.params["decode_on"] == "gpu"
    assert run.data.params["version.ray"] and run.data.params["command"]
    text = record.read_text()
    assert "## bench: resnet8 at 16 px on CPU" in text and "(3) end to end on Ray Train" in text and "Goal: Ray Train / plain DDP" in text


@pytest.mark.slow
def test_recipe_trains_with_decoding_on_the_device(shards, tmp_path):
    """train_loop_per_worker with data.decode_on=gpu (its CPU fallback here), in Ray Train's local mode
    (the loop runs in this process: no worker actors to start)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = tiny(shards, "data.decode_on=gpu", "schedule.epochs=2", "data.pca_lighting=0.1")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run_id, _ = tracking.find_or_create_run(client, "test-bench", "decode-gpu", {}, {})
    trainer = TorchTrainer(
        train.train_loop_per_worker,
        train_loop_config={"train": to_dict(cfg), "mlflow_uri": uri, "mlflow_run_id": run_id},
        scaling_config=ScalingConfig(num_workers=0),
        run_config=RunConfig(name="decode-gpu", storage_path=str(tmp_path / "runs")),
    )
    result = trainer.fit()
    assert result.error is None and result.metrics["epoch"] == 1
    assert result.metrics["val_top1_err"] <= 100 and result.metrics["images_per_sec"] > 0
    assert len(client.get_metric_history(run_id, "train_loss")) == 2


def test_help():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--help"], capture_output=True,
                         text=True, cwd=ROOT / "tests")  # from anywhere: no path set up beforehand
    assert out.returncode == 0, out.stderr
    for needle in ("--decode-on", "--peak-tflops", "--workers", "--steps", "--recipe", "MFU", "plain", "BENCHMARKS.md"):
        assert needle in out.stdout, needle


def test_bad_input_is_one_line_and_exit_code_2(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--data", str(tmp_path / "none"),
                          "--record", ""], capture_output=True, text=True,
                         env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"})
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert lines[0].startswith(f"error: --data={tmp_path / 'none'}: cannot read its manifest.json"), lines
