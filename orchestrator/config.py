"""Every kind of config file, typed: YAML files plus dotted command-line overrides, validated by one mechanism.

Three kinds, one folder each under orchestrator/configs/, every file found by its bare name too:
recipes (`TrainConfig`: one training run), studies (`StudyConfig`: an ablation study of the papers) and
ensembles (`EnsembleConfig`). Each kind is a `Schema`: a tree of dataclasses (typed keys, defaults,
comments), the closed choices of its keys, and a `finish` function that checks the rules spanning
keys and computes derived values, in one place. Unknown keys, wrong types and values outside their
choices are errors that name the key and what is valid. A training run's derived values (per-worker
batch, the learning rate scaled to the global batch) are `derived()`, logged with the run.

Dataclasses rather than pydantic: the schemas stay plain standard-library classes that any module (and
Ray's pickling) handles without a dependency whose major version Ray decides, and the checks with their
messages are the ~60 lines of `from_dict` below. The module is over 500 lines because every kind's
schema is here, so that one file lists every key of every config file.
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
class ProgressiveConfig:
    """FFCV's progressive resizing: the train crop is `min_size` up to `start_epoch`, `data.size` from
    `end_epoch`, linear in between rounded to a multiple of `multiple` (epochs counted from 0)."""

    min_size: int = 0  # 0: off (the train crop is data.size throughout)
    start_epoch: int = 0
    end_epoch: int = 0
    multiple: int = 32


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
    # Today's recipes (torchvision v2, ResNet strikes back, FFCV). Each default is the papers' behaviour.
    # ImageNet train crop: "scale" (v1: shorter side random in scale_range, then a random `size` crop) or
    # "random_resized" (Inception's RandomResizedCrop: 8-100 % of the area, aspect 3/4-4/3, resized to `size`)
    crop: str = "scale"
    auto_augment: str = ""  # per-image policy after crop and flip: "" (none), "trivial_augment_wide", "rand_augment"
    rand_augment: list = field(default_factory=lambda: [2, 9])  # [operations, magnitude] of rand_augment
    random_erasing: float = 0.0  # probability of erasing a random rectangle (after normalising, value 0)
    # Batch-level MixUp / CutMix (0 disables each): targets become soft (mixed one-hot); see orchestrator.step.
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    cutmix_prob: float = 0.5  # with both on: the chance that a batch gets CutMix rather than MixUp (timm's switch_prob)
    mix_prob: float = 1.0  # the chance that a batch is mixed at all
    progressive: ProgressiveConfig = field(default_factory=ProgressiveConfig)


@dataclass
class OptimConfig:
    batch_size: int = 128  # global mini-batch (all workers together)
    lr: float = 0.1  # learning rate at lr_reference_batch; scaled linearly to batch_size
    lr_reference_batch: int = 128
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False
    label_smoothing: float = 0.0
    optimizer: str = "sgd"  # "sgd" or "lamb" (ResNet strikes back: timm's LAMB, orchestrator.step.Lamb)
    loss: str = "ce"  # "ce" (softmax cross-entropy) or "bce" (one-vs-all binary cross-entropy, ResNet strikes back)
    bce_target_threshold: float | None = None  # bce: targets above it become 1, the others 0 (RSB: 0.2); None: kept soft
    # Parameters without weight decay: "none" (v1: every parameter decays), "norm" (the norm layers' weights
    # and biases: torchvision's --norm-weight-decay 0), "norm_and_bias" (those and every bias: timm's rule)
    no_weight_decay: str = "none"


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
    # Linear warm-up (today's recipes): from warmup_start_factor x lr to lr over the first warmup_epochs, then
    # `kind` ("cosine" and "linear_decay" then decay to 0 over the remaining epochs; milestones stay where they are).
    warmup_epochs: int = 0
    warmup_start_factor: float = 0.01  # torchvision's --lr-warmup-decay; FFCV starts at 1e-4
    # How often the learning rate changes: "iter" (every iteration) or "epoch" (once per epoch, as
    # torchvision's and timm's schedulers step): for warm-up, cosine and linear_decay.
    granularity: str = "iter"


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
class EMAConfig:
    """An exponential moving average of the weights (torchvision's --model-ema): evaluated at every epoch's end
    beside the weights (val_top1_err_ema), checkpointed and restored on resume. With it on, the run's model
    (the checkpoint's "model", the MLflow model, what ensembles and studies score) is the average."""

    decay: float = 0.0  # 0: off; torchvision's --model-ema-decay (0.99998), adjusted as below
    every_steps: int = 32  # updated after every this-many steps of an epoch (torchvision's --model-ema-steps)
    # torchvision's adjustment: the decay per update is 1 - (1 - decay) x global batch x every_steps / epochs
    # (at most 1 - 0); false: `decay` is the decay per update as written
    adjust: bool = True


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
    # A drill's pace: each training step lasts at least this long (the rest of it asleep), so that a drill's
    # events (a kill, a drain, a node that comes back) land mid-run however fast the machine trains (0: off).
    min_step_seconds: float = 0.0


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
    ema: EMAConfig = field(default_factory=EMAConfig)


CHOICES = {
    "data.kind": ("cifar", "imagenet"),
    "data.decode_on": ("cpu", "gpu"),
    "data.on_error": ("raise", "skip"),
    "data.crop": ("scale", "random_resized"),
    "data.auto_augment": ("", "trivial_augment_wide", "rand_augment"),
    "optim.optimizer": ("sgd", "lamb"),
    "optim.loss": ("ce", "bce"),
    "optim.no_weight_decay": ("none", "norm", "norm_and_bias"),
    "schedule.kind": ("step", "plateau", "cosine", "linear_decay"),
    "schedule.milestone_unit": ("epoch", "iter"),
    "schedule.granularity": ("iter", "epoch"),
}


# ---------------------------------------------------------------------------------------------
# The mechanism, for every kind of config: a dataclass tree built from nested dicts, each value
# checked against its type hint, each closed choice against its list. `choices` maps a dotted key
# to its valid values (a tuple, or a function that returns one, for lists that live in modules too
# heavy to import for --help); in a key, `[]` stands for any list item and `*` for any mapping key
# (`scales.*.rows[].model`).


def _choices_of(choices: dict, pattern: str) -> tuple | None:
    valid = choices.get(pattern)
    return valid() if callable(valid) else valid


def _check_choice(key: str, value, valid: tuple) -> None:
    for v in value if isinstance(value, list) else [value]:
        if v not in valid:
            raise ConfigError(f"{key}: {v!r} is not one of {', '.join(map(str, valid))}")


def _check_type(key: str, value, hint, pattern: str = "", choices: dict | None = None):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool):
        if type(value) is not hint:
            raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r} ({type(value).__name__})")
        return value
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, key + ".", choices, pattern + ".")
    if hint in (list, dict) or origin in (list, dict):
        expected = origin or hint
        if not isinstance(value, expected):
            raise ConfigError(f"{key}: expected a {expected.__name__}, got {value!r}")
        if origin is list and args:  # list[X]: every item an X
            return [_check_type(f"{key}[{i}]", v, args[0], pattern + "[]", choices) for i, v in enumerate(value)]
        if origin is dict and len(args) == 2 and dataclasses.is_dataclass(args[1]):  # dict[str, Schema]
            return {k: _check_type(f"{key}.{k}", v, args[1], pattern + ".*", choices) for k, v in value.items()}
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arm in args:
            try:
                return _check_type(key, value, arm, pattern, choices)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: {value!r} does not fit {hint}")
    return value


def from_dict(cls, data: dict, prefix: str = "", choices: dict | None = None, pattern: str | None = None):
    """`cls` built from the mapping `data`: unknown keys and wrong types are errors naming the key and the
    valid keys or choices. `choices`: the closed choices of the kind (default: the kind whose root is `cls`)."""
    if choices is None:
        choices = next((s.choices for s in SCHEMAS.values() if s.root is cls), {})
    pattern = prefix if pattern is None else pattern
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = f" in {prefix.rstrip('.')}" if prefix else ""
        raise ConfigError(f"unknown key(s) {', '.join(prefix + k for k in unknown)}{where}; valid: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in data.items():
        key = prefix + name
        kwargs[name] = _check_type(key, value, hints[name], pattern + name, choices)
        valid = _choices_of(choices, pattern + name)
        if valid is not None:
            _check_choice(key, kwargs[name], valid)
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


# Where each kind's files live, under orchestrator/configs/. A bare name (`digits_resnet20.yaml`) or a
# path that does not exist is looked up by its file name in its kind's folder.
FOLDERS = {"recipe": "recipes", "study": "studies", "ensemble": "ensembles"}


def list_configs(kind: str) -> list[str]:
    return sorted(p.name for p in (CONFIG_DIR / FOLDERS[kind]).glob("*.yaml"))


def find_config(path: str | Path, kind: str) -> Path:
    """The file at `path`, or the bundled `kind` config of that file name."""
    path = Path(path)
    if path.exists():
        return path
    bundled = CONFIG_DIR / FOLDERS[kind] / path.name
    if bundled.exists():
        return bundled
    other = next((k for k in FOLDERS if (CONFIG_DIR / FOLDERS[k] / path.name).exists()), None)
    if other:
        raise ConfigError(f"{path.name} is one of the {other} configs (orchestrator/configs/{FOLDERS[other]}/), not of "
                          f"the {kind} configs: {', '.join(list_configs(kind))}")
    raise ConfigError(f"config file {str(path)!r} not found; bundled {kind} configs: {', '.join(list_configs(kind))}")


def load_yaml(path: str | Path, kind: str = "recipe") -> dict:
    path = find_config(path, kind)
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


@dataclass(frozen=True)
class Schema:
    """One kind of config file: its root dataclass (typed keys, defaults, comments), the closed choices of
    its keys, and `finish`, which checks the rules that span keys and computes derived values, once."""

    root: type
    choices: dict
    finish: typing.Callable


def load_config(kind: str, path: str | Path | None, overrides: list[str] = ()):
    """A `kind` config (recipe, study, ensemble) from its file (none: the defaults) and dotted overrides."""
    schema = SCHEMAS[kind]
    data = load_yaml(path, kind) if path else {}
    data.pop("command", None)  # configs may record their command; it is documentation
    cfg = from_dict(schema.root, apply_overrides(data, list(overrides)), choices=schema.choices)
    schema.finish(cfg)
    return cfg


def load_train_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    return load_config("recipe", path, overrides)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def finish_train(cfg: TrainConfig) -> None:
    validate(cfg)
    # Workers and Tune trials run in other working directories: pin local data paths now.
    if "://" not in cfg.data.url:
        cfg.data.url = str(Path(cfg.data.url).expanduser().resolve())


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
        "debug.min_step_seconds": cfg.debug.min_step_seconds,
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
    _validate_recipe(cfg)


def _validate_recipe(cfg: TrainConfig) -> None:
    """The keys of today's recipes (augmentation, mixing, EMA, warm-up, LAMB, progressive resizing)."""
    d, o, s, e = cfg.data, cfg.optim, cfg.schedule, cfg.ema
    for key, p in {"data.random_erasing": d.random_erasing, "data.cutmix_prob": d.cutmix_prob,
                   "data.mix_prob": d.mix_prob, "optim.label_smoothing": o.label_smoothing}.items():
        if not 0 <= p <= 1:
            raise ConfigError(f"{key} is a probability: 0 <= {key} <= 1, got {p}")
    if d.mixup_alpha < 0 or d.cutmix_alpha < 0:
        raise ConfigError(f"data.mixup_alpha and data.cutmix_alpha must be >= 0 (0: off), got {d.mixup_alpha}, {d.cutmix_alpha}")
    if d.crop != "scale" and d.kind != "imagenet":
        raise ConfigError(f"data.crop={d.crop} is an ImageNet train crop (data.kind=imagenet); data.kind={d.kind} pads and crops")
    ra = d.rand_augment
    if len(ra) != 2 or not all(type(v) is int and v >= 0 for v in ra) or ra[1] > 30:
        raise ConfigError(f"data.rand_augment must be [operations, magnitude] (integers, magnitude 0-30), got {ra}")
    if o.bce_target_threshold is not None and (o.loss != "bce" or not 0 <= o.bce_target_threshold < 1):
        raise ConfigError(f"optim.bce_target_threshold is for optim.loss=bce, in [0, 1); got {o.bce_target_threshold} "
                          f"with optim.loss={o.loss}")
    if s.warmup_epochs < 0 or not 0 <= s.warmup_start_factor <= 1:
        raise ConfigError(f"schedule.warmup_epochs must be >= 0 and schedule.warmup_start_factor in [0, 1], got "
                          f"{s.warmup_epochs}, {s.warmup_start_factor}")
    if s.warmup_epochs and s.warmup_lr > 0:
        raise ConfigError("schedule.warmup_epochs (a linear warm-up) and schedule.warmup_lr (v1's constant warm-up) "
                          "exclude each other: set one")
    if s.warmup_epochs >= s.epochs and s.kind in ("cosine", "linear_decay"):
        raise ConfigError(f"schedule.warmup_epochs={s.warmup_epochs} leaves no epoch for the {s.kind} decay "
                          f"(schedule.epochs={s.epochs})")
    if not 0 <= e.decay < 1 or e.every_steps <= 0:
        raise ConfigError(f"ema.decay must be in [0, 1) (0: off) and ema.every_steps > 0, got {e.decay}, {e.every_steps}")
    pr = d.progressive
    if pr.min_size:
        if not 0 < pr.min_size <= d.size or pr.multiple <= 0 or not 0 <= pr.start_epoch <= pr.end_epoch:
            raise ConfigError(
                "data.progressive needs 0 < min_size <= data.size, multiple > 0 and 0 <= start_epoch <= end_epoch; "
                f"got min_size={pr.min_size}, data.size={d.size}, multiple={pr.multiple}, epochs {pr.start_epoch}-{pr.end_epoch}")


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
        "train_sizes": _train_sizes(cfg),
        "ema_decay_per_update": ema_decay(cfg),
    }


def train_size(cfg: TrainConfig, epoch: int) -> int:
    """The train crop of `epoch` (from 0): data.size, or FFCV's progressive resizing (its `get_resolution`):
    min_size up to start_epoch, data.size from end_epoch, linear between, rounded to a multiple."""
    p, size = cfg.data.progressive, cfg.data.size
    if not p.min_size or epoch >= p.end_epoch:
        return size
    if epoch <= p.start_epoch:
        return p.min_size
    at = p.min_size + (size - p.min_size) * (epoch - p.start_epoch) / (p.end_epoch - p.start_epoch)
    return int(round(at / p.multiple)) * p.multiple


def _train_sizes(cfg: TrainConfig) -> str:
    """The train crop per epoch, as ranges of epochs counted from 1 (as the console does): "176" or
    "160 px epochs 1-18; 192 px epochs 19-24"."""
    sizes = [train_size(cfg, e) for e in range(cfg.schedule.epochs)]
    if len(set(sizes)) == 1:
        return str(sizes[0])
    runs, first = [], 0
    for e in range(1, len(sizes) + 1):
        if e == len(sizes) or sizes[e] != sizes[first]:
            runs.append(f"{sizes[first]} px epoch{'s' if e - first > 1 else ''} {first + 1}" + (f"-{e}" if e - first > 1 else ""))
            first = e
    return "; ".join(runs)


def ema_decay(cfg: TrainConfig) -> float:
    """The EMA's decay per update (0: no EMA). torchvision's reference adjusts its --model-ema-decay to the
    global batch, the update period and the epochs: alpha = (1 - decay) x G x every_steps / epochs, at most 1."""
    e = cfg.ema
    if not e.decay or not e.adjust:
        return e.decay
    return 1.0 - min(1.0, (1.0 - e.decay) * cfg.optim.batch_size * e.every_steps / cfg.schedule.epochs)


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


# ---------------------------------------------------------------------------------------------
# Ensemble configs (orchestrator/configs/ensembles/): `python -m orchestrator.run ensemble`.


def protocols() -> tuple[str, ...]:
    """The test protocols: one list, `pipelines.transforms.PROTOCOLS` (imported only when a config names one)."""
    from pipelines.transforms import PROTOCOLS

    return PROTOCOLS


@dataclass
class MemberSpec:
    label: str = ""  # unique; default: the model name (or member<i>)
    model: str = ""  # registry name; for `mlflow_run` members it is read from the run
    overrides: dict = field(default_factory=dict)  # models.create_model overrides
    train: list = field(default_factory=list)  # dotted training overrides for this member (e.g. seed=1)
    checkpoint: str = ""  # bring your own weights: our checkpoint.pt or a (torchvision-layout) state_dict
    mlflow_run: str = ""  # a member trained earlier: its MLflow run id


@dataclass
class EvaluationConfig:
    split: str = "val"
    protocol: str = "center"  # one of protocols() (the data kind must support it)
    batch_size: int = 128


@dataclass
class RegistryConfig:
    alias: str = "champion"


@dataclass
class BatchEvalConfig:
    split: str = "test"


@dataclass
class EnsembleConfig:
    name: str = "resnet-ensemble"  # registered model name
    experiment: str = "ensemble"
    source: str = ""  # pipelines source to write shards from when the data has none yet ("" = never)
    storage: str = "./runs"  # results, checkpoints, predictions (a multi-node cluster needs s3://...); --storage wins
    base: str = "digits_resnet20.yaml"  # the training recipe every member starts from
    base_overrides: list = field(default_factory=list)  # dotted overrides for every member
    members: list[MemberSpec] = field(default_factory=list)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    batch_eval: BatchEvalConfig = field(default_factory=BatchEvalConfig)


def finish_ensemble(cfg: EnsembleConfig) -> None:
    if not cfg.members:
        raise ConfigError("members: an ensemble needs at least one member")
    for i, m in enumerate(cfg.members):
        m.label = m.label or m.model or f"member{i}"
        sources = [bool(m.model and not (m.checkpoint or m.mlflow_run)), bool(m.checkpoint), bool(m.mlflow_run)]
        if sum(sources) != 1 or (m.checkpoint and not m.model):
            raise ConfigError(
                f"members[{i}] ({m.label}): give `model` (to train it), `model` + `checkpoint` (weights you have), "
                f"or `mlflow_run` (a run trained earlier)"
            )
    labels = [m.label for m in cfg.members]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"members: labels must be unique, got {labels}")


# ---------------------------------------------------------------------------------------------
# Study configs (orchestrator/configs/studies/ablate_<name>.yaml): `python -m orchestrator.run ablate`.
# The shape, with an example, is in orchestrator/ablations.py's docstring.

SCALES = ("paper", "demo")  # the papers' recipes on the user's data; the same study shrunk to the digits


@dataclass
class PublishedSpec:
    top1: float | None = None  # error %
    top1_std: float | None = None
    top5: float | None = None
    text: str = ""  # a published outcome that is not a number ("fails", "only in a figure")
    ref: str = ""
    note: str = ""


@dataclass
class EarlyStoppingSpec:  # ASHA on val_top1_err, for a ranking only (--asha / --no-asha)
    enabled: bool = False
    grace_period: int = 1  # epochs every trial runs before it may be stopped
    reduction_factor: float = 3.0


@dataclass
class EvaluationSpec:  # how a base's final checkpoints are scored: the paper's split and test protocols
    split: str = "test"
    protocols: list[str] = field(default_factory=lambda: ["center"])


@dataclass
class BaseSpec:
    config: str = ""  # a recipe (orchestrator/configs/recipes/)
    overrides: list = field(default_factory=list)  # dotted train-config overrides
    evaluation: EvaluationSpec = field(default_factory=EvaluationSpec)


@dataclass
class RowSpec:
    label: str = ""  # unique within the scale
    model: str = ""  # a name from models.list_models()
    base: str = ""  # which base ("": the only one)
    overrides: dict = field(default_factory=dict)  # model overrides (shortcut, unit, skip, width, ...)
    train: list = field(default_factory=list)  # dotted train-config overrides for this row
    seeds: list[int] = field(default_factory=lambda: [0])  # repeats: mean +- std over them in the report
    paper: str | dict | None = None  # a key of `published`, or one per protocol: {ten_crop: k1, multi_scale: k2}
    panel: str = ""  # which panel of the error-curve figure

    def papers(self, protocols: list[str]) -> dict[str, str]:
        """protocol -> key of `published` (a bare key belongs to the base's first protocol)."""
        if isinstance(self.paper, dict):
            return dict(self.paper)
        return {protocols[0]: self.paper} if self.paper is not None else {}


@dataclass
class DegradationSpec:  # v1 sec. 4.1: the deeper plain net trains worse, the deeper ResNet does not
    plain: list = field(default_factory=list)  # [shallower, deeper] row labels
    residual: list = field(default_factory=list)


@dataclass
class VerdictSpec:  # claims computed from the measured training curves
    degradation: DegradationSpec | None = None


@dataclass
class ScaleSpec:
    note: str = ""  # printed in the report header
    source: str = ""  # a pipelines source written to data.url when missing ("" = none)
    bases: dict[str, BaseSpec] = field(default_factory=dict)
    rows: list[RowSpec] = field(default_factory=list)
    verdict: VerdictSpec = field(default_factory=VerdictSpec)


@dataclass
class StudyConfig:
    study: str = ""  # the name on the command line (default: the file name without ablate_)
    title: str = ""  # the report's heading
    experiment: str = ""  # MLflow experiment of the parent run and every child run (default: ablate-<name>)
    published: dict[str, PublishedSpec] = field(default_factory=dict)  # the papers' numbers
    early_stopping: EarlyStoppingSpec = field(default_factory=EarlyStoppingSpec)
    scales: dict[str, ScaleSpec] = field(default_factory=dict)


def finish_study(cfg: StudyConfig) -> None:
    """The rules that span keys, for every scale: bases, rows, papers and verdicts refer to what exists."""
    unknown = sorted(set(cfg.scales) - set(SCALES))
    if unknown:
        raise ConfigError(f"scales: unknown {', '.join(unknown)}; valid: {', '.join(SCALES)}")
    for name, s in cfg.scales.items():
        where = f"scales.{name}"
        if not s.bases:
            raise ConfigError(f"{where}.bases is empty")
        for i, r in enumerate(s.rows):
            _finish_row(cfg, s, r, f"{where}.rows[{i}]")
        labels = [r.label for r in s.rows]
        if not labels or len(set(labels)) != len(labels):
            raise ConfigError(f"{where}.rows must be non-empty with unique labels, got {labels}")
        if s.verdict.degradation is not None:
            for group in ("plain", "residual"):
                pair = getattr(s.verdict.degradation, group)
                if len(pair) != 2 or any(x not in labels for x in pair):
                    raise ConfigError(
                        f"{where}.verdict.degradation.{group} must be [shallower, deeper] row labels of this "
                        f"scale, got {pair!r}; rows: {', '.join(labels)}"
                    )


def _finish_row(cfg: StudyConfig, s: ScaleSpec, r: RowSpec, where: str) -> None:
    if not r.label or not r.model:
        raise ConfigError(f"{where}: needs label and model")
    r.base = r.base or (next(iter(s.bases)) if len(s.bases) == 1 else "")
    if r.base not in s.bases:
        raise ConfigError(f"{where}: base {r.base!r} is not one of {', '.join(s.bases)}")
    protocols = s.bases[r.base].evaluation.protocols
    for proto, key in r.papers(protocols).items():
        if proto not in protocols:
            raise ConfigError(f"{where}: paper for protocol {proto!r}, but base {r.base!r} scores with {', '.join(protocols)}")
        if key not in cfg.published:
            raise ConfigError(f"{where}: paper {key!r} is not a key of `published`")
    if not r.seeds:
        raise ConfigError(f"{where}: seeds must be a non-empty list of integers, got {r.seeds!r}")


SCHEMAS = {
    "recipe": Schema(TrainConfig, CHOICES, finish_train),
    "study": Schema(StudyConfig, {"scales.*.bases.*.evaluation.protocols": protocols}, finish_study),
    "ensemble": Schema(EnsembleConfig, {"evaluation.protocol": protocols}, finish_ensemble),
}
