"""timm's model API on the twelve networks: the generic tests of timm's own tests/test_models.py, ported.

Every generic test of timm's suite that applies to a CIFAR-sized classifier runs on every allconv name, at the input
size the pretrained cfg gives (3 x 32 x 32, under every size cap of timm's tests): forward, backward, the default
cfgs, TorchScript, features_only (timm's list and getter wrappers), ``forward_intermediates``, FX forward and
backward, FX then TorchScript, and FX features then TorchScript. Not ported because they cannot apply: the tests of
hub weights (``test_model_inference``, ``test_model_load_pretrained``, ``test_model_features_pretrained``: the nets
have none) and ``test_model_default_cfgs_non_std`` (transformers' token outputs). The tests after them check what
timm users rely on beyond timm's suite.
"""

from __future__ import annotations

import math

import pytest
import timm
import torch
from timm.models import FeatureInfo, get_notrace_functions, get_notrace_modules
from torch import nn
from torchvision.models.feature_extraction import NodePathTracer, create_feature_extractor, get_graph_node_names

from allconv_cli import architectures, models

# TorchScript and FX cost several times a forward pass: those tests are e2e, the rest unit.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")

NAMES = [entrypoint.__name__ for entrypoint in models.ENTRYPOINTS]


def _input(model_name: str, batch_size: int) -> torch.Tensor:
    return torch.randn((batch_size, *timm.get_pretrained_cfg_value(model_name, "input_size")))


def _check_maps(outputs: list[torch.Tensor], info: FeatureInfo, inputs: torch.Tensor) -> None:
    """timm's checks of feature maps: one per tap, its channels, at most ceil(size / reduction) + 1 wide, no NaN."""
    assert len(outputs) == len(info.channels())
    for channels, reduction, output in zip(info.channels(), info.reduction(), outputs, strict=True):
        assert output.shape[1] == channels and output.shape[0] == inputs.shape[0]
        for axis in (2, 3):
            assert output.shape[axis] <= math.ceil(inputs.shape[axis] / reduction) + 1
        assert not torch.isnan(output).any()


def _check_backward(model: nn.Module, outputs: torch.Tensor, num_params: int) -> None:
    """timm's backward checks: every parameter gets a gradient, 42 classes out, no NaN."""
    outputs.mean().backward()
    for n, x in model.named_parameters():
        assert x.grad is not None, f"No gradient for {n}"
    num_grad = sum(x.grad.numel() for x in model.parameters() if x.grad is not None)
    assert outputs.shape[-1] == 42
    assert num_params == num_grad, "Some parameters are missing gradients"
    assert not torch.isnan(outputs).any(), "Output included NaNs"


def _fx_model(model: nn.Module, train: bool = False) -> nn.Module:
    """torchvision's feature extractor over timm's leaf modules and functions, returning the graph's output (in train
    mode: the nodes that feed it), as timm's tests build it."""
    tracer_kwargs = {"leaf_modules": get_notrace_modules(), "autowrap_functions": get_notrace_functions(),
                     "param_shapes_constant": True}
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    train_return = [train_nodes[-1]]
    if train:
        graph_nodes = list(reversed(NodePathTracer(**tracer_kwargs).trace(model).nodes))
        output_inputs = [node.name for node in graph_nodes[0]._input_nodes]
        names = [node.name for node in graph_nodes]
        train_return = [train_nodes[-names.index(name)] for name in output_inputs]
    return create_feature_extractor(model, train_return_nodes=train_return, eval_return_nodes=[eval_nodes[-1]],
                                    tracer_kwargs=tracer_kwargs)


# ------------------------------------------------------------------------------------------- timm's generic suite


@pytest.mark.unit
@pytest.mark.parametrize("model_name", NAMES)
def test_model_forward(model_name: str) -> None:
    model = timm.create_model(model_name, pretrained=False).eval()
    outputs = model(_input(model_name, 1))
    assert outputs.shape == (1, 10)
    assert not torch.isnan(outputs).any(), "Output included NaNs"
    # timm's test also compares the output with gradient checkpointing on where a model offers it; these do not
    assert not hasattr(model, "set_grad_checkpointing")


@pytest.mark.unit
@pytest.mark.parametrize("model_name", NAMES)
def test_model_backward(model_name: str) -> None:
    model = timm.create_model(model_name, pretrained=False, num_classes=42)
    num_params = sum(x.numel() for x in model.parameters())
    model.train()
    outputs = model(_input(model_name, 2))
    _check_backward(model, outputs, num_params)


@pytest.mark.unit
@pytest.mark.parametrize("model_name", NAMES)
def test_model_default_cfgs(model_name: str) -> None:
    model = timm.create_model(model_name, pretrained=False).eval()
    assert model.num_classes >= 0 and model.num_features > 0 and model.head_hidden_size > 0
    assert getattr(model, "output_fmt", "NCHW") == "NCHW"  # channels on axis 1, space on 2 and 3
    state_dict = model.state_dict()
    cfg = model.default_cfg
    assert model.pretrained_cfg is cfg and cfg["architecture"] == model_name
    pool_size = cfg["pool_size"]
    input_tensor = _input(model_name, 1)

    # forward_features (always unpooled) and forward_head with pre_logits
    outputs = model.forward_features(input_tensor)
    outputs_pre = model.forward_head(outputs, pre_logits=True)
    assert tuple(outputs.shape[-2:]) == pool_size
    assert outputs.shape[1] == model.num_features
    assert outputs_pre.shape == (1, model.head_hidden_size)
    assert torch.equal(model.forward_head(outputs), model(input_tensor))

    # classifier deleted: the output is pooled, size(-1) == num_features, the pre-logits features themselves
    model.reset_classifier(0)
    assert model.num_classes == 0
    outputs = model.forward(input_tensor)
    assert len(outputs.shape) == 2
    assert outputs.shape[1] == model.num_features == model.head_hidden_size
    assert outputs.shape == outputs_pre.shape
    assert torch.equal(outputs, outputs_pre)
    assert isinstance(model.get_classifier(), nn.Identity)

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
    assert cfg["num_classes"]
    classifier = cfg["classifier"]
    for c in (classifier,) if not isinstance(classifier, (tuple, list)) else classifier:
        assert c + ".weight" in state_dict, f"{c} not in model params"
    first_conv = cfg["first_conv"]
    for fc in (first_conv,) if isinstance(first_conv, str) else first_conv:
        assert fc + ".weight" in state_dict, f"{fc} not in model params"


@pytest.mark.e2e
@pytest.mark.parametrize("model_name", NAMES)
def test_model_forward_torchscript(model_name: str) -> None:
    """Scripted, the net gives what it gives eagerly."""
    with timm.set_scriptable(True):
        model = timm.create_model(model_name, pretrained=False)
    model.eval()
    scripted = torch.jit.script(model)
    inputs = _input(model_name, 1)
    outputs = scripted(inputs)
    assert outputs.shape[0] == 1
    assert not torch.isnan(outputs).any(), "Output included NaNs"
    torch.testing.assert_close(outputs, model(inputs))


@pytest.mark.unit
@pytest.mark.parametrize("model_name", NAMES)
def test_model_forward_features(model_name: str) -> None:
    """features_only (timm's list wrapper): one map per pooling stage plus the final features, as ``feature_info``
    says; the last is exactly ``forward_features`` of the same weights."""
    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False, features_only=True).eval()
    assert len(model.feature_info.channels()) >= 3
    inputs = _input(model_name, 1)
    outputs = model(inputs)
    _check_maps(outputs, model.feature_info, inputs)

    torch.manual_seed(0)
    full = timm.create_model(model_name, pretrained=False).eval()
    assert torch.equal(outputs[-1], full.forward_features(inputs))


@pytest.mark.unit
@pytest.mark.parametrize("model_name", NAMES)
def test_model_forward_intermediates_features(model_name: str) -> None:
    """features_only through timm's getter wrapper (``forward_intermediates``) gives the list wrapper's maps."""
    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False, features_only=True, feature_cls="getter").eval()
    inputs = _input(model_name, 1)
    outputs = model(inputs)
    _check_maps(outputs, model.feature_info, inputs)

    torch.manual_seed(0)
    listed = timm.create_model(model_name, pretrained=False, features_only=True).eval()
    assert all(torch.equal(a, b) for a, b in zip(outputs, listed(inputs), strict=True))


@pytest.mark.unit
@pytest.mark.parametrize("model_name", NAMES)
def test_model_forward_intermediates(model_name: str) -> None:
    model = timm.create_model(model_name, pretrained=False).eval()
    feature_info = FeatureInfo(model.feature_info, len(model.feature_info))
    assert len(feature_info.channels()) >= 3
    inputs = _input(model_name, 1)
    output, intermediates = model.forward_intermediates(inputs, output_fmt="NCHW")
    _check_maps(intermediates, feature_info, inputs)
    assert torch.allclose(output, model.forward_features(inputs))


@pytest.mark.e2e
@pytest.mark.parametrize("model_name", NAMES)
def test_model_forward_fx(model_name: str) -> None:
    """Symbolically traced, the net gives exactly what the module gives."""
    model = timm.create_model(model_name, pretrained=False).eval()
    inputs = _input(model_name, 1)
    with torch.inference_mode():
        outputs = model(inputs)
        fx_outputs = torch.cat(tuple(_fx_model(model)(inputs).values()))
    assert torch.all(fx_outputs == outputs)
    assert outputs.shape[0] == 1
    assert not torch.isnan(outputs).any(), "Output included NaNs"


@pytest.mark.e2e
@pytest.mark.parametrize("model_name", NAMES)
def test_model_backward_fx(model_name: str) -> None:
    model = timm.create_model(model_name, pretrained=False, num_classes=42)
    model.train()
    num_params = sum(x.numel() for x in model.parameters())
    model = _fx_model(model, train=True)
    outputs = torch.cat(tuple(model(_input(model_name, 2)).values()))
    _check_backward(model, outputs, num_params)


@pytest.mark.e2e
@pytest.mark.parametrize("model_name", NAMES)
def test_model_forward_fx_torchscript(model_name: str) -> None:
    """Symbolically traced, then scripted."""
    with timm.set_scriptable(True):
        model = timm.create_model(model_name, pretrained=False)
    model.eval()
    model = torch.jit.script(_fx_model(model))
    with torch.inference_mode():
        outputs = torch.cat(tuple(model(_input(model_name, 1)).values()))
    assert outputs.shape[0] == 1
    assert not torch.isnan(outputs).any(), "Output included NaNs"


@pytest.mark.e2e
@pytest.mark.parametrize("model_name", NAMES)
def test_model_forward_torchscript_with_features_fx(model_name: str) -> None:
    """features_only through timm's FX wrapper, scripted: a list of maps."""
    with timm.set_scriptable(True):
        model = timm.create_model(model_name, pretrained=False, features_only=True, feature_cfg={"feature_cls": "fx"})
    model.eval()
    model = torch.jit.script(model)
    with torch.inference_mode():
        outputs = model(_input(model_name, 1))
    assert isinstance(outputs, list) and len(outputs) == 3
    for tensor in outputs:
        assert tensor.shape[0] == 1
        assert not torch.isnan(tensor).any(), "Output included NaNs"


# ------------------------------------------------------------------------------------------------ beyond timm's suite


@pytest.mark.unit
def test_every_network_has_a_plain_entry_point_in_timms_registry() -> None:
    """Go-to-definition on a name finds its function: timm's registry holds the twelve functions of models.py."""
    assert list(architectures.ARCHITECTURES.values()) == NAMES
    assert sorted(timm.list_models("allconv_*")) == sorted(NAMES)
    for entrypoint in models.ENTRYPOINTS:
        assert timm.models.model_entrypoint(entrypoint.__name__) is entrypoint
        assert entrypoint.__module__ == models.__name__ and entrypoint.__doc__
    models.register_timm()  # idempotent: no second registration, no warning
    assert len(timm.list_models("allconv_*")) == 12


@pytest.mark.unit
def test_all_twelve_are_registered_with_their_cfgs() -> None:
    for (base, branch), name in architectures.ARCHITECTURES.items():
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg is not None and cfg.architecture == name and not cfg.has_weights
        assert {k: getattr(cfg, k) for k in models.pretrained_cfg_of(base, branch)} == models.pretrained_cfg_of(
            base, branch)
        made = timm.create_model(name)
        assert (made.features.conv1.conv.weight.shape[0], models.count_params(made)) == (
            96, architectures.param_count(base, branch))


@pytest.mark.unit
@pytest.mark.parametrize("model_name", NAMES)
def test_reset_classifier_to_new_classes(model_name: str) -> None:
    """A fresh head for another class count, with the net's BN/ReLU choice; the features are left alone."""
    model = timm.create_model(model_name, pretrained=False, bn=True).eval()
    x = _input(model_name, 2)
    features = model.forward_features(x)
    model.reset_classifier(5)
    head = model.get_classifier()
    assert model.num_classes == 5 and head.conv.out_channels == 5 and isinstance(head.bn, nn.BatchNorm2d)
    assert model(x).shape == (2, 5)
    assert torch.equal(model.forward_features(x), features)
    assert model.default_cfg["classifier"] + ".weight" in model.state_dict()


@pytest.mark.unit
def test_intermediates_pick_stop_early_and_prune() -> None:
    """``indices`` as timm reads them (None all, n the last n, a list), ``stop_early`` and the pruning timm's getter
    wrapper does: the kept taps are the same maps, the net ends at the last one."""
    model = timm.create_model("allconv_b_model").eval()
    x = _input("allconv_b_model", 2)
    _, taps = model.forward_intermediates(x)
    assert [t.shape[1:] for t in taps] == [(96, 16, 16), (192, 8, 8), (192, 6, 6)]
    assert all(torch.equal(a, b) for a, b in zip(model.forward_intermediates(x, 2, intermediates_only=True),
                                                   taps[1:], strict=True))
    first = model.forward_intermediates(x, [0], stop_early=True)
    assert torch.equal(first[0], taps[0]) and torch.equal(first[1][0], taps[0])
    assert torch.equal(model.forward_intermediates(x, [-1], intermediates_only=True)[0], taps[-1])
    for bad in (0, 4, [3], [-4]):
        with pytest.raises(ValueError, match="indices="):
            model.forward_intermediates(x, bad)
    with pytest.raises(ValueError, match="NCHW"):
        model.forward_intermediates(x, output_fmt="NHWC")
    assert model.prune_intermediate_layers([0, 1]) == [0, 1]
    assert list(model.features._modules)[-1] == "pool2" and model.num_features == 192 and model.num_classes == 0
    assert len(model.feature_info) == 2
    assert torch.equal(model(x), taps[1])
    assert [t.shape[1:] for t in model.forward_intermediates(x, [0, 1], intermediates_only=True)] == [
        (96, 16, 16), (192, 8, 8)]


@pytest.mark.unit
def test_create_model_options_and_errors() -> None:
    model = timm.create_model("allconv_c_allcnn", num_classes=100, drop_rate=0.3)
    assert model.num_classes == 100 and model.features.drop1.p == 0.3 and model(torch.randn(1, 3, 32, 32)).shape == (
        1, 100)
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("allconv_c_allcnn", pretrained=True)
    with pytest.raises(TypeError, match="drop_path_rate"):
        timm.create_model("allconv_c_allcnn", drop_path_rate=0.1)
    config = timm.data.resolve_data_config({}, model=model)
    assert config["input_size"] == (3, 32, 32) and config["crop_pct"] == 1.0


@pytest.mark.unit
def test_build_and_timm_agree() -> None:
    """``models.build`` (what training uses) and ``timm.create_model`` make the same net with the same cfg fields."""
    built = models.build("B", "convpool")
    made = timm.create_model("allconv_b_convpool")
    assert list(built.state_dict()) == list(made.state_dict())
    assert built.feature_info == made.feature_info and built.num_features == made.num_features
    for key, value in built.pretrained_cfg.items():
        assert made.pretrained_cfg[key] == value, key
