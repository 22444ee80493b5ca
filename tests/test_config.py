"""The typed training config: files, overrides, validation, derived values, the CLI's answers."""

import subprocess
import sys

import pytest

from orchestrator.config import CONFIG_DIR, ConfigError, derived, load_train_config, run_name

CONFIG_FILES = sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))
TRAIN_CONFIGS = [n for n in CONFIG_FILES if not n.startswith(("ablate_", "ensemble_"))]


@pytest.mark.parametrize("name", TRAIN_CONFIGS)
def test_every_training_config_loads_and_starts_with_its_command(name):
    text = (CONFIG_DIR / name).read_text()
    assert text.startswith("# python -m orchestrator.run "), "a config begins with the command that runs it"
    cfg = load_train_config(CONFIG_DIR / name)
    assert cfg.optim.batch_size % cfg.scaling.num_workers == 0


def test_overrides_keep_yaml_types():
    cfg = load_train_config(
        "digits_resnet20.yaml",
        ["schedule.epochs=3", "optim.lr=0.05", "scaling.use_gpu=false", "schedule.milestones=[1, 2]",
         "model.overrides.shortcut=B"],
    )
    assert cfg.schedule.epochs == 3 and cfg.optim.lr == 0.05 and cfg.scaling.use_gpu is False
    assert cfg.schedule.milestones == [1, 2] and cfg.model.overrides == {"shortcut": "B"}


def test_derived_values_in_one_place():
    cfg = load_train_config("digits_resnet20.yaml", ["optim.batch_size=256", "scaling.num_workers=4", "optim.lr=0.1"])
    d = derived(cfg)
    assert d["per_worker_batch"] == 64 and d["global_batch"] == 256
    assert d["lr_scaled"] == pytest.approx(0.1 * 256 / cfg.optim.lr_reference_batch)


def test_run_name_is_deterministic_and_tracks_the_config():
    a = load_train_config("digits_resnet20.yaml")
    b = load_train_config("digits_resnet20.yaml")
    c = load_train_config("digits_resnet20.yaml", ["optim.lr=0.2"])
    assert run_name(a) == run_name(b) != run_name(c)
    assert run_name(load_train_config("digits_resnet20.yaml", ["debug.kill_worker_at_epoch=1"])) == run_name(a)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.learning_rate=0.1"], "optim.learning_rate"),
        (["optim.lr=fast"], "optim.lr: expected float"),
        (["schedule.epochs=2.5"], "schedule.epochs: expected int"),
        (["schedule.kind=linear"], "step, plateau, cosine"),
        (["optim.batch_size=65"], "not divisible"),
        (["model.name=resnet51"], "resnet50"),
        (["model.overrides.unit=preact"], "full_preact"),
        (["schedule.warmup_lr=0.01"], "warmup_iters"),
        (["nonsense"], "key.sub=value"),
    ],
)
def test_bad_config_names_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_train_config("digits_resnet20.yaml", overrides)


def test_missing_config_file_lists_bundled_ones():
    with pytest.raises(ConfigError, match="digits_resnet20.yaml"):
        load_train_config("no_such.yaml")


def test_cli_help_and_bad_input():
    run = [sys.executable, "-m", "orchestrator.run"]
    out = subprocess.run([*run, "train", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--storage" in out.stdout and "resume" in out.stdout
    bad = subprocess.run([*run, "train", "--config", "digits_resnet20.yaml", "optim.lr=-1"], capture_output=True, text=True)
    assert bad.returncode == 2 and "optim.lr must be > 0" in bad.stderr
