"""Train and test transforms of the two papers, as picklable torchvision ``transforms.v2`` pipelines.

Inputs are decoded images (uint8 ``(C, H, W)`` tensors from the loader, or PIL images); geometry
runs on uint8, then the image becomes float in [0, 1] and is normalised with the manifest's
per-channel mean/std.

``make_transform("imagenet", train=True, ...)``: shorter side random in ``scale_range`` ([256, 480]),
random ``size`` crop (224), horizontal flip, AlexNet PCA lighting (std 0.1), normalise
(He et al. 2015, sec. 3.4).

``make_transform("imagenet", train=False, protocol=...)``:
  "center"       resize shorter side to ``resize`` (256), centre ``size`` crop   -> (C, H, W)
  "ten_crop"     resize to ``resize``, four corners + centre and their flips  -> (10, C, H, W)
  "multi_scale"  for each s in ``scales`` ({224, 256, 384, 480, 640}): resize the shorter side to s and
                 centre-crop s x s -> a tuple of (C, s, s), one per scale. The paper evaluates the
                 whole rectangular image fully-convolutionally; the square centre crop is what makes
                 a scale batchable, so it approximates that protocol (it drops the long side's edges).

``make_transform("cifar", train=True)``: pad 4, random ``size`` (32) crop, flip. ``train=False``:
the single ``size`` view (He et al. 2015, sec. 4.2). The demo's 32 px digits use these.

The loader batches the three test outputs as (B, C, H, W), (B, 10, C, H, W) and a tuple of (B, C, s, s).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import v2

PROTOCOLS = ("center", "ten_crop", "multi_scale")
KINDS = ("imagenet", "cifar")

# AlexNet's PCA of ImageNet RGB pixels (Krizhevsky et al. 2012), as used by fb.resnet.torch.
IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)


class Lighting(torch.nn.Module):
    """AlexNet "fancy PCA" colour augmentation on a float image in [0, 1]: add
    ``eigvec @ (alpha * eigval)`` to every pixel, alpha ~ N(0, std)."""

    def __init__(self, std: float = 0.1, eigval: Sequence[float] = IMAGENET_EIGVAL, eigvec: Sequence[Sequence[float]] = IMAGENET_EIGVEC):
        super().__init__()
        self.std = std
        self.register_buffer("eigval", torch.tensor(eigval, dtype=torch.float32), persistent=False)
        self.register_buffer("eigvec", torch.tensor(eigvec, dtype=torch.float32), persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.std == 0:
            return image
        alpha = torch.randn(3) * self.std
        rgb = self.eigvec @ (alpha * self.eigval)
        return image + rgb.view(3, 1, 1).to(image.dtype)


class StackCrops(torch.nn.Module):
    """Turn TenCrop's tuple of 10 images into one (10, C, H, W) tensor."""

    def forward(self, crops: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.stack(list(crops))


class MultiScale(torch.nn.Module):
    """Apply one pipeline per scale to the same image; return the tuple of views."""

    def __init__(self, views: Sequence[v2.Transform]):
        super().__init__()
        self.views = torch.nn.ModuleList(views)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(view(image) for view in self.views)


def _finish(mean: Sequence[float], std: Sequence[float]) -> list:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std)), v2.ToPureTensor()]


def make_transform(
    kind: str,
    train: bool,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    size: int | None = None,
    protocol: str = "center",
    scale_range: tuple[int, int] | None = None,
    resize: int | None = None,
    scales: Sequence[int] | None = None,
    pad: int = 4,
    lighting: float = 0.1,
) -> v2.Compose:
    """The paper's transform for ``kind`` ("imagenet" or "cifar"); see the module docstring.

    Sizes default to the paper's and scale with ``size``: for ImageNet, ``size`` 224 gives
    ``scale_range`` (256, 480), ``resize`` 256 and ``scales`` (224, 256, 384, 480, 640); ``size`` 32
    gives (37, 69), 37 and (32, 37, 55, 69, 91). ``lighting`` is the PCA std (0 disables it).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown transform kind {kind!r}; valid: {list(KINDS)}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown test protocol {protocol!r}; valid: {list(PROTOCOLS)}")
    head = [v2.ToImage()]  # PIL or tensor in, an Image tv_tensor out (uint8 stays uint8)

    if kind == "cifar":
        size = size or 32
        if train:
            return v2.Compose([*head, v2.RandomCrop(size, padding=pad), v2.RandomHorizontalFlip(), *_finish(mean, std)])
        if protocol != "center":
            raise ValueError(f"cifar test protocol is the single view ('center'), not {protocol!r}")
        return v2.Compose([*head, v2.CenterCrop(size), *_finish(mean, std)])

    size = size or 224

    def scaled(x: float) -> int:
        return round(size * x / 224)

    lo, hi = scale_range or (scaled(256), scaled(480))
    if train:
        steps = [v2.RandomShortestSize(list(range(lo, hi + 1))), v2.RandomCrop(size), v2.RandomHorizontalFlip(), *_finish(mean, std)]
        if lighting:
            steps.insert(-2, Lighting(lighting))  # on [0, 1] pixels, before normalising
        return v2.Compose([*head, *steps])
    resize = resize or scaled(256)
    if protocol == "center":
        return v2.Compose([*head, v2.Resize(resize), v2.CenterCrop(size), *_finish(mean, std)])
    if protocol == "ten_crop":
        return v2.Compose([*head, v2.Resize(resize), v2.TenCrop(size), *_finish(mean, std), StackCrops()])
    scales = scales or tuple(scaled(s) for s in (224, 256, 384, 480, 640))
    views = [v2.Compose([v2.Resize(s), v2.CenterCrop(s), *_finish(mean, std)]) for s in scales]
    return v2.Compose([*head, MultiScale(views)])
