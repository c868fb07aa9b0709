"""The twelve networks must match the paper's Tables 1 and 2 exactly."""

from __future__ import annotations

import json
import subprocess
import sys

import click
import pytest
import torch
from torch import nn

from allconv_cli import architectures, config, models, paper
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
    for name, module in model.named_layers():
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
    kinds = {br: [s.kind for s in models.layer_plan("C", br)] for br in paper.BRANCHES}
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
    names = [name for name, _ in model.named_layers()]
    assert names[0] == "drop0" and model.features.drop0.p == 0.2
    assert names[names.index("conv1") + 1] == "drop1" and model.features.drop1.p == 0.5


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
    assert isinstance(with_relu.named_layers()[-2][1].relu, nn.ReLU) and with_relu.named_layers()[-2][0] == "conv7"
    assert isinstance(without.get_classifier().relu, nn.Identity)


@pytest.mark.unit
@pytest.mark.parametrize("init", config.INITS)
def test_inits(init: str) -> None:
    torch.manual_seed(0)
    model = models.build("C", "allcnn", init=init, init_std=0.05)
    weight = model.features.conv2.conv.weight
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
@pytest.mark.parametrize("init", config.INITS)
@pytest.mark.parametrize("base", ["A", "C"])
def test_init_statistics_follow_the_formula(init: str, base: str) -> None:
    """Every conv's weight std equals its scheme's formula within 5 standard errors of a sample std (SE = std x
    sqrt((kurtosis - 1) / 4n): kurtosis 1.8 uniform, 3 normal), mean 0 within 5 SE; uniform weights within the
    bound; biases as the scheme says. All-CNN-A (5x5 convs) and -C (3x3): 16 layers of fan_in 27 to 4,800."""
    assert set(INIT_LAWS) == set(config.INITS)
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
    assert architectures.parse_name("allconv_c_allcnn") == ("C", "allcnn")
    assert architectures.parse_name("B/convpool") == ("B", "convpool")


@pytest.mark.unit
def test_the_library_checks_with_the_config_messages() -> None:
    """One place for choices and ranges: the builder and the layer table raise TrainConfig's own messages."""
    cases = [(lambda: models.build("A", "model", dropout_input=1.0), "dropout_input"),
             (lambda: models.build("C", "allcnn", init="he"), "init"),
             (lambda: models.build("C", "allcnn", init="gaussian", init_std=0.0), "init_std"),
             (lambda: models.layer_plan("D", "model"), "model"),
             (lambda: models.layer_plan("A", "pooled"), "branch")]
    for make, field in cases:
        with pytest.raises(AllconvError) as err:
            make()
        value = {"dropout_input": 1.0, "init": "he", "init_std": 0.0, "model": "D", "branch": "pooled"}[field]
        assert str(err.value) == config.spec(field).check(field, value)


@pytest.mark.unit
@pytest.mark.parametrize(("name", "expected"), [
    ("All-CNN-C", ("C", "allcnn")), ("all-cnn-c", ("C", "allcnn")), ("Model A", ("A", "model")),
    ("model  a", ("A", "model")), ("ConvPool-CNN-B", ("B", "convpool")), ("STRIDED-CNN-A", ("A", "strided")),
    ("allconv_c_allcnn", ("C", "allcnn")), ("ALLCONV_B_MODEL", ("B", "model")), ("c-allcnn", ("C", "allcnn")),
])
def test_parse_name_takes_registry_and_paper_names(name: str, expected: tuple[str, str]) -> None:
    assert architectures.parse_name(name) == expected


@pytest.mark.unit
def test_an_unknown_name_lists_every_valid_one_on_one_line() -> None:
    with pytest.raises(AllconvError) as err:
        architectures.parse_name("All-CNN-D")
    message = str(err.value)
    assert "'All-CNN-D'" in message and "\n" not in message
    assert all(name in message for name in architectures.ARCHITECTURES.values())
    assert all(entry.display_name in message for entry in paper.TABLE3.values())


@pytest.mark.unit
def test_from_config_builds_what_the_engine_builds() -> None:
    """``models.from_config`` reads every ``network`` field of TrainConfig (the engine's keyword list, derived):
    the same net, weight for weight, as ``engine.build_model`` for non-default values of each."""
    from allconv_cli.engine import build_model

    cfg = config.TrainConfig(model="B", branch="convpool", bn=True, dropout_input=0.1, dropout_hidden=0.3,
                             init="gaussian", init_std=0.02, head_relu=False)
    torch.manual_seed(3)
    ours = models.from_config(cfg, 7)
    torch.manual_seed(3)
    engine = build_model(cfg, 7)
    assert ours.state_dict().keys() == engine.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), engine.state_dict().values(),
                                                   strict=True))
    assert (ours.features.drop0.p, ours.features.drop1.p, ours.num_classes) == (0.1, 0.3, 7)
    assert isinstance(ours.get_classifier().relu, nn.Identity)


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


@pytest.mark.e2e
def test_models_cli_at_80_columns_takes_paper_names_and_needs_no_torch() -> None:
    """At 80 columns every registry name stays whole on its row (a person copies it); ``--summary`` takes the
    paper's names; an unknown name is one line listing the valid ones; the list itself imports no torch."""
    cli = [sys.executable, "-m", "allconv_cli", "models"]
    no_torch = ("import sys, atexit; atexit.register(lambda: print('torch' in sys.modules)); "
                "from allconv_cli.cli import main; main(['models'])")
    table, by_paper, bad, light = run_side_by_side(
        [cli, [*cli, "--summary", "ConvPool-CNN-B"], [*cli, "--summary", "Model D"],
         [sys.executable, "-c", no_torch]],
        env={"COLUMNS": "80", "PATH": ""},
    )
    lines = table.stdout.splitlines()
    assert table.returncode == 0 and max(map(len, lines)) <= 80
    for key, name in architectures.ARCHITECTURES.items():
        row = next(line for line in lines if f" {name} " in line)
        assert paper.TABLE3[key].display_name in row and f"{architectures.param_count(*key):,}" in row
    assert by_paper.returncode == 0, by_paper.stderr
    assert "ConvPool-CNN-B (allconv_b_convpool)" in by_paper.stdout and "1,300,618" in by_paper.stdout
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "'Model D'" in bad.stderr
    assert "allconv_c_allcnn" in bad.stderr and "All-CNN-C" in bad.stderr and "Traceback" not in bad.stderr
    assert light.returncode == 0 and light.stdout.splitlines()[-1] == "False", light.stderr


@pytest.mark.unit
def test_cli_choices_match_the_library() -> None:
    """The CLI's choice lists are generated from TrainConfig's metadata, so `--help` needs no torch; they are the
    lists the library checks against."""
    from allconv_cli.cli.train_cmd import train_command

    choices = {p.name: tuple(p.type.choices) for p in train_command.params if isinstance(p.type, click.Choice)}
    assert choices["model"] == paper.BASES and choices["branch"] == paper.BRANCHES == config.spec("branch").choices
    assert choices["init"] == config.INITS == config.spec("init").choices and choices["optimizer"] == config.OPTIMIZERS
    assert choices["compile_mode"] == config.COMPILE_MODES
    assert choices["dataset"] == config.DATASETS and choices["preprocess"] == config.PREPROCESSINGS
    assert choices["augment"] == config.AUGMENTATIONS
