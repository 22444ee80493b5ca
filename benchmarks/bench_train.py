"""Ray Train overhead: images/s of the same model, data and loop under TorchTrainer vs plain PyTorch DDP.

Both run 2 processes with gloo on CPU (NCCL with --gpu), read the same shards through
`pipelines.make_loader`, and time the same epochs after a warm-up epoch; start-up is excluded.
Goal: Ray Train >= 0.95 of plain DDP.

    .venv/bin/python benchmarks/bench_train.py                          # digits shards, resnet20, 2 workers
    .venv/bin/python benchmarks/bench_train.py --model resnet32 --epochs 3
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import models
import pipelines


def timed_epochs(rank: int, world: int, args, device) -> float:
    """The shared loop: one warm-up epoch, then `args.epochs` timed epochs; returns images/s (all ranks)."""
    manifest = pipelines.read_manifest(args.data)
    torch.manual_seed(0)
    model = models.create_model(args.model, num_classes=len(manifest["classes"])).to(device)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    tf = pipelines.make_transform("cifar", True, size=32, mean=manifest["mean"], std=manifest["std"])
    per_worker = args.batch_size // world
    seen, elapsed = 0, 0.0
    for epoch in range(args.epochs + 1):
        loader = pipelines.make_loader(args.data, "train", per_worker, rank=rank, world_size=world,
                                       num_workers=args.loader_workers, epoch=epoch, transform=tf)
        if world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        n = 0
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            n += len(y)
        if world > 1:
            dist.barrier()
        if epoch > 0:  # epoch 0 warms up allocators and loader workers
            seen += n
            elapsed += time.perf_counter() - t0
    total = torch.tensor([seen / elapsed])
    if world > 1:
        dist.all_reduce(total)
    return float(total)


# --- plain PyTorch DDP -------------------------------------------------------------------------


def _ddp_worker(rank: int, world: int, port: int, args, out_file: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("nccl" if args.gpu else "gloo", rank=rank, world_size=world)
    device = torch.device(f"cuda:{rank}") if args.gpu else torch.device("cpu")
    rate = timed_epochs(rank, world, args, device)
    if rank == 0:
        with open(out_file, "w") as f:
            f.write(str(rate))
    dist.destroy_process_group()


def plain_ddp(args) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tempfile.mktemp()
    torch.multiprocessing.spawn(_ddp_worker, args=(args.workers, port, args, out), nprocs=args.workers, join=True)
    with open(out) as f:
        return float(f.read())


# --- Ray Train ---------------------------------------------------------------------------------


def ray_train(args) -> float:
    import ray
    import ray.train
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def loop(config):
        ctx = ray.train.get_context()
        rate = timed_epochs(ctx.get_world_rank(), ctx.get_world_size(), config["args"], ray.train.torch.get_device())
        ray.train.report({"rate": rate})

    if not ray.is_initialized():
        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    trainer = TorchTrainer(
        loop,
        train_loop_config={"args": args},
        scaling_config=ScalingConfig(num_workers=args.workers, use_gpu=args.gpu),
        run_config=RunConfig(name=f"bench-{time.time_ns()}", storage_path=tempfile.mkdtemp()),
    )
    return float(trainer.fit().metrics["rate"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data/digits", help="shards (written from digits if missing)")
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--batch-size", type=int, default=64, help="global batch")
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs (after one warm-up epoch)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--loader-workers", type=int, default=1)
    ap.add_argument("--gpu", action="store_true")
    args = ap.parse_args()
    args.data = os.path.abspath(args.data) if "://" not in args.data else args.data
    try:
        pipelines.read_manifest(args.data)
    except Exception:  # noqa: BLE001
        pipelines.write_shards("digits", args.data, progress=False)
    n = pipelines.read_manifest(args.data)["splits"]["train"]["num_samples"]
    print(f"model {args.model}, {n} train images/epoch, global batch {args.batch_size}, {args.workers} workers "
          f"({'nccl' if args.gpu else 'gloo'}), {args.epochs} timed epochs after 1 warm-up, torch {torch.__version__}")
    ddp = plain_ddp(args)
    print(f"plain DDP      {ddp:8.1f} img/s")
    ray_rate = ray_train(args)
    print(f"Ray Train      {ray_rate:8.1f} img/s")
    print(f"ratio Ray Train / plain DDP: {ray_rate / ddp:.3f} (goal >= 0.95)")


if __name__ == "__main__":
    main()
