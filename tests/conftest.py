"""Shared fixtures, the test markers' rules, and the real-data helper.

Services: a real PostgreSQL server and a real ``mlflow server`` (PostgreSQL as its backend store, artifacts served
by the server) on loopback, started once per session by ``tests/services.py`` (imported as the module ``services``)
in the order docker-compose.yml starts them. Tests that need them FAIL when they cannot be started (PostgreSQL not
installed, a port clash): ``scripts/test-deps.sh`` (run first by `make test`, and so by CI) installs the
``postgresql`` package when it is missing. Nothing skips.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import services  # tests/services.py; test modules use it as `import services` too

ROOT = Path(__file__).resolve().parents[1]
CIFAR_DIR = ROOT.parent / "shared" / "data" / "cifar10"  # the real CIFAR-10 arrays (README of ../shared/data)


def run_side_by_side(commands: list[list[str]], timeout: float = 300, **popen: object) -> list[
        subprocess.CompletedProcess[str]]:
    """Run independent commands at the same time and return their results in order, like ``subprocess.run``.

    Most of a CLI test's time is the process importing torch; two cores do two of those at once."""
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
             for cmd in commands]
    results = []
    for cmd, proc in zip(commands, procs, strict=True):
        out, err = proc.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(cmd, proc.returncode, out, err))
    return results


@pytest.fixture(autouse=True)
def _tracking_uri_stays_put() -> Iterator[None]:
    """``mlflow.set_tracking_uri`` also sets ``$MLFLOW_TRACKING_URI``, which every later subprocess and in-process
    study would inherit: a test that points MLflow somewhere puts it back."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if "mlflow" in sys.modules and os.environ.get("MLFLOW_TRACKING_URI") != before:
        sys.modules["mlflow"].set_tracking_uri(before)  # None unsets the variable again


@pytest.fixture
def flush_denormals() -> Iterator[None]:
    """Subnormal floats flushed to zero while a test trains a network initialised with weights of std 1e-20 (dead
    on purpose): its activations pass through the subnormal range, where a CPU is 10x slower (42 s vs 4.7 s for
    two epochs of the collapse test's net); zero is what they underflow to a layer later anyway."""
    import torch  # here: the suite's start imports no torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the flag is per thread: the pool's threads, started earlier, would not have it
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def cifar10k(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir with the first real training file (10,000 images, 1,000 per class; the five files are balanced and
    shuffled) and the first 2,000 real test images: small enough that one ZCA fit keeps the real-data tests fast."""
    assert (CIFAR_DIR / "test.npz").is_file(), f"real CIFAR-10 arrays missing at {CIFAR_DIR}"
    d = tmp_path_factory.mktemp("cifar10k")
    (d / "train_1.npz").symlink_to(CIFAR_DIR / "train_1.npz")
    with np.load(CIFAR_DIR / "test.npz") as z:
        np.savez(d / "test.npz", images=z["images"][:2000], labels=z["labels"][:2000])
    return d


@pytest.fixture(scope="session")
def postgres() -> Iterator[services.Postgres]:
    """A private PostgreSQL cluster on 127.0.0.1 with databases ``optuna`` and ``mlflow``."""
    pg, error = services.Postgres(), ""
    try:
        pg.start()
    except services.ServiceError as exc:
        error = str(exc)
        pg.cleanup()
    if error:
        pytest.fail(f"PostgreSQL could not be started (these tests fail rather than skip): {error}", pytrace=False)
    yield pg
    pg.cleanup()


@pytest.fixture(scope="session")
def mlflow_server(postgres: services.Postgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[
        services.MlflowServer]:
    """``mlflow server`` on 127.0.0.1 storing runs in PostgreSQL and serving artifacts from a temp folder."""
    root = tmp_path_factory.mktemp("mlflow-server")
    yield from serve(services.MlflowServer(postgres.url("mlflow"), root, workers=1), "the MLflow server")


def serve(server: services.MlflowServer, what: str) -> Iterator[services.MlflowServer]:
    """A fixture's body: start ``server`` (a failed start fails the test in one message), yield it, stop it."""
    error = ""
    try:
        server.start()
    except services.ServiceError as exc:
        error = str(exc)  # failed outside the except block: no chained traceback
    if error:
        pytest.fail(f"{what} could not be started: {error}", pytrace=False)
    yield server
    server.stop(timeout=3)


@pytest.fixture
def service_env(mlflow_server: services.MlflowServer, tmp_path: Path) -> dict[str, str]:
    """Environment for worker processes of the ``mlflow_server``: as on a host that only knows the two URLs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(
        MLFLOW_TRACKING_URI=mlflow_server.uri,
        ALLCONV_CACHE_DIR=str(tmp_path / "cache"),
        PYTHONUNBUFFERED="1",
        # MLflow's HTTP client retries a refused connection with back-off 2 * 2^n s (4, 8, ... 120): a worker could
        # sleep a minute after a restarted server is back. Same retries, half the back-off, for shorter tests.
        MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1",
    )
    return env


# ---------------------------------------------------------------------------------------------------------------
# markers: every test says what it needs (docs/design.md, "Test markers"); `make test-fast` runs `-m unit`

CATEGORIES = ("unit", "e2e", "cifar", "services")
NEEDS = {"cifar10k": "cifar", "postgres": "services", "mlflow_server": "services", "service_env": "services"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Refuse a test without exactly one category, and a fixture its marker hides: `-m` then selects each test by what
    it needs (scripts/test-deps.sh names the markers of the tests that cannot run on a machine)."""
    bad = []
    for item in items:
        kinds = [k for k in CATEGORIES if item.get_closest_marker(k)]
        needed = {NEEDS[f] for f in getattr(item, "fixturenames", ()) if f in NEEDS}
        if len(kinds) != 1 or not needed <= set(kinds):
            bad.append(f"{item.nodeid} (marked {', '.join(kinds) or 'nothing'}; needs {', '.join(needed) or '-'})")
    if bad:
        raise pytest.UsageError(f"mark each test with exactly one of {', '.join(CATEGORIES)}, "
                                f"the one its fixtures need: {'; '.join(bad)}")
