"""Only the right people get in: the MLflow server as docker-compose.yml and deploy/k8s run it (MLflow's basic-auth
app, backend in PostgreSQL, artifacts served by the server, the workers' user created by `scripts/services.py
add-user`), started by tests/services.py. A request without valid credentials is refused; a worker process with the
workers' credentials logs its run, checkpoints included; one without them logs nothing.
"""

from __future__ import annotations

import base64
import os
import secrets
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

import services
from conftest import serve

pytestmark = pytest.mark.services

WORKER = "allconv"
API = "/api/2.0/mlflow/experiments/search?max_results=5"
EXPERIMENT = "auth-check"


def status(url: str, user: str | None = None, password: str | None = None, method: str = "GET") -> int:
    """The HTTP status of one request, with basic-auth credentials when given."""
    request = urllib.request.Request(url, method=method)
    if user is not None:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.fixture(scope="module")
def auth_server(postgres: services.Postgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[
        services.MlflowServer]:
    postgres.reset_database("mlflow_auth")
    server = services.MlflowServer(postgres.url("mlflow_auth"), tmp_path_factory.mktemp("mlflow-auth"), workers=1,
                                   auth=True)
    yield from serve(server, "the MLflow server with basic auth")


def train(server: services.MlflowServer, tmp_path: Path, **credentials: str) -> subprocess.CompletedProcess[str]:
    """``allconv train`` on fake data against ``server``, as a worker host would run it."""
    tmp_path.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=server.uri, ALLCONV_FAKE_SIZES="60,20", ALLCONV_CACHE_DIR=str(tmp_path / "cache"),
               **credentials)
    return subprocess.run(
        [sys.executable, "-m", "allconv_cli", "train", "--model", "A", "--branch", "strided", "--dataset", "fake",
         "--subset", "40", "--val-size", "20", "--preprocess", "standardize", "--epochs", "1", "--device", "cpu",
         "--experiment", EXPERIMENT],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)


def test_requests_without_valid_credentials_are_refused(auth_server: services.MlflowServer) -> None:
    uri = auth_server.uri
    assert status(uri + "/health") == 200, "the probes' endpoint needs no credentials"
    assert status(uri + API) == 401
    assert status(uri + API, services.MLFLOW_ADMIN, "not-the-password") == 401
    assert status(uri + API, "nobody", str(auth_server.admin_password)) == 401
    assert status(uri + "/api/2.0/mlflow-artifacts/artifacts") == 401, "artifacts are served to users only"
    assert status(uri + "/api/2.0/mlflow/experiments/create", method="POST") == 401
    assert status(uri + API, services.MLFLOW_ADMIN, str(auth_server.admin_password)) == 200
    # The server got its secrets through the environment: neither its command line nor its log holds them.
    secret_values = [str(auth_server.admin_password), auth_server.environment()["MLFLOW_FLASK_SERVER_SECRET_KEY"]]
    assert not any(s in " ".join(auth_server.command()) for s in secret_values)
    assert not any(s in auth_server.log.read_text() for s in secret_values)


def test_a_worker_with_the_workers_credentials_logs_its_run(auth_server: services.MlflowServer, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    first, password = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    assert auth_server.add_user(WORKER, first) == f"MLflow user '{WORKER}' created at {auth_server.uri}"
    # Run again (the prepare Job retried, the Secret rotated): the user's password becomes the given one.
    assert auth_server.add_user(WORKER, password) == f"MLflow user '{WORKER}' updated at {auth_server.uri}"
    assert status(auth_server.uri + API, WORKER, first) == 401
    assert status(auth_server.uri + API, WORKER, password) == 200

    refused = train(auth_server, tmp_path / "without")
    assert refused.returncode != 0, refused.stdout[-2000:]
    assert "401" in refused.stderr or "authenticat" in refused.stderr.lower(), refused.stderr[-2000:]
    done = train(auth_server, tmp_path / "with", MLFLOW_TRACKING_USERNAME=WORKER, MLFLOW_TRACKING_PASSWORD=password)
    assert done.returncode == 0, done.stderr[-3000:]

    from mlflow import MlflowClient
    from mlflow.server import get_app_client

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", services.MLFLOW_ADMIN)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", str(auth_server.admin_password))
    client = MlflowClient(auth_server.uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED"], "one run: the worker's; none from the refused one"
    checkpoints = [f.path for f in client.list_artifacts(runs[0].info.run_id, "checkpoints")]
    assert "checkpoints/last.pt" in checkpoints, "the checkpoint went through the server's artifact proxy"
    # The worker created the experiment, so it may manage it (as the prepare Job does for the study's experiment).
    permission = get_app_client("basic-auth", tracking_uri=auth_server.uri).get_user_permission(
        WORKER, "experiment", experiment.experiment_id)
    assert permission.permission == "MANAGE"


def test_add_user_takes_passwords_from_the_environment_only(tmp_path: Path) -> None:
    """A missing password is one line and exit 2, before any request; no password is ever an argument."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_") and k != "ALLCONV_USER_PASSWORD"}
    env.update(MLFLOW_TRACKING_URI="http://127.0.0.1:9", MLFLOW_TRACKING_USERNAME="admin",
               MLFLOW_TRACKING_PASSWORD="admin-password-1")
    script = Path(__file__).resolve().parents[1] / "scripts" / "services.py"
    out = subprocess.run([sys.executable, str(script), "add-user", WORKER], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [out.stderr.strip()] and "ALLCONV_USER_PASSWORD" in out.stderr


def test_a_worker_without_valid_credentials_stops_at_once_with_one_line(auth_server: services.MlflowServer,
                                                                        tmp_path: Path) -> None:
    """No retries for a refusal: a k8s Job fails on exit 2 at once (any other code is retried), compose stops."""
    import time

    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=auth_server.uri, MLFLOW_TRACKING_USERNAME="nobody", MLFLOW_TRACKING_PASSWORD="x",
               ALLCONV_CACHE_DIR=str(tmp_path / "cache"))
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "allconv_cli", "search", "--dataset", "fake", "--trials", "1",
                          "--storage", f"sqlite:///{tmp_path / 'optuna.db'}", "--prepare"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) == 1, out.stderr[-3000:]
    assert "HTTP 401" in lines[0] and "MLFLOW_TRACKING_USERNAME" in lines[0] and "Traceback" not in out.stderr
    assert time.monotonic() - started < 30, "refused at once, not after minutes of retries"
    assert not (tmp_path / "optuna.db").exists(), "nothing is created"
