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
list, ``BatchTransform`` draws each image's crop, (the seed of its auto-augment policy,) flip, lighting
(and the seed of its random erasing), in that order, from its own ``torch.Generator().manual_seed(seed)``:
an image is augmented alike in any batch, on any world size and any number of loader processes, on the
CPU and the GPU. Called on a plain list, it draws from its ``generator`` (or torch's global generator)
as before. Per-image transforms (``make_transform``) draw from torch's global generator, which the
loader seeds per sample, so any torchvision transform in them (TrivialAugmentWide, RandAugment,
RandomErasing, RandomResizedCrop) is keyed per sample.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

PROTOCOLS = ("center", "ten_crop", "multi_scale", "multi_scale_center")
KINDS = ("imagenet", "cifar")
CROPS = ("scale", "random_resized")  # ImageNet train crops: v1's scale augmentation, Inception's RandomResizedCrop

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


def _finish(mean: Sequence[float], std: Sequence[float], lighting: float = 0.0, erasing: float = 0.0) -> list:
    """uint8 -> float in [0, 1] -> (PCA lighting) -> normalised -> (random erasing, value 0: the mean pixel)."""
    return [
        v2.ToDtype(torch.float32, scale=True),
        *([Lighting(lighting)] if lighting else []),  # on [0, 1] pixels, before normalising
        v2.Normalize(list(mean), list(std)),
        *([v2.RandomErasing(erasing, value=0)] if erasing else []),  # torchvision's recipe: after normalising
        v2.ToPureTensor(),
    ]


AUTO_AUGMENTS = ("", "trivial_augment_wide", "rand_augment")


def auto_augment_policy(name: str, rand_augment: Sequence[int] = (2, 9)) -> list:
    """The per-image policy on uint8 pixels, after crop and flip, bilinear as in torchvision's recipe presets:
    TrivialAugmentWide (Müller & Hutter 2021) or RandAugment([operations, magnitude]) (Cubuk et al. 2020)."""
    if name not in AUTO_AUGMENTS:
        raise ValueError(f"unknown auto_augment {name!r}; valid: {list(AUTO_AUGMENTS)}")
    bilinear = v2.InterpolationMode.BILINEAR
    if name == "trivial_augment_wide":
        return [v2.TrivialAugmentWide(interpolation=bilinear)]
    if name == "rand_augment":
        return [v2.RandAugment(num_ops=rand_augment[0], magnitude=rand_augment[1], interpolation=bilinear)]
    return []


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
    crop: str = "scale",
    auto_augment: str = "",
    rand_augment: Sequence[int] = (2, 9),
    random_erasing: float = 0.0,
) -> v2.Compose:
    """The paper's transform for ``kind`` ("imagenet" or "cifar"); see the module docstring.

    Sizes default to the paper's and scale with ``size``: for ImageNet, ``size`` 224 gives
    ``scale_range`` (256, 480), ``resize`` 256 and ``scales`` (224, 256, 384, 480, 640); ``size`` 32
    gives (37, 69), 37 and (32, 37, 55, 69, 91). ``lighting`` is the PCA std (0 disables it).

    Today's recipes, train only (the defaults leave the papers' transforms as they were): ImageNet ``crop``
    "random_resized" (Inception's RandomResizedCrop to ``size``, instead of v1's scale augmentation);
    ``auto_augment`` (``auto_augment_policy``) after the flip; ``random_erasing`` (probability) last.
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
            return v2.Compose([*head, v2.RandomCrop(size, padding=pad, fill=fill), v2.RandomHorizontalFlip(),
                               *auto_augment_policy(auto_augment, rand_augment), *_finish(mean, std, erasing=random_erasing)])
        if protocol != "center":
            raise ValueError(f"cifar test protocol is the single view ('center'), not {protocol!r}")
        return v2.Compose([*head, v2.CenterCrop(size), *_finish(mean, std)])

    size = size or 224

    def scaled(x: float) -> int:
        return round(size * x / 224)

    lo, hi = scale_range or (scaled(256), scaled(480))
    if train:
        if crop not in CROPS:
            raise ValueError(f"unknown train crop {crop!r}; valid: {list(CROPS)}")
        geometry = ([v2.RandomResizedCrop(size, antialias=True)] if crop == "random_resized"
                    else [v2.RandomShortestSize(list(range(lo, hi + 1))), v2.RandomCrop(size)])
        return v2.Compose([*head, *geometry, v2.RandomHorizontalFlip(), *auto_augment_policy(auto_augment, rand_augment),
                           *_finish(mean, std, lighting=lighting, erasing=random_erasing)])
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
    ``size`` crop (or with ``crop="random_resized"``, Inception's random-resized crop), flip; test: shorter
    side to ``resize``, centre ``size`` crop. Each image's crop box is mapped back to source pixels so that
    only the crop is resized (one ``resized_crop`` per image, not a resize of the whole image and then a
    crop). Random draws come from CPU generators (each image's own, seeded from the batch's ``seeds``, or
    else ``generator``), so CPU and GPU runs of one seed crop alike.

    Today's recipes: ``augment`` (an ``auto_augment_policy``) runs per image on its uint8 crop on the device,
    and random erasing (probability ``erasing``) per image after normalising. Both are torchvision transforms,
    which draw from torch's global generator: with ``seeds``, each image's draws come from a seed drawn from
    its own generator (after its crop), inside ``torch.random.fork_rng``, so the caller's RNG is left as it was.
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
        crop: str = "scale",
        augment: Sequence[v2.Transform] = (),
        erasing: float = 0.0,
    ):
        self.train, self.size, self.scale_range, self.resize, self.lighting = train, size, scale_range, resize, lighting
        if crop not in CROPS:
            raise ValueError(f"unknown train crop {crop!r}; valid: {list(CROPS)}")
        self.crop = crop
        self.augment = v2.Compose(list(augment)) if augment else None
        self.erasing = v2.RandomErasing(erasing, value=0) if erasing else None
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
        if self.train and self.crop == "random_resized":
            return self._random_resized_box(height, width, g)
        s = self._randint(*self.scale_range, g) if self.train else self.resize
        f = s / min(height, width)  # scale factor of the (virtual) resize
        rh, rw = max(self.size, round(height * f)), max(self.size, round(width * f))
        if self.train:
            top, left = self._randint(0, rh - self.size, g), self._randint(0, rw - self.size, g)
        else:  # as v2.CenterCrop
            top, left = int(round((rh - self.size) / 2.0)), int(round((rw - self.size) / 2.0))
        h, w = min(height, max(1, round(self.size / f))), min(width, max(1, round(self.size / f)))
        return min(round(top / f), height - h), min(round(left / f), width - w), h, w

    @staticmethod
    def _random_resized_box(height: int, width: int, g: torch.Generator | None,
                            scale: tuple = (0.08, 1.0), ratio: tuple = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
        """(top, left, h, w) of Inception's random-resized crop, drawn as ``v2.RandomResizedCrop`` draws it (ten
        tries at an area fraction in ``scale`` and a log-uniform aspect in ``ratio``, else the centre crop)."""
        area = height * width
        log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        for _ in range(10):
            target = area * float(torch.empty(1).uniform_(scale[0], scale[1], generator=g))
            aspect = math.exp(float(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=g)))
            w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return BatchTransform._randint(0, height - h, g), BatchTransform._randint(0, width - w, g), h, w
        in_ratio = width / height  # fallback: the whole image, cropped to the nearest allowed aspect
        if in_ratio < min(ratio):
            w, h = width, int(round(width / min(ratio)))
        elif in_ratio > max(ratio):
            h, w = height, int(round(height * max(ratio)))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def _per_image(self, transform, image: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        """A torchvision transform on one image, its global-generator draws keyed by a seed drawn from ``g``."""
        if g is None:
            return transform(image)
        seed = int(torch.randint(0, 1 << 62, (1,), generator=g))
        with torch.random.fork_rng(devices=[]):  # the draws are on the CPU, whatever the image's device
            torch.manual_seed(seed)
            return transform(image)

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
        if self.train and self.augment is not None:  # on uint8 pixels, as the per-image transform does
            crops = [self._per_image(self.augment, c, own[i] if own else None) for i, c in enumerate(crops)]
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
        x = x.sub_(self.mean).div_(self.std)
        if self.train and self.erasing is not None:
            x = torch.stack([self._per_image(self.erasing, x[i], own[i] if own else None) for i in range(n)])
        return x


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
    crop: str = "scale",
    auto_augment: str = "",
    rand_augment: Sequence[int] = (2, 9),
    random_erasing: float = 0.0,
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
        lighting=lighting, device=device, generator=generator, crop=crop,
        augment=auto_augment_policy(auto_augment, rand_augment), erasing=random_erasing,
    )


class BatchMix:
    """Batch-level MixUp (Zhang et al. 2018) and CutMix (Yun et al. 2019) with torchvision's ``v2.MixUp`` and
    ``v2.CutMix``, chosen per batch as timm's ``Mixup(mode="batch")`` chooses: with probability ``prob`` the
    batch is mixed, by CutMix with probability ``cutmix_prob`` when both alphas are on (else by the one on).
    Returns (images, targets): targets are (B, num_classes) floats that sum to 1 per sample, mixed or not.

    Draws come from torch's global generator (on the CPU, whatever the batch's device): the training step
    seeds it per step and rank, so a resumed run mixes as an uninterrupted one did."""

    def __init__(self, num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, *,
                 cutmix_prob: float = 0.5, prob: float = 1.0):
        if num_classes <= 0 or not (mixup_alpha or cutmix_alpha):
            raise ValueError("BatchMix needs num_classes > 0 and mixup_alpha or cutmix_alpha > 0")
        self.num_classes, self.cutmix_prob, self.prob = num_classes, cutmix_prob, prob
        self.mixup = v2.MixUp(alpha=mixup_alpha, num_classes=num_classes) if mixup_alpha else None
        self.cutmix = v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes) if cutmix_alpha else None

    def choose(self) -> v2.Transform | None:
        """This batch's mixing (None: not mixed); one draw for each choice there is to make."""
        if self.prob < 1 and float(torch.rand(())) >= self.prob:
            return None
        if self.mixup is not None and self.cutmix is not None:
            return self.cutmix if float(torch.rand(())) < self.cutmix_prob else self.mixup
        return self.mixup or self.cutmix

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mix = self.choose()
        if mix is None:
            return images, torch.nn.functional.one_hot(labels, self.num_classes).float()
        return mix(images, labels)
