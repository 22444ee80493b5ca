"""The training step and the recipe's pieces, with no Ray in them.

What one step of the recipe does (model, batch, optimizer, autocast) lives here, so that Ray Train's
worker loop (`orchestrator.worker`), the benchmarks and the GPU check (`benchmarks/`) run the same
code. This module imports torch, torchvision, the model zoo and the pipelines, never Ray or MLflow:
it must import on a machine that has neither.

- `build_model`, `make_optimizer`, `lr_at`: the net, the optimizer (SGD, or `Lamb` for ResNet strikes
  back; optionally without weight decay on norm and bias parameters) and the learning-rate schedule.
- `StepOptions` + `train_step`: one optimisation step. The loss of a rank's share of the global batch
  is summed and scaled by W / G (W ranks, G the global batch), so the gradient that DDP averages over
  the ranks is the gradient of the global batch's mean loss, whatever W is and however unevenly G
  divides among the ranks. MixUp / CutMix (`pipelines.BatchMix`) mix the rank's share on the device;
  the loss is cross-entropy or one-vs-all binary cross-entropy of the (soft) targets.
- `step_seed`: the torch RNG is re-seeded at every step from (seed, step, rank), so the model's own
  randomness (the dropout shortcut) and the batch's mixing need no state in a checkpoint and a resumed
  run draws what an uninterrupted one drew (mixing pairs samples within a rank's share: a resume at
  the same world size is exact).
- `make_ema`, `update_ema`: an exponential moving average of the weights (torchvision's recipe).
- `evaluate`: loss and top-1/top-5 error over a split the ranks read once between them.
- `make_transforms`, `make_batch_transforms`, `Transformed`: the per-image transforms of a config (of an
  epoch: progressive resizing changes the train crop), or decoding + augmentation of encoded batches on
  the device (`data.decode_on=gpu`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import models
import pipelines

from .config import TrainConfig, train_size
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


# Norm layers, as torchvision's reference lists them for --norm-weight-decay (public classes only).
NORM_LAYERS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.SyncBatchNorm,
               torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.InstanceNorm1d, torch.nn.InstanceNorm2d,
               torch.nn.InstanceNorm3d, torch.nn.LocalResponseNorm)


def param_groups(model: torch.nn.Module, weight_decay: float, no_weight_decay: str) -> list[dict]:
    """Two groups: the parameters that decay, and those that do not ("norm": the norm layers' weights and
    biases, as torchvision's --norm-weight-decay 0; "norm_and_bias": those and every bias, timm's rule)."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            skip = isinstance(module, NORM_LAYERS) or (no_weight_decay == "norm_and_bias" and name == "bias")
            (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, lr: float, device: torch.device) -> torch.optim.Optimizer:
    o = cfg.optim
    # v1: weight decay on every parameter, BN included
    params = model.parameters() if o.no_weight_decay == "none" else param_groups(model, o.weight_decay, o.no_weight_decay)
    if o.optimizer == "lamb":
        return Lamb(params, lr=lr, weight_decay=o.weight_decay)
    return torch.optim.SGD(
        params,
        lr=lr,
        momentum=o.momentum,
        weight_decay=o.weight_decay,
        nesterov=o.nesterov,
        **optimizer_impl(device),
    )


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning") as timm's `Lamb` computes it with
    its defaults, the optimizer of "ResNet strikes back" (Wightman et al. 2021), in the NVIDIA FusedLAMB form:

        g = grad / max(1, ||all grads||_2 / max_grad_norm)          global clipping, before the moments
        m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
        u = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + wd * w   weight decay in the update
        w -= lr * r * u,  r = ||w|| / ||u|| (1 where either is 0)     the trust ratio, only where wd != 0

    so parameters without weight decay (norm and bias with `optim.no_weight_decay`) take Adam's step unscaled
    (timm's `always_adapt=False`). Not timm's code: written from the rule above, tested against it by hand."""

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.01, betas: tuple = (0.9, 0.999),
                 eps: float = 1e-6, max_grad_norm: float | None = 1.0):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "betas": betas, "eps": eps})
        self.max_grad_norm = max_grad_norm

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        clip = None
        if self.max_grad_norm and grads:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            clip = (norm / self.max_grad_norm).clamp_(min=1.0)
        for group in self.param_groups:
            (beta1, beta2), eps, wd, lr = group["betas"], group["eps"], group["weight_decay"], group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad if clip is None else p.grad / clip
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = float(state["step"])
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(grad, 1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                update = (m / (1 - beta1**t)).div_((v.sqrt() / math.sqrt(1 - beta2**t)).add_(eps))
                if wd != 0:
                    update.add_(p, alpha=wd)
                    w_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
                    one = torch.ones_like(w_norm)
                    update.mul_(torch.where(w_norm > 0, torch.where(u_norm > 0, w_norm / u_norm, one), one))
                p.add_(update, alpha=-lr)
        return loss


def lr_at(cfg: TrainConfig, base_lr: float, it: int, steps_per_epoch: int, plateau_scale: float) -> float:
    """Learning rate at iteration `it` (v1's constant warm-up, schedule.warmup_lr, is handled by the caller).

    A linear warm-up (schedule.warmup_epochs) goes from warmup_start_factor x base_lr to base_lr; cosine and
    linear_decay then decay to 0 over the remaining epochs (torchvision: CosineAnnealingLR over epochs - warm-up;
    FFCV: linear from the peak to 0). With schedule.granularity=epoch the rate changes once per epoch, as
    torchvision's and timm's schedulers step; "iter" interpolates within the epoch (FFCV)."""
    s = cfg.schedule
    unit = steps_per_epoch if s.granularity == "epoch" else 1
    u = it // unit  # where the run is, in schedule units (iterations or epochs)
    warm = s.warmup_epochs * steps_per_epoch // unit
    if u < warm:
        return base_lr * (s.warmup_start_factor + (1 - s.warmup_start_factor) * u / warm)
    if s.kind == "step":
        unit = steps_per_epoch if s.milestone_unit == "epoch" else 1
        passed = sum(it >= m * unit for m in s.milestones)
        return base_lr * s.gamma**passed
    if s.kind == "plateau":
        return base_lr * plateau_scale
    total = max(1, s.epochs * steps_per_epoch // unit)
    if s.kind == "linear_decay":
        return base_lr * max(0, total - u) / max(1, total - warm)
    return base_lr * 0.5 * (1 + math.cos(math.pi * min(u - warm, total - warm) / max(1, total - warm)))  # cosine


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
    mix: pipelines.BatchMix | None = None  # MixUp / CutMix of the batch (data.mixup_alpha, data.cutmix_alpha)
    loss: str = "ce"  # "ce" or "bce" (optim.loss)
    bce_target_threshold: float | None = None

    @classmethod
    def of(cls, cfg: TrainConfig, device: torch.device, world_size: int, num_classes: int = 0) -> StepOptions:
        """The step's options; `num_classes` is needed only when the config mixes batches."""
        on_gpu = device.type == "cuda"
        d = cfg.data
        mixing = d.mixup_alpha > 0 or d.cutmix_alpha > 0
        if mixing and num_classes <= 0:
            raise ValueError("data.mixup_alpha / data.cutmix_alpha: StepOptions.of needs the number of classes")
        return cls(
            device=device,
            loss_scale=world_size / cfg.optim.batch_size,
            label_smoothing=cfg.optim.label_smoothing,
            bf16=on_gpu and cfg.scaling.bf16,
            channels_last=on_gpu and cfg.scaling.channels_last,
            mix=pipelines.BatchMix(num_classes, d.mixup_alpha, d.cutmix_alpha, cutmix_prob=d.cutmix_prob,
                                   prob=d.mix_prob) if mixing else None,
            loss=cfg.optim.loss,
            bce_target_threshold=cfg.optim.bce_target_threshold,
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
    """One optimisation step on a batch already on the device; returns (summed loss, correct top-1) as device
    tensors, so the caller can add them up without a host sync per step. With mixing, a sample counts as
    correct when the net's top class is its target's largest part (torchvision's reference does the same)."""
    for group in opt.param_groups:
        group["lr"] = lr
    targets = labels
    if o.mix is not None:  # draws from torch's generator, which the caller seeded for this step and rank
        images, targets = o.mix(images, labels)
        if o.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
    with torch.autocast(o.device.type, dtype=torch.bfloat16, enabled=o.bf16):
        logits = model(images)
    loss_sum = summed_loss(logits.float(), targets, o)
    opt.zero_grad(set_to_none=True)
    (loss_sum * o.loss_scale).backward()
    opt.step()
    top = targets if targets.ndim == 1 else targets.argmax(1)
    return loss_sum.detach(), (logits.detach().argmax(1) == top).sum()


def summed_loss(logits: torch.Tensor, targets: torch.Tensor, o: StepOptions) -> torch.Tensor:
    """The loss summed over the batch. Targets are class indices or (B, C) probabilities (mixed batches).

    "ce": softmax cross-entropy with label smoothing (for probabilities too: t (1 - s) + s / C).
    "bce" (ResNet strikes back, timm's BinaryCrossEntropy): one-vs-all sigmoid cross-entropy of the smoothed
    targets, binarised at `bce_target_threshold` when set, averaged over the classes, so that at world size 1
    the mean over the batch is timm's mean over batch x classes."""
    if o.loss == "ce":
        return F.cross_entropy(logits, targets, label_smoothing=o.label_smoothing, reduction="sum")
    classes = logits.shape[-1]
    t = F.one_hot(targets, classes).to(logits.dtype) if targets.ndim == 1 else targets.to(logits.dtype)
    if o.label_smoothing:
        t = t * (1 - o.label_smoothing) + o.label_smoothing / classes
    if o.bce_target_threshold is not None:
        t = (t > o.bce_target_threshold).to(logits.dtype)
    return F.binary_cross_entropy_with_logits(logits, t, reduction="sum") / classes


# ---------------------------------------------------------------------------------------------
# The average of the weights (EMA).


def make_ema(model: torch.nn.Module, decay: float) -> AveragedModel:
    """An exponential moving average of `model`'s weights and buffers (BN running statistics averaged too,
    `use_buffers=True`, as torchvision's ExponentialMovingAverage does, so the average needs no BN pass).
    Its first update copies the weights (`n_averaged` 0)."""
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


@torch.no_grad()
def update_ema(ema: AveragedModel, model: torch.nn.Module, restart: bool = False) -> None:
    """One EMA update from `model`. `restart`: during the warm-up epochs torchvision keeps the average equal
    to the weights (n_averaged back to 0, so the next update copies them again)."""
    ema.update_parameters(model)
    if restart:
        ema.n_averaged.zero_()


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


def make_transforms(cfg: TrainConfig, manifest: dict, protocol: str = "center", epoch: int = 0):
    """(train, test) transforms of the configured kind, normalised with the manifest's mean/std; the train
    crop is `epoch`'s (data.progressive)."""
    d = cfg.data
    common = {"mean": manifest["mean"], "std": manifest["std"]}
    augment = {"auto_augment": d.auto_augment, "rand_augment": tuple(d.rand_augment), "random_erasing": d.random_erasing}
    size = train_size(cfg, epoch)
    if d.kind == "imagenet":
        train = pipelines.make_transform(
            "imagenet", True, size=size, scale_range=tuple(d.scale_range) or None, lighting=d.pca_lighting,
            crop=d.crop, **augment, **common
        )
        test = pipelines.make_transform(
            "imagenet", False, size=d.test_size or d.size, resize=d.resize or None, protocol=protocol, **common
        )
    else:
        train = pipelines.make_transform("cifar", True, size=size, **augment, **common)
        test = pipelines.make_transform("cifar", False, size=d.test_size or d.size, protocol=protocol, **common)
    return train, test


def make_batch_transforms(cfg: TrainConfig, manifest: dict, device: torch.device, generator: torch.Generator | None = None,
                          epoch: int = 0):
    """(train, test) transforms of encoded batches on `device` (data.decode_on=gpu): nvJPEG + crops on CUDA,
    the same code on the CPU otherwise; the train crop is `epoch`'s."""
    d = cfg.data
    common = {"mean": manifest["mean"], "std": manifest["std"], "device": device, "generator": generator}
    train = pipelines.make_batch_transform(
        "imagenet", True, size=train_size(cfg, epoch), scale_range=tuple(d.scale_range) or None,
        lighting=d.pca_lighting, crop=d.crop, auto_augment=d.auto_augment, rand_augment=tuple(d.rand_augment),
        random_erasing=d.random_erasing, **common
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
