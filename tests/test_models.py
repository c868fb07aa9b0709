"""The twelve networks must match the paper's Tables 1 and 2 exactly."""

from __future__ import annotations

import json
import subprocess
import sys

import click
import pytest
import torch
from torch import nn

from allconv_cli import models
from allconv_cli.errors import AllconvError
from conftest import run_side_by_side

EXPECTED_PARAMS = {
    ("A", "model"): 839_242,
    ("A", "strided"): 839_242,
    ("A", "convpool"): 1_254_250,
    ("A", "allcnn"): 1_254_250,
    ("B", "model"): 885_610,
    ("B", "strided"): 885_610,
    ("B", "convpool"): 1_300_618,
    ("B", "allcnn"): 1_300_618,
    ("C", "model"): 954_730,
    ("C", "strided"): 954_730,
    ("C", "convpool"): 1_369_738,
    ("C", "allcnn"): 1_369_738,
}


@pytest.mark.unit
@pytest.mark.parametrize(("base", "branch"), list(EXPECTED_PARAMS))
def test_parameter_counts_are_exact(base: str, branch: str) -> None:
    assert models.count_params(models.build(base, branch)) == EXPECTED_PARAMS[(base, branch)]


@pytest.mark.unit
@pytest.mark.parametrize(("base", "branch"), list(EXPECTED_PARAMS))
def test_shapes_and_no_shared_modules(base: str, branch: str) -> None:
    model = models.build(base, branch, num_classes=100).eval()
    feature_maps = {}
    for name, module in model.layers.named_children():
        module.register_forward_hook(lambda m, i, o, name=name: feature_maps.__setitem__(name, o.shape))
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 100)
    children = list(model.modules())
    assert len({id(m) for m in children}) == len(children), "a module object appears twice"
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    valid = [c for c in convs if c.padding == (0, 0) and c.kernel_size == (3, 3)]
    assert len(valid) == 1 and valid[0].out_channels == 192
    # the global average runs over 6x6 after the unpadded conv
    assert feature_maps["gap"] == (2, 100)
    last_map = [s for n, s in feature_maps.items() if n.startswith("conv")][-1]
    assert tuple(last_map[2:]) == (6, 6)
    for conv in convs:
        if conv is not valid[0]:
            assert conv.padding == (conv.kernel_size[0] // 2,) * 2


@pytest.mark.unit
def test_branch_rewrites() -> None:
    kinds = {br: [s.kind for s in models.layer_plan("C", br)] for br in models.BRANCHES}
    assert kinds["model"].count("pool") == 2 and kinds["strided"].count("pool") == 0
    assert kinds["allcnn"].count("pool") == 0 and kinds["convpool"].count("pool") == 2
    assert kinds["convpool"].count("conv") == kinds["allcnn"].count("conv") == kinds["model"].count("conv") + 2
    # strided B: the stride goes on the 1x1 conv that stood before the removed pool
    strided_b = [s for s in models.layer_plan("B", "strided") if s.kind == "conv" and s.stride == 2]
    assert [(s.kernel, s.out) for s in strided_b] == [(1, 96), (1, 192)]
    allcnn_a = [s for s in models.layer_plan("A", "allcnn") if s.kind == "conv" and s.stride == 2]
    assert [(s.kernel, s.out) for s in allcnn_a] == [(3, 96), (3, 192)]
    # dropout: 20% on the input, 50% after each pooling layer or its replacement
    model = models.build("A", "strided")
    names = list(dict(model.layers.named_children()))
    assert names[0] == "drop0" and model.layers.drop0.p == 0.2
    assert names[names.index("conv1") + 1] == "drop1" and model.layers.drop1.p == 0.5


@pytest.mark.unit
def test_dropout_off_in_eval_and_bn_option() -> None:
    model = models.build("C", "allcnn", bn=True).eval()
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(model(x), model(x))
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 9
    model.train()
    assert not torch.equal(model(x), model(x))


@pytest.mark.unit
def test_head_relu_option() -> None:
    with_relu = models.build("C", "model", init="gaussian")
    without = models.build("C", "model", head_relu=False)
    assert isinstance(with_relu.layers[-2].relu, nn.ReLU)
    assert isinstance(without.layers[-2].relu, nn.Identity)


@pytest.mark.unit
@pytest.mark.parametrize("init", models.INITS)
def test_inits(init: str) -> None:
    torch.manual_seed(0)
    model = models.build("C", "allcnn", init=init, init_std=0.05)
    weight = model.layers.conv2.conv.weight
    if init == "gaussian":
        assert abs(weight.std().item() - 0.05) < 0.005
    if init == "xavier":
        bound = (6 / (96 * 9 + 96 * 9)) ** 0.5
        assert weight.abs().max().item() <= bound and weight.std().item() > bound / 3


# init -> (weight distribution, its std from fan_in/fan_out/--init-std, bias std or None for zeros)
INIT_LAWS = {
    "xavier": ("uniform", lambda fi, fo, std: (2.0 / (fi + fo)) ** 0.5, None),  # U(+-sqrt(6/(fi+fo))): var 2/(fi+fo)
    "xavier-caffe": ("uniform", lambda fi, fo, std: (1.0 / fi) ** 0.5, None),  # U(+-sqrt(3/fi)): var 1/fi
    "gaussian": ("normal", lambda fi, fo, std: std, "std"),  # the neon/TF port: N(0, std) weights and biases
    "kaiming": ("normal", lambda fi, fo, std: (2.0 / fi) ** 0.5, None),
    "torch": ("uniform", lambda fi, fo, std: (1.0 / (3 * fi)) ** 0.5, "torch"),  # U(+-1/sqrt(fi)), biases too
}


@pytest.mark.unit
@pytest.mark.parametrize("init", models.INITS)
@pytest.mark.parametrize("base", ["A", "C"])
def test_init_statistics_follow_the_formula(init: str, base: str) -> None:
    """Every conv's weight std equals its scheme's formula within 5 standard errors of a sample std (SE = std x
    sqrt((kurtosis - 1) / 4n): kurtosis 1.8 uniform, 3 normal), mean 0 within 5 SE; uniform weights within the
    bound; biases as the scheme says. All-CNN-A (5x5 convs) and -C (3x3): 16 layers of fan_in 27 to 4,800."""
    assert set(INIT_LAWS) == set(models.INITS)
    law, std_of, bias_law = INIT_LAWS[init]
    torch.manual_seed(1)
    std_setting = 0.03
    model = models.build(base, "allcnn", init=init, init_std=std_setting)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == sum(spec.kind == "conv" for spec in models.layer_plan(base, "allcnn"))  # 7 in A, 9 in C
    biases, bias_expected = [], []
    for conv in convs:
        w = conv.weight.detach().double()
        fan_in, fan_out = w[0].numel(), w.shape[0] * w[0, 0].numel()
        expected = std_of(fan_in, fan_out, std_setting)
        n = w.numel()
        se = expected * (((1.8 if law == "uniform" else 3.0) - 1) / (4 * n)) ** 0.5
        assert abs(w.std().item() - expected) < 5 * se, (conv, w.std().item(), expected)
        assert abs(w.mean().item()) < 5 * expected / n**0.5
        if law == "uniform":
            assert w.abs().max().item() <= expected * 3**0.5 * (1 + 1e-6)
        biases.append(conv.bias.detach().double())
        bias_expected.append(torch.full_like(biases[-1], 1.0 / (3 * fan_in) ** 0.5))
    bias = torch.cat(biases)
    if bias_law is None:
        assert not bias.any()
    else:  # pooled over the layers (1,066 biases in C), each scaled to its own expected std
        scale = torch.full_like(bias, std_setting) if bias_law == "std" else torch.cat(bias_expected)
        z = bias / scale
        n = len(z)
        kurtosis = 3.0 if bias_law == "std" else 1.8
        assert abs(z.pow(2).mean().sqrt().item() - 1) < 5 * ((kurtosis - 1) / (4 * n)) ** 0.5


@pytest.mark.unit
def test_bad_names_raise_clear_errors() -> None:
    with pytest.raises(AllconvError, match="'D'"):
        models.layer_plan("D", "model")
    with pytest.raises(AllconvError, match="'pooled'"):
        models.layer_plan("A", "pooled")
    with pytest.raises(AllconvError, match=r"dropout_hidden=1\.5"):
        models.build("A", "model", dropout_hidden=1.5)
    assert models.parse_name("allconv_c_allcnn") == ("C", "allcnn")
    assert models.parse_name("B/convpool") == ("B", "convpool")


@pytest.mark.e2e
def test_timm_registry_after_import() -> None:
    code = (
        "import allconv_cli, timm; m = timm.create_model('allconv_c_allcnn', num_classes=100);"
        "print(type(m).__name__, m.num_classes, sum(p.numel() for p in m.parameters()));"
        "print(len(timm.list_models('allconv_*')))"
    )
    other_order = "import timm, allconv_cli; print(timm.create_model('allconv_a_model').num_classes)"
    first, second = run_side_by_side([[sys.executable, "-c", code], [sys.executable, "-c", other_order]])
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    out = first.stdout.split()
    assert out[:2] == ["AllConvNet", "100"]
    assert int(out[2]) == 1_369_738 - 192 * 10 - 10 + 192 * 100 + 100
    assert out[3] == "12"
    assert second.stdout.strip() == "10"


@pytest.mark.unit
def test_import_does_not_pull_torch() -> None:
    code = (
        "import sys, allconv_cli.cli; print('torch' in sys.modules, 'mlflow' in sys.modules, 'optuna' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False False False"


@pytest.mark.e2e
def test_models_cli_json_and_table_and_a_bad_name() -> None:
    cli = [sys.executable, "-m", "allconv_cli", "models"]
    as_json, table, summ, bad = run_side_by_side(
        [[*cli, "--format", "json"], cli, [*cli, "--summary", "allconv_c_allcnn"],
         [*cli, "--summary", "allconv_d_model"]],
        env={"COLUMNS": "160", "PATH": ""},
    )
    rows = json.loads(as_json.stdout)
    assert {(r["base"], r["branch"]): r["params"] for r in rows} == EXPECTED_PARAMS
    assert {"name", "base", "branch", "display_name", "params", "paper_error"} <= set(rows[0])
    assert next(r for r in rows if r["name"] == "allconv_c_allcnn")["paper_error"] == 9.08
    assert "All-CNN-C" in table.stdout and "1,369,738" in table.stdout and "9.08" in table.stdout
    assert "192 x 6 x 6" in summ.stdout and "1,369,738" in summ.stdout
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "allconv_d_model" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.unit
def test_cli_choices_match_the_library() -> None:
    """The CLI's choice lists are generated from TrainConfig's metadata, so `--help` needs no torch; they are the
    lists the library checks against."""
    from allconv_cli import config, paper
    from allconv_cli.cli.train_cmd import train_command

    choices = {p.name: tuple(p.type.choices) for p in train_command.params if isinstance(p.type, click.Choice)}
    assert choices["model"] == paper.BASES and choices["branch"] == paper.BRANCHES == models.BRANCHES
    assert choices["init"] == config.INITS == models.INITS and choices["optimizer"] == config.OPTIMIZERS
    assert choices["compile_mode"] == config.COMPILE_MODES
    assert choices["dataset"] == config.DATASETS and choices["preprocess"] == config.PREPROCESSINGS
    assert choices["augment"] == config.AUGMENTATIONS
