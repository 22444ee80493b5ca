"""One ResNet class and two block kinds; every named network is a row of data in `models/zoo.py`.

Module and parameter names follow torchvision (`conv1 bn1 layer1..layer4 downsample fc`), so a
torchvision `state_dict()` loads into the equivalent row with `strict=True`.
"""

from __future__ import annotations

import torch
from torch import nn

from .units import Unit, make_combine, make_shortcut


class ResidualBlock(nn.Module):
    """A stack of convolutions F(x), arranged by `unit`, plus a shortcut h(x) combined by `combine`.

    `shortcut_option=None` makes a plain block (no shortcut, no addition).
    `preact_mode` matters for pre-activation units only: "branch" (the activation feeds F alone),
    "both" (it runs before the split, so h and F see the activated input; the first unit of each
    stage, as in the authors' code) or "none" (the stem already ended with BN-ReLU).
    """

    expansion = 1  # out channels = planes * expansion; subclasses also define
    # conv_specs(in_channels, planes, stride, stride_in_1x1) -> [(in, out, kernel, stride), ...]

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int,
        *,
        unit: Unit,
        shortcut_option: str | None,
        skip: str,
        skip_params: dict,
        stride_in_1x1: bool,
        preact_mode: str = "branch",
    ):
        super().__init__()
        specs = self.conv_specs(in_channels, planes, stride, stride_in_1x1)
        out_channels = specs[-1][1]
        self.relu = nn.ReLU(inplace=True)
        self.plain = shortcut_option is None
        ops: list[tuple[str, nn.Module]] = []
        for i, (cin, cout, k, s) in enumerate(specs, start=1):
            template = unit.last if i == len(specs) else unit.per_conv
            conv_at = template.index("conv")
            for j, op in enumerate(template):
                if op == "conv":
                    m = nn.Conv2d(cin, cout, k, stride=s, padding=k // 2, bias=False)
                    setattr(self, f"conv{i}", m)
                elif op == "bn":
                    m = nn.BatchNorm2d(cin if j < conv_at else cout)
                    setattr(self, f"bn{i}", m)
                else:
                    m = self.relu
                ops.append((op, m))
        post = []
        for op in unit.post:
            if op == "bn":  # v2 Fig. 4(b): the last conv's BN sits after the addition
                m = nn.BatchNorm2d(out_channels)
                setattr(self, f"bn{len(specs)}", m)
            else:
                m = self.relu
            post.append(m)

        n_pre = len(unit.preact)
        if preact_mode not in ("branch", "both", "none"):
            raise ValueError(f"preact_mode {preact_mode!r}; valid: branch, both, none")
        split_ops = [m for _, m in ops[:n_pre]] if n_pre and preact_mode == "both" else []
        if n_pre and preact_mode != "branch":
            if preact_mode == "none" and "bn" in unit.preact:
                del self.bn1  # the stem's BN-ReLU already activated this input
            ops = ops[n_pre:]
        # A ReLU that is the branch's first op must not act in place: its input is also the shortcut.
        branch = [nn.ReLU() if (k == 0 and op == "relu") else m for k, (op, m) in enumerate(ops)]
        self._pre_split = split_ops
        self._branch = branch
        self._post = post

        self.downsample = None if self.plain else make_shortcut(
            shortcut_option, skip, skip_params, in_channels, out_channels, stride, preact=bool(unit.preact)
        )
        self.combine = None if self.plain else make_combine(skip, skip_params, in_channels, out_channels, stride)
        self._zero_target = f"bn{len(specs)}" if unit.last_op in ("bn", "relu") else f"conv{len(specs)}"

    def zero_init_last(self) -> None:
        """Zero-init the end of the residual branch (Goyal et al. 2017): each block starts as identity."""
        target = getattr(self, self._zero_target)
        nn.init.zeros_(target.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in self._pre_split:
            x = m(x)
        out = x
        for m in self._branch:
            out = m(out)
        if not self.plain:
            s = x if self.downsample is None else self.downsample(x)
            out = self.combine(x, s, out)
        for m in self._post:
            out = m(out)
        return out


class BasicBlock(ResidualBlock):
    """Two 3x3 convolutions (ResNet-18/34 and the CIFAR nets of v1)."""

    expansion = 1

    @staticmethod
    def conv_specs(in_channels, planes, stride, stride_in_1x1):
        return [(in_channels, planes, 3, stride), (planes, planes, 3, 1)]


class Bottleneck(ResidualBlock):
    """1x1 reduce, 3x3, 1x1 expand (x4). `stride_in_1x1=True` is the paper's v1 layout (stride on the
    first 1x1, ResNet-50 ~3.8 GMACs); False is "v1.5", torchvision's layout (stride on the 3x3)."""

    expansion = 4

    @staticmethod
    def conv_specs(in_channels, planes, stride, stride_in_1x1):
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        return [(in_channels, planes, 1, s1), (planes, planes, 3, s3), (planes, planes * 4, 1, 1)]


class ResNet(nn.Module):
    """Stem, stages of blocks, global average pooling, fc.

    `stem="imagenet"`: 7x7/2 conv, BN, ReLU, 3x3/2 max pool (v1, Table 1).
    `stem="cifar"`: 3x3 conv, BN, ReLU (v1, section 4.2); a full pre-activation net drops the BN-ReLU
    (the first unit activates before the split) and a ReLU-only pre-activation net drops the ReLU.
    Pre-activation nets end with the activation the last unit lacks (v2: an extra BN-ReLU) before pooling.
    Global average pooling makes every net fully convolutional: any input size works.
    """

    def __init__(
        self,
        block: type[ResidualBlock],
        layers: tuple[int, ...],
        *,
        stem: str,
        width: int,
        num_classes: int,
        in_channels: int,
        unit: Unit,
        shortcut: str | None,
        skip: str,
        skip_params: dict,
        stride_in_1x1: bool,
        zero_init_residual: bool,
    ):
        super().__init__()
        preact = unit.preact  # e.g. ("bn", "relu") for full pre-activation, () for the others
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
            stem_ops = [self.conv1, self.bn1, self.relu, self.maxpool]
            first_mode = "none"  # the stem already ends activated
        elif stem == "cifar":
            self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
            stem_ops = [self.conv1]
            if "bn" not in preact:
                self.bn1 = nn.BatchNorm2d(width)
                stem_ops.append(self.bn1)
            if not preact:
                self.relu = nn.ReLU(inplace=True)
                stem_ops.append(self.relu)
            first_mode = "both"
        else:
            raise ValueError(f"stem {stem!r}; valid: imagenet, cifar")
        self._stem = stem_ops

        channels = width
        for i, n_blocks in enumerate(layers):
            planes = width * 2**i
            stage = []
            for b in range(n_blocks):
                mode = "branch"
                if b == 0 and preact:
                    mode = first_mode if i == 0 else "both"
                stage.append(
                    block(
                        channels,
                        planes,
                        2 if (b == 0 and i > 0) else 1,
                        unit=unit,
                        shortcut_option=shortcut,
                        skip=skip,
                        skip_params=skip_params,
                        stride_in_1x1=stride_in_1x1,
                        preact_mode=mode,
                    )
                )
                channels = planes * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
        self.num_stages = len(layers)
        final: list[nn.Module] = []
        if "bn" in preact:
            self.bn_final = nn.BatchNorm2d(channels)
            final.append(self.bn_final)
        if preact:
            final.append(nn.ReLU(inplace=True))
        self._final = final
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        self.num_features = channels

        # He ("MSRA") initialisation, as both papers and torchvision.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, ResidualBlock):
                    m.zero_init_last()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for m in self._stem:
            x = m(x)
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{i}")(x)
        for m in self._final:
            x = m(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.forward_features(x))
        return self.fc(torch.flatten(x, 1))
