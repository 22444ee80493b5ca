"""The model zoo against the papers' tables and torchvision's reference implementation."""

import pytest
import torch
import torchvision

from models import count_flops, count_params, create_model, list_models, register_model, resolve
from models.units import SKIPS, UNITS

# torchvision's exact parameter counts (PAPER_FACTS section 1).
TORCHVISION_PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
}
# v1 Table 1, multiply-adds at 224 px.
PAPER_FLOPS = {"resnet18": 1.8e9, "resnet34": 3.6e9, "resnet50": 3.8e9, "resnet101": 7.6e9, "resnet152": 11.3e9}
# v1 Table 6 and v2 section 4, parameters.
PAPER_PARAMS = {
    "resnet20": 0.27e6,
    "resnet32": 0.46e6,
    "resnet44": 0.66e6,
    "resnet56": 0.85e6,
    "resnet110": 1.7e6,
    "resnet1202": 19.4e6,
    "resnet164": 1.7e6,
    "resnet1001": 10.2e6,
    "preact_resnet164": 1.7e6,
    "preact_resnet1001": 10.2e6,
}
REQUIRED = (
    "resnet18 resnet34 resnet50 resnet101 resnet152 resnet200 plain18 plain34 preact_resnet152 preact_resnet200 "
    "resnet20 resnet32 resnet44 resnet56 resnet110 resnet1202 plain20 plain32 plain44 plain56 plain110 resnet164 "
    "resnet1001 preact_resnet110 preact_resnet164 preact_resnet1001 resnet8 resnet14"
).split()


def test_registry_has_every_network_of_both_papers():
    assert set(REQUIRED) <= set(list_models())


@pytest.mark.parametrize("name", sorted(TORCHVISION_PARAMS))
def test_v1_5_option_b_is_torchvision(name):
    torch.manual_seed(0)
    ours = create_model(name, stride_in_1x1=False, shortcut="B")
    ref = getattr(torchvision.models, name)()
    assert count_params(ours) == count_params(ref) == TORCHVISION_PARAMS[name]
    ours.load_state_dict(ref.state_dict(), strict=True)
    ours.eval()
    ref.eval()
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(PAPER_FLOPS))
def test_flops_match_table_1(name):
    flops = count_flops(create_model(name))  # the paper's v1 layout: stride on the first 1x1
    assert flops == pytest.approx(PAPER_FLOPS[name], rel=0.03)


def test_v1_5_costs_more_than_v1():
    v1 = count_flops(create_model("resnet50", stride_in_1x1=True))
    v15 = count_flops(create_model("resnet50", stride_in_1x1=False))
    assert v15 == pytest.approx(4.1e9, rel=0.03) and v15 > v1


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_cifar_params_match_papers(name):
    assert count_params(create_model(name)) == pytest.approx(PAPER_PARAMS[name], rel=0.03)


def test_option_a_is_parameter_free_and_c_adds_projections():
    plain, a = create_model("plain34"), create_model("resnet34", shortcut="A")
    b, c = create_model("resnet34", shortcut="B"), create_model("resnet34", shortcut="C")
    assert count_params(a) == count_params(plain)
    assert count_params(a) < count_params(b) < count_params(c)
    assert count_params(create_model("resnet20")) == count_params(create_model("plain20"))


def _forward_backward(model, size, batch=2):
    x = torch.randn(batch, model.conv1.in_channels, size, size, requires_grad=False)
    out = model(x)
    out.float().pow(2).mean().backward()
    return out


@pytest.mark.parametrize("name", list_models())
def test_every_registered_net_trains_a_step(name):
    row = resolve(name)
    deep = row["layers"] and sum(row["layers"]) > 100
    # The deepest nets keep their depth and shrink their width, so the suite stays fast on 2 cores.
    model = create_model(name, num_classes=5, **({"width": 4} if deep else {}))
    size = 32 if row["stem"] == "imagenet" else 16
    out = _forward_backward(model, size)
    assert out.shape == (2, 5)
    assert torch.isfinite(out).all()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("base", ["resnet14", "resnet164"])
@pytest.mark.parametrize("unit", list(UNITS))
@pytest.mark.parametrize("skip", SKIPS)
def test_every_unit_and_skip_on_basic_and_bottleneck(base, unit, skip):
    model = create_model(base, unit=unit, skip=skip, width=4, num_classes=3)
    out = _forward_backward(model, 16)
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    assert all(p.grad is not None for p in model.parameters()), "a parameter took no part in the loss"


@pytest.mark.parametrize("name", ["resnet18", "resnet20", "preact_resnet20", "resnet164"])
@pytest.mark.parametrize("size", [(40, 40), (57, 91)])
def test_fully_convolutional_on_any_input_size(name, size):
    model = create_model(name, width=8).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, *size))
    assert out.shape == (1, model.fc.out_features)


def test_in_channels_and_num_classes():
    model = create_model("resnet8", in_channels=1, num_classes=4)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 4)


def test_zero_init_residual_makes_blocks_start_as_identity():
    model = create_model("resnet20", zero_init_residual=True).eval()
    block = model.layer1[1]
    x = torch.relu(torch.randn(2, 16, 8, 8))  # a block's input is a post-ReLU activation
    with torch.no_grad():
        torch.testing.assert_close(block(x), x)


def test_preact_net_ends_with_bn_relu_and_has_no_bn_in_the_stem():
    model = create_model("preact_resnet110")
    assert hasattr(model, "bn_final") and not hasattr(model, "bn1")
    imagenet = create_model("preact_resnet152")
    # The ImageNet stem ends with BN-ReLU, so the first unit does not activate again.
    assert hasattr(imagenet, "bn1") and not hasattr(imagenet.layer1[0], "bn1")


def test_relu_before_add_branch_is_non_negative():
    model = create_model("resnet8", unit="relu_before_add").eval()
    block = model.layer1[0]
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        assert (block(x) - x).min() >= 0


def test_gates_start_at_their_configured_bias():
    model = create_model("resnet8", skip="exclusive_gating", gate_bias=-6.0).eval()
    gate = model.layer1[0].combine.gate
    assert torch.all(gate.bias == -6.0)
    # With the gate's weights at zero, g = sigmoid(-6) everywhere: y = relu((1 - g) x + g F(x)).
    block, x = model.layer1[0], torch.relu(torch.randn(1, 16, 8, 8))
    torch.nn.init.zeros_(gate.weight)
    with torch.no_grad():
        f = x
        for m in block._branch:
            f = m(f)
        g = torch.sigmoid(torch.tensor(-6.0))
        torch.testing.assert_close(block(x), torch.relu((1 - g) * x + g * f))


def test_constant_scaling_values():
    model = create_model("resnet8", skip="constant_scaling", shortcut_scale=0.5, residual_scale=0.5)
    assert model.layer1[0].combine.shortcut_scale == 0.5 and model.layer1[0].combine.residual_scale == 0.5


@pytest.mark.parametrize(
    "name, overrides, message",
    [
        ("resnt50", {}, "resnet50"),
        ("resnet20", {"unit": "preact"}, "full_preact"),
        ("resnet20", {"skip": "gating"}, "exclusive_gating"),
        ("resnet20", {"shortcut": "D"}, "A, B, C"),
        ("plain20", {"skip": "dropout"}, "plain net"),
        ("plain34", {"shortcut": "B"}, "plain net"),
        ("resnet20", {"gate_bias": -3.0}, "gating"),
        ("resnet18", {"stride_in_1x1": True}, "bottleneck"),
        ("resnet20", {"width": 0}, "width"),
        ("resnet20", {"num_classes": "10"}, "num_classes"),
        ("resnet20", {"depth": 20}, "unknown option"),
        ("resnet20", {"skip": "dropout", "skip_dropout": 1.5}, "skip_dropout"),
    ],
)
def test_bad_input_gets_a_clear_error(name, overrides, message):
    with pytest.raises(ValueError, match=message):
        create_model(name, **overrides)


def test_duplicate_registration_raises():
    with pytest.raises(ValueError, match="already registered"):
        register_model("resnet50", {})


# ---------------------------------------------------------------------------------------------
# Issue 16: the variants as the papers define them.


def test_dropout_shortcut_scales_the_shortcut_by_its_expectation():
    # v2 sec. 3.1: dropout on the shortcut imposes a scale with an expectation of 1 - p (0.5): in training
    # the mask is not rescaled; at test the shortcut is multiplied by 1 - p.
    torch.manual_seed(0)
    combine = create_model("resnet8", skip="dropout").layer1[0].combine
    x, zero = torch.ones(200_000), torch.zeros(200_000)
    out = combine.train()(None, x, zero)
    assert set(out.unique().tolist()) == {0.0, 1.0} and out.mean().item() == pytest.approx(0.5, abs=0.01)
    assert torch.equal(combine.eval()(None, x, zero), 0.5 * x)
    inverted = create_model("resnet8", skip="dropout", skip_dropout_inverted=True).layer1[0].combine
    assert inverted.train()(None, x, zero).mean().item() == pytest.approx(1.0, abs=0.02)  # nn.Dropout keeps 1
    assert torch.equal(inverted.eval()(None, x, zero), x)


PREACT_WITH_PROJECTIONS = [n for n in list_models() if n.startswith("preact_") and resolve(n)["shortcut"] != "A"]


@pytest.mark.parametrize("name", PREACT_WITH_PROJECTIONS)
def test_no_preactivation_projection_shortcut_has_a_batchnorm(name):
    # resnet-pre-act.lua and fb.resnet.torch's preresnet.lua: a bare 1x1 conv on the pre-activated input.
    model = create_model(name, width=4) if resolve(name)["stem"] == "cifar" else create_model(name)
    projections = [m.downsample for m in model.modules() if getattr(m, "downsample", None) is not None]
    assert projections, f"{name} has no projection shortcut to check"
    for p in projections:
        assert [type(m) for m in p] == [torch.nn.Conv2d]
    original = create_model("resnet164", width=4)  # the v1 unit keeps option B's BN
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in original.layer2[0].downsample)


def test_preactivation_nets_named_in_the_issue_have_projections_without_bn():
    assert {"preact_resnet164", "preact_resnet1001", "preact_resnet152", "preact_resnet200"} <= set(PREACT_WITH_PROJECTIONS)


def test_conv1x1_skip_has_no_bn_unless_asked():
    plain = create_model("resnet8", skip="conv1x1").layer1[0].downsample
    with_bn = create_model("resnet8", skip="conv1x1", shortcut_bn=True).layer1[0].downsample
    assert [type(m) for m in plain] == [torch.nn.Conv2d]
    assert [type(m) for m in with_bn] == [torch.nn.Conv2d, torch.nn.BatchNorm2d]
    with pytest.raises(ValueError, match="shortcut_bn applies to skip=conv1x1"):
        create_model("resnet8", shortcut_bn=True)
    with pytest.raises(ValueError, match="shortcut_bn must be True or False, got 'yes'"):
        create_model("resnet8", skip="conv1x1", shortcut_bn="yes")
