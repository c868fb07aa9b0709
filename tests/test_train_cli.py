"""`allconv train` end to end: real CIFAR-10, MLflow contents, model reload, resume, Ctrl-C, bench, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from conftest import run_side_by_side

CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


# A run on small fake data, as fast as a CLI run gets on a CPU.
FAKE_TRAIN = [
    *("train", "--model", "A", "--branch", "model", "--dataset", "fake", "--subset", "200", "--val-size", "100"),
    *("--preprocess", "standardize", "--bn", "--json"),
]


def clean_env() -> dict[str, str]:
    """This environment without MLFLOW_*: the commands must use MLflow's own default store in their cwd.

    ``--dataset fake`` shrinks to 400 training / 100 test images (room for the runs' 100-image validation split and
    200-image subset): the CLI runs here test plumbing, and a 1,000-image test pass per run is wasted CI time."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["ALLCONV_FAKE_SIZES"] = "400,100"
    env.update(MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="1", MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING="2")
    return env


def allconv(args: list[str], cwd: Path, **kwargs: object) -> subprocess.CompletedProcess[str]:
    env = clean_env()
    return subprocess.run(
        [sys.executable, "-m", "allconv_cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        **kwargs,
    )


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The issue's check: 2 epochs on a 2,000-image subset of real CIFAR-10, default MLflow store in the cwd."""
    cwd = tmp_path_factory.mktemp("train")
    run = allconv(
        [
            "train",
            "--model",
            "A",
            "--branch",
            "strided",
            "--data-dir",
            str(CIFAR),
            "--subset",
            "2000",
            "--val-size",
            "1000",
            "--test-size",
            "2000",
            "--epochs",
            "2",
            "--bn",
            "--lr",
            "0.05",
            "--register",
            "allconv-a-strided",
            "--json",
        ],
        cwd,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return cwd, json.loads(run.stdout)


@pytest.mark.cifar
def test_real_data_run_is_fully_tracked(real_run: tuple[Path, dict]) -> None:
    cwd, out = real_run
    assert {"run_id", "status", "epochs", "val_accuracy", "test_accuracy", "images_per_second"} <= set(out)
    assert out["status"] == "finished" and out["epochs"] == 2
    # 2 epochs (31 steps) are too few to beat chance reliably on real data (learning is tested in test_engine)
    assert 0.0 <= out["test_accuracy"] <= 1.0 and out["images_per_second"] > 0
    assert (cwd / "mlflow.db").exists() and (cwd / "mlruns").is_dir()  # MLflow's own default store
    mlflow.set_tracking_uri(f"sqlite:///{cwd / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    run = client.get_run(out["run_id"])
    assert run.data.params["lr"] == "0.05" and run.data.params["subset"] == "2000"
    assert run.data.params["test_size"] == "2000"
    assert run.data.params["weight_decay"] == "0.001" and run.data.params["lr_milestones"] == "[1.143, 1.429, 1.714]"
    assert run.data.tags["allconv.model"] == "A" and run.data.tags["allconv.branch"] == "strided"
    assert run.data.tags["allconv.status"] == "finished" and run.info.status == "FINISHED"
    assert len(run.data.tags["allconv.data_hash"]) >= 8 and run.data.tags["allconv.device"] == "cpu"
    history = client.get_metric_history(out["run_id"], "val_accuracy")
    assert [m.step for m in history] == [1, 2]
    for key in ("train_loss", "train_accuracy", "val_loss", "lr", "epoch_seconds", "images_per_second"):
        assert len(client.get_metric_history(out["run_id"], key)) == 2, key
    assert run.data.metrics["test_accuracy"] == pytest.approx(out["test_accuracy"])
    artifacts = {a.path for a in client.list_artifacts(out["run_id"], "checkpoints")}
    assert artifacts == {"checkpoints/last.pt", "checkpoints/best.pt"}


@pytest.mark.cifar
def test_logged_model_reloads_with_identical_predictions(real_run: tuple[Path, dict]) -> None:
    cwd, out = real_run
    mlflow.set_tracking_uri(f"sqlite:///{cwd / 'mlflow.db'}")
    model = mlflow.pytorch.load_model(f"runs:/{out['run_id']}/network").eval()  # the bare network
    ckpt_path = mlflow.MlflowClient().download_artifacts(out["run_id"], "checkpoints/last.pt", str(cwd))
    state = torch.load(ckpt_path, weights_only=True)
    from allconv_cli.config import TrainConfig
    from allconv_cli.engine import build_model

    reference = build_model(TrainConfig.from_dict(state["config"]), 10)
    reference.load_state_dict(state["model"])
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((16, 3, 32, 32)).astype(np.float32))
    with torch.no_grad():
        assert torch.equal(model(x), reference.eval()(x))
    pyfunc = mlflow.pyfunc.load_model(f"runs:/{out['run_id']}/network")
    assert np.allclose(pyfunc.predict(x.numpy()), reference(x).detach().numpy(), atol=1e-5)


SERVE_CHECK = """
import json, sys
import mlflow, numpy as np
from allconv_cli.config import TrainConfig
from allconv_cli.data import load_raw, pick_test_indices

mlflow.set_tracking_uri(sys.argv[1])
run = mlflow.MlflowClient().get_run(sys.argv[2])
cfg = TrainConfig.from_params(run.data.params).data_config()
_, _, x_test, y_test, _ = load_raw(cfg)
keep = pick_test_indices(y_test, cfg.test_size, cfg.seed)
np.save(sys.argv[3], x_test[keep][:3])
model = mlflow.pyfunc.load_model(f"runs:/{sys.argv[2]}/model")
probabilities = model.predict(x_test[keep])
accuracy = float((probabilities.argmax(1) == y_test[keep]).mean())
print(json.dumps({"accuracy": accuracy, "logged": run.data.metrics["test_accuracy"], "n": len(keep),
                  "sums": [float(probabilities.sum(1).min()), float(probabilities.sum(1).max())]}))
"""


@pytest.mark.cifar
def test_logged_model_serves_raw_images(real_run: tuple[Path, dict]) -> None:
    """The run's ``model`` takes raw uint8 CIFAR images (the fitted GCN + ZCA travels with it): loaded in a fresh
    process, its accuracy on the run's real test images is the logged test accuracy; `mlflow models predict` works on
    a JSON of raw images."""
    cwd, out = real_run
    uri = f"sqlite:///{cwd / 'mlflow.db'}"
    sample = cwd / "three.npy"
    check = subprocess.run([sys.executable, "-c", SERVE_CHECK, uri, out["run_id"], str(sample)], cwd=cwd,
                           env=clean_env(), capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stderr[-3000:]
    got = json.loads(check.stdout.strip().splitlines()[-1])
    assert got["n"] == 2000 and got["accuracy"] == pytest.approx(got["logged"], abs=1e-9)
    assert got["sums"][0] == pytest.approx(1, abs=1e-4) and got["sums"][1] == pytest.approx(1, abs=1e-4)
    payload = cwd / "input.json"
    payload.write_text(json.dumps({"inputs": np.load(sample).tolist()}))
    env = {**clean_env(), "MLFLOW_TRACKING_URI": uri}
    mlflow_cli = str(Path(sys.executable).parent / "mlflow")
    served = subprocess.run([mlflow_cli, "models", "predict", "-m", f"runs:/{out['run_id']}/model", "-i", str(payload),
                             "-t", "json", "--env-manager", "local"], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=300)
    assert served.returncode == 0, served.stderr[-3000:]
    predictions = np.array(json.loads(served.stdout[served.stdout.index("{"):])["predictions"])
    assert predictions.shape == (3, 10) and np.allclose(predictions.sum(1), 1, atol=1e-4)


@pytest.mark.cifar
def test_runs_carry_mlflow_context_dataset_and_system_metrics(real_run: tuple[Path, dict]) -> None:
    cwd, out = real_run
    client = mlflow.MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
    run = client.get_run(out["run_id"])
    for tag in ("mlflow.user", "mlflow.source.name", "mlflow.source.type", "mlflow.source.git.commit"):
        assert run.data.tags.get(tag), tag
    (dataset_input,) = run.inputs.dataset_inputs
    dataset = dataset_input.dataset
    assert dataset.digest == run.data.tags["allconv.data_hash"] and dataset.name == "cifar10-gcn-zca"
    profile = json.loads(dataset.profile)
    assert profile["train"] == 2000 and profile["validation"] == 1000 and profile["test"] == 2000
    assert {t.key: t.value for t in dataset_input.tags}["mlflow.data.context"] == "train"
    (version,) = client.search_model_versions("name='allconv-a-strided'")
    assert version.run_id == out["run_id"] and int(version.version) == 1
    samples = client.get_metric_history(out["run_id"], "system/cpu_utilization_percentage")
    assert len(samples) >= 1 and "system/system_memory_usage_megabytes" in run.data.metrics




@pytest.mark.cifar
def test_resume_continues_the_same_run(real_run: tuple[Path, dict], tmp_path: Path) -> None:
    """--resume reads the run's config and last checkpoint and logs into the same run; a bad id is one line."""
    cwd, _ = real_run
    bad = subprocess.Popen([sys.executable, "-m", "allconv_cli", "train", "--resume", "0123456789abcdef"], cwd=cwd,
                           env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # meanwhile
    first = allconv([*FAKE_TRAIN, "--epochs", "1"], cwd)
    run_id = json.loads(first.stdout)["run_id"]
    again = allconv(["train", "--resume", run_id, "--json"], cwd)
    assert again.returncode == 0, again.stderr[-2000:]
    out = json.loads(again.stdout)
    assert out["run_id"] == run_id and out["epochs"] == 1  # the run was complete: nothing left to train
    _, bad_stderr = bad.communicate(timeout=300)
    assert bad.returncode == 2 and "0123456789abcdef" in bad_stderr and "Traceback" not in bad_stderr


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.e2e
def test_ctrl_c_checkpoints_and_marks_killed(tmp_path: Path) -> None:
    env = clean_env()
    proc = subprocess.Popen(
        [sys.executable, "-m", "allconv_cli", *FAKE_TRAIN, "--epochs", "200"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a shell's background job ignores SIGINT and its children inherit that; a terminal's Ctrl-C does not
        preexec_fn=_default_sigint,
    )
    deadline = time.time() + 600
    client = None
    while time.time() < deadline:  # wait until an epoch's checkpoint is in MLflow
        time.sleep(2)
        assert proc.poll() is None, proc.communicate()[1][-2000:]  # it died early: say why now, not in 10 minutes
        if not (tmp_path / "mlflow.db").exists():
            continue
        mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
        try:  # the trainer may still be creating the database's tables
            client = mlflow.MlflowClient()
            runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        except Exception:
            continue
        if runs and "allconv.checkpoint_last_epoch" in runs[0].data.tags:
            break
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr[-2000:]
    out = json.loads(stdout)
    assert out["status"] == "interrupted"
    run = client.get_run(out["run_id"])
    assert run.info.status == "KILLED" and run.data.tags["allconv.status"] == "interrupted"
    assert int(run.data.tags["allconv.checkpoint_last_epoch"]) >= 1
    assert "allconv train --resume" in stderr


@pytest.mark.e2e
def test_user_errors_are_one_line(tmp_path: Path) -> None:
    cases = [
        (["train", "--model", "D"], "'D'"),
        (["train", "--branch", "pooled"], "'pooled'"),
        (["train", "--dataset", "cifar10", "--data-dir", str(tmp_path / "nowhere")], "nowhere"),
        (["train", "--dataset", "fake", "--val-size", "100", "--subset", "-5"], "subset=-5"),
        (["train", "--data-dir", str(tmp_path)], str(tmp_path)),
        (["train", "--no-such-option"], "--no-such-option"),
    ]
    runs = run_side_by_side([[sys.executable, "-m", "allconv_cli", *args] for args, _ in cases], cwd=tmp_path,
                            env=clean_env())
    for (args, needle), run in zip(cases, runs, strict=True):
        assert run.returncode == 2, (args, run.stderr)
        assert needle in run.stderr and "Traceback" not in run.stderr, (args, run.stderr)
        assert len(run.stderr.strip().splitlines()) == 1, (args, run.stderr)
    assert not (tmp_path / "mlflow.db").exists()  # nothing was logged for a bad command


@pytest.mark.e2e
def test_bench_json() -> None:
    """In-process (CliRunner): the command is what is tested here, not a fresh interpreter's start-up."""
    from click.testing import CliRunner

    from allconv_cli.cli import main

    args = ["bench", "--model", "A", "--branch", "strided", "--batch-size", "16", "--steps", "2", "--warmup", "1",
            "--device", "cpu", "--json"]
    run = CliRunner().invoke(main, args)
    assert run.exit_code == 0, run.output[-2000:]
    out = json.loads(run.stdout)
    assert {"train_images_per_second", "eval_images_per_second", "ms_per_step", "peak_memory_mb", "device"} <= set(out)
    assert out["train_images_per_second"] > 0 and out["peak_memory_mb"] > 0 and out["device"] == "cpu"
