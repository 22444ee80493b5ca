"""Ray Train overhead: images/s of the same model, data and loop under TorchTrainer vs plain PyTorch DDP.

A thin wrapper over `orchestrator.bench` (one implementation; `python -m orchestrator.run bench` runs
the same two measurements beside model-only and loader throughput). Both run `--workers` processes
with gloo on CPU (NCCL with --gpu), read the digits shards through `pipelines.make_loader` with the
recipe's CIFAR-style transform, and time `--steps` steps after `--warmup`; start-up is excluded.
Goal: Ray Train >= 0.95 of plain DDP on CPU (>= 0.97 on one H100).

    .venv/bin/python benchmarks/bench_train.py                          # digits shards, resnet20, 2 workers
    .venv/bin/python benchmarks/bench_train.py --model resnet32 --steps 60
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pipelines  # noqa: E402
from orchestrator import bench  # noqa: E402
from orchestrator.config import load_train_config  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data/digits", help="shards (written from digits if missing)")
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--batch-size", type=int, default=64, help="global batch")
    ap.add_argument("--steps", type=int, default=40, help="timed steps (after the warm-up)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--loader-workers", type=int, default=1)
    ap.add_argument("--gpu", action="store_true")
    args = ap.parse_args()
    data = os.path.abspath(args.data) if "://" not in args.data else args.data
    try:
        pipelines.read_manifest(data)
    except Exception:  # noqa: BLE001 - not written yet
        pipelines.write_shards("digits", data, progress=False)
    cfg = load_train_config("digits_resnet20.yaml", [
        f"model.name={args.model}", f"data.url={data}", f"data.num_workers={args.loader_workers}",
        f"optim.batch_size={args.batch_size}", f"scaling.num_workers={args.workers}",
        f"scaling.use_gpu={str(args.gpu).lower()}", "scaling.cpus_per_worker=1",
    ])
    result = bench.run(bench.BenchSpec(cfg, steps=args.steps, warmup=args.warmup), parts=("ddp", "ray"))
    for line in result.verdicts:
        print(f"goal: {line}")


if __name__ == "__main__":
    main()
