"""Issue 16: the papers' test protocols and recipes, compared like with like.

Multi-scale testing sees the whole image at each scale with its flip (v1 sec. 3.4), batched by aspect
ratio on the cluster; CIFAR pads with the mean pixel; CIFAR recipes train on all 50k and stop on
iterations; the ImageNet ensemble says what is ours; torchvision-layout weights are not loaded silently.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import models
import pipelines
from orchestrator.config import CONFIG_DIR, ConfigError, find_config, list_configs, load_train_config
from pipelines.transforms import PROTOCOLS, make_transform

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.2, 0.2]


def _edge_image(h: int, w: int) -> torch.Tensor:
    """Black, with white columns at the left and right eighths of the width."""
    image = torch.zeros(3, h, w, dtype=torch.uint8)
    image[:, :, : w // 8] = 255
    image[:, :, -(w // 8) :] = 255
    return image


def test_multi_scale_on_a_4_3_image_sees_its_whole_width_and_its_flip():
    t = make_transform("imagenet", False, mean=MEAN, std=STD, size=24, protocol="multi_scale", scales=(24, 36))
    out = t(_edge_image(48, 64))  # 4:3
    assert [tuple(v.shape) for v in out] == [(2, 3, 24, 32), (2, 3, 36, 48)]  # shorter side s, ratio kept
    white = (1.0 - MEAN[0]) / STD[0]
    for v in out:
        assert v[0, 0, :, 0].mean() == pytest.approx(white, abs=0.2)  # the left edge is there
        assert v[0, 0, :, -1].mean() == pytest.approx(white, abs=0.2)  # and the right one
        torch.testing.assert_close(v[1], v[0].flip(-1))
    # The square approximation, kept under its own name, drops both edges.
    center = make_transform("imagenet", False, mean=MEAN, std=STD, size=24, protocol="multi_scale_center", scales=(24, 36))
    out = center(_edge_image(48, 64))
    assert [tuple(v.shape) for v in out] == [(3, 24, 24), (3, 36, 36)]
    assert all(v[0].max() < 0 for v in out), "the centre crop of a 4:3 image loses its left and right eighths"
    assert PROTOCOLS == ("center", "ten_crop", "multi_scale", "multi_scale_center")


def test_cifar_pads_with_the_mean_pixel_a_normalised_zero():
    torch.manual_seed(0)
    t = make_transform("cifar", True, mean=MEAN, std=STD, size=8, pad=4)
    image = torch.full((3, 8, 8), 255, dtype=torch.uint8)
    white = torch.tensor([(1.0 - m) / s for m, s in zip(MEAN, STD, strict=True)])
    padded = 0
    for _ in range(20):
        out = t(image)
        border = ~torch.isclose(out, white.view(3, 1, 1)).all(0)
        padded += int(border.sum())
        assert out[:, border].abs().max() <= 0.5 / 255 / min(STD) + 1e-6  # mean pixel -> 0 after normalising
    assert padded > 0, "no crop reached the padding"


# ---------------------------------------------------------------------------------------------
# Multi-scale on the cluster: images of different aspect ratios, batched by shape.


@pytest.fixture(scope="module")
def mixed_shapes(tmp_path_factory) -> str:
    """An image folder with 4:3, 3:4 and square images (2 classes), written as shards."""
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 7)):
        for i in range(n):
            h, w = [(24, 32), (32, 24), (28, 28)][i % 3]
            folder = root / "src" / split / f"c{i % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{split}{i}.png")
    pipelines.write_shards(f"imagefolder:{root / 'src'}", str(root / "shards"), progress=False)
    return str(root / "shards")


@pytest.mark.slow
def test_multi_scale_batch_evaluation_scores_whole_images_of_every_shape(ray_local, mixed_shapes):
    from orchestrator.batch_eval import score_split
    from orchestrator.ensemble_model import build_member
    from orchestrator.scoring import view_averaged_probs

    manifest = pipelines.read_manifest(mixed_shapes)
    torch.manual_seed(0)
    net = models.create_model("resnet18", num_classes=2, width=4)
    member = ({"label": "r18", "model": "resnet18", "overrides": {"width": 4}, "num_classes": 2}, net.state_dict())
    spec = {"kind": "imagenet", "size": 16, "resize": None, "protocol": "multi_scale",
            "mean": manifest["mean"], "std": manifest["std"]}
    scores = score_split({"members": [member]}, mixed_shapes, "val", spec, batch_size=2)
    # The evaluation count equals the manifest's: every image once, whatever its shape.
    assert len(scores.keys) == len(set(scores.keys)) == manifest["splits"]["val"]["num_samples"] == 7
    # Each image's score is the one of its whole self at every scale and flipped, as if scored alone.
    net = build_member(*member)
    t = make_transform("imagenet", False, mean=manifest["mean"], std=manifest["std"], size=16, protocol="multi_scale")
    loader = pipelines.make_loader(mixed_shapes, "val", 1, transform=t, with_keys=True, num_workers=0)
    alone = {k[0]: view_averaged_probs(net, tuple(v for v in views))[0] for views, _, k in loader}
    for i, key in enumerate(scores.keys):
        torch.testing.assert_close(torch.as_tensor(scores.member_probs[0, i]), alone[key], atol=1e-5, rtol=1e-4)


def test_batches_by_shape_groups_one_aspect_ratio_per_batch():
    from orchestrator.batch_eval import batches_by_shape

    def one(h, w, key):
        return (torch.zeros(1, 2, 3, h, w),), torch.tensor([0]), [key]

    items = [one(24, 32, "a"), one(32, 24, "b"), one(24, 32, "c"), one(24, 32, "d"), one(32, 24, "e")]
    got = [([tuple(v.shape) for v in views], keys) for views, _, keys in batches_by_shape(iter(items), 2)]
    assert got == [([(2, 2, 3, 24, 32)], ["a", "c"]), ([(2, 2, 3, 32, 24)], ["b", "e"]), ([(1, 2, 3, 24, 32)], ["d"])]


# ---------------------------------------------------------------------------------------------
# CIFAR recipes: all 50k images, scored on test, 64k iterations.

CIFAR_RECIPES = [n for n in list_configs("recipe") if n.startswith("cifar10_")]


@pytest.mark.parametrize("name", CIFAR_RECIPES)
def test_cifar_final_recipes_train_on_trainval_score_on_test_and_stop_at_64k(name):
    cfg = load_train_config(name)
    assert (cfg.data.train_split, cfg.data.val_split) == ("trainval", "test")
    assert cfg.schedule.max_iters == 64_000 and cfg.schedule.milestones == [32_000, 48_000]
    # 50,000 / 128 = 391 iterations per epoch: the epoch budget covers 64k, max_iters ends the run.
    assert cfg.schedule.epochs * -(-50_000 // cfg.optim.batch_size) >= cfg.schedule.max_iters
    study = load_train_config(name, ["data.train_split=train", "data.val_split=val"])  # a schedule study
    assert (study.data.train_split, study.data.val_split) == ("train", "val")


def test_max_iters_must_not_be_negative():
    with pytest.raises(ConfigError, match=r"schedule.max_iters must be >= 0 \(0: no limit\), got -1"):
        load_train_config("digits_resnet20.yaml", ["schedule.max_iters=-1"])


# ---------------------------------------------------------------------------------------------
# The ImageNet ensemble: what is the paper's and what is ours.


def test_imagenet_ensemble_says_which_members_are_assumed_and_that_both_splits_are_val():
    path = find_config("ensemble_imagenet.yaml", "ensemble")
    text = path.read_text()
    data = yaml.safe_load(text)
    members = data["members"]
    assert len(members) == 6 and sum(m["model"] == "resnet152" for m in members) == 2  # v1 Table 5
    lines = {m["label"]: next(line for line in text.splitlines() if f"label: {m['label']}," in line) for m in members}
    assert all(("our assumption" in line) == (m["model"] != "resnet152") for m, line in zip(members, lines.values(), strict=True))
    assert data["evaluation"]["protocol"] == "multi_scale"  # the real fully-convolutional multi-scale test
    assert data["evaluation"]["split"] == data["batch_eval"]["split"] == "val"
    assert "BOTH the champion selection (evaluation.split) and the batch\n# evaluation (batch_eval.split) use val" in text
    readme = (CONFIG_DIR.parent.parent / "README.md").read_text()
    assert "the paper's six-model ImageNet ensemble" not in readme and "the other four our assumption" in readme


# ---------------------------------------------------------------------------------------------
# torchvision-layout weights are never loaded silently into a paper-layout net.


def test_a_torchvision_state_dict_needs_its_layout_stated(tmp_path):
    import torchvision

    from orchestrator.batch_eval import EvaluationError
    from orchestrator.ensemble import MemberSpec, _state_from_file
    from orchestrator.ensemble_model import build_member

    torch.manual_seed(0)
    ref = torchvision.models.resnet50().eval()
    path = tmp_path / "torchvision_resnet50.pt"
    torch.save(ref.state_dict(), path)
    x = torch.randn(1, 3, 64, 64)

    unstated = MemberSpec(label="tv", model="resnet50", checkpoint=str(path))
    with pytest.warns(UserWarning, match=r"member 'tv' .*stride_in_1x1=False for torchvision weights"):
        state = _state_from_file(str(path), unstated)
    wrong = build_member({"label": "tv", "model": "resnet50", "overrides": {}, "num_classes": 1000}, state)
    with torch.no_grad():
        assert (wrong(x) - ref(x)).abs().max() > 0.1, "the v1 layout computes something else"

    stated = MemberSpec(label="tv", model="resnet50", overrides={"stride_in_1x1": False}, checkpoint=str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state = _state_from_file(str(path), stated)
    net = build_member({"label": "tv", "model": "resnet50", "overrides": {"stride_in_1x1": False}, "num_classes": 1000}, state)
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref(x), rtol=0, atol=0)

    # Our own checkpoints carry their layout: a member that contradicts it is an error.
    ours = tmp_path / "ours.pt"
    config = {"model": {"name": "resnet50", "overrides": {"stride_in_1x1": False}}}
    torch.save({"model": ref.state_dict(), "optimizer": {}, "config": config}, ours)
    with pytest.raises(EvaluationError, match=r"trained with stride_in_1x1=False .* asks for stride_in_1x1=True"):
        _state_from_file(str(ours), MemberSpec(label="m", model="resnet50", checkpoint=str(ours)))
    assert models.unstated_layout("resnet20", {}) is None  # basic blocks have one layout only
