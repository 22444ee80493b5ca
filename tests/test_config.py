"""Every kind of config (recipes, studies, ensembles) through one mechanism: files, overrides, validation,
derived values, the CLI's answers."""

import shlex
import subprocess
import sys

import pytest

from orchestrator.config import (
    CONFIG_DIR,
    FOLDERS,
    ConfigError,
    derived,
    find_config,
    list_configs,
    load_config,
    load_train_config,
    run_name,
)

CONFIGS = [(kind, name) for kind in FOLDERS for name in list_configs(kind)]
COMMAND = {"recipe": "train", "study": "ablate", "ensemble": "ensemble"}


def test_every_folder_holds_configs_and_nothing_lies_loose():
    assert {kind for kind, _ in CONFIGS} == set(FOLDERS)
    assert not list(CONFIG_DIR.glob("*.yaml")), "each config lives in its kind's folder"


@pytest.mark.parametrize("kind, name", CONFIGS)
def test_every_config_file_loads_and_its_first_line_is_the_command_that_runs_it(kind, name):
    path = CONFIG_DIR / FOLDERS[kind] / name
    first = path.read_text().splitlines()[0]
    assert first.startswith("# python -m orchestrator.run "), "a config begins with the command that runs it"
    argv = shlex.split(first[2:])[3:]
    assert argv[0] == COMMAND[kind]
    if kind == "study":
        from orchestrator.ablations import study_path

        assert study_path(argv[1]) == path
    else:  # the path it names (the old flat layout's, or a bare name) finds this very file
        assert find_config(argv[argv.index("--config") + 1], kind).resolve() == path.resolve()
    assert find_config(name, kind).resolve() == path.resolve(), "found by its bare name"
    cfg = load_config(kind, name)
    if kind == "recipe":
        assert cfg.optim.batch_size % cfg.scaling.num_workers == 0
    if kind == "ensemble":
        for m in cfg.members:  # every member's recipe, as the job builds it
            from orchestrator.ensemble import member_train_config

            if m.model:
                assert member_train_config(cfg, m).model.name == m.model


@pytest.mark.parametrize(
    "kind, name, override, message",
    [
        ("recipe", "digits_resnet20.yaml", "optim.learning_rate=0.1", r"unknown key\(s\) optim.learning_rate in optim; valid: batch_size,"),
        ("ensemble", "ensemble_digits.yaml", "registry.aliass=x", r"unknown key\(s\) registry.aliass in registry; valid: alias$"),
        ("study", "ablate_depth.yaml", "early_stopping.patience=2", r"early_stopping.patience in early_stopping; valid: enabled, grace"),
        ("study", "ablate_depth.yaml", 'scales.demo.rows=[{"label": "x", "model": "resnet20", "seed": [1]}]',
         r"unknown key\(s\) scales.demo.rows\[0\].seed in scales.demo.rows\[0\]; valid: base, label, model,"),
        ("recipe", "digits_resnet20.yaml", "schedule.epochs=2.5", "schedule.epochs: expected int, got 2.5"),
        ("ensemble", "ensemble_digits.yaml", "evaluation.batch_size=big", "evaluation.batch_size: expected int"),
        ("study", "ablate_depth.yaml", "scales.demo.rows=[{\"label\": \"x\", \"model\": \"resnet20\", \"seeds\": [true]}]",
         r"scales.demo.rows\[0\].seeds\[0\]: expected int, got True"),
        ("recipe", "digits_resnet20.yaml", "data.on_error=ignore", "data.on_error: 'ignore' is not one of raise, skip"),
        ("ensemble", "ensemble_digits.yaml", "evaluation.protocol=five_crop",
         "evaluation.protocol: 'five_crop' is not one of center, ten_crop, multi_scale, multi_scale_center"),
        ("study", "ablate_depth.yaml", "scales.demo.bases.digits.evaluation.protocols=[center, five_crop]",
         "scales.demo.bases.digits.evaluation.protocols: 'five_crop' is not one of center, ten_crop, multi_scale"),
        ("study", "ablate_depth.yaml", "scales.huge={}", "scales: unknown huge; valid: paper, demo"),
    ],
)
def test_one_mechanism_refuses_unknown_keys_wrong_types_and_bad_choices_in_every_kind(kind, name, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(kind, name, [override])


def test_a_config_of_another_kind_is_named_as_such():
    with pytest.raises(ConfigError, match="ensemble_digits.yaml is one of the ensemble configs .*not of the recipe configs: cifar10"):
        load_train_config("ensemble_digits.yaml")


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
    # A key at its default is not part of the name: adding keys to the schema renames no existing run.
    assert run_name(load_train_config("digits_resnet20.yaml", ["checkpoint.every_steps=0", "data.streams=64"])) == run_name(a)
    uneven = load_train_config("digits_resnet20.yaml", ["optim.batch_size=65", "scaling.num_workers=[2, 3]"])
    assert (uneven.scaling.min_workers, uneven.scaling.max_workers) == (2, 3) and run_name(uneven) != run_name(a)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.learning_rate=0.1"], "optim.learning_rate"),
        (["optim.lr=fast"], "optim.lr: expected float"),
        (["schedule.epochs=2.5"], "schedule.epochs: expected int"),
        (["schedule.kind=linear"], "step, plateau, cosine"),
        (["optim.batch_size=1"], "at least one sample"),  # the global batch, shared by the 2 workers
        (["scaling.num_workers=[3, 2]"], "[min, max]"),
        (["scaling.num_workers=[2, 3, 4]"], "[min, max]"),
        (["checkpoint.every_steps=-1"], "checkpoint.every_steps must be >= 0"),
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
    with pytest.raises(ConfigError, match="not found; bundled recipe configs: .*digits_resnet20.yaml"):
        load_train_config("no_such.yaml")


def test_cli_help_and_bad_input():
    run = [sys.executable, "-m", "orchestrator.run"]
    out = subprocess.run([*run, "train", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--storage" in out.stdout and "resume" in out.stdout
    bad = subprocess.run([*run, "train", "--config", "digits_resnet20.yaml", "optim.lr=-1"], capture_output=True, text=True)
    assert bad.returncode == 2 and "optim.lr must be > 0" in bad.stderr
    bad = subprocess.run([*run, "ensemble", "evaluation.protocol=five_crop"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: evaluation.protocol: 'five_crop' is not one of center, ten_crop, multi_scale, multi_scale_center"
    ]
