"""Residual-unit arrangements and skip connections: the parts of a block that the papers vary.

A *unit* says where BN and ReLU sit around the convolutions of a residual branch and after the
addition (He et al. 2016, "Identity Mappings", Fig. 4 / Table 2). A *skip* says what the shortcut
path h(x) does and how it is combined with the branch F(x) (same paper, Fig. 2 / Table 1).
A *shortcut option* says how h(x) matches dimensions when they grow (He et al. 2015, options A/B/C).

Each is data or a small module that a block receives; the block itself chooses nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------------------------
# Unit arrangements (v2, Fig. 4). Each tuple lists the ops around one convolution of the branch;
# "bn" before "conv" normalises the conv's input, after it the conv's output. `post` runs after
# the addition. The BN attached to conv i is named bn{i} (torchvision's names for the original).


@dataclass(frozen=True)
class Unit:
    name: str
    per_conv: tuple[str, ...]  # ops around every conv but the last
    last: tuple[str, ...]  # ops around the last conv of the branch
    post: tuple[str, ...]  # ops after the addition

    @property
    def preact(self) -> tuple[str, ...]:
        """Ops that run before the first conv (a pre-activation unit's activation)."""
        return self.per_conv[: self.per_conv.index("conv")]

    @property
    def last_op(self) -> str:
        """What the residual branch ends with, for zero-init of the branch."""
        return self.last[-1]


UNITS: dict[str, Unit] = {
    # (a) BN after each conv, ReLU after the addition: the v1 unit.
    "original": Unit("original", ("conv", "bn", "relu"), ("conv", "bn"), ("relu",)),
    # (b) the last BN moved after the addition: it alters the shortcut signal.
    "bn_after_add": Unit("bn_after_add", ("conv", "bn", "relu"), ("conv",), ("bn", "relu")),
    # (c) ReLU before the addition: the branch can only add non-negative values.
    "relu_before_add": Unit("relu_before_add", ("conv", "bn", "relu"), ("conv", "bn", "relu"), ()),
    # (d) ReLU-only pre-activation: ReLU before each conv, BN after it.
    "relu_preact": Unit("relu_preact", ("relu", "conv", "bn"), ("relu", "conv", "bn"), ()),
    # (e) full pre-activation: BN and ReLU before each conv; nothing after the addition.
    "full_preact": Unit("full_preact", ("bn", "relu", "conv"), ("bn", "relu", "conv"), ()),
}


# --------------------------------------------------------------------------------------------
# Shortcut options when dimensions grow (v1, section 3.3).

SHORTCUTS = ("A", "B", "C")


class ZeroPadShortcut(nn.Module):
    """Option A: identity on the kept channels, zeros for the new ones; stride by subsampling.

    Parameter-free, so a net with option A has exactly the plain net's parameter count.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"option A cannot shrink channels ({in_channels} -> {out_channels})")
        self.extra = out_channels - in_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra:
            x = F.pad(x, (0, 0, 0, 0, 0, self.extra))
        return x


def projection(in_channels: int, out_channels: int, stride: int, norm: bool = True) -> nn.Sequential:
    """A 1x1 convolution (with BN), named like torchvision's `downsample` (0: conv, 1: bn)."""
    layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)]
    if norm:
        layers.append(nn.BatchNorm2d(out_channels))
    return nn.Sequential(*layers)


def make_shortcut(
    option: str | None, skip: str, skip_params: dict, in_channels: int, out_channels: int, stride: int,
    *, preact: bool = False,
):
    """The module h(x) of one unit, or None for the identity (or for a plain net's missing shortcut).

    `preact`: the unit is a pre-activation unit, so its projections are a bare 1x1 conv on the
    pre-activated input, without BN: the authors' `resnet-pre-act.lua` (KaimingHe/resnet-1k-layers) and
    fb.resnet.torch's `preresnet.lua` build the shortcut as `nn.SpatialConvolution` alone.
    """
    if option is None:
        return None
    if skip == "conv1x1":  # v2 Fig. 2(e): a 1x1 conv on every shortcut; BN only if asked (shortcut_bn)
        return projection(in_channels, out_channels, stride, norm=skip_params["shortcut_bn"])
    grows = stride != 1 or in_channels != out_channels
    if option == "C" or (option == "B" and grows):
        return projection(in_channels, out_channels, stride, norm=not preact)
    if option == "A" and grows:
        return ZeroPadShortcut(in_channels, out_channels, stride)
    return None


# --------------------------------------------------------------------------------------------
# Skip variants (v2, Table 1): how the shortcut value s and the branch value f are combined.

SKIPS = (
    "identity",
    "constant_scaling",
    "exclusive_gating",
    "shortcut_only_gating",
    "conv1x1",
    "dropout",
)
# The parameters each skip variant takes, with the paper's defaults.
SKIP_PARAMS = {
    "constant_scaling": {"shortcut_scale": 0.5, "residual_scale": 1.0},  # 0.5/0.5 is Table 1's 12.35 row
    "exclusive_gating": {"gate_bias": -6.0},
    "shortcut_only_gating": {"gate_bias": -6.0},
    # v2 Table 1's 1x1-conv shortcut: the paper does not say whether a BN follows the conv. Our choice is
    # none; shortcut_bn=True adds one, as option B/C projections have.
    "conv1x1": {"shortcut_bn": False},
    # skip_dropout_inverted=False is the paper's: the mask is not rescaled, so the shortcut is scaled by
    # lambda with an expectation of 1-p (v2 sec. 3.1); True is nn.Dropout (expectation 1).
    "dropout": {"skip_dropout": 0.5, "skip_dropout_inverted": False},
}


class Add(nn.Module):
    """identity and conv1x1 skips: y = h(x) + F(x)."""

    def forward(self, x, s, f):
        return s + f


class ConstantScaling(nn.Module):
    """y = lambda * h(x) + rho * F(x)."""

    def __init__(self, shortcut_scale: float, residual_scale: float):
        super().__init__()
        self.shortcut_scale = shortcut_scale
        self.residual_scale = residual_scale

    def forward(self, x, s, f):
        return self.shortcut_scale * s + self.residual_scale * f

    def extra_repr(self) -> str:
        return f"shortcut_scale={self.shortcut_scale}, residual_scale={self.residual_scale}"


class Gating(nn.Module):
    """g(x) = sigmoid(1x1 conv of the unit input). Exclusive: (1-g) h(x) + g F(x);
    shortcut-only: (1-g) h(x) + F(x). A negative gate bias starts the shortcut open (v2: -6)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, gate_bias: float, exclusive: bool):
        super().__init__()
        self.gate = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=True)
        nn.init.constant_(self.gate.bias, gate_bias)
        self.exclusive = exclusive

    def forward(self, x, s, f):
        g = torch.sigmoid(self.gate(x))
        return (1 - g) * s + (g * f if self.exclusive else f)

    def extra_repr(self) -> str:
        return f"exclusive={self.exclusive}"


class DropoutShortcut(nn.Module):
    """y = m * h(x) + F(x) with a Bernoulli(1 - p) mask m per element.

    The paper's variant (v2 sec. 3.1: dropout "statistically imposes a scale of lambda with an
    expectation of 0.5 on the shortcut", which is why it fails): in training the mask is applied
    without rescaling, at test the shortcut is multiplied by its expectation 1 - p.
    `inverted=True` is nn.Dropout instead (training: m / (1 - p); test: identity).
    """

    def __init__(self, p: float, inverted: bool = False):
        super().__init__()
        self.p = p
        self.inverted = inverted
        self.dropout = nn.Dropout(p) if inverted else None

    def forward(self, x, s, f):
        if self.inverted:
            return self.dropout(s) + f
        if not self.training:
            return (1 - self.p) * s + f
        return s * torch.bernoulli(torch.full_like(s, 1 - self.p)) + f

    def extra_repr(self) -> str:
        return f"p={self.p}, inverted={self.inverted}"


def make_combine(skip: str, params: dict, in_channels: int, out_channels: int, stride: int) -> nn.Module:
    if skip in ("identity", "conv1x1"):
        return Add()
    if skip == "constant_scaling":
        return ConstantScaling(params["shortcut_scale"], params["residual_scale"])
    if skip in ("exclusive_gating", "shortcut_only_gating"):
        return Gating(in_channels, out_channels, stride, params["gate_bias"], skip == "exclusive_gating")
    if skip == "dropout":
        return DropoutShortcut(params["skip_dropout"], params["skip_dropout_inverted"])
    raise ValueError(f"unknown skip {skip!r}; valid: {', '.join(SKIPS)}")
