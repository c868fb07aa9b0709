"""Scale-out and faults, against a real PostgreSQL server and a real ``mlflow server`` (tests/conftest.py).

The layout is docker-compose.yml's as plain processes: PostgreSQL holds the Optuna study and is the MLflow server's
backend store, the server serves the artifacts, and every worker is a separate ``allconv search`` process that knows
only the two URLs (``--storage postgresql+psycopg://...``, ``MLFLOW_TRACKING_URI=http://...``), as on separate hosts.
Each worker also gets its own TMPDIR, so the per-host lock that search uses between the workers of one host does not
coordinate them: what is left is what separate hosts share, the database.

Faults: a worker SIGKILLed mid-trial, the MLflow server killed and restarted mid-study, PostgreSQL unreachable at
start, a corrupted checkpoint, a read-only and a full artifact location. Trials are tiny (``fake`` data, a few
hundred images, model A on CPU) so the file stays within a few minutes on two cores.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
import torch
from mlflow import MlflowClient
from mlflow.entities import Run

pytestmark = [pytest.mark.services, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
ALLCONV = str(Path(sys.executable).parent / "allconv")
# The smallest useful trial: model A (strided: 2.5x cheaper than max-pooling on a CPU) on 100 fake images,
# validation on 50, standardised inputs, BN. Search workers also shrink the fake set (ALLCONV_FAKE_SIZES).
TINY = ["--model", "A", "--branch", "strided", "--dataset", "fake", "--subset", "100", "--val-size", "50",
        "--preprocess", "standardize", "--bn", "--device", "cpu"]
FAKE_SIZES = "200,50"


# Only the learning rate varies; batch size fixed, so an epoch is 4 steps. Random sampler: no TPE start-up cost.
SPACE = """\
description: services tests - the learning rate only
sampler: random
fixed: {optimizer: sgd, batch_size: 50}
params:
  lr: {type: float, low: 0.01, high: 0.1, log: true}
"""


def one_line_error(stderr: str) -> str:
    """The CLI's user-error contract: one ``Error:`` line, last on stderr, no traceback (MLflow's own INFO log lines
    about creating a local store may come before it)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    errors = [line for line in lines if line.startswith("Error")]
    assert len(errors) == 1 and lines[-1] == errors[0] and errors[0].startswith("Error: "), stderr
    return errors[0]


def tiny_fs(cmd: list[str], mountpoint: Path, *, size: str, readonly: bool = False) -> list[str]:
    """``cmd`` run with a private tmpfs of ``size`` (read-only if asked) mounted on ``mountpoint``.

    A mount namespace of its own (``unshare``), so nothing needs unmounting and nothing else sees it; as a normal
    user, ``--map-root-user`` lets it mount. The file system is real: writes fail with EROFS / ENOSPC from the kernel.
    """
    opts = f"size={size},mode=0777" + (",ro" if readonly else "")
    unshare = ["unshare", "--mount"] + ([] if os.geteuid() == 0 else ["--map-root-user"])
    script = f'mount -t tmpfs -o {opts} allconv-test "$0" && exec "$@"'
    return [*unshare, "sh", "-c", script, str(mountpoint), *cmd]


# ---------------------------------------------------------------------------------------------------------------
# the services themselves


def test_mlflow_server_stores_runs_in_postgres_and_serves_artifacts(
    mlflow_server, postgres, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import psycopg

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    client = MlflowClient()
    exp = client.create_experiment("services-smoke")
    run = client.create_run(exp)
    client.log_metric(run.info.run_id, "x", 1.5, step=3)
    (tmp_path / "hello.txt").write_text("hi")
    client.log_artifact(run.info.run_id, str(tmp_path / "hello.txt"), "dir")
    assert run.info.artifact_uri.startswith("mlflow-artifacts:"), "artifacts go through the server"
    got = Path(client.download_artifacts(run.info.run_id, "dir/hello.txt", str(tmp_path / "down")))
    assert got.read_text() == "hi"
    assert list(mlflow_server.artifacts.rglob("hello.txt")), "the server stored the file in --artifacts-destination"
    with psycopg.connect(postgres.url("mlflow").replace("postgresql+psycopg", "postgresql")) as conn:
        (n,) = conn.execute("SELECT count(*) FROM runs WHERE run_uuid = %s", (run.info.run_id,)).fetchone()
    assert n == 1, "the run is a row of the PostgreSQL backend store"


# ---------------------------------------------------------------------------------------------------------------
# artifact location read-only or full: one clear line, exit code 2, no retry loop


@pytest.fixture(scope="module")
def empty_mlflow_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new local MLflow store, created once: its schema migrations take seconds that each test need not repeat."""
    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.mark.parametrize("fault", ["read-only", "full"])
def test_unwritable_artifact_location_is_one_clear_error(fault: str, tmp_path: Path, empty_mlflow_db: Path) -> None:
    """MLflow's local store (sqlite:///mlflow.db + ./mlruns), its artifact folder on a read-only or a 1 MB file
    system: the first checkpoint upload fails, and that is reported at once as one line naming the problem."""
    (tmp_path / "mlruns").mkdir()
    shutil.copyfile(empty_mlflow_db, tmp_path / "mlflow.db")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlflow.db", ALLCONV_CACHE_DIR=str(tmp_path / "cache"))
    cmd = [ALLCONV, "train", *TINY, "--epochs", "1"]
    wrapped = tiny_fs(cmd, tmp_path / "mlruns", size="1m", readonly=fault == "read-only")
    started = time.monotonic()
    out = subprocess.run(wrapped, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 2, out.stderr
    line = one_line_error(out.stderr)
    expected = "Read-only file system" if fault == "read-only" else "No space left on device"
    assert expected in line and "artifact location" in line, line
    assert time.monotonic() - started < 120, "a storage error must not go through the transient-error retries"


# ---------------------------------------------------------------------------------------------------------------
# a corrupted checkpoint


def test_corrupted_checkpoint_restarts_the_trial_from_scratch(
    mlflow_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A retried trial whose dead run's ``checkpoints/last.pt`` is garbage (through the server): detected, recorded on
    the new run, and the trial trains from epoch 1 instead of crashing."""
    from allconv_cli.config import TrainConfig
    from allconv_cli.tracking import store
    from allconv_cli.tracking.run import run_tracked

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    monkeypatch.setenv("ALLCONV_CACHE_DIR", str(tmp_path / "cache"))
    cfg = TrainConfig(model="A", branch="strided", dataset="fake", subset=100, val_size=50, preprocess="standardize",
                      bn=True, epochs=2, batch_size=50, device="cpu")
    dead = store.start_run(cfg, experiment="services-corrupt", run_name="dead")
    garbage = tmp_path / "checkpoints" / "last.pt"
    garbage.parent.mkdir()
    garbage.write_bytes(b"PK\x03\x04 this is not a checkpoint" + os.urandom(512))
    store.client().log_artifact(dead, str(garbage), "checkpoints")

    outcome = run_tracked(cfg, experiment="services-corrupt", run_name="retry", checkpoint_from_run=dead,
                          restart_on_bad_checkpoint=True, log_model=False)
    assert outcome.result.status == "finished" and outcome.result.epochs_completed == 2
    assert outcome.resumed_from_epoch == 0
    assert "corrupted" in outcome.checkpoint_problem
    run = store.client().get_run(outcome.run_id)
    assert "corrupted" in run.data.tags["allconv.checkpoint_problem"]
    assert run.data.tags["allconv.resumed_from_run"] == dead
    steps = [m.step for m in store.client().get_metric_history(outcome.run_id, "val_accuracy")]
    assert sorted(steps) == [1, 2], "trained from scratch: every epoch logged on the new run"
    # and the new run's own checkpoint is a good one, downloadable through the server
    good = store.download_checkpoint(outcome.run_id, "last", tmp_path / "good")
    assert torch.load(good, weights_only=True)["epoch"] == 2


# ---------------------------------------------------------------------------------------------------------------
# allconv search workers against the services


class Workers:
    """``allconv search`` processes as on separate hosts: own working folder, own TMPDIR, one session each."""

    def __init__(self, env: dict[str, str], tmp_path: Path, storage: str, study: str, *, trials: int,
                 epochs: int) -> None:
        self.env, self.tmp, self.storage, self.study = env, tmp_path, storage, study
        space = tmp_path / "space.yaml"
        space.write_text(SPACE)
        self.args = ["search", *TINY, "--space", str(space), "--pruner", "none", "--trials", str(trials),
                     "--epochs", str(epochs), "--storage", storage, "--study-name", study, "--experiment", study]
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, **env: str) -> subprocess.Popen[bytes]:
        host = self.tmp / f"host-{name}"
        (host / "tmp").mkdir(parents=True)
        full_env = {**self.env, "TMPDIR": str(host / "tmp"), "OMP_NUM_THREADS": "1", "ALLCONV_FAKE_SIZES": FAKE_SIZES,
                    **env}
        with open(self.tmp / f"{name}.log", "ab") as log:
            proc = subprocess.Popen([ALLCONV, *self.args], cwd=host, env=full_env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def logs(self) -> str:
        return "\n".join(f"==== {p.name}\n" + p.read_text(errors="replace")[-3000:]
                         for p in sorted(self.tmp.glob("*.log")))

    def wait(self, timeout: float, expect: dict[str, int] | None = None) -> None:
        """Wait for every worker; all must exit 0 unless ``expect`` says otherwise (e.g. -9 for a killed one)."""
        end = time.monotonic() + timeout
        try:
            for proc in self.procs.values():
                proc.wait(max(1.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill_all()
            pytest.fail(f"workers still running after {timeout:.0f}s\n{self.logs()}")
        codes = {name: proc.returncode for name, proc in self.procs.items()}
        wanted = {name: (expect or {}).get(name, 0) for name in self.procs}
        assert codes == wanted, self.logs()

    def kill(self, name: str) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.procs[name].pid, signal.SIGKILL)
        self.procs[name].wait(10)

    def kill_all(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is None:
                self.kill(name)


@pytest.fixture
def workers(service_env: dict[str, str], postgres, tmp_path: Path, request: pytest.FixtureRequest):
    made: list[Workers] = []

    def make(*, trials: int, epochs: int, **env: str) -> Workers:
        study = f"{request.node.name.split('[')[0].removeprefix('test_')[:40]}-{os.urandom(3).hex()}"
        w = Workers({**service_env, **env}, tmp_path, postgres.url("optuna"), study, trials=trials, epochs=epochs)
        made.append(w)
        return w

    yield make
    for w in made:
        w.kill_all()


@dataclass
class Record:
    """What the study left in Optuna and in MLflow."""

    trials: list[optuna.trial.FrozenTrial]  # every trial in the storage
    counted: list[optuna.trial.FrozenTrial]  # the ones the study counts (not re-queued, not surplus)
    parents: list[Run]
    children: list[Run]

    def runs_of(self, number: int) -> list[Run]:
        return [r for r in self.children if r.data.tags.get("allconv.trial_number") == str(number)]


def record(w: Workers) -> Record:
    from allconv_cli.search.budget import Ledger
    from allconv_cli.tracking.schema import TrialAttr

    study = optuna.load_study(study_name=w.study, storage=w.storage)
    trials = study.get_trials()
    gone = Ledger.of(trials).retried
    counted = [t for t in trials if not t.user_attrs.get(TrialAttr.SURPLUS)
               and not (t.state == optuna.trial.TrialState.FAIL and t.number in gone)]
    client = MlflowClient(w.env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name(w.study)
    assert exp is not None, f"no MLflow experiment {w.study}"
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    roles = {r.info.run_id: r.data.tags.get("allconv.role") for r in runs}
    return Record(trials, counted, [r for r in runs if roles[r.info.run_id] == "study"],
                  [r for r in runs if roles[r.info.run_id] == "trial"])


def metric_steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted({m.step for m in client.get_metric_history(run_id, key)})


def check_consistent(rec: Record, trials: int, epochs: int, client: MlflowClient) -> None:
    """Every counted trial finished exactly once in Optuna and has exactly one live child run under the one parent,
    with every epoch's metrics; nothing else is a child run except runs of dead workers that point to their retry."""
    assert len(rec.counted) == trials, [(t.number, t.state) for t in rec.trials]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in rec.counted), \
        [(t.number, t.state, t.user_attrs.get("reason")) for t in rec.counted]
    assert len(rec.parents) == 1, "one MLflow parent run per study"
    parent = rec.parents[0].info.run_id
    assert {r.data.tags.get("mlflow.parentRunId") for r in rec.children} == {parent}
    counted_numbers = {t.number for t in rec.counted}
    for t in rec.counted:
        live = [r for r in rec.runs_of(t.number) if "allconv.retried_as" not in r.data.tags]
        assert len(live) == 1, f"trial {t.number}: {len(live)} child runs"
        run = live[0]
        assert t.user_attrs["mlflow_run_id"] == run.info.run_id
        assert run.info.status == "FINISHED" and run.data.tags["allconv.trial_state"] == "complete"
        first = int(run.data.tags.get("allconv.resumed_from_epoch", "0")) + 1
        for key in ("train_loss", "val_accuracy"):
            assert metric_steps(client, run.info.run_id, key) == list(range(first, epochs + 1)), (t.number, key)
    for r in rec.children:
        if "allconv.retried_as" in r.data.tags:  # a dead worker's run: closed, and its retry is a counted trial
            assert r.info.status == "FAILED"
    extra = {int(r.data.tags["allconv.trial_number"]) for r in rec.children} - counted_numbers
    retried_numbers = {t.number for t in rec.trials if t.number not in counted_numbers}
    assert extra <= retried_numbers, f"child runs of trials the study does not count: {extra}"


def test_three_workers_share_one_study(workers, tmp_path: Path) -> None:
    """3 separate `allconv search` processes, one PostgreSQL study, one MLflow server: every trial once in Optuna,
    once as a child run under the study's single parent run, checkpoints downloadable through the server."""
    trials, epochs = 4, 2
    w = workers(trials=trials, epochs=epochs)
    for name in ("a", "b", "c"):
        w.start(name)
    w.wait(timeout=240)
    rec = record(w)
    client = MlflowClient(w.env["MLFLOW_TRACKING_URI"])
    check_consistent(rec, trials, epochs, client)
    assert not [t for t in rec.trials if t not in rec.counted and not t.user_attrs.get("allconv.surplus")]
    assert len({r.data.tags["allconv.worker"] for r in rec.children}) >= 2, "the work was shared"
    # A checkpoint, through the server's artifact proxy.
    run = rec.children[0]
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    path = client.download_artifacts(run.info.run_id, "checkpoints/last.pt", str(tmp_path / "download"))
    state = torch.load(path, weights_only=True)
    assert state["epoch"] == epochs and state["config"]["model"] == "A"
    summary = client.download_artifacts(rec.parents[0].info.run_id, "summary/best_params.json", str(tmp_path))
    assert json.loads(Path(summary).read_text())["finished"] == trials


def _wait_for_checkpoint(client: MlflowClient, w: Workers, timeout: float = 180.0) -> tuple[str, Run]:
    """The first worker (by name) whose running trial has uploaded a checkpoint of epoch >= 1, and that run.

    Whichever worker it is: which one asks for a trial first is up to the scheduler."""
    host = socket.gethostname()
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        exp = client.get_experiment_by_name(w.study)
        if exp is not None:
            for run in client.search_runs([exp.experiment_id], "tags.`allconv.role` = 'trial'"):
                if run.info.status == "RUNNING" and "allconv.checkpoint_last_epoch" in run.data.tags:
                    for name, proc in w.procs.items():
                        if run.data.tags.get("allconv.worker") == f"{host}:{proc.pid}" and proc.poll() is None:
                            return name, run
        if all(p.poll() is not None for p in w.procs.values()):
            pytest.fail(f"the workers exited before a checkpoint was seen\n{w.logs()}")
        time.sleep(0.3)
    pytest.fail(f"no checkpoint after {timeout:.0f}s\n{w.logs()}")


def _wait_for_log(w: Workers, name: str, text: str, timeout: float = 180.0) -> None:
    end = time.monotonic() + timeout
    while text not in (w.tmp / f"{name}.log").read_text(errors="replace"):
        assert w.procs[name].poll() is None and time.monotonic() < end, w.logs()
        time.sleep(0.3)


def test_killed_worker_trial_is_retried_and_resumes_from_its_checkpoint(workers) -> None:
    """SIGKILL one worker mid-trial: its heartbeat stops, another worker fails the trial after the grace period,
    re-queues it with the same params and resumes it from the dead run's last checkpoint."""
    from allconv_cli.tracking.schema import TrialAttr

    trials, epochs = 2, 4
    w = workers(trials=trials, epochs=epochs, ALLCONV_HEARTBEAT_INTERVAL="1", ALLCONV_HEARTBEAT_GRACE="4")
    w.start("a")
    w.start("b")
    client = MlflowClient(w.env["MLFLOW_TRACKING_URI"])
    victim, dead = _wait_for_checkpoint(client, w)
    w.kill(victim)
    killed_at = int(client.get_run(dead.info.run_id).data.tags["allconv.checkpoint_last_epoch"])
    w.wait(timeout=240, expect={victim: -signal.SIGKILL})

    rec = record(w)
    check_consistent(rec, trials, epochs, client)
    (lost,) = [t for t in rec.trials
               if t.state == optuna.trial.TrialState.FAIL and not t.user_attrs.get(TrialAttr.SURPLUS)]
    assert lost.user_attrs["mlflow_run_id"] == dead.info.run_id
    (retry,) = [t for t in rec.counted if lost.number in t.system_attrs.get("retry_history", ())]
    assert retry.params == lost.params, "the retry is the same trial"
    run = client.get_run(retry.user_attrs["mlflow_run_id"])
    assert run.data.tags["allconv.worker"] != dead.data.tags["allconv.worker"], "another worker retried it"
    assert run.data.tags["allconv.resumed_from_run"] == dead.info.run_id
    assert int(run.data.tags["allconv.resumed_from_epoch"]) >= killed_at >= 1
    dead_run = client.get_run(dead.info.run_id)
    assert dead_run.info.status == "FAILED" and dead_run.data.tags["allconv.retried_as"] == run.info.run_id


def test_mlflow_server_restart_mid_study_loses_no_metric(workers, mlflow_server) -> None:
    """Kill the MLflow server (SIGKILL) while two workers train, keep it down, start it again: workers wait and
    retry, and every finished epoch's metrics are on the server afterwards."""
    trials, epochs = 2, 3
    w = workers(trials=trials, epochs=epochs)
    w.start("a")
    w.start("b")
    client = MlflowClient(w.env["MLFLOW_TRACKING_URI"])
    _wait_for_checkpoint(client, w)
    old_pid, started = mlflow_server.proc.pid, time.monotonic()
    mlflow_server.restart(down_seconds=2)
    assert mlflow_server.proc.pid != old_pid
    print(f"MLflow server down for {time.monotonic() - started:.0f}s")
    w.wait(timeout=300)
    print(f"study finished {time.monotonic() - started:.0f}s after the kill")
    rec = record(w)
    check_consistent(rec, trials, epochs, client)


FAULT_ROUNDS = int(os.environ.get("ALLCONV_FAULT_ROUNDS", "2"))


@pytest.mark.parametrize("round_", range(FAULT_ROUNDS))
def test_no_fault_loses_a_trial(workers, mlflow_server, postgres, round_: int) -> None:
    """Issue 19's fault sequence on one PostgreSQL study: three workers and a replacement; one worker SIGKILLed
    mid-trial, the MLflow server killed and restarted, PostgreSQL restarted (fast shutdown) while trials train. The
    study still ends with exactly N counted trials, all distinct, each one finished child run with a checkpoint, and
    nothing left RUNNING; a trial a store outage stopped is retried, never counted against --trials.
    ``ALLCONV_FAULT_ROUNDS`` repeats it (CI runs 2)."""
    trials, epochs = 6, 3
    w = workers(trials=trials, epochs=epochs, ALLCONV_HEARTBEAT_INTERVAL="1", ALLCONV_HEARTBEAT_GRACE="6",
                ALLCONV_TRACKING_RETRY_SECONDS="90")
    for name in ("a", "b", "c"):
        w.start(name)
    client = MlflowClient(w.env["MLFLOW_TRACKING_URI"])
    victim, _ = _wait_for_checkpoint(client, w)
    w.kill(victim)
    w.start("d")  # the replacement, started as a new worker is: when the stores answer (it checks them first)
    _wait_for_log(w, "d", "Resuming study")
    started = time.monotonic()
    mlflow_server.restart(down_seconds=3)
    print(f"round {round_}: MLflow server back after {time.monotonic() - started:.0f}s")
    started = time.monotonic()
    postgres.stop()  # SIGINT: PostgreSQL's fast shutdown; every open connection is cut
    postgres.start()
    print(f"round {round_}: PostgreSQL back after {time.monotonic() - started:.1f}s")
    w.wait(timeout=420, expect={victim: -signal.SIGKILL})

    rec = record(w)
    check_consistent(rec, trials, epochs, client)
    configs = {tuple(sorted(t.params.items())) for t in rec.counted}
    assert len(configs) == trials, "every counted trial has its own configuration"
    for t in rec.counted:
        listed = client.list_artifacts(t.user_attrs["mlflow_run_id"], "checkpoints")
        assert "checkpoints/last.pt" in {f.path for f in listed}, f"trial {t.number} has no checkpoint"
    assert not [t.number for t in rec.trials if t.state in (optuna.trial.TrialState.RUNNING,
                                                             optuna.trial.TrialState.WAITING)]
    assert not [r.info.run_id for r in rec.parents + rec.children if r.info.status == "RUNNING"]
    stopped = [t for t in rec.trials if t not in rec.counted and t.state == optuna.trial.TrialState.FAIL]
    print(f"round {round_}: {len(rec.trials)} trials in the storage, {len(rec.counted)} counted, {len(stopped)} "
          f"failed by the faults and retried: " + "; ".join(str(t.user_attrs.get("reason", "lost worker"))
                                                           for t in stopped))


def test_refused_postgres_password_is_the_users_error(postgres, tmp_path: Path) -> None:
    """A server that answers and refuses the password (or has no such database) is the user's to fix: exit 2, where
    a server that does not answer is an outage, exit 75 (test_search's test_postgres_url_that_cannot_connect...)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PG"))}
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlflow.db", ALLCONV_CACHE_DIR=str(tmp_path / "cache"))
    for url in (postgres.url("optuna").replace(f":{postgres.password}@", ":wrong-pw@"),
                postgres.url("no_such_db")):
        out = subprocess.run([ALLCONV, "search", *TINY, "--trials", "1", "--epochs", "1", "--storage", url],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 2, out.stdout + out.stderr
        line = one_line_error(out.stderr)
        assert "cannot open the Optuna storage" in line and "wrong-pw" not in out.stderr, line
