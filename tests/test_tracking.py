"""The tracking door: one tracking URI, no secret printed, the retry layer's two lines about an outage, temporary
checkpoints removed, one status type; and MLflow's own console output kept off the terminal (also against a real
``mlflow server`` that restarts while a run trains)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE

import services
from allconv_cli import runtime, stores
from allconv_cli.errors import AllconvError, StoreUnavailable
from allconv_cli.tracking import retry, store
from allconv_cli.tracking.schema import Status, Tag


@pytest.fixture
def sqlite_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root, ./mlruns, lands here
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    return tmp_path


@pytest.mark.unit
def test_one_tracking_uri(sqlite_store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The door, the store checks and the client all use the URI resolved in stores.tracking_uri."""
    assert store.tracking_uri() == stores.tracking_uri() == f"sqlite:///{sqlite_store}/mlflow.db"
    assert stores.check_tracking_store() == store.tracking_uri()
    run_id = store.create_run("door", {Tag.ROLE: "trial"})
    assert MlflowClient(f"sqlite:///{sqlite_store}/mlflow.db").get_run(run_id).data.tags[Tag.ROLE] == "trial"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert store.tracking_uri() == stores.DEFAULT_TRACKING_URI


@pytest.mark.unit
def test_secrets_are_never_printed(monkeypatch: pytest.MonkeyPatch) -> None:
    uri = f"http://alice:s3cret@127.0.0.1:{services.free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv(runtime.ENV_RETRY_SECONDS, "0")
    with pytest.raises(AllconvError) as info:
        store.get_run("0123456789abcdef0123456789abcdef")
    message = str(info.value)
    assert isinstance(info.value, StoreUnavailable)  # not the user's input: a search re-queues the trial
    assert "s3cret" not in message and "alice:***@127.0.0.1" in message, message
    assert store.shown_uri() == stores.safe_url(uri)
    url = store.ui_url("1", "abc")
    assert url.startswith("http://127.0.0.1:") and "alice" not in url and "s3cret" not in url


@pytest.mark.unit
def test_an_outage_is_said_once_when_it_starts_and_once_when_it_ends(monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://bob:pw@tracking.example:5000")
    monkeypatch.setattr(retry.time, "sleep", lambda seconds: None)
    failures = [3]

    def flaky() -> str:
        if failures[0]:
            failures[0] -= 1
            raise MlflowException("Connection refused by http://bob:pw@tracking.example:5000/api",
                                  error_code=TEMPORARILY_UNAVAILABLE)
        return "ok"

    assert store.retrying(flaky, budget=60) == "ok"
    assert store.retrying(flaky, budget=60) == "ok"  # no outage: nothing said
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("allconv: the MLflow store http://bob:***@tracking.example:5000 does not answer")
    assert lines[0].endswith("does not answer: retrying for up to 60 s")
    assert lines[1].startswith("allconv: the MLflow store http://bob:***@tracking.example:5000 answers again")


@pytest.mark.unit
def test_checkpoint_file_removes_its_folder(sqlite_store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    temp = sqlite_store / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    run_id = store.create_run("door", {})
    (sqlite_store / "last.pt").write_bytes(b"weights")
    store.log_artifact(run_id, sqlite_store / "last.pt", "checkpoints")
    with store.checkpoint_file(run_id) as path:
        assert path.read_bytes() == b"weights" and path.parent.parent == temp
    assert list(temp.iterdir()) == []
    mine = sqlite_store / "mine"
    mine.mkdir()
    assert store.download_checkpoint(run_id, "last", into=mine) == mine / "last.pt"
    with pytest.raises(AllconvError, match="has no best checkpoint"), store.checkpoint_file(run_id, "best"):
        pass
    assert list(temp.iterdir()) == []


@pytest.mark.unit
def test_runs_end_in_the_one_status_type(sqlite_store: Path) -> None:
    run_id = store.create_run("door", {Tag.STATUS: Status.RUNNING})
    store.mark_failed(run_id, "KeyboardInterrupt: ", "KILLED")
    run = store.get_run(run_id)
    assert (run.info.status, run.data.tags[Tag.STATUS]) == ("KILLED", Status.INTERRUPTED)
    store.reopen_run(run_id)
    store.mark_failed(run_id, "worker lost")
    run = store.get_run(run_id)
    assert (run.info.status, run.data.tags[Tag.STATUS], run.data.tags[Tag.REASON]) == ("FAILED", "failed",
                                                                                        "worker lost")
    assert store.finished_epochs(run) is None and store.experiment_name(run_id) == "door"


QUIET_PROBE = """
import logging, sys
if sys.argv[1] == "before":
    import mlflow  # as in a search session, which configures after MLflow was imported
from allconv_cli import runtime
runtime.configure()
runtime.configure()  # the CLI and a study session may both configure: one notice
import mlflow
logging.getLogger("mlflow.system_metrics.system_metrics_monitor").warning("Failed to get mlflow run: Max retries")
logging.getLogger("mlflow.tracking").info("chatter that is dropped")
logging.getLogger("urllib3.connectionpool").warning("Retrying after connection broken")
"""


@pytest.mark.unit
@pytest.mark.parametrize("imported", ["before", "after"])
def test_mlflow_messages_go_to_a_log_file_named_once(tmp_path: Path, imported: str) -> None:
    env = {**os.environ, "ALLCONV_CACHE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", QUIET_PROBE, imported], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    log = tmp_path / runtime.MLFLOW_LOG
    assert out.stdout == ""
    assert out.stderr.strip().splitlines() == [f"allconv: MLflow's messages are written to {log}"]
    text = log.read_text()
    assert "Failed to get mlflow run" in text and "Retrying after connection broken" in text
    assert "chatter" not in text


# --------------------------------------------------------------------------------------------------------------------
# against a real MLflow server

MLFLOW_CHATTER = ("View run", "View experiment", "🏃", "🧪", "Failed to get", "Max retries", "WARNING mlflow",
                  "site-packages/mlflow", "Traceback")


@pytest.mark.services
def test_train_against_a_restarting_server_prints_only_our_lines(tmp_path: Path) -> None:
    """``allconv train`` with an MLflow server as tracking URI: MLflow's run/experiment links and its system-metrics
    monitor's warnings (sampled every second here, so they fire while the server is down) never reach the terminal;
    our own lines say when the server stopped answering and when it was back."""
    server = services.MlflowServer(f"sqlite:///{tmp_path}/server.db", tmp_path / "server", workers=1).start()
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env.update(MLFLOW_TRACKING_URI=server.uri, ALLCONV_CACHE_DIR=str(tmp_path / "cache"), PYTHONUNBUFFERED="1",
                   ALLCONV_FAKE_SIZES="400,100", MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="1",
                   MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING="1")
        train = [sys.executable, "-m", "allconv_cli", "train", "--model", "A", "--branch", "strided", "--dataset",
                 "fake", "--subset", "100", "--val-size", "50", "--preprocess", "standardize", "--bn", "--epochs",
                 "6", "--json"]
        proc = subprocess.Popen(train, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        client, deadline = MlflowClient(server.uri), time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:  # the run exists: take the server away
            if any(client.search_runs([e.experiment_id]) for e in client.search_experiments()):
                break
            time.sleep(0.2)
        server.restart(down_seconds=4)
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        server.stop()
    assert proc.returncode == 0, stderr[-3000:]
    assert json.loads(stdout.strip().splitlines()[-1])["status"] == "finished"
    for chatter in MLFLOW_CHATTER:
        assert chatter not in stdout + stderr, f"{chatter!r} reached the terminal:\n{stderr[-3000:]}"
    ours = [line for line in stderr.splitlines() if line.startswith("allconv: the MLflow store")]
    assert len(ours) == 2 and "does not answer" in ours[0] and "answers again" in ours[1], stderr[-3000:]
    assert stderr.count("MLflow's messages are written to") <= 1
