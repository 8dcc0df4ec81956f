"""Parameter groups by module type / ndim and Goyal's zero-gamma init of the last BN per residual block."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from lightning_lbo.models import MLP, ResNet, SmallCNN
from lightning_lbo.param_groups import is_norm_or_bias, param_groups, zero_init_last_bn


def _names(model, group):
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_param_groups_resnet18_every_bn_and_bias_no_decay():
    """torchvision resnet18: every BN parameter (incl. downsample.1) and bias in no-decay, conv/fc weights decay."""
    model = torchvision.models.resnet18(weights=None)
    groups = param_groups(model, weight_decay=1e-4)
    assert [g["name"] for g in groups] == ["decay", "no_decay"]
    decay, no_decay = groups
    bn_params = {f"{m}.{n}" for m, mod in model.named_modules() if isinstance(mod, nn.BatchNorm2d)
                 for n, _ in mod.named_parameters(recurse=False)}
    biases = {n for n, _ in model.named_parameters() if n.endswith(".bias")}  # the test's independent oracle
    assert "layer2.0.downsample.1.weight" in bn_params and "fc.bias" in biases
    assert _names(model, no_decay) == bn_params | biases
    weights = {n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert _names(model, decay) == {f"{n}.weight" for n in weights}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert (decay["weight_decay"], decay["lars_adapt"]) == (1e-4, True)
    assert (no_decay["weight_decay"], no_decay["lars_adapt"]) == (0.0, False)
    assert "lr" not in decay


def test_param_groups_norm_types_and_shared_params():
    """LayerNorm, GroupNorm, InstanceNorm with affine and any 1-D parameter are excluded; shared params once."""
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.LayerNorm(4), nn.GroupNorm(2, 4), nn.InstanceNorm1d(4, affine=True), lin,
                          nn.PReLU(4))
    decay, no_decay = param_groups(model, weight_decay=0.1)
    assert [id(p) for p in decay["params"]] == [id(lin.weight)]
    assert len(no_decay["params"]) == 1 + 2 + 2 + 2 + 1  # lin.bias, LN, GN, IN, PReLU
    big_norm = nn.Sequential(nn.Conv2d(1, 2, 1))  # a 2-D parameter of a norm layer is still a norm parameter
    big_norm.norm = nn.LayerNorm([3, 3])
    assert _names(big_norm, param_groups(big_norm, 0.1)[1]) == {"0.bias", "norm.weight", "norm.bias"}
    assert is_norm_or_bias(nn.LayerNorm([3, 3]), nn.Parameter(torch.ones(3, 3)))


def test_param_groups_frozen_params_left_out():
    """requires_grad=False parameters belong to no group."""
    model = SmallCNN()
    model.head.weight.requires_grad_(False)
    groups = param_groups(model, weight_decay=0.0)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters())) - 1


def test_param_groups_separate_filters_and_lr_multipliers():
    """Different decay and adaptation filters give four-way names; LR multipliers multiply per flag."""
    model = MLP(hidden=(8,), batch_norm=True)

    def no_adapt_bn_only(module, param):
        return isinstance(module, nn.BatchNorm1d)

    groups = param_groups(model, weight_decay=5e-4, lr=0.2, lr_multipliers={"no_decay": 0.5, "no_adapt": 0.1},
                          no_adapt=no_adapt_bn_only)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"decay_adapt", "no_decay_adapt", "no_decay_no_adapt"}
    assert _names(model, by_name["decay_adapt"]) == {"net.1.weight", "net.4.weight"}
    assert _names(model, by_name["no_decay_adapt"]) == {"net.4.bias"}
    assert _names(model, by_name["no_decay_no_adapt"]) == {"net.2.weight", "net.2.bias"}
    assert by_name["decay_adapt"]["lr"] == 0.2
    assert by_name["no_decay_adapt"]["lr"] == pytest.approx(0.1)
    assert by_name["no_decay_no_adapt"]["lr"] == pytest.approx(0.01)
    opt = torch.optim.SGD(groups, lr=1.0, momentum=0.9)  # groups are valid torch param groups
    assert [g["weight_decay"] for g in opt.param_groups] == [5e-4, 0.0, 0.0]


@pytest.mark.parametrize("kwargs, match", [
    (dict(weight_decay=-1e-4), "Invalid weight_decay"),
    (dict(weight_decay=float("nan")), "Invalid weight_decay"),
    (dict(weight_decay=0.0, lr=float("inf")), "Invalid lr"),
    (dict(weight_decay=0.0, lr=0.1, lr_multipliers={"bn": 0.5}), "Supported"),
    (dict(weight_decay=0.0, lr=0.1, lr_multipliers={"no_decay": -1}), "Invalid lr_multipliers"),
    (dict(weight_decay=0.0, lr_multipliers={"no_decay": 0.5}), "need the base lr"),
])
def test_param_groups_bad_input_raises(kwargs, match):
    """Bad weight decay, LR or multiplier keys fail with the fix named."""
    with pytest.raises(ValueError, match=match):
        param_groups(SmallCNN(), **kwargs)


def test_param_groups_module_without_trainable_params_raises():
    """A module with nothing to train is an error, not an optimizer with no groups."""
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(nn.ReLU(), weight_decay=0.0)


@pytest.mark.parametrize("build, attr, count", [
    (lambda: torchvision.models.resnet18(weights=None), "bn2", 8),
    (lambda: torchvision.models.resnet50(weights=None), "bn3", 16),
    (lambda: ResNet(depth=20, width=4), "bn2", 9),
])
def test_zero_init_last_bn_residual_blocks(build, attr, count):
    """Only the last BN of each block gets gamma = 0; its beta and all other BNs are untouched."""
    model = build()
    assert zero_init_last_bn(model) == count
    last = {id(getattr(m, attr)) for m in model.modules() if hasattr(m, attr) and hasattr(m, "conv1")}
    assert len(last) == count
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            expected = 0.0 if id(m) in last else 1.0
            assert torch.all(m.weight == expected) and torch.all(m.bias == 0)


def test_zero_init_last_bn_makes_block_identity():
    """With gamma = 0 an identity-shortcut block returns relu(x): the residual branch is silent."""
    model = ResNet(depth=8, width=4).eval()
    zero_init_last_bn(model)
    block = model.layer1[0]
    x = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(block(x), torch.relu(x))


def test_zero_init_last_bn_unknown_blocks():
    """Models without known residual blocks raise; custom blocks are supported by name."""
    with pytest.raises(ValueError, match="no residual block"):
        zero_init_last_bn(SmallCNN())

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3)
            self.norm_out = nn.BatchNorm2d(2)

    model = nn.Sequential(Block(), Block())
    assert zero_init_last_bn(model, blocks={Block: "norm_out"}) == 2
    assert all(torch.all(b.norm_out.weight == 0) for b in model)
    with pytest.raises(ValueError, match="not an affine BatchNorm"):
        zero_init_last_bn(model, blocks={Block: "conv"})
