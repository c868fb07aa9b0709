"""timm's model API on the twelve networks: the generic checks of timm's own tests/test_models.py, ported.

``test_model_forward``, ``test_model_backward``, ``test_model_default_cfgs`` and ``test_model_forward_features`` are
timm's, run on every allconv name (timm's version picks its input size from the pretrained cfg, as here: 32 x 32).
The rest check what timm users rely on beyond them: the registry's pretrained cfgs, ``reset_classifier`` with a new
class count, ``forward_head(pre_logits=True)`` and the feature taps against ``forward_features``.
"""

from __future__ import annotations

import pickle

import pytest
import timm
import torch
from torch import nn

from allconv_cli import models

pytestmark = pytest.mark.unit

NAMES = list(models.ARCHITECTURES.values())


def _input(model: nn.Module, batch_size: int) -> torch.Tensor:
    return torch.randn((batch_size, *model.default_cfg["input_size"]))


def test_all_twelve_are_registered_with_their_cfgs() -> None:
    assert sorted(timm.list_models("allconv_*")) == sorted(NAMES)
    for (base, branch), name in models.ARCHITECTURES.items():
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg is not None and cfg.architecture == name and not cfg.has_weights
        assert {k: getattr(cfg, k) for k in models.pretrained_cfg_of(base, branch)} == models.pretrained_cfg_of(
            base, branch)


@pytest.mark.parametrize("model_name", NAMES)
def test_model_forward(model_name: str) -> None:
    model = timm.create_model(model_name, pretrained=False).eval()
    outputs = model(_input(model, 1))
    assert outputs.shape == (1, 10)
    assert not torch.isnan(outputs).any(), "Output included NaNs"


@pytest.mark.parametrize("model_name", NAMES)
def test_model_backward(model_name: str) -> None:
    model = timm.create_model(model_name, pretrained=False, num_classes=42)
    num_params = sum(x.numel() for x in model.parameters())
    model.train()
    outputs = model(_input(model, 2))
    outputs.mean().backward()
    for n, x in model.named_parameters():
        assert x.grad is not None, f"No gradient for {n}"
    num_grad = sum(x.grad.numel() for x in model.parameters() if x.grad is not None)
    assert outputs.shape[-1] == 42
    assert num_params == num_grad, "Some parameters are missing gradients"
    assert not torch.isnan(outputs).any(), "Output included NaNs"


@pytest.mark.parametrize("model_name", NAMES)
def test_model_default_cfgs(model_name: str) -> None:
    model = timm.create_model(model_name, pretrained=False).eval()
    state_dict = model.state_dict()
    cfg = model.default_cfg
    assert model.pretrained_cfg is cfg and cfg["architecture"] == model_name
    pool_size = cfg["pool_size"]
    input_tensor = _input(model, 1)

    # forward_features (always unpooled) and forward_head with pre_logits
    outputs = model.forward_features(input_tensor)
    outputs_pre = model.forward_head(outputs, pre_logits=True)
    assert tuple(outputs.shape[-2:]) == pool_size
    assert outputs.shape[1] == model.num_features
    assert outputs_pre.shape == (1, model.head_hidden_size)
    assert torch.equal(model.forward_head(outputs), model(input_tensor))

    # classifier deleted: the output is pooled, size(-1) == num_features, the pre-logits features themselves
    model.reset_classifier(0)
    outputs = model.forward(input_tensor)
    assert len(outputs.shape) == 2
    assert outputs.shape[1] == model.num_features == model.head_hidden_size
    assert outputs.shape == outputs_pre.shape
    assert torch.equal(outputs, outputs_pre)
    assert isinstance(model.get_classifier(), nn.Identity) and model.num_classes == 0

    # classifier and pooling deleted: the unpooled map
    model.reset_classifier(0, "")
    outputs = model.forward(input_tensor)
    assert len(outputs.shape) == 4
    assert tuple(outputs.shape[-2:]) == pool_size

    # classifier and global pool deleted through __init__
    model = timm.create_model(model_name, pretrained=False, num_classes=0, global_pool="").eval()
    outputs = model.forward(input_tensor)
    assert len(outputs.shape) == 4
    assert tuple(outputs.shape[-2:]) == pool_size

    # classifier and first conv names match the cfg
    if cfg.get("num_classes", None):
        classifier = cfg["classifier"]
        for c in (classifier,) if not isinstance(classifier, (tuple, list)) else classifier:
            assert c + ".weight" in state_dict, f"{c} not in model params"
    first_conv = cfg["first_conv"]
    for fc in (first_conv,) if isinstance(first_conv, str) else first_conv:
        assert fc + ".weight" in state_dict, f"{fc} not in model params"


@pytest.mark.parametrize("model_name", NAMES)
def test_model_forward_features(model_name: str) -> None:
    """features_only: one map per pooling stage plus the final features, as ``feature_info`` says; the last is
    exactly ``forward_features`` of the same weights."""
    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False, features_only=True).eval()
    expected_channels = model.feature_info.channels()
    expected_reductions = model.feature_info.reduction()
    assert len(expected_channels) >= 3

    inputs = torch.randn((1, 3, 32, 32))
    outputs = model(inputs)
    assert len(expected_channels) == len(outputs)
    for e, r, o in zip(expected_channels, expected_reductions, outputs, strict=True):
        assert e == o.shape[1]
        assert o.shape[0] == 1
        assert o.shape[-1] <= inputs.shape[-1] // r
        assert not torch.isnan(o).any()

    torch.manual_seed(0)
    full = timm.create_model(model_name, pretrained=False).eval()
    assert torch.equal(outputs[-1], full.forward_features(inputs))


@pytest.mark.parametrize("model_name", NAMES)
def test_reset_classifier_to_new_classes(model_name: str) -> None:
    """A fresh head for another class count, with the net's BN/ReLU choice; the features are left alone."""
    model = timm.create_model(model_name, pretrained=False, bn=True).eval()
    x = _input(model, 2)
    features = model.forward_features(x)
    model.reset_classifier(5)
    head = model.get_classifier()
    assert model.num_classes == 5 and head.conv.out_channels == 5 and isinstance(head.bn, nn.BatchNorm2d)
    assert model(x).shape == (2, 5)
    assert torch.equal(model.forward_features(x), features)
    assert model.default_cfg["classifier"] + ".weight" in model.state_dict()


def test_create_model_options_and_errors() -> None:
    model = timm.create_model("allconv_c_allcnn", num_classes=100, drop_rate=0.3)
    assert model.num_classes == 100 and model.layers.drop1.p == 0.3 and model(torch.randn(1, 3, 32, 32)).shape == (
        1, 100)
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("allconv_c_allcnn", pretrained=True)
    with pytest.raises(TypeError, match="drop_path_rate"):
        timm.create_model("allconv_c_allcnn", drop_path_rate=0.1)
    config = timm.data.resolve_data_config({}, model=model)
    assert config["input_size"] == (3, 32, 32) and config["crop_pct"] == 1.0


def test_build_and_timm_agree() -> None:
    """``models.build`` (what training uses) and ``timm.create_model`` make the same net with the same cfg fields."""
    built = models.build("B", "convpool")
    made = timm.create_model("allconv_b_convpool")
    assert list(built.state_dict()) == list(made.state_dict())
    assert built.feature_info == made.feature_info and built.num_features == made.num_features
    for key, value in built.pretrained_cfg.items():
        assert made.pretrained_cfg[key] == value, key


def test_nets_pickled_before_the_timm_api_still_load() -> None:
    """MLflow logged whole pickled nets before they had timm's attributes; unpickling works them out again."""
    model = models.build("B", "allcnn", bn=True, head_relu=False).eval()
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    old = pickle.loads(pickle.dumps(model))
    for attr in ("head_name", "_head_index", "num_features", "head_hidden_size", "feature_info", "in_chans",
                 "global_pool", "_head_options", "_init"):
        delattr(old, attr)
    loaded = pickle.loads(pickle.dumps(old))
    assert torch.equal(loaded(x), expected)
    assert (loaded.head_name, loaded.num_features, loaded.feature_info) == (
        model.head_name, model.num_features, model.feature_info)
    loaded.reset_classifier(3)
    head = loaded.get_classifier()
    assert isinstance(head.bn, nn.BatchNorm2d) and isinstance(head.relu, nn.Identity) and loaded(x).shape == (2, 3)
