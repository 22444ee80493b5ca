"""The training step and the recipe's pieces, with no Ray in them.

What one step of the recipe does (model, batch, optimizer, autocast) lives here, so that Ray Train's
worker loop (`orchestrator.worker`), the benchmarks and the GPU check (`benchmarks/`) run the same
code. This module imports torch, torchvision, the model zoo and the pipelines, never Ray or MLflow:
it must import on a machine that has neither.

- `build_model`, `make_optimizer`, `lr_at`: the net, SGD and the learning-rate schedule of a config.
- `StepOptions` + `train_step`: one optimisation step. The loss of a rank's share of the global batch
  is summed and scaled by W / G (W ranks, G the global batch), so the gradient that DDP averages over
  the ranks is the gradient of the global batch's mean loss, whatever W is and however unevenly G
  divides among the ranks.
- `step_seed`: the torch RNG is re-seeded at every step from (seed, step, rank), so the model's own
  randomness (the dropout shortcut) needs no state in a checkpoint and a resumed run draws what an
  uninterrupted one drew.
- `evaluate`: loss and top-1/top-5 error over a split the ranks read once between them.
- `make_transforms`, `make_batch_transforms`, `Transformed`: the per-image transforms of a config, or
  decoding + augmentation of encoded batches on the device (`data.decode_on=gpu`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

import models
import pipelines

from .config import TrainConfig
from .scoring import correct_topk, view_averaged_probs

# ---------------------------------------------------------------------------------------------
# Model, optimizer, schedule.


def build_model(cfg: TrainConfig, num_classes: int, device: torch.device, world_size: int = 1) -> torch.nn.Module:
    """The configured net on `device`: SyncBatchNorm when asked and W > 1, channels_last on the GPU."""
    model = models.create_model(cfg.model.name, num_classes=num_classes, **cfg.model.overrides)
    if cfg.scaling.sync_batchnorm and world_size > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if device.type == "cuda" and cfg.scaling.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def optimizer_impl(device: torch.device) -> dict:
    """SGD's implementation: one fused kernel for the whole update on CUDA; multi-tensor (foreach) elsewhere."""
    return {"fused": True} if device.type == "cuda" else {"foreach": True}


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, lr: float, device: torch.device) -> torch.optim.SGD:
    return torch.optim.SGD(  # v1: weight decay on every parameter, BN included
        model.parameters(),
        lr=lr,
        momentum=cfg.optim.momentum,
        weight_decay=cfg.optim.weight_decay,
        nesterov=cfg.optim.nesterov,
        **optimizer_impl(device),
    )


def lr_at(cfg: TrainConfig, base_lr: float, it: int, steps_per_epoch: int, plateau_scale: float) -> float:
    """Learning rate at iteration `it` (warm-up is handled by the caller)."""
    s = cfg.schedule
    if s.kind == "step":
        unit = steps_per_epoch if s.milestone_unit == "epoch" else 1
        passed = sum(it >= m * unit for m in s.milestones)
        return base_lr * s.gamma**passed
    if s.kind == "plateau":
        return base_lr * plateau_scale
    total = max(1, s.epochs * steps_per_epoch)  # cosine
    return base_lr * 0.5 * (1 + math.cos(math.pi * min(it, total) / total))


def step_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed of global step `step` on `rank`: a pure function, so resume needs no RNG state."""
    x = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + rank * 0x94D049BB133111EB) % (1 << 64)
    x ^= x >> 31
    return x % (1 << 63)


# ---------------------------------------------------------------------------------------------
# One step.


@dataclass(frozen=True)
class StepOptions:
    device: torch.device
    loss_scale: float  # W / G: see the module docstring
    label_smoothing: float = 0.0
    bf16: bool = False  # autocast to bfloat16 (CUDA only)
    channels_last: bool = False  # NHWC activations (CUDA only)

    @classmethod
    def of(cls, cfg: TrainConfig, device: torch.device, world_size: int) -> StepOptions:
        on_gpu = device.type == "cuda"
        return cls(
            device=device,
            loss_scale=world_size / cfg.optim.batch_size,
            label_smoothing=cfg.optim.label_smoothing,
            bf16=on_gpu and cfg.scaling.bf16,
            channels_last=on_gpu and cfg.scaling.channels_last,
        )


def to_device(images, labels: torch.Tensor, o: StepOptions) -> tuple:
    """A batch on the step's device (non-blocking from pinned memory), NHWC when asked."""
    images = images.to(o.device, non_blocking=True)
    labels = labels.to(o.device, non_blocking=True)
    if o.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
               lr: float, o: StepOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD step on a batch already on the device; returns (summed loss, correct top-1) as device
    tensors, so the caller can add them up without a host sync per step."""
    for group in opt.param_groups:
        group["lr"] = lr
    with torch.autocast(o.device.type, dtype=torch.bfloat16, enabled=o.bf16):
        logits = model(images)
    loss_sum = F.cross_entropy(logits.float(), labels, label_smoothing=o.label_smoothing, reduction="sum")
    opt.zero_grad(set_to_none=True)
    (loss_sum * o.loss_scale).backward()
    opt.step()
    return loss_sum.detach(), (logits.detach().argmax(1) == labels).sum()


# ---------------------------------------------------------------------------------------------
# Evaluation.


def all_reduce_sum(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device) -> dict:
    """Loss, top-1 and top-5 error (%) over a split that the ranks read once between them.

    A view dimension (10-crop: B x V x C x H x W) or a tuple of scales is averaged in softmax space.
    """
    model.eval()
    loss_sum = c1 = c5 = n = 0.0
    for images, labels in loader:
        labels = labels.to(device)
        probs = view_averaged_probs(model, images, device)
        loss_sum += float(F.nll_loss(torch.log(probs.clamp_min(1e-12)), labels, reduction="sum"))
        a, b = correct_topk(probs, labels)
        c1, c5, n = c1 + a, c5 + b, n + len(labels)
    loss_sum, c1, c5, n = all_reduce_sum([loss_sum, c1, c5, n], device)
    # Exactly once: the ranks together scored every sample the manifest lists (a skipped or doubled
    # sample would change the denominator silently). `Transformed` wraps the ShardLoader.
    expected = getattr(getattr(loader, "loader", loader), "split_samples", None)
    if expected is not None and int(n) != expected:
        raise pipelines.DataError(f"evaluation scored {int(n)} samples but the manifest lists {expected} for this split")
    n = max(n, 1.0)
    return {"loss": loss_sum / n, "top1_err": 100 * (1 - c1 / n), "top5_err": 100 * (1 - c5 / n), "n": int(n)}


# ---------------------------------------------------------------------------------------------
# Data: the config's transforms.


def make_transforms(cfg: TrainConfig, manifest: dict, protocol: str = "center"):
    """(train, test) transforms of the configured kind, normalised with the manifest's mean/std."""
    d = cfg.data
    common = {"mean": manifest["mean"], "std": manifest["std"]}
    if d.kind == "imagenet":
        train = pipelines.make_transform(
            "imagenet", True, size=d.size, scale_range=tuple(d.scale_range) or None, lighting=d.pca_lighting, **common
        )
        test = pipelines.make_transform(
            "imagenet", False, size=d.test_size or d.size, resize=d.resize or None, protocol=protocol, **common
        )
    else:
        train = pipelines.make_transform("cifar", True, size=d.size, **common)
        test = pipelines.make_transform("cifar", False, size=d.test_size or d.size, protocol=protocol, **common)
    return train, test


def make_batch_transforms(cfg: TrainConfig, manifest: dict, device: torch.device, generator: torch.Generator | None = None):
    """(train, test) transforms of encoded batches on `device` (data.decode_on=gpu): nvJPEG + crops on CUDA,
    the same code on the CPU otherwise."""
    d = cfg.data
    common = {"mean": manifest["mean"], "std": manifest["std"], "device": device, "generator": generator}
    train = pipelines.make_batch_transform(
        "imagenet", True, size=d.size, scale_range=tuple(d.scale_range) or None, lighting=d.pca_lighting, **common
    )
    test = pipelines.make_batch_transform("imagenet", False, size=d.test_size or d.size, resize=d.resize or None, **common)
    return train, test


class Transformed:
    """`loader`'s (encoded images, labels) batches with the images decoded by `batch_transform` (re-iterable)."""

    def __init__(self, loader, batch_transform):
        self.loader, self.batch_transform = loader, batch_transform

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for images, labels in self.loader:
            yield self.batch_transform(images), labels
