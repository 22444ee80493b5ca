"""Every named network of the two papers, one row of data each.

Rows are registered in `models/registry.py`; caller overrides replace row values
(`dict(row, **overrides)`). Depth d of a CIFAR net: basic blocks n = (d - 2) / 6 per stage,
bottleneck blocks n = (d - 2) / 9 per stage (v1 section 4.2, v2 section 4).
"""

from .resnet import BasicBlock, Bottleneck

# v1, Table 1 (ImageNet, 224 px): 4 stages of widths 64..512 (x4 for bottlenecks), option B.
IMAGENET = dict(stem="imagenet", width=64, num_classes=1000, shortcut="B", stride_in_1x1=True)
# v1 section 4.2 (CIFAR, 32 px): 3 stages of widths 16, 32, 64, option A.
CIFAR = dict(stem="cifar", width=16, num_classes=10, shortcut="A", stride_in_1x1=True)
# v2: the CIFAR bottleneck nets (164, 1001) use projections where dimensions grow.
CIFAR_BOTTLENECK = dict(CIFAR, shortcut="B")

IMAGENET_LAYERS = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
    200: (Bottleneck, (3, 24, 36, 3)),  # v2, section 5
}


def cifar_basic(depth: int):
    n, rest = divmod(depth - 2, 6)
    assert rest == 0 and n > 0, depth
    return BasicBlock, (n, n, n)


def cifar_bottleneck(depth: int):
    n, rest = divmod(depth - 2, 9)
    assert rest == 0 and n > 0, depth
    return Bottleneck, (n, n, n)


def _row(base: dict, block_layers, **extra) -> dict:
    block, layers = block_layers
    return dict(base, block=block, layers=layers, **extra)


PLAIN = dict(shortcut=None)  # the same stacks without shortcuts
PREACT = dict(unit="full_preact")

ROWS: dict[str, dict] = {}
# ImageNet (v1 Table 1; ResNet-200 and the pre-activation nets from v2).
for d in (18, 34, 50, 101, 152, 200):
    ROWS[f"resnet{d}"] = _row(IMAGENET, IMAGENET_LAYERS[d])
for d in (18, 34):
    ROWS[f"plain{d}"] = _row(IMAGENET, IMAGENET_LAYERS[d], **PLAIN)
for d in (152, 200):
    ROWS[f"preact_resnet{d}"] = _row(IMAGENET, IMAGENET_LAYERS[d], **PREACT)
# CIFAR, basic blocks (v1 Table 6), plus the small depths demos need (8, 14).
for d in (8, 14, 20, 32, 44, 56, 110, 1202):
    ROWS[f"resnet{d}"] = _row(CIFAR, cifar_basic(d))
for d in (8, 14, 20, 32, 44, 56, 110):
    ROWS[f"plain{d}"] = _row(CIFAR, cifar_basic(d), **PLAIN)
for d in (20, 110):
    ROWS[f"preact_resnet{d}"] = _row(CIFAR, cifar_basic(d), **PREACT)
# CIFAR, bottleneck blocks (v2 section 4).
for d in (164, 1001):
    ROWS[f"resnet{d}"] = _row(CIFAR_BOTTLENECK, cifar_bottleneck(d))
    ROWS[f"preact_resnet{d}"] = _row(CIFAR_BOTTLENECK, cifar_bottleneck(d), **PREACT)
