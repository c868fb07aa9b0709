"""`allconv visualize`: the three ReLU back-propagation rules by hand, and the command end to end on a fake run:
weights only (no pickle is loaded), no temporary checkpoint left behind, and --out never overwrites or follows a link
without being told."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import torch
from mlflow import MlflowClient
from torch import nn

from allconv_cli import models, saliency
from allconv_cli.visualize import figure_pixels
from conftest import run_side_by_side


def _hand_net() -> nn.Sequential:
    """x (2) -> Linear W1 (4x2) -> ReLU -> Linear w2 (1x4): at x = (1, 2) the ReLU input is f = (1, -2, 3, 1) and
    the gradient arriving at the ReLU is R = w2 = (2, 1, -3, 1)."""
    net = nn.Sequential(nn.Linear(2, 4, bias=False), nn.ReLU(inplace=True), nn.Linear(4, 1, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, -1.0], [1.0, 1.0], [-1.0, 1.0]]))
        net[2].weight.copy_(torch.tensor([[2.0, 1.0, -3.0, 1.0]]))
    return net


# What passes the ReLU, unit by unit (f = 1, -2, 3, 1; R = 2, 1, -3, 1), and that times W1 = the input gradient:
#   backprop  (f > 0) R          = (2, 0, -3, 1) -> (2 + 0 - 3 - 1, 0 + 0 - 3 + 1) = (-2, -2)
#   deconvnet (R > 0) R          = (2, 1,  0, 1) -> (2 + 0 + 0 - 1, 0 - 1 + 0 + 1) = ( 1,  0)
#   guided    (f > 0) (R > 0) R  = (2, 0,  0, 1) -> (2 + 0 + 0 - 1, 0 + 0 + 0 + 1) = ( 1,  1)
HAND = {"backprop": [-2.0, -2.0], "deconvnet": [1.0, 0.0], "guided": [1.0, 1.0]}


@pytest.mark.unit
@pytest.mark.parametrize("rule", saliency.RULES)
def test_relu_rules_match_the_hand_computed_gradients(rule: str) -> None:
    net = _hand_net()
    x = torch.tensor([[1.0, 2.0]], requires_grad=True)
    with saliency.relu_rule(net, rule) as swapped:
        out = net(x)
        (grad,) = torch.autograd.grad(out.sum(), x)
    assert swapped == 1
    assert out.item() == 2 * 1 + 1 * 0 - 3 * 3 + 1 * 1  # the forward pass is the plain ReLU net's
    assert grad.tolist() == [HAND[rule]]
    # the original in-place ReLU is back and the plain gradient is autograd's own
    assert type(net[1]) is nn.ReLU and net[1].inplace
    (plain,) = torch.autograd.grad(net(x).sum(), x)
    assert plain.tolist() == [HAND["backprop"]]


@pytest.mark.unit
def test_rules_on_a_network_restore_it_and_backprop_is_autograds_gradient() -> None:
    torch.manual_seed(0)
    model = models.build("A", "model", bn=True, init="kaiming").eval()
    relus_before = [id(m) for m in model.modules() if isinstance(m, nn.ReLU)]
    x = torch.randn(3, 3, 32, 32)
    assert saliency.layer_names(model) == ["conv1", "pool1", "conv2", "pool2", "conv3", "conv4", "conv5"]
    assert saliency.default_layer(model) == "conv4"
    unit = 7

    grads = {rule: saliency.reconstruct(model, "conv4", x, unit, rule) for rule in saliency.RULES}

    assert [id(m) for m in model.modules() if isinstance(m, nn.ReLU)] == relus_before
    assert not model.training
    inputs = x.clone().requires_grad_(True)
    peak = saliency.forward_to(model, "conv4", inputs)[:, unit].flatten(1).amax(dim=1)
    (expected,) = torch.autograd.grad(peak.sum(), inputs)
    torch.testing.assert_close(grads["backprop"], expected, rtol=0, atol=0)
    # each image's reconstruction is its own: the same image alone gives the same signal
    torch.testing.assert_close(saliency.reconstruct(model, "conv4", x[1:2], unit, "guided"), grads["guided"][1:2])
    # the three rules give three different signals on a real net
    assert not torch.equal(grads["guided"], grads["backprop"])
    assert not torch.equal(grads["guided"], grads["deconvnet"])
    peaks = saliency.peak_activations(model, "conv4", x, batch_size=2)
    assert peaks.shape == (3, 192)
    torch.testing.assert_close(peaks[:, unit], peak.detach())


# ----------------------------------------------------------------------------------------------------------------
# the command


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["ALLCONV_FAKE_SIZES"] = "400,100"
    return env


def _allconv(*args: str) -> list[str]:
    return [sys.executable, "-m", "allconv_cli", *args]


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A one-epoch run on small fake data, default MLflow store in its folder."""
    cwd = tmp_path_factory.mktemp("visualize")
    out = subprocess.run(
        _allconv("train", "--model", "A", "--branch", "model", "--bn", "--dataset", "fake", "--preprocess",
                 "standardize", "--epochs", "1", "--subset", "200", "--val-size", "100", "--json"),
        cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr
    return cwd, json.loads(out.stdout.strip().splitlines()[-1])["run_id"]


def _artifacts(cwd: Path, run_id: str) -> list[str]:
    mlc = MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlflow.db'}")
    return sorted(a.path for a in mlc.list_artifacts(run_id, "visualize"))


@pytest.mark.e2e
def test_visualize_writes_the_figure_and_logs_it(fake_run: tuple[Path, str]) -> None:
    """Both weight sources and both splits; each run also checks that the raw pictures it shows, preprocessed again,
    are the very inputs it analysed (visualize._check_raw_matches)."""
    cwd, run_id = fake_run
    checkpoint = f"weights runs:/{run_id}/checkpoints/best.pt (epoch 1)"
    default, from_checkpoint = run_side_by_side(
        [
            _allconv("visualize", run_id, "--top", "2", "--units", "2"),
            _allconv("visualize", run_id, "--weights", "best", "--layer", "pool1", "--units", "0,5,95", "--top", "3",
                     "--split", "test", "--out", "pool.png"),
        ],
        cwd=cwd, env=_env(),
    )
    assert default.returncode == 0, default.stderr
    assert from_checkpoint.returncode == 0, from_checkpoint.stderr
    png = cwd / f"visualize-{run_id[:8]}-conv4.png"
    assert f"Wrote {png.name} (conv4 units " in default.stdout
    assert f"top 2 val images each, {checkpoint}" in default.stdout
    assert f"pool1 units 0,5,95, top 3 test images each, {checkpoint}" in from_checkpoint.stdout
    assert f"Logged to the run as runs:/{run_id}/visualize/pool.png" in from_checkpoint.stdout
    for path, (units, top) in ((png, (2, 2)), (cwd / "pool.png", (3, 3))):
        image = matplotlib.image.imread(path)
        width, height = figure_pixels(units, top)
        assert image.shape[:2] == (height, width)
        assert image[..., :3].std() > 0.05  # pictures, not a blank canvas
    assert _artifacts(cwd, run_id) == ["visualize/pool.png", f"visualize/{png.name}"]


@pytest.mark.e2e
def test_visualize_bad_input_is_one_line_and_writes_nothing(fake_run: tuple[Path, str]) -> None:
    cwd, run_id = fake_run
    before = sorted(p.name for p in cwd.iterdir())
    artifacts_before = _artifacts(cwd, run_id)
    results = run_side_by_side(
        [
            _allconv("visualize", "0123456789abcdef0123456789abcdef"),
            _allconv("visualize", run_id, "--layer", "conv9"),
            _allconv("visualize", run_id, "--units", "3,192"),
        ],
        cwd=cwd, env=_env(),
    )
    expected = [
        "no MLflow run '0123456789abcdef0123456789abcdef'",
        "unknown layer 'conv9': choose one of conv1, pool1, conv2, pool2, conv3, conv4, conv5",
        "unit 192 is out of range: conv4 has 192 units (0..191)",
    ]
    for result, message in zip(results, expected, strict=True):
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], result.stderr
        assert result.stdout == ""
    assert sorted(p.name for p in cwd.iterdir()) == before
    assert _artifacts(cwd, run_id) == artifacts_before


# Run in place of `allconv visualize`: every torch.load must be weights-only (a pickled model would run the code
# its author put in it), and the CLI must not import the module that loads pickled MLflow models.
GUARDED = """
import sys, torch
from allconv_cli.cli import main
real_load = torch.load
def weights_only_load(*args, **kwargs):
    assert kwargs.get("weights_only") is True, f"torch.load without weights_only=True: {args[:1]}"
    return real_load(*args, **kwargs)
torch.load = weights_only_load
try:
    main(sys.argv[1:], prog_name="allconv")
finally:
    assert "mlflow.pytorch" not in sys.modules, "visualize imported mlflow.pytorch (pickled models)"
"""


@pytest.mark.e2e
def test_visualize_loads_weights_only_and_leaves_no_temporary_checkpoint(fake_run: tuple[Path, str],
                                                                        tmp_path: Path) -> None:
    """The run also holds the pickled ``network`` model; visualize never unpickles it, and the checkpoint it
    downloads goes into a temporary folder that is removed."""
    cwd, run_id = fake_run
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    figure = tmp_path / "last.png"
    figure.write_bytes(b"an older figure")  # --force replaces it
    out = subprocess.run([sys.executable, "-c", GUARDED, "visualize", run_id, "--units", "1", "--top", "1",
                          "--weights", "last", "--out", str(figure), "--force"],
                         cwd=cwd, env={**_env(), "TMPDIR": str(tmp)}, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert f"weights runs:/{run_id}/checkpoints/last.pt (epoch 1)" in out.stdout
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(tmp.iterdir()) == [], "temporary files left behind"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.png", "tmp"]


@pytest.mark.e2e
def test_visualize_out_is_checked_before_anything_runs(fake_run: tuple[Path, str], tmp_path: Path) -> None:
    """An existing file needs --force, a symbolic link is refused even then, and the name must end in .png: one line,
    exit 2, the file and the link's target untouched."""
    cwd, run_id = fake_run
    taken = tmp_path / "taken.png"
    taken.write_bytes(b"mine")
    target = tmp_path / "target.txt"
    target.write_text("keep me")
    link = tmp_path / "link.png"
    link.symlink_to(target)
    cases = {
        str(taken): f"--out {taken} already exists: choose another name, or pass --force to replace it",
        str(link): f"--out {link} is a symbolic link",
        str(tmp_path / "figure"): f"--out {tmp_path / 'figure'}: the figure is a PNG, give a file name ending in "
                                  f".png (e.g. {tmp_path / 'figure.png'})",
    }
    results = run_side_by_side([_allconv("visualize", run_id, "--out", out) for out in cases]
                               + [_allconv("visualize", run_id, "--out", str(link), "--force")], cwd=cwd, env=_env())
    for result, message in zip(results, [*cases.values(), f"--out {link} is a symbolic link"], strict=True):
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], result.stderr
        assert result.stdout == ""
    assert taken.read_bytes() == b"mine" and target.read_text() == "keep me" and link.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.png", "taken.png", "target.txt"]
