"""Training-step throughput of the zoo's resnet50 (v1.5 layout) against torchvision's resnet50.

Same input, same process, NCHW and channels_last; prints img/s and the ratio ours / torchvision.
Goal: ratio >= 0.98 (the zoo's flexibility costs nothing).

    .venv/bin/python benchmarks/bench_models.py                      # CPU defaults: 64 px, batch 16
    .venv/bin/python benchmarks/bench_models.py --size 224 --batch 128 --device cuda
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torchvision

from models import create_model


def step_rate(model, x, y, steps: int) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    step()  # warm-up (allocator, cuDNN autotuning)
    if x.is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if x.is_cuda:
        torch.cuda.synchronize()
    return steps * x.shape[0] / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=64, help="input side in pixels (paper: 224)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    ap.add_argument("--repeats", type=int, default=3, help="alternating measurements per model; median kept")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    torch.manual_seed(0)
    device = torch.device(args.device)
    print(f"device={device} torch={torch.__version__} torchvision={torchvision.__version__} "
          f"cpu={platform.processor() or platform.machine()} threads={torch.get_num_threads()}")
    print(f"input {args.batch}x3x{args.size}x{args.size}, {args.steps} steps x {args.repeats} repeats, SGD step")
    for fmt in (torch.contiguous_format, torch.channels_last):
        ours = create_model("resnet50", stride_in_1x1=False).to(device, memory_format=fmt)
        ref = torchvision.models.resnet50().to(device, memory_format=fmt)
        x = torch.randn(args.batch, 3, args.size, args.size, device=device).to(memory_format=fmt)
        y = torch.randint(0, 1000, (args.batch,), device=device)
        rates = {"ours": [], "torchvision": []}
        for _ in range(args.repeats):  # alternate, so drift in machine load hits both alike
            rates["ours"].append(step_rate(ours, x, y, args.steps))
            rates["torchvision"].append(step_rate(ref, x, y, args.steps))
        a, b = statistics.median(rates["ours"]), statistics.median(rates["torchvision"])
        name = "channels_last" if fmt is torch.channels_last else "NCHW"
        print(f"{name:14s} ours {a:8.1f} img/s   torchvision {b:8.1f} img/s   ratio {a / b:.3f}")


if __name__ == "__main__":
    main()
