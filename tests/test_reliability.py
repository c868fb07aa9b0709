"""Bad input and unusable stores are caught before anything is created: one line, exit 2, within seconds."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, TEMPORARILY_UNAVAILABLE

from allconv_cli import runtime, stores
from allconv_cli.config import SEED_MAX, TrainConfig
from allconv_cli.errors import AllconvError, StoreUnavailable
from allconv_cli.tracking import store


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(ALLCONV_CACHE_DIR=str(tmp / "cache"), ALLCONV_FAKE_SIZES="400,100", PYTHONUNBUFFERED="1", **extra)
    return env


def _allconv(args: list[str], cwd: Path, **extra: str) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "allconv_cli", *args], cwd=cwd, env=_env(cwd, **extra),
                         capture_output=True, text=True, timeout=120)
    return run, time.perf_counter() - started


def _one_line_exit(run: subprocess.CompletedProcess[str], *needles: str, code: int = 2) -> None:
    """One ``Error:`` line, no traceback, exit ``code``: 2 for the user's error, 75 for a store that is not there."""
    assert run.returncode == code, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and "Traceback" not in run.stderr, run.stderr
    for needle in needles:
        assert needle in run.stderr, run.stderr


@pytest.mark.unit
@pytest.mark.parametrize(
    ("values", "needle"),
    [
        ({"dropout_input": 1.5}, "dropout_input=1.5: must be in [0, 1)"),
        ({"dropout_hidden": -0.1}, "dropout_hidden=-0.1"),
        ({"init_std": 0.0}, "init_std=0.0: must be > 0"),
        ({"lr_gamma": 0.0}, "lr_gamma=0.0"),
        ({"lr": float("inf")}, "lr=inf: must be a finite number"),
        ({"lr": float("nan")}, "lr=nan"),
        ({"val_size": -1}, "val_size=-1: must be >= 0"),
        ({"seed": -1}, "seed=-1"),
        ({"seed": SEED_MAX + 1}, f"seed={SEED_MAX + 1}"),
        ({"optimizer": "sgdd"}, "optimizer='sgdd': choose one of"),
        ({"subset": 0}, "subset=0: must be >= 1"),
    ],
)
def test_every_field_range_is_checked_in_trainconfig(values: dict[str, object], needle: str) -> None:
    with pytest.raises(AllconvError) as info:
        TrainConfig(**values)
    assert needle in str(info.value) and "\n" not in str(info.value)


@pytest.mark.unit
def test_retrying_is_one_bounded_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Transient failures back off 1, 2, 4 s... until the budget would be exceeded, then one AllconvError line."""
    sleeps: list[float] = []
    clock = [0.0]
    monkeypatch.setattr(store.time, "sleep", lambda s: (sleeps.append(s), clock.__setitem__(0, clock[0] + s)))
    monkeypatch.setattr(store.time, "monotonic", lambda: clock[0])
    calls = []

    def down() -> None:
        calls.append(1)
        raise MlflowException("Connection refused", error_code=TEMPORARILY_UNAVAILABLE)

    with pytest.raises(AllconvError) as info:
        store.retrying(down, budget=20)
    assert sleeps == [1, 2, 4, 8] and len(calls) == 5  # 1+2+4+8 = 15; a 16 s wait would pass 20
    assert "did not answer for 15 s" in str(info.value) and runtime.ENV_RETRY_SECONDS in str(info.value)

    monkeypatch.setenv(runtime.ENV_RETRY_SECONDS, "0")
    calls.clear()
    with pytest.raises(AllconvError):
        store.retrying(down)
    assert len(calls) == 1

    def bad_request() -> None:
        calls.append(1)
        raise MlflowException("no such run", error_code=RESOURCE_DOES_NOT_EXIST)

    calls.clear()
    with pytest.raises(MlflowException):
        store.retrying(bad_request, budget=100)
    assert len(calls) == 1  # not transient: no retry


@pytest.mark.unit
def test_configure_turns_mlflow_retries_off_but_keeps_user_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")
    runtime.configure()
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"


@pytest.mark.unit
def test_store_checks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{blocker}/mlflow.db")
    with pytest.raises(AllconvError) as info:
        stores.check_tracking_store(write=True)
    assert str(blocker) in str(info.value) and "--user $(id -u):$(id -g)" in str(info.value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/new/mlflow.db")
    stores.check_tracking_store(write=True)  # a missing folder that can be created is fine
    with pytest.raises(AllconvError, match="no MLflow store at"):
        stores.check_tracking_store(write=False)
    assert not (tmp_path / "new").exists()  # the checks create nothing
    assert stores.sqlite_path("sqlite:///rel/x.db") == Path.cwd() / "rel" / "x.db"
    assert stores.sqlite_path("postgresql://u@h/db") is None


@pytest.mark.unit
def test_a_new_sqlite_store_created_by_two_processes_at_once_is_tried_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow's migrations of a new SQLite store fail in whichever process loses the race (any exception type); the
    tracking client tries again there, and only there: a server's error is not retried by this loop."""
    attempts: list[str] = []

    def flaky(tracking_uri: str) -> str:
        attempts.append(tracking_uri)
        if len(attempts) < 3:
            raise ValueError("No such index: 'index_jobs_function_status_creation_time'")  # seen in a race
        return "client"

    monkeypatch.setattr(store, "MlflowClient", flaky)
    monkeypatch.setattr(store.time, "sleep", lambda s: None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///x/mlflow.db")
    assert store.client() == "client" and len(attempts) == 3
    attempts.clear()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    with pytest.raises(ValueError):
        store.client()
    assert len(attempts) == 1


@pytest.mark.unit
def test_a_server_is_checked_once_per_process_and_its_absence_is_an_outage(monkeypatch: pytest.MonkeyPatch) -> None:
    """The start-up check of an MLflow server: not answering is StoreUnavailable (exit 75: a server may be
    restarting), and once passed it is not repeated, so a restart mid-study meets the retry layer, not the check
    (CI once saw a worker's first trial repeat the check during a restart and stop the search as a user error)."""
    import http.server
    import threading

    class Ok(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # /health and the credentials probe
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ok)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setattr(stores, "_CHECKED", set())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert stores.check_tracking_store(write=True) == uri
    server.shutdown()
    server.server_close()
    assert stores.check_tracking_store(write=True) == uri  # gone now, but this process already checked it
    monkeypatch.setattr(stores, "_CHECKED", set())
    with pytest.raises(StoreUnavailable, match="does not answer") as info:
        stores.check_tracking_store(write=True)
    assert info.value.exit_code == 75 and uri in str(info.value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://[bad")
    with pytest.raises(AllconvError, match="is not a URL") as bad:
        stores.check_tracking_store(write=True)
    assert bad.value.exit_code == 2


@pytest.mark.e2e
def test_unwritable_and_unreachable_stores_fail_fast(tmp_path: Path) -> None:
    """A tracking store that cannot be written (here: a file where its folder should be, which stops root too) or a
    server that does not answer: one line naming it, well within 5 s, and no run, database or folder made. The first
    is the user's to fix (exit 2); the second may be a server still starting (exit 75: a scheduler starts it again)."""
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    train = ["train", "--dataset", "fake", "--subset", "200", "--val-size", "100", "--epochs", "1"]
    run, seconds = _allconv(train, tmp_path, MLFLOW_TRACKING_URI=f"sqlite:///{blocker}/mlflow.db")
    _one_line_exit(run, str(blocker), "--user")
    assert seconds < 5, seconds
    run, seconds = _allconv(train, tmp_path, MLFLOW_TRACKING_URI="http://127.0.0.1:9")
    _one_line_exit(run, "http://127.0.0.1:9", "does not answer", code=75)
    assert seconds < 5, seconds
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]


@pytest.mark.e2e
def test_small_cli_cases(tmp_path: Path) -> None:
    bare = subprocess.run([sys.executable, "-m", "allconv_cli"], cwd=tmp_path, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=60)
    assert bare.returncode == 0 and "Usage:" in bare.stdout and "Error" not in bare.stdout + bare.stderr

    run, _ = _allconv(["train", "--resume", "no-such-run"], tmp_path)
    _one_line_exit(run, "no MLflow store at")
    run, _ = _allconv(["train", "--dataset", "fake", "--seed", "-1"], tmp_path)
    _one_line_exit(run, "seed=-1")
    assert not list(tmp_path.glob("*.db")) and not (tmp_path / "mlruns").exists()


@pytest.mark.e2e
def test_resuming_a_finished_run_says_so(tmp_path: Path) -> None:
    train = ["train", "--model", "A", "--branch", "model", "--dataset", "fake", "--subset", "200", "--val-size", "100",
             "--preprocess", "standardize", "--epochs", "1", "--json"]
    run, _ = _allconv(train, tmp_path)
    assert run.returncode == 0, run.stderr
    import json

    run_id = json.loads(run.stdout)["run_id"]
    run, _ = _allconv(["train", "--resume", run_id, "--json"], tmp_path)
    assert run.returncode == 0, run.stderr
    assert f"Run {run_id} already finished (1 epochs): nothing to resume" in run.stderr
    out = json.loads(run.stdout)
    assert out["run_id"] == run_id and out["epochs"] == 1 and out["resumed"] is False
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert len(client.search_runs([e.experiment_id for e in client.search_experiments()])) == 1
    assert "Creating initial MLflow database tables" not in run.stderr
