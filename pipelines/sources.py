"""Image sources that ``python -m pipelines.shards write`` turns into shards.

A source is a name, its class names and, per split, a list of ``Record``s. A record knows its key
and label and encodes its image only when asked, so a source of a million files costs a list of
paths until the writer reaches it.

Spec strings (``--source``):
  digits                              scikit-learn's bundled 8x8 digits, upscaled to 32x32 RGB PNG;
                                      fixed stratified 70/15/15 train/val/test split (seed 0), and
                                      trainval = train + val
  cifar10:PATH, cifar100:PATH         the official python archive (cifar-10-python.tar.gz) or its
                                      extracted folder; train = first 45,000, val = last 5,000 of
                                      the training batches (He et al. 2015, sec. 4.2), trainval =
                                      all 50,000 training images, test = test batch
  imagefolder:PATH                    PATH/train/<class>/*, PATH/val/<class>/* (and PATH/test/ if
                                      present); JPEG and PNG bytes kept as they are
  synthetic:k=v,...                   generated images: classes=10,size=64 (or size=64-128),
                                      train=1000,val=200,test=0,format=jpg|png,seed=0
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import numpy as np
from PIL import Image

SOURCE_KINDS = ("digits", "cifar10:PATH", "cifar100:PATH", "imagefolder:PATH", "synthetic:k=v,...")
IMAGE_EXTS = ("jpg", "png")


@dataclass(frozen=True)
class Record:
    key: str
    label: int
    # load() -> (encoded bytes, extension "jpg"/"png", HxWx3 uint8 pixels if already at hand else None)
    load: Callable[[], tuple[bytes, str, np.ndarray | None]]


@dataclass
class Source:
    name: str
    classes: list[str]
    splits: dict[str, list[Record]]
    image_size: tuple[int, int] | None = None  # (H, W) when every image has it
    extra: dict = field(default_factory=dict)


def encode(pixels: np.ndarray, fmt: str, quality: int = 90) -> bytes:
    """Encode HxWx3 uint8 pixels as PNG or JPEG."""
    buf = io.BytesIO()
    image = Image.fromarray(pixels, "RGB")
    if fmt == "png":
        image.save(buf, format="PNG")
    else:
        image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _array_record(key: str, label: int, pixels: np.ndarray, fmt: str) -> Record:
    return Record(key, label, partial(_encode_array, pixels, fmt))


def _encode_array(pixels: np.ndarray, fmt: str) -> tuple[bytes, str, np.ndarray]:
    return encode(pixels, fmt), fmt, pixels


# -- digits ---------------------------------------------------------------------------------------


def digits_pixels(size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as (N, size, size, 3) uint8 and their labels (0..9)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    small = np.clip(data.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    big = np.stack([np.asarray(Image.fromarray(im, "L").resize((size, size), Image.BILINEAR)) for im in small])
    return np.repeat(big[..., None], 3, axis=3), data.target.astype(np.int64)


def digits_split_indices(labels: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """The fixed stratified 70/15/15 split of the digits; the same indices on every machine."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    train_val, test = train_test_split(idx, test_size=0.15, stratify=labels, random_state=seed)
    train, val = train_test_split(train_val, test_size=0.15 / 0.85, stratify=labels[train_val], random_state=seed)
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def digits_source(size: int = 32, seed: int = 0) -> Source:
    pixels, labels = digits_pixels(size)
    indices = digits_split_indices(labels, seed)
    indices["trainval"] = np.sort(np.concatenate([indices["train"], indices["val"]]))  # the final fit after model selection
    splits = {name: [_array_record(f"digits_{i:04d}", int(labels[i]), pixels[i], "png") for i in idx] for name, idx in indices.items()}
    return Source("digits", [str(d) for d in range(10)], splits, (size, size))


# -- CIFAR ----------------------------------------------------------------------------------------


def _cifar_members(path: str) -> Callable[[str], dict]:
    """A reader of the pickled batches from the archive or the extracted folder."""
    if os.path.isdir(path):
        folder = path
        for sub in ("cifar-10-batches-py", "cifar-100-python"):
            if os.path.isdir(os.path.join(path, sub)):
                folder = os.path.join(path, sub)

        def read(name: str) -> dict:
            with open(os.path.join(folder, name), "rb") as f:
                return pickle.load(f, encoding="bytes")

        return read
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no CIFAR archive or folder there")
    with tarfile.open(path, "r:*") as tar:
        blobs = {os.path.basename(m.name): tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    return lambda name: pickle.loads(blobs[name], encoding="bytes")


def cifar_source(path: str, kind: str = "cifar10") -> Source:
    read = _cifar_members(path)
    if kind == "cifar10":
        meta = read("batches.meta")
        classes = [c.decode() for c in meta[b"label_names"]]
        batches = [read(f"data_batch_{i}") for i in range(1, 6)]
        test = read("test_batch")
        label_key = b"labels"
    else:
        meta = read("meta")
        classes = [c.decode() for c in meta[b"fine_label_names"]]
        batches = [read("train")]
        test = read("test")
        label_key = b"fine_labels"

    def arrays(batch_list: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        data = np.concatenate([np.asarray(b[b"data"], dtype=np.uint8) for b in batch_list])
        labels = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in batch_list])
        return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels

    train_x, train_y = arrays(batches)
    test_x, test_y = arrays([test])
    n_val = 5000 if len(train_x) > 5000 else len(train_x) // 10  # the paper's 45k/5k; tiny test archives keep 10 %
    cut = len(train_x) - n_val
    parts = {
        "train": (train_x[:cut], train_y[:cut], 0),
        "val": (train_x[cut:], train_y[cut:], cut),
        "trainval": (train_x, train_y, 0),  # all training images: the final fit after model selection
        "test": (test_x, test_y, 0),
    }
    splits = {
        name: [_array_record(f"{name if name == 'test' else 'train'}_{start + i:05d}", int(y[i]), x[i], "png") for i in range(len(x))]
        for name, (x, y, start) in parts.items()
    }
    return Source(kind, classes, splits, (32, 32))


# -- image folders (ImageNet layout) ---------------------------------------------------------------


def _read_file(path: str) -> tuple[bytes, str, None]:
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    with open(path, "rb") as f:
        data = f.read()
    if ext in ("jpg", "jpeg"):
        return data, "jpg", None
    if ext == "png":
        return data, "png", None
    # any other format Pillow reads is stored as PNG, losslessly
    with Image.open(io.BytesIO(data)) as im:
        pixels = np.asarray(im.convert("RGB"))
    return encode(pixels, "png"), "png", pixels


def imagefolder_source(path: str) -> Source:
    train_dir = os.path.join(path, "train")
    if not os.path.isdir(train_dir):
        raise FileNotFoundError(f"{path}: expected class folders under {train_dir}")
    classes = sorted(d.name for d in os.scandir(train_dir) if d.is_dir())
    index = {c: i for i, c in enumerate(classes)}
    splits: dict[str, list[Record]] = {}
    for split in ("train", "val", "test"):
        root = os.path.join(path, split)
        if not os.path.isdir(root):
            continue
        records = []
        for cls in sorted(d.name for d in os.scandir(root) if d.is_dir()):
            if cls not in index:
                raise ValueError(f"{root}/{cls}: class not among the train classes")
            for name in sorted(os.listdir(os.path.join(root, cls))):
                stem = os.path.splitext(name)[0].replace(".", "_")
                file = os.path.join(root, cls, name)
                records.append(Record(f"{cls}/{stem}", index[cls], partial(_read_file, file)))
        splits[split] = records
    return Source("imagefolder", classes, splits, None)


# -- synthetic ------------------------------------------------------------------------------------


def synthetic_pixels(label: int, num_classes: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A smooth class-coloured gradient plus noise: compresses like a photo, not like white noise."""
    hue = label / max(num_classes, 1)
    base = np.array([np.sin(2 * np.pi * (hue + k / 3)) * 0.5 + 0.5 for k in range(3)]) * 200
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * xx + np.sin(angle) * yy)[..., None] * 55
    noise = rng.normal(0, 12, (h, w, 3))
    return np.clip(base + ramp + noise, 0, 255).astype(np.uint8)


def _synthetic_load(i: int, label: int, num_classes: int, h: int, w: int, fmt: str, seed: int) -> tuple[bytes, str, np.ndarray]:
    pixels = synthetic_pixels(label, num_classes, h, w, np.random.default_rng([seed, i]))
    return encode(pixels, fmt), fmt, pixels


def synthetic_source(options: dict[str, str]) -> Source:
    allowed = {"classes", "size", "train", "val", "test", "format", "seed"}
    unknown = set(options) - allowed
    if unknown:
        raise ValueError(f"synthetic: unknown option(s) {sorted(unknown)}; valid: {sorted(allowed)}")
    num_classes = int(options.get("classes", 10))
    lo, _, hi = options.get("size", "64").partition("-")
    lo_size, hi_size = int(lo), int(hi or lo)
    fmt = options.get("format", "jpg").replace("jpeg", "jpg")
    if fmt not in IMAGE_EXTS:
        raise ValueError(f"synthetic: format={fmt!r}; valid: {list(IMAGE_EXTS)}")
    seed = int(options.get("seed", 0))
    counts = {"train": int(options.get("train", 1000)), "val": int(options.get("val", 200)), "test": int(options.get("test", 0))}
    splits: dict[str, list[Record]] = {}
    offset = 0
    for split, n in counts.items():
        if n <= 0:
            continue
        size_rng = np.random.default_rng([seed, offset, 7])
        records = []
        for j in range(n):
            i = offset + j
            label = i % num_classes
            h, w = (int(v) for v in size_rng.integers(lo_size, hi_size + 1, size=2))
            records.append(Record(f"{split}_{j:07d}", label, partial(_synthetic_load, i, label, num_classes, h, w, fmt, seed)))
        splits[split] = records
        offset += n
    fixed = (lo_size, lo_size) if lo_size == hi_size else None
    return Source("synthetic", [f"class_{c}" for c in range(num_classes)], splits, fixed)


def parse_source(spec: str) -> Source:
    """Build the source named by a ``--source`` string (see the module docstring)."""
    kind, _, arg = spec.partition(":")
    if kind == "digits":
        return digits_source()
    if kind in ("cifar10", "cifar100") and arg:
        return cifar_source(arg, kind)
    if kind == "imagefolder" and arg:
        return imagefolder_source(arg)
    if kind == "synthetic":
        options = dict(item.split("=", 1) for item in arg.split(",") if item) if arg else {}
        return synthetic_source(options)
    raise ValueError(f"unknown source {spec!r}; valid sources: {', '.join(SOURCE_KINDS)}")
