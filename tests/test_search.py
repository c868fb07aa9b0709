"""``allconv search`` end to end: Optuna studies on fake data, every trial an MLflow run.

Everything runs with MLflow's defaults (``MLFLOW_TRACKING_URI`` unset: ``./mlflow.db`` + ``./mlruns``) and the default
Optuna storage (``./optuna.db``) in a temporary working directory, as a user would. Trials are tiny so the file fits
in a few minutes on two cores: model A on 10 fake images (one batch), validation on 10, a 10-image test set
(``ALLCONV_FAKE_SIZES``), 2 epochs. Launchers run in-process (CliRunner); worker processes are real processes, and
the test kills one of them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient
from optuna.trial import TrialState

from allconv_cli import stores
from allconv_cli.checkpoints import load_checkpoint
from allconv_cli.cli import main
from allconv_cli.search import budget, launcher, plan, storage

TINY = ["--model", "A", "--branch", "model", "--dataset", "fake", "--subset", "10", "--val-size", "10",
        "--preprocess", "standardize", "--device", "cpu"]
SPACE = """description: tiny test space - lr and input dropout
sampler: random
fixed: {batch_size: 10}
params:
  lr: {type: float, low: 0.01, high: 0.1, log: true}
  dropout_input: {type: categorical, choices: [0.0, 0.2]}
"""
STUDY = "allconv_a_model-tiny"


def clean_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(ALLCONV_CACHE_DIR=str(tmp / "cache"), ALLCONV_FAKE_SIZES="30,10", PYTHONUNBUFFERED="1",
               TMPDIR=str(tmp))
    return env


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The working directory of this file's searches, with the search's environment.

    One MLflow store for all of them (each study has its own name): creating MLflow's SQLite schema takes seconds."""
    folder = tmp_path_factory.mktemp("searches")
    with pytest.MonkeyPatch.context() as mp:
        for key in [k for k in os.environ if k.startswith("MLFLOW_")]:
            mp.delenv(key)
        for key, value in clean_env(folder).items():
            mp.setenv(key, value)
        mp.chdir(folder)
        (folder / "tiny.yaml").write_text(SPACE)
        yield folder


@pytest.fixture
def workdir(module_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(module_dir)
    return module_dir


def cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and " INFO mlflow" not in line]
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    assert "Traceback" not in err
    return lines[0]


def mlflow_runs(folder: Path, study: str) -> tuple[object, list]:
    """(parent run, child trial runs) of ``study`` in ``folder``'s default MLflow store."""
    client = MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
    exp = client.get_experiment_by_name("allconv")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`allconv.study_name` = '{study}'",
                              max_results=1000)
    parents = [r for r in runs if r.data.tags.get("allconv.role") == "study"]
    assert len(parents) == 1, "exactly one parent run per study"
    children = [r for r in runs if r.data.tags.get("allconv.role") == "trial"]
    return parents[0], children


def load(folder: Path, study: str = STUDY) -> optuna.Study:
    return optuna.load_study(study_name=study, storage=f"sqlite:///{folder / 'optuna.db'}")


# ---------------------------------------------------------------------------------------------------------------
# one study, resumed, seen through `mlflow server`, its winner retrained


@pytest.fixture(scope="module")
def study_dir(module_dir: Path) -> Path:
    """A 6-trial study (2 epochs each) with every default: median pruner, ./optuna.db, ./mlflow.db."""
    code, out, err = cli("search", *TINY, "--bn", "--epochs", "2", "--space", "tiny.yaml", "--trials", "6")
    assert code == 0, out + err
    return module_dir


@pytest.fixture(scope="module")
def server(study_dir: Path) -> Iterator[str]:
    """``mlflow server`` with no backend options, in the search's folder (what ``mlflow ui`` does); its base URL.

    Started when the study exists and left booting (it takes a while) while the other tests of the study run."""
    port = free_port()
    mlflow_bin = str(Path(sys.executable).parent / "mlflow")
    log = open(study_dir / "server.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([mlflow_bin, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            cwd=study_dir, env=clean_env(study_dir), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # it only read: no need to wait for a graceful shutdown
        proc.wait()
        log.close()


@pytest.mark.e2e
def test_six_trial_study_is_one_parent_with_six_children(study_dir: Path, server: str) -> None:
    assert (study_dir / "optuna.db").is_file() and (study_dir / "mlflow.db").is_file()
    study = load(study_dir)
    assert len(study.trials) == 6 and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)
    parent, children = mlflow_runs(study_dir, STUDY)
    assert len(children) == 6
    assert sorted(int(r.data.tags["allconv.trial_number"]) for r in children) == list(range(6))
    client = MlflowClient(tracking_uri=f"sqlite:///{study_dir / 'mlflow.db'}")
    by_number = {int(r.data.tags["allconv.trial_number"]): r for r in children}
    for trial in study.trials:
        run = by_number[trial.number]
        assert trial.user_attrs["mlflow_run_id"] == run.info.run_id
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        state = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned"}[trial.state]
        assert run.data.tags["allconv.trial_state"] == state
        assert run.data.params["lr"] == str(trial.params["lr"]), "the sampled value is the run's config param"
        assert run.data.params["batch_size"] == "10" and run.data.params["bn"] == "True"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")]
        assert steps == sorted(trial.intermediate_values) and steps[0] == 1, "one val accuracy per epoch"
        assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")] == [
            "checkpoints/best.pt", "checkpoints/last.pt"]
        if trial.state == TrialState.COMPLETE:
            assert trial.value == pytest.approx(run.data.metrics["final_val_accuracy"])
            assert "test_accuracy" in run.data.metrics, "recorded for the report, never used to select"
    tags = parent.data.tags
    assert tags["allconv.storage"].endswith("optuna.db") and tags["allconv.space"] == "tiny"
    assert tags["allconv.model"] == "A" and tags["allconv.study_state"] == "complete"
    assert study.user_attrs["allconv.parent_run_id"] == parent.info.run_id
    summary = {a.path for a in client.list_artifacts(parent.info.run_id, "summary")}
    assert {"summary/best_params.json", "summary/trials.csv", "summary/optimization_history.png",
            "summary/intermediate_values.png"} <= summary
    assert summary & {"summary/param_importances.png", "summary/param_importances.txt"}
    best = json.loads(Path(client.download_artifacts(parent.info.run_id, "summary/best_params.json",
                                                     str(study_dir / "dl"))).read_text())["best"]
    assert best["val_accuracy"] == pytest.approx(parent.data.metrics["best_val_accuracy"])
    assert best["val_accuracy"] == max(t.value for t in study.trials if t.state == TrialState.COMPLETE)


@pytest.mark.cifar
def test_study_on_a_real_cifar_subset(workdir: Path, cifar10k: Path) -> None:
    """Real CIFAR-10 through the whole search: a 2,000-image subset, GCN + ZCA, the shipped default space, a 1,000-image
    test part. Scaled to CI (2 trials of 1 epoch); the issue's 6 x 2-epoch study is `make bench-search`."""
    code, out, err = cli("search", "--model", "A", "--branch", "strided", "--data-dir", str(cifar10k),
                         "--subset", "2000", "--val-size", "1000", "--test-size", "1000", "--epochs", "1",
                         "--trials", "2", "--study-name", "real-subset", "--device", "cpu")
    assert code == 0, out + err
    assert "2 of 2 finished" in out and "Wall time" in out
    parent, children = mlflow_runs(workdir, "real-subset")
    assert len(children) == 2 and parent.data.tags["allconv.space"] == "default"
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    for run in children:
        params = run.data.params
        assert (params["dataset"], params["preprocess"], params["subset"]) == ("cifar10", "gcn-zca", "2000")
        assert (params["val_size"], params["test_size"]) == ("1000", "1000")
        assert run.data.tags["allconv.trial_state"] in ("complete", "pruned")
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")] == [1]
        correct = run.data.metrics["test_accuracy"] * 1000  # a whole number of the 1,000 test images
        assert 0 <= correct <= 1000 and correct == pytest.approx(round(correct))
    assert len({r.data.tags["allconv.data_hash"] for r in children}) == 1, "every trial saw the same data"


@pytest.mark.e2e
def test_rerun_with_more_trials_resumes_the_same_study_and_parent(study_dir: Path) -> None:
    parent_before, _ = mlflow_runs(study_dir, STUDY)
    code, out, err = cli("search", *TINY, "--bn", "--epochs", "2", "--space", "tiny.yaml", "--trials", "8")
    assert code == 0, out + err
    assert "Resuming study" in out
    study = load(study_dir)
    assert [t.number for t in study.trials] == list(range(8)), "exactly 2 more trials, same study"
    parent, children = mlflow_runs(study_dir, STUDY)
    assert parent.info.run_id == parent_before.info.run_id
    assert len(children) == 8
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    # the study is complete: the same command runs nothing
    code, out, _ = cli("search", *TINY, "--bn", "--epochs", "2", "--space", "tiny.yaml", "--trials", "8")
    assert code == 0 and "nothing to run" in out and len(load(study_dir).trials) == 8
    # --timeout: no trial starts after it (0: none at all); the study stays resumable
    code, out, _ = cli("search", *TINY, "--bn", "--epochs", "2", "--space", "tiny.yaml", "--trials", "9",
                       "--timeout", "0")
    assert code == 0 and "Timeout reached" in out and len(load(study_dir).trials) == 8
    # resuming with other training options would mix two experiments in one study
    code, _, err = cli("search", *TINY, "--bn", "--epochs", "3", "--space", "tiny.yaml", "--trials", "9")
    assert code == 2 and "was started with epochs=2; this command has epochs=3" in one_line_error(err)
    assert len(load(study_dir).trials) == 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.mark.e2e
def test_mlflow_server_started_in_the_search_folder_shows_the_study(study_dir: Path, server: str) -> None:
    """`mlflow ui` with no arguments where the search ran: its REST API finds the parent and every child."""
    deadline = time.time() + 240
    while True:
        try:
            with urllib.request.urlopen(f"{server}/health", timeout=5) as response:
                if response.status == 200:
                    break
        except (urllib.error.URLError, OSError):
            pass
        assert time.time() < deadline, (study_dir / "server.log").read_text()
        time.sleep(1)
    exp = http_json(f"{server}/api/2.0/mlflow/experiments/get-by-name?experiment_name=allconv")["experiment"]
    found = http_json(f"{server}/api/2.0/mlflow/runs/search", {
        "experiment_ids": [exp["experiment_id"]], "max_results": 1000,
        "filter": f"tags.`allconv.study_name` = '{STUDY}'",
    })["runs"]
    tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in found]
    parents = [r for r, t in zip(found, tags, strict=True) if t.get("allconv.role") == "study"]
    assert len(parents) == 1
    parent_id = parents[0]["info"]["run_id"]
    children = [t for t in tags if t.get("allconv.role") == "trial"]
    assert len(children) == len(load(study_dir).trials) >= 6
    assert all(t["mlflow.parentRunId"] == parent_id for t in children)
    listed = http_json(f"{server}/api/2.0/mlflow/artifacts/list?run_id={parent_id}&path=summary")
    assert "summary/trials.csv" in {f["path"] for f in listed["files"]}


@pytest.mark.e2e
def test_retrain_best_trains_on_train_plus_val_and_tests_once(study_dir: Path) -> None:
    code, out, err = cli("search", *TINY, "--bn", "--epochs", "2", "--space", "tiny.yaml", "--trials", "8",
                         "--summarize", "--retrain-best", "--final-epochs", "1")
    assert code == 0, out + err
    study = load(study_dir)
    assert len(study.trials) == 8, "--summarize runs no trial"
    client = MlflowClient(tracking_uri=f"sqlite:///{study_dir / 'mlflow.db'}")
    parent, _ = mlflow_runs(study_dir, STUDY)
    finals = client.search_runs([parent.info.experiment_id], filter_string="tags.`allconv.role` = 'final'")
    assert len(finals) == 1
    final = finals[0]
    best = max((t for t in study.trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    assert final.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert final.data.tags["allconv.best_trial"] == str(best.number)
    assert final.data.params["val_size"] == "0" and final.data.params["epochs"] == "1"
    assert final.data.params["lr"] == str(best.params["lr"])
    assert "test_accuracy" in final.data.metrics and "val_accuracy" not in final.data.metrics
    assert final.info.status == "FINISHED"
    assert client.get_run(parent.info.run_id).data.tags["allconv.final_run_id"] == final.info.run_id


# ---------------------------------------------------------------------------------------------------------------
# workers, lost workers, Ctrl-C, divergence


@pytest.mark.e2e
def test_two_workers_record_every_trial_exactly_once(workdir: Path) -> None:
    code, out, err = cli("search", *TINY, "--bn", "--epochs", "1", "--space", "tiny.yaml", "--trials", "3",
                         "--workers", "2", "--study-name", "two-workers")
    assert code == 0, out + err
    study = load(workdir, "two-workers")
    assert [t.number for t in study.trials] == [0, 1, 2]
    assert all(t.state.is_finished() and t.state != TrialState.FAIL for t in study.trials)
    parent, children = mlflow_runs(workdir, "two-workers")
    assert sorted(int(r.data.tags["allconv.trial_number"]) for r in children) == [0, 1, 2]
    assert {r.info.run_id for r in children} == {t.user_attrs["mlflow_run_id"] for t in study.trials}
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    assert all(str(os.getpid()) not in t.user_attrs["worker"] for t in study.trials), "trials ran in the workers"


def kill_between_uploads(pid: int, client: MlflowClient, run_id: str, folder: Path) -> bool:
    """SIGKILL worker ``pid`` at a moment its run's uploaded ``checkpoints/last.pt`` is whole: stopped first, the
    file checked, killed, or let go on (False) when it was caught mid-upload. A kill mid-upload leaves a cut file,
    and the retry then rightly starts from scratch: test_corrupted_checkpoint_restarts_the_trial_from_scratch."""
    os.kill(pid, signal.SIGSTOP)
    try:
        with tempfile.TemporaryDirectory(dir=folder) as into:
            load_checkpoint(client.download_artifacts(run_id, "checkpoints/last.pt", into))
    except Exception:
        os.kill(pid, signal.SIGCONT)
        return False
    os.kill(pid, signal.SIGKILL)
    return True


@pytest.mark.e2e
def test_killed_worker_trial_is_retried_from_its_checkpoint(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALLCONV_HEARTBEAT_INTERVAL", "1")
    # 8 s without a heartbeat: a live worker's 1 s beats stay inside it even on a loaded 2-core machine
    monkeypatch.setenv("ALLCONV_HEARTBEAT_GRACE", "8")
    outcome: dict[str, tuple[int, str, str]] = {}
    launcher = threading.Thread(target=lambda: outcome.setdefault("cli", cli(
        "search", *TINY, "--bn", "--epochs", "8", "--space", "tiny.yaml", "--trials", "2", "--workers", "2",
        "--study-name", "killed")))  # 8 epochs: seconds in which to find the trial mid-way and kill it
    launcher.start()
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    victim = None
    deadline = time.time() + 240
    while victim is None and time.time() < deadline and launcher.is_alive():
        time.sleep(0.3)
        try:
            trials = load(workdir, "killed").get_trials(states=(TrialState.RUNNING,))
            for t in trials:
                run_id = t.user_attrs.get("mlflow_run_id")
                # mid-trial: checkpointed, but not at the last epoch (a kill then could race the run's end)
                done = int(client.get_run(run_id).data.tags.get("allconv.checkpoint_last_epoch", 0)) if run_id else 0
                pid = int(t.user_attrs["worker"].rsplit(":", 1)[1])
                if 1 <= done < 6 and kill_between_uploads(pid, client, run_id, workdir):
                    victim = (t.number, run_id, pid)
                    break
        except Exception:  # the databases are still being created
            continue
    launcher.join(timeout=300)
    assert not launcher.is_alive()
    code, out, err = outcome["cli"]
    assert victim is not None, out + err
    assert code == 0, out + err
    assert f"pid {victim[2]}) exited with -9" in out
    number, dead_run, _ = victim
    study = load(workdir, "killed")
    assert budget.count_trials(study.trials).finished == 2
    dead = study.trials[number]
    assert dead.state == TrialState.FAIL
    retries = [t for t in study.trials if t.user_attrs.get("retry_of") == number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert retries[0].params == dead.params
    retry_run = client.get_run(retries[0].user_attrs["mlflow_run_id"])
    assert retry_run.data.tags["allconv.resumed_from_run"] == dead_run
    resumed = int(retry_run.data.tags["allconv.resumed_from_epoch"])
    assert resumed >= 1
    steps = [m.step for m in client.get_metric_history(retry_run.info.run_id, "val_accuracy")]
    assert steps == list(range(resumed + 1, 9)), "the retry trained only the epochs after the checkpoint"
    lost = client.get_run(dead_run)
    assert lost.info.status == "FAILED" and lost.data.tags["allconv.trial_state"] == "failed"
    assert lost.data.tags["allconv.retried_as"] == retry_run.info.run_id


@pytest.mark.e2e
def test_ctrl_c_fails_the_trial_and_the_same_command_resumes_it(workdir: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from allconv_cli import engine

    real_epoch = engine.train_epoch

    def interrupted_in_epoch_2(*args, **kwargs):  # what Ctrl-C does inside the training loop
        if args[2] == 2:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    args = ["search", *TINY, "--bn", "--epochs", "2", "--space", "tiny.yaml", "--trials", "1", "--study-name", "cc"]
    monkeypatch.setattr(engine, "train_epoch", interrupted_in_epoch_2)
    code, out, err = cli(*args)
    assert code == 130, out + err
    assert "Rerun the same command to resume" in out
    (trial,) = load(workdir, "cc").trials
    assert trial.state == TrialState.FAIL and trial.user_attrs["reason"] == "interrupted"
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    first = client.get_run(trial.user_attrs["mlflow_run_id"])
    assert first.info.status == "KILLED" and first.data.tags["allconv.checkpoint_last_epoch"] == "1"
    parent, _ = mlflow_runs(workdir, "cc")
    assert parent.info.status == "KILLED" and parent.data.tags["allconv.study_state"] == "interrupted"

    monkeypatch.setattr(engine, "train_epoch", real_epoch)
    code, out, err = cli(*args)
    assert code == 0, out + err
    study = load(workdir, "cc")
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert budget.count_trials(study.trials).finished == 1, "the interrupted trial does not count, its retry does"
    retry = study.trials[1]
    assert retry.user_attrs["retry_of"] == 0 and retry.params == trial.params
    run = client.get_run(retry.user_attrs["mlflow_run_id"])
    assert run.data.tags["allconv.resumed_from_run"] == first.info.run_id
    assert run.data.tags["allconv.resumed_from_epoch"] == "1"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")] == [2]
    assert client.get_run(first.info.run_id).data.tags["allconv.retried_as"] == run.info.run_id


@pytest.mark.e2e
def test_diverged_trial_is_recorded_pruned_with_its_reason_and_the_study_goes_on(workdir: Path) -> None:
    (workdir / "diverge.yaml").write_text("description: lr far too large\nsampler: random\n"
                                          "fixed: {lr: 1.0e6, bn: false, batch_size: 10}\n")
    code, out, err = cli("search", *TINY, "--epochs", "3", "--space", "diverge.yaml", "--trials", "2",
                         "--study-name", "diverge")
    assert code == 0, out + err
    study = load(workdir, "diverge")
    assert len(study.trials) == 2
    for t in study.trials:
        assert t.state == TrialState.PRUNED
        assert t.user_attrs["reason"].startswith("diverged: training loss became nan")
    _, children = mlflow_runs(workdir, "diverge")
    assert len(children) == 2
    for run in children:
        assert run.data.tags["allconv.trial_state"] == "pruned" and run.data.tags["allconv.status"] == "diverged"
        assert "diverged" in run.data.tags["allconv.reason"]


# ---------------------------------------------------------------------------------------------------------------
# user errors: one line, exit code 2


@pytest.fixture
def errdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working directory: user errors must be reported before anything is created."""
    for key in [k for k in os.environ if k.startswith("MLFLOW_")]:
        monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.yaml").write_text(SPACE)
    return tmp_path


@pytest.mark.unit
@pytest.mark.parametrize(("args", "expected"), [
    (["--storage", "foo://x"], "foo://x"),
    (["--trails", "3"], "No such option '--trails'"),
    (["--pruner", "asha"], "'asha' is not one of"),
    (["--set", "lr_gama=0.2"], "unknown hyperparameter 'lr_gama'"),
    (["--set", "epochs=many"], "epochs is an integer"),
    (["--val-size", "0"], "selects on the validation split"),
])
def test_user_errors_are_one_line_with_exit_code_2(args: list[str], expected: str, errdir: Path) -> None:
    code, out, err = cli("search", "--dataset", "fake", "--space", "tiny.yaml", *args)
    assert code == 2, out + err
    line = one_line_error(err)
    assert expected in line
    assert not list(errdir.glob("*.db")), "nothing is created before the options are checked"


@pytest.mark.unit
def test_postgres_url_that_cannot_connect_names_the_url(errdir: Path) -> None:
    """No server on the port: one line naming the URL, its password masked, exit 75 (a database still starting is
    an outage a scheduler retries, not the user's error; a refused password is exit 2: test_services)."""
    started = time.monotonic()
    code, _, err = cli("search", "--dataset", "fake", "--space", "tiny.yaml", "--storage",
                       "postgresql://alice:s3cret@127.0.0.1:1/optuna")
    line = one_line_error(err)
    assert code == 75 and "cannot open the Optuna storage postgresql://alice:***@127.0.0.1:1/optuna" in line, line
    assert "s3cret" not in err and not (errdir / "mlflow.db").exists()
    assert time.monotonic() - started < 60, "reported at once, not after the retry budget"


# ---------------------------------------------------------------------------------------------------------------
# counting (no training)


@pytest.mark.unit
def test_counting_finished_trials_with_retries_and_surplus() -> None:
    study = optuna.create_study(direction="maximize")
    make = optuna.trial.create_trial
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    study.add_trial(make(state=TrialState.COMPLETE, value=0.5, params={"x": 0.1}, distributions=dist))
    study.add_trial(make(state=TrialState.PRUNED, params={"x": 0.2}, distributions=dist))
    study.add_trial(make(state=TrialState.FAIL, params={"x": 0.3}, distributions=dist))  # lost, re-queued as 4
    study.add_trial(make(state=TrialState.FAIL, params={"x": 0.4}, distributions=dist))  # crashed: counts
    study.add_trial(make(state=TrialState.COMPLETE, value=0.7, params={"x": 0.3}, distributions=dist,
                         system_attrs={"failed_trial": 2, "retry_history": [2]}))
    study.add_trial(make(state=TrialState.FAIL, params={"x": 0.5}, distributions=dist,
                         user_attrs={"allconv.surplus": True}))
    study.add_trial(make(state=TrialState.WAITING, params={"x": 0.3}, distributions=dist,
                         system_attrs={"failed_trial": 2, "retry_history": [2]}))  # duplicate retry of 2
    c = budget.count_trials(study.get_trials())
    assert (c.finished, c.complete, c.pruned, c.failed, c.waiting) == (4, 2, 1, 1, 0)
    assert (c.best_value, c.best_number) == (0.7, 4)


@pytest.mark.unit
def test_storage_password_is_stripped() -> None:
    shown = stores.safe_url("postgresql+psycopg://bob:pw@db:5432/optuna")
    assert "pw" not in shown and shown.startswith("postgresql+psycopg://bob") and "@db:5432/optuna" in shown
    assert stores.safe_url("sqlite:///optuna.db") == "sqlite:///optuna.db"
    assert plan.default_study_name("B", "convpool", "default") == "allconv_b_convpool-default"


@pytest.mark.unit
def test_gpus_are_assigned_round_robin_and_cpu_workers_share_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = plan.SearchSettings(study_name="s", storage_url="sqlite:///x.db", experiment="e", space_source="x",
                                     space_name="x", space_text="", base_config={"device": "auto"}, trials=3,
                                     workers=3)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert launcher.gpu_assignment(settings) == ["3", "5", "3"]
    settings.base_config["device"] = "cpu"
    assert launcher.gpu_assignment(settings) == [None, None, None]


@pytest.mark.unit
def test_pruners() -> None:
    assert isinstance(storage.make_pruner("median", 350), optuna.pruners.MedianPruner)
    assert isinstance(storage.make_pruner("hyperband", 350), optuna.pruners.HyperbandPruner)
    assert isinstance(storage.make_pruner("hyperband", 1), optuna.pruners.HyperbandPruner)
    assert isinstance(storage.make_pruner("none", 2), optuna.pruners.NopPruner)
