"""The one constructor: `create_model(name, **overrides)`, over the rows of `models/zoo.py`."""

from __future__ import annotations

import difflib

from torch import nn

from .resnet import BasicBlock, ResNet
from .units import SHORTCUTS, SKIP_PARAMS, SKIPS, UNITS

# What a caller may override, with the defaults every row shares.
DEFAULTS = dict(
    in_channels=3,
    unit="original",
    skip="identity",
    zero_init_residual=False,
)
OVERRIDABLE = (
    "num_classes",
    "in_channels",
    "width",
    "zero_init_residual",
    "shortcut",
    "stride_in_1x1",
    "unit",
    "skip",
    *sorted({k for params in SKIP_PARAMS.values() for k in params}),
)

_REGISTRY: dict[str, dict] = {}


def register_model(name: str, row: dict) -> None:
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[name] = row


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_row(name: str) -> dict:
    """The row of `name` (defaults filled in), or a ValueError listing close matches."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(str(name), _REGISTRY, n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} Known models: {', '.join(list_models())}")
    return dict(DEFAULTS, **_REGISTRY[name])


def _check_int(key: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key} must be an integer >= {minimum}, got {value!r}")


def _check_number(key: str, value, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ValueError(f"{key} must be a number in [{low}, {high}], got {value!r}")


def resolve(name: str, **overrides) -> dict:
    """Row of `name` with `overrides` applied and validated: the full, explicit model config."""
    row = get_row(name)
    unknown = sorted(set(overrides) - set(OVERRIDABLE))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for {name}; valid: {', '.join(OVERRIDABLE)}")
    plain = row["shortcut"] is None
    if plain:
        for key, default in (("shortcut", None), ("unit", "original"), ("skip", "identity")):
            if key in overrides and overrides[key] != default:
                raise ValueError(
                    f"{name} is a plain net: it has no shortcuts, so {key}={overrides[key]!r} means nothing "
                    f"(shortcut, unit and skip describe residual units; use a resnet* model)"
                )
    cfg = dict(row, **overrides)

    _check_int("num_classes", cfg["num_classes"], 1)
    _check_int("in_channels", cfg["in_channels"], 1)
    _check_int("width", cfg["width"], 1)
    for key in ("zero_init_residual", "stride_in_1x1"):
        if not isinstance(cfg[key], bool):
            raise ValueError(f"{key} must be True or False, got {cfg[key]!r}")
    if not plain and cfg["shortcut"] not in SHORTCUTS:
        raise ValueError(f"shortcut must be one of {', '.join(SHORTCUTS)}, got {cfg['shortcut']!r}")
    if cfg["unit"] not in UNITS:
        raise ValueError(f"unit must be one of {', '.join(UNITS)}, got {cfg['unit']!r}")
    if cfg["skip"] not in SKIPS:
        raise ValueError(f"skip must be one of {', '.join(SKIPS)}, got {cfg['skip']!r}")
    if cfg["block"] is BasicBlock and overrides.get("stride_in_1x1") is True:
        raise ValueError(
            f"{name} has basic blocks (two 3x3 convs): stride_in_1x1=True applies to bottleneck blocks only"
        )
    # Skip parameters: only the chosen variant's, with the paper's defaults.
    wanted = SKIP_PARAMS.get(cfg["skip"], {})
    for key in OVERRIDABLE[OVERRIDABLE.index("skip") + 1 :]:
        if key in overrides and key not in wanted:
            owners = [s for s, p in SKIP_PARAMS.items() if key in p]
            raise ValueError(f"{key} applies to skip={' or '.join(owners)}, not skip={cfg['skip']!r}")
    cfg["skip_params"] = {k: cfg.pop(k, v) for k, v in wanted.items()}
    for key in ("shortcut_scale", "residual_scale"):
        if key in cfg["skip_params"]:
            _check_number(key, cfg["skip_params"][key], 0.0, 10.0)
    if "skip_dropout" in cfg["skip_params"]:
        _check_number("skip_dropout", cfg["skip_params"]["skip_dropout"], 0.0, 0.99)
    for key in ("shortcut_bn", "skip_dropout_inverted"):
        if key in cfg["skip_params"] and not isinstance(cfg["skip_params"][key], bool):
            raise ValueError(f"{key} must be True or False, got {cfg['skip_params'][key]!r}")
    if "gate_bias" in cfg["skip_params"]:
        _check_number("gate_bias", cfg["skip_params"]["gate_bias"], -100.0, 100.0)
    return cfg


def unstated_layout(name: str, overrides: dict) -> str | None:
    """Why loading a state_dict of unknown origin into `name` is ambiguous, or None if it is not.

    The v1 bottleneck (stride on the first 1x1, our default) and torchvision's v1.5 (stride on the 3x3)
    have the same parameter names and shapes, so a torchvision `resnet50` state_dict loads into our
    `resnet50` with strict=True and silently computes something else (logits differ by several units).
    """
    from .resnet import Bottleneck

    if get_row(name)["block"] is not Bottleneck or "stride_in_1x1" in overrides:
        return None
    return (
        f"{name} is a bottleneck net in the paper's v1 layout (stride on the first 1x1) unless told otherwise; "
        f"a state_dict without this project's metadata (e.g. torchvision's, v1.5: stride on the 3x3) loads into "
        f"it without error but computes different logits. State the layout: stride_in_1x1=False for torchvision "
        f"weights, stride_in_1x1=True for the paper's v1"
    )


def create_model(name: str, **overrides) -> nn.Module:
    """Build the registered network `name`; keyword arguments override its row (see OVERRIDABLE)."""
    cfg = resolve(name, **overrides)
    return ResNet(
        cfg["block"],
        cfg["layers"],
        stem=cfg["stem"],
        width=cfg["width"],
        num_classes=cfg["num_classes"],
        in_channels=cfg["in_channels"],
        unit=UNITS[cfg["unit"]],
        shortcut=cfg["shortcut"],
        skip=cfg["skip"],
        skip_params=cfg["skip_params"],
        stride_in_1x1=cfg["stride_in_1x1"],
        zero_init_residual=cfg["zero_init_residual"],
    )
