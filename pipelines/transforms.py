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
  "multi_scale"  the paper's fully-convolutional multi-scale test (v1 sec. 3.4: "average the scores at
                 multiple scales (images are resized such that the shorter side is in {224, 256, 384,
                 480, 640})"): for each s in ``scales``, the *whole* image resized so that its shorter
                 side is s, aspect ratio kept, and its horizontal flip -> a tuple of (2, C, s, s * W / H),
                 one per scale. Images of different aspect ratios give different shapes: batch them by
                 shape (``orchestrator.batch_eval`` does) or one at a time.
  "multi_scale_center"  the older square approximation: shorter side to s, centre s x s crop (drops the
                 long side's edges, about 25 % of a 4:3 image), no flips -> a tuple of (C, s, s).

``make_transform("cifar", train=True)``: pad 4 with the mean pixel (a normalised zero, as padding the
normalised image with zeros does), random ``size`` (32) crop, flip. ``train=False``: the single
``size`` view (He et al. 2015, sec. 4.2). The demo's 32 px digits use these.

The loader batches the test outputs as (B, C, H, W), (B, 10, C, H, W), a tuple of (B, 2, C, s, w) for
images of one shape, and a tuple of (B, C, s, s).

``make_batch_transform("imagenet", train, ..., device=...)``: the same ImageNet train and centre-crop
test transforms for a whole batch of *encoded* images (``make_loader(..., decode=False)``), run on
``device``: JPEG decoding with nvJPEG on CUDA (``torchvision.io.decode_jpeg(..., device="cuda")``),
then crop, flip, lighting and normalisation as batched tensor ops, so two CPU cores per GPU only
read shards. On ``device="cpu"`` the same code runs on the CPU (the fallback, and how it is tested).

Per-sample randomness: a training loader's batches of encoded images (``make_loader(...,
decode=False)``) are ``pipelines.loader.SeededImages``: a list with a ``seeds`` attribute (int64
tensor, one seed per image, ``pipelines.order.sample_seed(seed, epoch, index)``). Called on such a
list, ``BatchTransform`` draws each image's crop, flip and lighting, in that order, from its own
``torch.Generator().manual_seed(seed)``: an image is augmented alike in any batch, on any world size
and any number of loader processes, on the CPU and the GPU. Called on a plain list, it draws from
its ``generator`` (or torch's global generator) as before. Per-image transforms (``make_transform``)
draw from torch's global generator, which the loader seeds per sample.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

PROTOCOLS = ("center", "ten_crop", "multi_scale", "multi_scale_center")
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


class WithFlip(torch.nn.Module):
    """One view and its horizontal flip, stacked: (2, C, H, W)."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.stack([image, image.flip(-1)])


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
            # Pad with the mean pixel: after normalisation the border is zero, as in the authors' code,
            # which pads the mean-subtracted image with zeros (a black pad would be -mean/std).
            fill = [round(255 * m) for m in mean]
            return v2.Compose([*head, v2.RandomCrop(size, padding=pad, fill=fill), v2.RandomHorizontalFlip(), *_finish(mean, std)])
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
    if protocol == "multi_scale_center":
        views = [v2.Compose([v2.Resize(s), v2.CenterCrop(s), *_finish(mean, std)]) for s in scales]
    else:  # the whole image at each scale (v2.Resize(s) sets the shorter side, keeping the aspect ratio)
        views = [v2.Compose([v2.Resize(s), *_finish(mean, std), WithFlip()]) for s in scales]
    return v2.Compose([*head, MultiScale(views)])


class BatchTransform:
    """``make_transform("imagenet", ...)`` for a batch of encoded images, decoded and augmented on ``device``.

    Geometry as the per-image transform: train: shorter side random in ``scale_range``, a random
    ``size`` crop, flip; test: shorter side to ``resize``, centre ``size`` crop. Each image's crop box
    is mapped back to source pixels so that only the crop is resized (one ``resized_crop`` per
    image, not a resize of the whole image and then a crop). Random draws come from CPU generators
    (each image's own, seeded from the batch's ``seeds``, or else ``generator``), so CPU and GPU runs
    of one seed crop alike.
    """

    def __init__(
        self,
        train: bool,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        size: int,
        scale_range: tuple[int, int],
        resize: int,
        lighting: float,
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
    ):
        self.train, self.size, self.scale_range, self.resize, self.lighting = train, size, scale_range, resize, lighting
        self.device = torch.device(device)
        self.generator = generator
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.eigval = torch.tensor(IMAGENET_EIGVAL, dtype=torch.float32)
        self.eigvec = torch.tensor(IMAGENET_EIGVEC, dtype=torch.float32)

    def decode(self, blobs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """uint8 (3, H, W) images on ``device``: JPEGs in one batched call (nvJPEG on CUDA), others
        (PNG) on the CPU and then moved."""
        is_jpeg = [len(b) > 2 and b[0].item() == 0xFF and b[1].item() == 0xD8 for b in blobs]
        out: list = [None] * len(blobs)
        with warnings.catch_warnings():  # torchvision 0.29 points to torchcodec (not a dependency)
            warnings.simplefilter("ignore", DeprecationWarning)
            jpegs = [i for i, j in enumerate(is_jpeg) if j]
            if jpegs:
                decoded = decode_jpeg([blobs[i] for i in jpegs], mode=ImageReadMode.RGB, device=self.device)
                for i, image in zip(jpegs, decoded, strict=True):
                    out[i] = image
            for i, j in enumerate(is_jpeg):
                if not j:
                    out[i] = decode_image(blobs[i], mode=ImageReadMode.RGB).to(self.device, non_blocking=True)
        return out

    @staticmethod
    def _randint(low: int, high: int, generator: torch.Generator | None) -> int:
        """Uniform in [low, high] (inclusive)."""
        return int(torch.randint(low, high + 1, (1,), generator=generator))

    def box(self, height: int, width: int, generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
        """(top, left, h, w) in source pixels of the crop that becomes the ``size`` x ``size`` view;
        random draws from ``generator`` (default: the transform's)."""
        g = generator or self.generator
        s = self._randint(*self.scale_range, g) if self.train else self.resize
        f = s / min(height, width)  # scale factor of the (virtual) resize
        rh, rw = max(self.size, round(height * f)), max(self.size, round(width * f))
        if self.train:
            top, left = self._randint(0, rh - self.size, g), self._randint(0, rw - self.size, g)
        else:  # as v2.CenterCrop
            top, left = int(round((rh - self.size) / 2.0)), int(round((rw - self.size) / 2.0))
        h, w = min(height, max(1, round(self.size / f))), min(width, max(1, round(self.size / f)))
        return min(round(top / f), height - h), min(round(left / f), width - w), h, w

    def __call__(self, blobs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Encoded images -> float32 (B, 3, size, size) on ``device``, normalised. With a ``seeds``
        attribute on ``blobs`` (training loaders' ``SeededImages``), image i's draws come from a
        generator seeded with ``seeds[i]`` (module docstring)."""
        n = len(blobs)
        if n == 0:  # a step whose samples were all skipped (make_loader(on_error="skip"))
            return torch.zeros(0, 3, self.size, self.size, device=self.device)
        images = self.decode(blobs)
        seeds = getattr(blobs, "seeds", None) if self.train else None
        own = [torch.Generator().manual_seed(int(s)) for s in seeds.tolist()] if seeds is not None else None
        crops = [
            TF.resized_crop(img, *self.box(img.shape[-2], img.shape[-1], own[i] if own else None), [self.size, self.size], antialias=True)
            for i, img in enumerate(images)
        ]
        x = torch.stack(crops).float().div_(255)
        if self.train:
            if own:
                flip = torch.cat([torch.rand(1, generator=g) for g in own]) < 0.5
            else:
                flip = torch.rand(n, generator=self.generator) < 0.5
            x = torch.where(flip.to(self.device, non_blocking=True).view(n, 1, 1, 1), x.flip(-1), x)
            if self.lighting:  # per image: eigvec @ (alpha * eigval), alpha ~ N(0, lighting)
                if own:
                    alpha = torch.stack([torch.randn(3, generator=g) for g in own]) * self.lighting
                else:
                    alpha = torch.randn(n, 3, generator=self.generator) * self.lighting
                w = alpha * self.eigval
                # elementwise, not a matmul: an image's colour shift must not depend on its batch's size
                rgb = w[:, 0:1] * self.eigvec[:, 0] + w[:, 1:2] * self.eigvec[:, 1] + w[:, 2:3] * self.eigvec[:, 2]
                x += rgb.to(self.device, non_blocking=True).view(n, 3, 1, 1)
        return x.sub_(self.mean).div_(self.std)


def make_batch_transform(
    kind: str,
    train: bool,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    size: int | None = None,
    protocol: str = "center",
    scale_range: tuple[int, int] | None = None,
    resize: int | None = None,
    lighting: float = 0.1,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> BatchTransform:
    """The batched, on-device form of ``make_transform(kind, train, ...)`` (ImageNet; test: centre crop)."""
    if kind != "imagenet":
        raise ValueError(f"batch transform: kind {kind!r} is not supported; decode on the accelerator is for 'imagenet'")
    if not train and protocol != "center":
        raise ValueError(f"batch transform: test protocol {protocol!r} is not supported; only 'center'")
    size = size or 224
    lo, hi = scale_range or (round(size * 256 / 224), round(size * 480 / 224))
    return BatchTransform(
        train, mean=mean, std=std, size=size, scale_range=(lo, hi), resize=resize or round(size * 256 / 224),
        lighting=lighting, device=device, generator=generator,
    )
