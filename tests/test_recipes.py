"""Today's recipes (torchvision v2, ResNet strikes back, FFCV): each mechanism against a hand computation or its
reference, the recipe files on the digits through the real step, and the papers' configs left exactly as they were.
No Ray here (the resume of a run with them is in tests/test_train.py)."""

import math

import pytest
import torch
from torch import nn

import pipelines
from orchestrator import step
from orchestrator.config import (
    ConfigError,
    derived,
    list_configs,
    load_config,
    load_train_config,
    run_name,
    train_size,
)

RECIPES = ["imagenet_tv2.yaml", "imagenet_rsb_a3.yaml", "imagenet_fast.yaml"]
CPU = torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# EMA


def test_ema_is_the_hand_computed_average_of_weights_and_bn_buffers():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = step.make_ema(net, decay=0.9)
    snapshots = []
    for _ in range(3):  # new weights and BN statistics, then an update
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        net.train()(torch.randn(8, 3))  # moves the running mean / var
        snapshots.append({k: v.clone() for k, v in net.state_dict().items()})
        step.update_ema(ema, net)
    w = [s["0.weight"] for s in snapshots]
    expected = 0.9 * (0.9 * w[0] + 0.1 * w[1]) + 0.1 * w[2]  # the first update copies
    assert torch.allclose(ema.module[0].weight, expected, atol=1e-6)
    m = [s["1.running_mean"] for s in snapshots]
    assert torch.allclose(ema.module[1].running_mean, 0.9 * (0.9 * m[0] + 0.1 * m[1]) + 0.1 * m[2], atol=1e-6)
    assert int(ema.n_averaged) == 3
    step.update_ema(ema, net, restart=True)  # warm-up: torchvision keeps copying the weights
    assert int(ema.n_averaged) == 0
    step.update_ema(ema, net)
    assert torch.equal(ema.module[0].weight, net[0].weight)


def test_the_ema_decay_per_update_is_torchvisions_adjusted_one():
    tv2 = load_train_config("imagenet_tv2.yaml")
    assert derived(tv2)["ema_decay_per_update"] == pytest.approx(1 - 2e-5 * 1024 * 32 / 600)
    plain = load_train_config("digits_resnet20.yaml", ["ema.decay=0.98", "ema.adjust=false"])
    assert derived(plain)["ema_decay_per_update"] == 0.98
    assert derived(load_train_config("digits_resnet20.yaml"))["ema_decay_per_update"] == 0.0


# ---------------------------------------------------------------------------------------------
# MixUp / CutMix


def test_mixed_targets_sum_to_one_and_mixup_blends_images_as_its_targets_say():
    mix = pipelines.BatchMix(10, mixup_alpha=0.2)
    torch.manual_seed(0)
    x, y = torch.rand(6, 3, 8, 8), torch.arange(6)
    images, t = mix(x, y)
    assert t.shape == (6, 10) and torch.allclose(t.sum(1), torch.ones(6))
    lam = float(t[0, 0])  # sample 0 keeps lam of itself and takes 1 - lam of sample 5 (torchvision rolls by one)
    assert t[0, 5] == pytest.approx(1 - lam)
    assert torch.allclose(images[0], lam * x[0] + (1 - lam) * x[5], atol=1e-6)
    cut = pipelines.BatchMix(10, cutmix_alpha=1.0)
    images, t = cut(x, y)
    own = (images[0] == x[0]).all(0).float().mean()  # CutMix's target is the area each image keeps
    assert torch.allclose(t.sum(1), torch.ones(6)) and float(t[0, 0]) == pytest.approx(float(own))


def test_mixing_probabilities_hold_over_many_batches():
    torch.manual_seed(1)
    both = pipelines.BatchMix(10, mixup_alpha=0.2, cutmix_alpha=1.0, cutmix_prob=0.3, prob=0.6)
    picks = [both.choose() for _ in range(4000)]
    mixed = [p for p in picks if p is not None]
    assert len(mixed) / len(picks) == pytest.approx(0.6, abs=0.03)
    assert sum(p is both.cutmix for p in mixed) / len(mixed) == pytest.approx(0.3, abs=0.03)
    # MixUp's lambda ~ Beta(0.2, 0.2): mean 1/2, mostly near 0 or 1
    lams = torch.tensor([float(both.mixup._dist.sample(())) for _ in range(4000)])
    assert float(lams.mean()) == pytest.approx(0.5, abs=0.03) and float(((lams < 0.1) | (lams > 0.9)).float().mean()) > 0.5
    unmixed = pipelines.BatchMix(4, mixup_alpha=0.2, prob=0.0)
    _, t = unmixed(torch.rand(2, 3, 4, 4), torch.tensor([1, 3]))
    assert torch.equal(t, torch.tensor([[0.0, 1, 0, 0], [0, 0, 0, 1]]))


def test_a_mixed_step_is_a_function_of_its_step_seed():
    cfg = load_train_config("digits_resnet20.yaml", ["model.name=resnet8", "data.mixup_alpha=0.2", "data.cutmix_alpha=1.0",
                                                     "optim.label_smoothing=0.1"])
    x, y = torch.rand(8, 3, 32, 32), torch.arange(8) % 10
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        net = step.build_model(cfg, 10, CPU)
        opt = step.make_optimizer(net, cfg, 0.1, CPU)
        torch.manual_seed(step.step_seed(0, 7, 1))
        step.train_step(net, opt, x, y, 0.1, step.StepOptions.of(cfg, CPU, 2, num_classes=10))
        results.append(net.state_dict())
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])
    with pytest.raises(ValueError, match="number of classes"):
        step.StepOptions.of(cfg, CPU, 1)


def test_bce_is_timms_mean_over_batch_and_classes():
    logits, labels = torch.randn(4, 5), torch.tensor([0, 3, 3, 1])
    o = step.StepOptions(device=CPU, loss_scale=1.0, loss="bce", label_smoothing=0.1, bce_target_threshold=0.2)
    soft = nn.functional.one_hot(labels, 5).float() * 0.9 + 0.1 / 5
    reference = nn.functional.binary_cross_entropy_with_logits(logits, (soft > 0.2).float())  # mean over 4 x 5
    assert float(step.summed_loss(logits, labels, o)) / 4 == pytest.approx(float(reference), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Optimizers


@pytest.mark.parametrize("rule, fc_bias_decays", [("norm", True), ("norm_and_bias", False)])
def test_norm_and_bias_parameters_go_without_weight_decay(rule, fc_bias_decays):
    cfg = load_train_config("digits_resnet20.yaml", [f"optim.no_weight_decay={rule}"])
    net = step.build_model(cfg, 10, CPU)
    decay, no_decay = step.make_optimizer(net, cfg, 0.1, CPU).param_groups
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in net.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    bn = {n for n, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert {n.rsplit(".", 1)[0] for n in skipped if n != "fc.bias"} == bn
    assert ("fc.bias" in skipped) is not fc_bias_decays
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(net.parameters()))
    assert all(p.ndim == 4 or n.startswith("fc.") for n, p in net.named_parameters() if id(p) in map(id, decay["params"]))
    assert len(step.make_optimizer(net, load_train_config("digits_resnet20.yaml"), 0.1, CPU).param_groups) == 1  # v1


def test_lamb_against_a_hand_computation():
    w = nn.Parameter(torch.tensor([3.0, 4.0]))  # ||w|| = 5
    b = nn.Parameter(torch.tensor([1.0]))  # a parameter without weight decay: Adam's step, no trust ratio
    opt = step.Lamb([{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}], lr=0.01, max_grad_norm=1.0)
    gw, gb = torch.tensor([6.0, 8.0]), torch.tensor([0.0])  # ||g|| = 10: clipped to norm 1
    w.grad, b.grad = gw.clone(), gb.clone()
    opt.step()
    g = gw / 10
    m, v = 0.1 * g, 0.001 * g * g
    u = (m / 0.1) / ((v / 0.001).sqrt() + 1e-6) + 0.1 * torch.tensor([3.0, 4.0])
    expected = torch.tensor([3.0, 4.0]) - 0.01 * (5 / u.norm()) * u
    assert torch.allclose(w.detach(), expected, atol=1e-6)
    assert torch.equal(b.detach(), torch.tensor([1.0]))  # zero gradient: Adam's step is 0
    w.grad, b.grad = torch.tensor([0.3, 0.0]), torch.tensor([0.5])  # ||g|| < 1: not clipped
    before = w.detach().clone()
    opt.step()
    m2 = 0.9 * m + 0.1 * w.grad
    v2 = 0.999 * v + 0.001 * w.grad**2
    u2 = (m2 / (1 - 0.9**2)) / ((v2 / (1 - 0.999**2)).sqrt() + 1e-6) + 0.1 * before
    assert torch.allclose(w.detach(), before - 0.01 * (before.norm() / u2.norm()) * u2, atol=1e-6)
    mb, vb = 0.1 * 0.5, 0.001 * 0.25
    ub = (mb / (1 - 0.9**2)) / (math.sqrt(vb / (1 - 0.999**2)) + 1e-6)
    assert float(b.detach()) == pytest.approx(1.0 - 0.01 * ub, rel=1e-6)
    state = opt.state_dict()  # resumable: a new optimizer from the state takes the same next step
    again = step.Lamb([{"params": [nn.Parameter(w.detach().clone())], "weight_decay": 0.1},
                       {"params": [nn.Parameter(b.detach().clone())], "weight_decay": 0.0}], lr=0.01)
    again.load_state_dict(state)
    assert float(again.state[again.param_groups[0]["params"][0]]["step"]) == 2


# ---------------------------------------------------------------------------------------------
# Schedules


def test_warmup_then_cosine_per_epoch_is_torchvisions_schedulers():
    cfg = load_train_config("imagenet_tv2.yaml", ["schedule.epochs=20"])
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.5)
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.01, total_iters=5)
    cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=15)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [warm, cos], milestones=[5])
    for epoch in range(20):
        for it in (epoch * 7, epoch * 7 + 6):  # constant within the epoch
            assert step.lr_at(cfg, 0.5, it, 7, 1.0) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-9), epoch
        opt.step()
        sched.step()


def test_ffcv_cyclic_schedule_per_iteration():
    cfg = load_train_config("imagenet_fast.yaml", ["schedule.epochs=16"])
    spe = 10
    for it in range(0, 16 * spe, 3):
        t = it / spe  # FFCV interpolates per iteration between its per-epoch values
        ffcv = 1.7 * (1e-4 + (1 - 1e-4) * t / 2) if t < 2 else 1.7 * (16 - t) / 14
        assert step.lr_at(cfg, 1.7, it, spe, 1.0) == pytest.approx(ffcv, rel=1e-9, abs=1e-12)


def test_progressive_resizing_is_ffcvs_schedule_per_epoch():
    cfg = load_train_config("imagenet_fast.yaml")  # 24 epochs: 160 up to epoch 17, 192 from 20, multiples of 32
    assert [train_size(cfg, e) for e in range(24)] == [160] * 19 + [192] * 5
    longer = load_train_config("imagenet_fast.yaml", ["schedule.epochs=88", "data.progressive.start_epoch=65",
                                                      "data.progressive.end_epoch=76"])
    sizes = [train_size(longer, e) for e in range(88)]  # FFCV's rn50_88: round(interp / 32) * 32
    assert sizes[:66] == [160] * 66 and sizes[76:] == [192] * 12 and set(sizes[66:76]) == {160, 192}
    assert sizes.index(192) == 71  # interp(71) = 160 + 32 * 6/11 = 177.5 -> 5.55 -> 6 x 32
    assert derived(cfg)["train_sizes"] == "160 px epochs 1-19; 192 px epochs 20-24"
    manifest = {"mean": [0.5] * 3, "std": [0.25] * 3}
    image = torch.randint(0, 255, (3, 300, 400), dtype=torch.uint8)
    assert step.make_transforms(cfg, manifest, epoch=0)[0](image).shape == (3, 160, 160)
    assert step.make_transforms(cfg, manifest, epoch=23)[0](image).shape == (3, 192, 192)
    assert step.make_transforms(cfg, manifest, epoch=23)[1](image).shape == (3, 256, 256)  # the test view stays


def test_decoding_on_the_gpu_path_applies_the_recipes_augmentations_keyed_per_sample(digits_url):
    cfg = load_train_config("imagenet_tv2.yaml", [f"data.url={digits_url}", "data.size=24", "data.test_size=24",
                                                  "data.resize=28", "data.decode_on=gpu"])
    manifest = pipelines.read_manifest(digits_url)
    train, _ = step.make_batch_transforms(cfg, manifest, CPU)
    assert train.crop == "random_resized" and train.augment is not None and train.erasing is not None
    loader = pipelines.make_loader(digits_url, "train", global_batch_size=8, num_workers=0, decode=False, seed=3)
    blobs, _ = next(iter(loader))
    before = torch.random.get_rng_state()
    a = train(blobs)
    assert torch.equal(torch.random.get_rng_state(), before), "the caller's RNG is left as it was"
    alone = pipelines.SeededImages(blobs[2:3], blobs.seeds[2:3])
    assert a.shape == (8, 3, 24, 24) and torch.equal(train(alone)[0], a[2]), "an image is augmented alike in any batch"


# ---------------------------------------------------------------------------------------------
# The recipe files


def test_the_recipes_hold_the_published_settings():
    tv2, a3, fast = (load_train_config(n) for n in RECIPES)
    assert (tv2.data.size, tv2.data.resize, tv2.data.test_size, tv2.optim.batch_size, tv2.optim.lr) == (176, 232, 224, 1024, 0.5)
    assert (tv2.data.mixup_alpha, tv2.data.cutmix_alpha, tv2.data.random_erasing, tv2.optim.label_smoothing) == (0.2, 1.0, 0.1, 0.1)
    assert (tv2.ema.decay, tv2.schedule.epochs, tv2.schedule.warmup_epochs, tv2.optim.weight_decay) == (0.99998, 600, 5, 2e-5)
    assert (a3.optim.optimizer, a3.optim.loss, a3.optim.bce_target_threshold, a3.optim.lr, a3.optim.batch_size) == (
        "lamb", "bce", 0.2, 0.008, 2048)
    assert (a3.data.size, a3.data.test_size, a3.schedule.epochs, a3.data.rand_augment) == (160, 224, 100, [2, 6])
    assert (fast.data.progressive.min_size, fast.data.size, fast.data.test_size, fast.schedule.kind) == (160, 192, 256, "linear_decay")
    for cfg in (tv2, a3, fast):
        assert cfg.model.overrides["stride_in_1x1"] is False, "torchvision's / timm's layout: the nets the numbers are for"
    first = [open(f"orchestrator/configs/recipes/{n}").read().splitlines()[:12] for n in RECIPES]
    for lines, number in zip(first, ("80.858", "78.1", "75.6"), strict=True):
        assert any(number in line for line in lines), f"the published number {number} beside the recipe"


def _two_steps(cfg, digits_url: str) -> dict:
    """What the worker does, without Ray: model, optimizer, EMA, the epoch's transforms, the loader, two keyed
    steps, an EMA update after each, then the EMA's evaluation on the val split."""
    manifest = pipelines.read_manifest(digits_url)
    classes = len(manifest["classes"])
    torch.manual_seed(cfg.seed)
    net = step.build_model(cfg, classes, CPU)
    opt = step.make_optimizer(net, cfg, derived(cfg)["lr_scaled"], CPU)
    ema = step.make_ema(net, derived(cfg)["ema_decay_per_update"]) if cfg.ema.decay else None
    options = step.StepOptions.of(cfg, CPU, 1, num_classes=classes)
    gpu = cfg.data.decode_on == "gpu"
    train_tf, test_tf = (None, None) if gpu else step.make_transforms(cfg, manifest, epoch=1)
    btf = step.make_batch_transforms(cfg, manifest, CPU, epoch=1) if gpu else None
    loader = pipelines.make_loader(digits_url, "train", global_batch_size=cfg.optim.batch_size, num_workers=0,
                                   transform=train_tf, seed=cfg.seed, epoch=1, decode=not gpu)
    losses = []
    for it, (images, labels) in enumerate(loader):
        if btf is not None:
            images = btf[0](images)
        torch.manual_seed(step.step_seed(cfg.seed, it, 0))
        lr = step.lr_at(cfg, derived(cfg)["lr_scaled"], len(loader) + it, len(loader), 1.0)
        loss, _ = step.train_step(net, opt, images, labels, lr, options)
        losses.append(float(loss))
        if ema is not None:
            step.update_ema(ema, net)
        if it == 1:
            break
    val = pipelines.make_loader(digits_url, "val", 64, num_workers=0, transform=test_tf, decode=not gpu)
    if gpu:
        val = step.Transformed(val, btf[1])
    return {"losses": losses, "val": step.evaluate(ema.module if ema else net, val, CPU)}


@pytest.mark.parametrize("decode_on", ["cpu", "gpu"])
@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_runs_two_steps_on_the_digits(name, decode_on, digits_url):
    """Each recipe with its own settings, shrunk: 24 px (progressive 16 -> 24), batch 8, 2 epochs."""
    cfg = load_train_config(name, [
        f"data.url={digits_url}", "data.size=24", "data.test_size=24", "data.resize=28", f"data.decode_on={decode_on}",
        "optim.batch_size=8", "scaling.num_workers=1", "scaling.use_gpu=false", "schedule.epochs=2",
        "schedule.warmup_epochs=1", *(["data.progressive.min_size=16", "data.progressive.start_epoch=0",
                                       "data.progressive.end_epoch=1", "data.progressive.multiple=8"]
                                      if name == "imagenet_fast.yaml" else [])])
    out = _two_steps(cfg, digits_url)
    assert len(out["losses"]) == 2 and all(math.isfinite(x) for x in out["losses"])
    assert out["val"]["n"] == 270 and 0 <= out["val"]["top1_err"] <= 100


def test_the_imagenet_ensemble_takes_any_recipe_as_its_base():
    from orchestrator.ensemble import load_ensemble_config, member_train_config

    for name in ["imagenet_v1.yaml", *RECIPES]:
        cfg, members = load_ensemble_config("ensemble_imagenet.yaml", [f"base={name}"])
        trained = [member_train_config(cfg, m) for m in members]
        assert [t.model.name for t in trained] == [m.model for m in members]
        assert {t.optim.optimizer for t in trained} == {load_train_config(name).optim.optimizer}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.crop=random_resized"], "ImageNet train crop"),
        (["schedule.warmup_epochs=2", "schedule.warmup_lr=0.01", "schedule.warmup_iters=10"], "exclude each other"),
        (["data.mixup_alpha=-1"], "must be >= 0"),
        (["data.random_erasing=1.5"], "probability"),
        (["optim.bce_target_threshold=0.2"], "for optim.loss=bce"),
        (["data.progressive.min_size=40"], "min_size <= data.size"),
        (["ema.decay=1.0"], r"ema.decay must be in \[0, 1\)"),
        (["optim.optimizer=adam"], "sgd, lamb"),
        (["data.auto_augment=augmix"], "trivial_augment_wide, rand_augment"),
    ],
)
def test_recipe_keys_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_train_config("digits_resnet20.yaml", overrides)


# ---------------------------------------------------------------------------------------------
# The papers' recipes stay exactly as they were.

# Computed on `main` at 4c767b7 (before the recipe keys), with the working directory "/" so that relative data
# paths resolve alike everywhere. A config file changed on purpose changes its names: recompute them there with
#   cd / && python -c "from orchestrator.config import *; print({n: run_name(load_train_config(n)) for n in list_configs('recipe')})"
# (and the studies' and ensembles' alike, as below).
NAMES_ON_MAIN = {
    "cifar10_preact.yaml": "preact_resnet164-03e782fa",
    "cifar10_resnet.yaml": "resnet20-56cca4cf",
    "cifar10_resnet110.yaml": "resnet110-dba5f42b",
    "digits_resnet20.yaml": "resnet20-d42eebbc",
    "imagenet_v1.yaml": "resnet50-bee9235f",
}
STUDIES_ON_MAIN = {
    # depth/demo was ablate-depth-demo-1bfcde2f until issue 20 halved it on purpose (40 -> 20 epochs, its schedule
    # and checkpoints with them): a change of the study, not of a new key's default.
    "depth/paper": "ablate-depth-paper-4ac475bb", "depth/demo": "ablate-depth-demo-79d15b49",
    "shortcuts/paper": "ablate-shortcuts-paper-fe349107", "shortcuts/demo": "ablate-shortcuts-demo-5ca10e1f",
    "skip/paper": "ablate-skip-paper-59f08a0b", "skip/demo": "ablate-skip-demo-6c6a7a08",
    "units/paper": "ablate-units-paper-ef2389d5", "units/demo": "ablate-units-demo-b96d6fa2",
}
ENSEMBLES_ON_MAIN = {
    "ensemble_digits.yaml": ["resnet8-3f23428c", "resnet14-4cb0242c", "resnet20-d3f72471", "resnet32-a7fc4258",
                             "resnet44-ca27d8d7", "resnet44-493748cb"],
    "ensemble_imagenet.yaml": ["resnet34-f7946df5", "resnet34-ac98057e", "resnet50-a7ed45fe", "resnet101-ca7cebb0",
                               "resnet152-d40cb745", "resnet152-75e65ed1"],
}


def test_the_new_keys_rename_no_run_of_the_papers_configs(monkeypatch):
    from orchestrator.ablations import expand, load_study, study_run_name
    from orchestrator.ensemble import member_train_config

    monkeypatch.chdir("/")
    assert {n: run_name(load_train_config(n)) for n in NAMES_ON_MAIN} == NAMES_ON_MAIN
    for key, name in STUDIES_ON_MAIN.items():
        study = load_study(*key.split("/"))
        assert study_run_name(study, expand(study)) == name, key
    for name, members in ENSEMBLES_ON_MAIN.items():
        cfg = load_config("ensemble", name)
        assert [run_name(member_train_config(cfg, m)) for m in cfg.members] == members, name
    assert set(NAMES_ON_MAIN) | set(RECIPES) == set(list_configs("recipe"))


def _old_lr_at(cfg, base_lr, it, steps_per_epoch, plateau_scale):
    """`step.lr_at` as it was on main at 4c767b7."""
    s = cfg.schedule
    if s.kind == "step":
        unit = steps_per_epoch if s.milestone_unit == "epoch" else 1
        return base_lr * s.gamma ** sum(it >= m * unit for m in s.milestones)
    if s.kind == "plateau":
        return base_lr * plateau_scale
    total = max(1, s.epochs * steps_per_epoch)
    return base_lr * 0.5 * (1 + math.cos(math.pi * min(it, total) / total))


@pytest.mark.parametrize("name", sorted(NAMES_ON_MAIN))
def test_with_the_new_keys_at_their_defaults_a_step_gives_the_tensors_it_gave_before(name):
    """Two steps through `step` (new keys at their defaults) and through the step as it was on main (SGD over
    model.parameters(), cross-entropy, no mixing): the same weights, bit for bit; the schedules alike."""
    cfg = load_train_config(name, ["model.name=resnet8" if "imagenet" not in name else "model.name=resnet18",
                                   "optim.batch_size=8", "scaling.num_workers=1", "scaling.use_gpu=false"])
    for kind in ("step", "plateau", "cosine"):
        c = load_train_config(name, [f"schedule.kind={kind}", "scaling.num_workers=1", "optim.batch_size=8",
                                     "scaling.use_gpu=false"] + (["schedule.milestones=[3]"] if kind == "step" else []))
        for it in (0, 5, 99, 3000, 64000):
            assert step.lr_at(c, 0.1, it, 7, 0.5) == _old_lr_at(c, 0.1, it, 7, 0.5)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(2)]
    torch.manual_seed(0)
    new = step.build_model(cfg, 10, CPU)
    old = step.build_model(cfg, 10, CPU)
    old.load_state_dict(new.state_dict())
    opt_new = step.make_optimizer(new, cfg, 0.1, CPU)
    opt_old = torch.optim.SGD(old.parameters(), lr=0.1, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay,
                              nesterov=cfg.optim.nesterov, foreach=True)
    options = step.StepOptions.of(cfg, CPU, 2)
    assert options.mix is None and options.loss == "ce"
    for it, (x, y) in enumerate(batches):
        torch.manual_seed(step.step_seed(0, it, 0))
        step.train_step(new, opt_new, x, y, 0.1, options)
        torch.manual_seed(step.step_seed(0, it, 0))
        loss = nn.functional.cross_entropy(old(x).float(), y, label_smoothing=cfg.optim.label_smoothing, reduction="sum")
        opt_old.zero_grad(set_to_none=True)
        (loss * options.loss_scale).backward()
        opt_old.step()
    a, b = new.state_dict(), old.state_dict()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_with_the_new_keys_at_their_defaults_the_transforms_are_the_papers():
    from torchvision.transforms import v2

    manifest = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.2]}
    train, _ = step.make_transforms(load_train_config("imagenet_v1.yaml"), manifest)
    assert [type(t) for t in train.transforms] == [v2.ToImage, v2.RandomShortestSize, v2.RandomCrop, v2.RandomHorizontalFlip,
                                                   v2.ToDtype, pipelines.transforms.Lighting, v2.Normalize, v2.ToPureTensor]
    train, _ = step.make_transforms(load_train_config("digits_resnet20.yaml"), manifest)
    assert [type(t) for t in train.transforms] == [v2.ToImage, v2.RandomCrop, v2.RandomHorizontalFlip, v2.ToDtype,
                                                   v2.Normalize, v2.ToPureTensor]


# ---------------------------------------------------------------------------------------------
# The study


def test_the_recipes_study_puts_every_recipe_beside_its_published_number_in_one_table():
    from orchestrator.ablations import expand, load_study
    from orchestrator.study_report import Outcome, render_markdown, summarize

    study = load_study("recipes", "paper")
    trials = expand(study)
    assert [t.trial.config.optim.optimizer for t in trials] == ["sgd", "sgd", "lamb", "sgd"]
    assert [t.row.paper.top1 for t in trials] == [None, 19.142, 21.9, 24.4]
    outcomes = {t.trial.label: Outcome(epochs=1, planned=1, status="FINISHED", train_curve=[1.0],
                                       scores={p: {"top1_err": 20.0, "top5_err": 5.0, "n": 50000} for p in t.evaluation.protocols})
                for t in trials}
    md = render_markdown(study, summarize(study, trials, outcomes))
    centre = md.split("## Scored on the `val` split, centre crop (50000 images)")[1].split("## ")[0]
    rows = [line for line in centre.splitlines() if line.startswith("| ") and "`" in line]
    assert len(rows) == 4 and "| not published |" in rows[0]
    assert "| 20.00 | 19.14 | +0.86 |" in rows[1] and "| 20.00 | 21.90 | -1.90 |" in rows[2] and "| 20.00 | 24.40 | -4.40 |" in rows[3]
    assert "## Scored on the `val` split, 10-crop" in md and "| 22.85 | -2.85 |" in md
    demo = expand(load_study("recipes", "demo"))
    assert len(demo) == 4 and {t.trial.config.schedule.epochs for t in demo} == {16}
    modern = [t.trial.config for t in demo if "MixUp" in t.row.label]
    assert all((c.data.mixup_alpha, c.optim.label_smoothing, c.schedule.kind, c.ema.decay) == (0.2, 0.1, "cosine", 0.95)
               for c in modern)
