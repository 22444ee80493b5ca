"""The typed training config: YAML files plus dotted command-line overrides, validated.

Unknown keys and wrong types are errors that name the key. Derived values (per-worker batch, the
learning rate scaled to the global batch) are computed in one place, `derived()`, and logged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message names the key."""


@dataclass
class ModelConfig:
    name: str = "resnet20"  # a name from models.list_models()
    overrides: dict = field(default_factory=dict)  # keyword overrides for models.create_model


@dataclass
class DataConfig:
    url: str = "data/digits"  # folder or s3://bucket/prefix holding manifest.json
    kind: str = "cifar"  # transforms: "cifar" (pad-and-crop) or "imagenet" (scale augmentation)
    size: int = 32  # training crop side in pixels
    test_size: int = 0  # test crop side (0: same as size); ImageNet: 224 after resizing to 256
    resize: int = 0  # ImageNet test: shorter side before the centre crop (0: size * 256 / 224)
    scale_range: list = field(default_factory=list)  # ImageNet train: shorter-side range ([] = [256, 480] x size/224)
    pca_lighting: float = 0.0  # AlexNet PCA colour augmentation std (v1 uses 0.1); 0 disables
    num_workers: int = 1  # data-loader processes per training worker
    # "gpu": loader processes only read shards; JPEG decoding (nvJPEG) and the ImageNet train/test
    # crops run on the training device (the same code on CPU when there is no GPU). ImageNet kind only.
    decode_on: str = "cpu"
    shuffle_buffer: int = 1000  # samples held for shuffling, across the run's readers (pipelines/order.py)
    # The run's canonical readers (MosaicML streaming's num_canonical_nodes): the training order depends on
    # it, never on the world size or the loader processes; world sizes that divide it read shards best.
    streams: int = 64
    cache_dir: str = ""  # local shard cache for S3 ("" = stream without caching)
    # bad shards/samples in training: "raise" (an error naming shard and sample) or "skip" (counted,
    # logged as the metric skipped_samples and in the epoch line); evaluation always raises
    on_error: str = "raise"
    train_split: str = "train"
    val_split: str = "val"


@dataclass
class OptimConfig:
    batch_size: int = 128  # global mini-batch (all workers together)
    lr: float = 0.1  # learning rate at lr_reference_batch; scaled linearly to batch_size
    lr_reference_batch: int = 128
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False
    label_smoothing: float = 0.0


@dataclass
class ScheduleConfig:
    epochs: int = 10  # one epoch = one pass over the train split
    max_iters: int = 0  # stop after this many iterations (v1 CIFAR: 64k), mid-epoch if need be; 0 = run all epochs
    kind: str = "step"  # "step": /10 at milestones; "plateau": /10 when val error stalls; "cosine"
    milestones: list = field(default_factory=list)  # in `milestone_unit`s
    milestone_unit: str = "epoch"  # "epoch" or "iter"
    gamma: float = 0.1
    plateau_patience: int = 5  # epochs without a val-error improvement before /10
    warmup_lr: float = 0.0  # v1 ResNet-110: 0.01 until train error < 80 %, then the base lr
    warmup_iters: int = 0  # warm up at most this many iterations
    warmup_until_train_err: float = 0.0  # leave warm-up early once train top-1 error (%) drops below this


@dataclass
class ScalingConfig:
    # Training workers: a number, or [min, max] for elastic training (Ray's elastic ScalingConfig): the run
    # starts with as many as the cluster can place, goes on with fewer when a node is lost (from the last
    # checkpoint), and grows back at the next resize check. The global batch (optim.batch_size) and the
    # learning-rate schedule are the same at every size.
    num_workers: int | list = 2
    resize_interval_s: float = 60.0  # elastic: how often Ray checks whether more workers fit (a resize restarts from the last checkpoint)
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    sync_batchnorm: bool = False
    bf16: bool = True  # autocast to bfloat16 on GPU (ignored on CPU)
    channels_last: bool = True  # on GPU (ignored on CPU)
    compile: bool = False  # torch.compile the model (minutes of compile time at start-up; pays off in long runs)

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if isinstance(self.num_workers, list) else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[1] if isinstance(self.num_workers, list) else self.num_workers


@dataclass
class CheckpointConfig:
    every_epochs: int = 1
    every_steps: int = 0  # also a checkpoint every this many global steps, mid-epoch (0: only at epoch ends)
    every_minutes: float = 0.0  # also a checkpoint when this many minutes passed since the last one (0: never)
    keep_best: int = 2  # best by val top-1 error; the latest is always kept for resume
    max_failures: int = 2  # worker-group restarts from the last checkpoint
    max_preemptions: int = -1  # restarts after node preemptions (drains), counted apart from failures; -1: no limit
    # Preemption notices (a drained node) are polled every this many steps, at a step boundary that every
    # rank reaches (the poll is a barrier); 0: about every 5 s of training, measured at the start.
    preemption_poll_steps: int = 0
    node_wait_s: float = 300.0  # how long a run waits for lost nodes to come back before it fails


@dataclass
class TrackingConfig:
    experiment: str = "resnet-train"
    run_name: str = ""  # "" = a deterministic name from the config, so a rerun resumes
    log_model: bool = True


@dataclass
class DebugConfig:
    # Fault injection for tests and drills: kill one worker process once at this epoch (-1: never).
    kill_worker_at_epoch: int = -1
    kill_marker: str = ""  # file created when the kill happened, so it happens only once
    kill_worker_at_step: int = -1  # SIGKILL the last rank's process once, just before this global step (-1: never)
    trace_dir: str = ""  # each rank appends the sample keys of every step it trains here (drills count them)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    seed: int = 0


CHOICES = {
    "data.kind": ("cifar", "imagenet"),
    "data.decode_on": ("cpu", "gpu"),
    "data.on_error": ("raise", "skip"),
    "schedule.kind": ("step", "plateau", "cosine"),
    "schedule.milestone_unit": ("epoch", "iter"),
}


# ---------------------------------------------------------------------------------------------
# Building a dataclass from nested dicts, with type checks.


def _check_type(key: str, value, hint):
    origin = typing.get_origin(hint)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool):
        if type(value) is not hint:
            raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r} ({type(value).__name__})")
        return value
    if hint in (list, dict) or origin in (list, dict):
        expected = origin or hint
        if not isinstance(value, expected):
            raise ConfigError(f"{key}: expected a {expected.__name__}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(hint):
            try:
                return _check_type(key, value, arm)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: {value!r} does not fit {hint}")
    return value


def from_dict(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f" in {prefix.rstrip('.')}" if prefix else ""
        raise ConfigError(f"unknown key(s) {', '.join(prefix + k for k in unknown)}{where}; valid: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in data.items():
        key = prefix + name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = from_dict(hint, value, key + ".")
        else:
            kwargs[name] = _check_type(key, value, hint)
            if key in CHOICES and kwargs[name] not in CHOICES[key]:
                raise ConfigError(f"{key}: {value!r} is not one of {', '.join(CHOICES[key])}")
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], object]:
    """`a.b.c=value` -> (["a", "b", "c"], value parsed as YAML, so 3, 0.1, true, [1, 2] keep their types)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({e})") from None
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = json.loads(json.dumps(data))  # deep copy of plain data
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return data


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        alt = CONFIG_DIR / path.name
        if alt.exists():
            path = alt
        else:
            known = ", ".join(sorted(p.name for p in CONFIG_DIR.glob("*.yaml")))
            raise ConfigError(f"config file {str(path)!r} not found; bundled configs: {known}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def load_train_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    data = load_yaml(path) if path else {}
    data.pop("command", None)  # configs may record their command; it is documentation
    cfg = from_dict(TrainConfig, apply_overrides(data, list(overrides)))
    validate(cfg)
    # Workers and Tune trials run in other working directories: pin local data paths now.
    if "://" not in cfg.data.url:
        cfg.data.url = str(Path(cfg.data.url).expanduser().resolve())
    return cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def validate(cfg: TrainConfig) -> None:
    from models import resolve

    try:
        resolve(cfg.model.name, **cfg.model.overrides)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None
    _check_workers(cfg.scaling.num_workers)
    positive = {
        "optim.batch_size": cfg.optim.batch_size,
        "optim.lr_reference_batch": cfg.optim.lr_reference_batch,
        "schedule.epochs": cfg.schedule.epochs,
        "checkpoint.every_epochs": cfg.checkpoint.every_epochs,
        "checkpoint.keep_best": cfg.checkpoint.keep_best,
        "data.size": cfg.data.size,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be > 0, got {value}")
    non_negative = {
        "checkpoint.every_steps": cfg.checkpoint.every_steps,
        "checkpoint.every_minutes": cfg.checkpoint.every_minutes,
        "checkpoint.preemption_poll_steps": cfg.checkpoint.preemption_poll_steps,
        "scaling.resize_interval_s": cfg.scaling.resize_interval_s,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
    if cfg.optim.batch_size < cfg.scaling.max_workers:
        raise ConfigError(
            f"optim.batch_size={cfg.optim.batch_size} is the global batch: it must give each of the "
            f"{cfg.scaling.max_workers} workers at least one sample"
        )
    if cfg.schedule.max_iters < 0:
        raise ConfigError(f"schedule.max_iters must be >= 0 (0: no limit), got {cfg.schedule.max_iters}")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"optim.lr must be > 0, got {cfg.optim.lr}")
    if cfg.schedule.kind == "step" and sorted(cfg.schedule.milestones) != list(cfg.schedule.milestones):
        raise ConfigError(f"schedule.milestones must be increasing, got {cfg.schedule.milestones}")
    w = cfg.schedule
    if w.warmup_lr > 0 and w.warmup_iters <= 0 and w.warmup_until_train_err <= 0:
        raise ConfigError("schedule.warmup_lr needs schedule.warmup_iters > 0 or schedule.warmup_until_train_err > 0")
    if cfg.data.decode_on == "gpu" and cfg.data.kind != "imagenet":
        raise ConfigError("data.decode_on=gpu is for data.kind=imagenet (JPEG decoding and scale augmentation on the GPU)")
    sr = cfg.data.scale_range
    if sr and (len(sr) != 2 or sr[0] > sr[1] or sr[0] < cfg.data.size):
        raise ConfigError(f"data.scale_range must be [low, high] with data.size <= low <= high, got {sr}")


def _check_workers(value) -> None:
    if isinstance(value, list):
        if len(value) != 2 or not all(type(v) is int for v in value) or not 1 <= value[0] <= value[1]:
            raise ConfigError(f"scaling.num_workers: {value!r} must be a number of workers or [min, max] with 1 <= min <= max")
    elif value <= 0:
        raise ConfigError(f"scaling.num_workers must be > 0, got {value}")


def derived(cfg: TrainConfig) -> dict:
    """Values computed from the config, in one place (logged with the run)."""
    per_worker = -(-cfg.optim.batch_size // cfg.scaling.max_workers)
    return {
        "global_batch": cfg.optim.batch_size,  # the same at every world size (elastic runs included)
        "per_worker_batch": per_worker,  # at the largest world size; shares of the global batch differ by <= 1
        "lr_scaled": cfg.optim.lr * cfg.optim.batch_size / cfg.optim.lr_reference_batch,
        "backend": "nccl" if cfg.scaling.use_gpu else "gloo",
        "test_size": cfg.data.test_size or cfg.data.size,
    }


def config_hash(cfg: TrainConfig) -> str:
    """A short stable hash of what determines the result: the values that differ from the defaults (not
    debugging switches, not the run name). A key added later at its default leaves every name as it was,
    so a rerun of an existing config still finds its run and resumes it."""
    ignored = ("debug.", "tracking.run_name")
    data, default = flatten(to_dict(cfg)), flatten(to_dict(TrainConfig()))
    diff = {k: v for k, v in data.items() if not k.startswith(ignored) and (k not in default or default[k] != v)}
    return hashlib.sha256(json.dumps(diff, sort_keys=True).encode()).hexdigest()[:8]


def run_name(cfg: TrainConfig) -> str:
    return cfg.tracking.run_name or f"{cfg.model.name}-{config_hash(cfg)}"


def flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in data.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
