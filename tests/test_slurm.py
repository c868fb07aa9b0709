"""deploy/slurm on a real SLURM cluster: the prepare job, then the worker array, against PostgreSQL and MLflow.

A single-node cluster of this machine (tests/slurm_cluster.py: munged, slurmctld, slurmd from Debian's packages) runs
the shipped ``prepare.sbatch`` and ``worker.sbatch`` unchanged, submitted as the README says (the array depends on the
prepare job with ``afterok``). Only sizes change, on the sbatch command line: 1 CPU and 1 GB per job (this machine has
2 cores), a 3-task array, and tiny trials on fake data on the CPU (options after the script name, which the scripts
pass to ``allconv search``; a short heartbeat through the environment, which sbatch passes on). The connection
settings are in the submit folder's ``allconv.env``, as a user keeps them. The node's two GPUs are GRES backed by
``/dev/null`` and ``/dev/zero``: ``--gres=gpu:1`` is scheduled as written, two tasks at a time.

While the study runs, one array task is cancelled (``scancel``: SIGTERM, then SIGKILL) mid-trial, after its trial
uploaded a checkpoint. Whether the worker checkpoints on SIGTERM or dies, the outcome is checked strictly through
PostgreSQL and the MLflow server: the study holds exactly N finished trials with N distinct configurations, one
finished child run with a checkpoint each under one parent, nothing RUNNING, and the cancelled trial retried with the
same parameters from its checkpoint (first logged epoch > 1).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import optuna
import psycopg
import pytest
from mlflow import MlflowClient
from mlflow.entities import Run
from optuna.trial import FrozenTrial, TrialState

from allconv_cli.tracking.schema import Artifact, Metric, MlflowTag, Role, StudyAttr, Tag, TrialAttr
from slurm_cluster import SlurmCluster, SlurmError

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "slurm"
TRIALS, EPOCHS, TASKS = 4, 5, 3
# the test's sizes, on the sbatch command line (these win over the scripts' #SBATCH lines)
CPU_JOB = ("--cpus-per-task=1", "--mem=1G")
WORKER_ARRAY = f"--array=0-{TASKS - 1}%2"
# tiny trials: model A on 100 fake images on the CPU, only the learning rate searched (random sampler, no pruner)
SPACE = """\
description: slurm test - the learning rate only
sampler: random
fixed: {optimizer: sgd, batch_size: 50}
params:
  lr: {type: float, low: 0.01, high: 0.1, log: true}
"""
TINY = ("--subset", "100", "--val-size", "50", "--preprocess", "standardize", "--bn", "--device", "cpu",
        "--pruner", "none")


def sbatch_command(path: Path) -> list[str]:
    """The ``allconv`` command a shipped sbatch file execs (its continuation lines joined), as words."""
    text = path.read_text().replace("\\\n", " ")
    (line,) = [ln for ln in text.splitlines() if ln.strip().startswith("exec allconv ")]
    return shlex.split(line)[1:]


def settings_block(path: Path) -> list[str]:
    """The lines that read the settings, from the shared block's marker to the PATH check (the marker line itself
    names the other file, so it is left out)."""
    lines = path.read_text().splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("# ---- the same block in "))
    end = next(i for i, ln in enumerate(lines) if ln.startswith("command -v allconv"))
    return lines[start + 1:end + 1]


@pytest.mark.unit
def test_prepare_job_runs_the_worker_command_plus_prepare() -> None:
    """One study, one command: the prepare job must create exactly the study the workers then load."""
    worker = sbatch_command(DEPLOY / "worker.sbatch")
    assert worker[:2] == ["allconv", "search"] and worker[-1] == "$@", worker
    for option in ("--model", "--branch", "--dataset", "--trials", "--epochs", "--study-name"):
        assert option in worker, option
    assert sbatch_command(DEPLOY / "prepare.sbatch") == [*worker, "--prepare"]
    assert settings_block(DEPLOY / "prepare.sbatch") == settings_block(DEPLOY / "worker.sbatch")
    worker_text = (DEPLOY / "worker.sbatch").read_text()
    assert re.search(r"^#SBATCH --array=0-\d+%\d+$", worker_text, re.M)
    assert re.search(r"^#SBATCH --gres=gpu:1$", worker_text, re.M)
    assert "--gres" not in (DEPLOY / "prepare.sbatch").read_text(), "the prepare job needs no GPU"
    for name in ("prepare.sbatch", "worker.sbatch"):
        syntax = subprocess.run(["bash", "-n", str(DEPLOY / name)], capture_output=True, text=True)
        assert syntax.returncode == 0, (name, syntax.stderr)


@pytest.mark.unit
def test_dataset_logged_by_two_tasks_at_once_is_logged_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """Array tasks start together, and their first runs log the same new dataset at once: MLflow's store checks, then
    inserts, and the loser gets a unique-key error. That is not the trial's failure: the call is made once more (the
    dataset exists then). Any other refusal still fails."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import BAD_REQUEST

    from allconv_cli.config import TrainConfig
    from allconv_cli.tracking import store

    race = ('(psycopg.errors.UniqueViolation) duplicate key value violates unique constraint "dataset_pk"')
    calls: list[str] = []

    def client(errors: list[str]):
        class Client:
            def log_inputs(self, run_id: str, datasets: list) -> None:
                calls.append(datasets[0].dataset.digest)
                if errors:
                    raise MlflowException(errors.pop(0), error_code=BAD_REQUEST)
        return lambda: Client()

    cfg = TrainConfig(model="A", branch="strided", dataset="fake")
    monkeypatch.setattr(store, "client", client([race]))
    store.log_dataset("run", cfg, "d1", 100, 50, 50)
    assert calls == ["d1", "d1"]
    monkeypatch.setattr(store, "client", client(["INVALID_PARAMETER_VALUE: dataset name too long"]))
    with pytest.raises(MlflowException, match="too long"):
        store.log_dataset("run", cfg, "d2", 100, 50, 50)
    assert calls == ["d1", "d1", "d2"]


# ---------------------------------------------------------------------------------------------------------------
# the cluster


@pytest.fixture(scope="module")
def slurm() -> Iterator[SlurmCluster]:
    """The single-node cluster, for this module; its daemons are stopped by pid afterwards, also on failure."""
    cluster, error = SlurmCluster(), ""
    try:
        cluster.start()
    except SlurmError as exc:
        error = str(exc)
    if error:
        cluster.cleanup()
        pytest.fail(f"the SLURM cluster could not be started (this test fails rather than skips): {error}",
                    pytrace=False)
    yield cluster
    cluster.stop()
    left = cluster.leftovers()
    cluster.cleanup()
    assert not left, f"processes of the test cluster still running after stop: {left}"


@pytest.fixture
def cluster(slurm: SlurmCluster) -> Iterator[SlurmCluster]:
    """The module's cluster with an empty queue afterwards: a failed test leaves no job holding the node."""
    yield slurm
    slurm.cancel_all()


@dataclass
class Study:
    """The study the jobs run, and where to look at it."""

    name: str
    storage: str
    tracking_uri: str
    folder: Path  # the submit folder: allconv.env, the jobs' logs
    env: dict[str, str]  # sbatch's environment (the jobs inherit it)
    args: tuple[str, ...]  # options after the script name (passed on to allconv search)

    def log(self, pattern: str) -> str:
        return "\n".join(f"==== {p.name}\n{p.read_text(errors='replace')[-4000:]}"
                         for p in sorted(self.folder.glob(pattern)))


def make_study(postgres, service_env: dict[str, str], folder: Path) -> Study:
    """The submit folder as a user has it: ``allconv.env`` holding the connection settings and the study (mode 600),
    the environment holding what the test shrinks."""
    name = f"slurm-{os.urandom(3).hex()}"
    tracking = {k: v for k, v in service_env.items() if k.startswith("MLFLOW_TRACKING_")}
    settings = {"ALLCONV_STORAGE": postgres.url("optuna"), **tracking, "MLFLOW_EXPERIMENT_NAME": name,
                "STUDY": name, "MODEL": "A", "BRANCH": "strided", "DATASET": "fake", "TRIALS": str(TRIALS),
                "EPOCHS": str(EPOCHS)}
    env_file = folder / "allconv.env"
    env_file.write_text("".join(f"{k}={shlex.quote(v)}\n" for k, v in settings.items()))
    env_file.chmod(0o600)
    env = {k: v for k, v in service_env.items() if k not in tracking}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1",
               ALLCONV_FAKE_SIZES="200,50", ALLCONV_HEARTBEAT_INTERVAL="1", ALLCONV_HEARTBEAT_GRACE="4")
    space = folder / "space.yaml"
    space.write_text(SPACE)
    return Study(name, postgres.url("optuna"), service_env["MLFLOW_TRACKING_URI"], folder, env,
                 (*TINY, "--space", str(space)))


def wait_for_prepare(slurm: SlurmCluster, prep: str, workers: str, study: Study) -> None:
    """The worker array waits on the prepare job (``afterok``); the prepare job ends COMPLETED."""
    pending = slurm.jobs(workers)
    assert all(j.state == "PENDING" and j.fields.get("Dependency", "").startswith(f"afterok:{prep}(unfulfilled)")
               for j in pending), "\n".join(f"{j} Dependency={j.fields.get('Dependency')}" for j in pending)
    (job,) = slurm.wait(prep, timeout=240)
    assert (job.state, job.fields["ExitCode"]) == ("COMPLETED", "0:0"), f"{job}\n{study.log('allconv-prepare-*')}"


def check_prepared(study: Study, client: MlflowClient) -> str:
    """Right after the prepare job: the study, its experiment and its one parent run exist, and no trial."""
    loaded = optuna.load_study(study_name=study.name, storage=study.storage)
    assert loaded.get_trials() == [], "the prepare job trained nothing"
    parent = loaded.user_attrs[StudyAttr.PARENT_RUN_ID]
    exp = client.get_experiment_by_name(study.name)
    assert exp is not None, "the prepare job created the MLflow experiment"
    runs = client.search_runs([exp.experiment_id])
    assert [(r.info.run_id, r.data.tags.get(Tag.ROLE)) for r in runs] == [(parent, Role.STUDY)], "one parent run"
    assert f"Prepared study {study.name}" in study.log("allconv-prepare-*")
    return parent


@dataclass
class Victim:
    job: str  # the cancelled array task, ARRAYID_TASK
    task: str
    pid: int
    run: Run  # its trial's MLflow run when it was cancelled
    epoch: int  # the epoch of that run's last checkpoint then


def cancel_a_task_mid_trial(slurm: SlurmCluster, workers: str, study: Study, client: MlflowClient) -> Victim:
    """``scancel`` the array task whose running trial first has a checkpoint (of epoch 1 or 2, of 5), and wait
    until its process is gone."""
    exp = client.get_experiment_by_name(study.name)
    deadline, victim = time.monotonic() + 240, None
    while victim is None:
        assert time.monotonic() < deadline, f"no trial with a checkpoint in time\n{study.log('allconv-worker-*')}"
        for run in client.search_runs([exp.experiment_id], f"tags.`{Tag.ROLE}` = '{Role.TRIAL}'"):
            epoch = int(run.data.tags.get(Tag.CHECKPOINT_LAST_EPOCH, "0"))
            if run.info.status == "RUNNING" and 1 <= epoch <= EPOCHS - 3:  # 3 epochs left, at least
                pid = int(run.data.tags[Tag.WORKER].rsplit(":", 1)[1])
                try:
                    job = SlurmCluster.job_of(pid)
                except OSError:  # that process just ended
                    continue
                if job.get("SLURM_ARRAY_JOB_ID") == workers:
                    victim = Victim(f"{workers}_{job['SLURM_ARRAY_TASK_ID']}", job["SLURM_ARRAY_TASK_ID"], pid, run,
                                    epoch)
                    break
        time.sleep(0.2)
    slurm.scancel(victim.job)
    end = time.monotonic() + slurm.kill_wait + 30
    while Path(f"/proc/{victim.pid}").exists():
        assert time.monotonic() < end, f"the cancelled worker (pid {victim.pid}) is still running"
        time.sleep(0.2)
    return victim


def check_tasks(slurm: SlurmCluster, workers: str, victim: Victim, study: Study) -> None:
    """Every task ran: the cancelled one ended CANCELLED, every other one (the spare included) exited 0."""
    jobs = slurm.wait(workers, timeout=300, tasks=TASKS)
    got = {j.task: (j.state, j.fields["ExitCode"]) for j in jobs}
    want = {str(i): ("COMPLETED", "0:0") for i in range(TASKS)}
    want[victim.task] = ("CANCELLED", got.get(victim.task, ("", ""))[1])
    assert got == want, f"{got}; cancelled {victim}\n{study.log('allconv-worker-*')}\n{slurm.logs()}"


def counted(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The trials the study counts: not failed trials that were retried (Optuna's ``retry_history`` of their retry
    names them), not trials that were never trained (``TrialAttr.SKIP_MARKS``)."""
    gone = {n for t in trials for n in t.system_attrs.get("retry_history", ())}
    return [t for t in trials if not any(m in t.user_attrs for m in TrialAttr.SKIP_MARKS)
            and not (t.state == TrialState.FAIL and t.number in gone)]


def check_study(study: Study, client: MlflowClient, parent_id: str) -> dict[int, Run]:
    """N finished trials, N configurations, each one finished child run with a checkpoint, under the one parent."""
    trials = optuna.load_study(study_name=study.name, storage=study.storage).get_trials()
    done = counted(trials)
    assert len(done) == TRIALS and all(t.state == TrialState.COMPLETE for t in done), \
        [(t.number, t.state, t.user_attrs.get(TrialAttr.REASON)) for t in trials]
    assert len({json.dumps(t.params, sort_keys=True) for t in done}) == TRIALS, "N distinct configurations"
    exp = client.get_experiment_by_name(study.name)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get(Tag.ROLE) == Role.STUDY]
    assert [p.info.run_id for p in parents] == [parent_id], "one parent run, the prepare job's"
    assert parents[0].info.status == "FINISHED" and parents[0].data.tags[Tag.STUDY_STATE] == "complete"
    children = [r for r in runs if r.data.tags.get(Tag.ROLE) == Role.TRIAL]
    assert {r.data.tags[MlflowTag.PARENT_RUN_ID] for r in children} == {parent_id}
    live = {}
    for t in done:
        mine = [r for r in children if r.data.tags[Tag.TRIAL_NUMBER] == str(t.number)
                and Tag.RETRIED_AS not in r.data.tags]
        assert len(mine) == 1 and mine[0].info.run_id == t.user_attrs[TrialAttr.MLFLOW_RUN_ID], t.number
        run = live[t.number] = mine[0]
        assert run.info.status == "FINISHED", (t.number, run.info.status)
        files = {f.path for f in client.list_artifacts(run.info.run_id, Artifact.CHECKPOINTS)}
        assert f"{Artifact.CHECKPOINTS}/last.pt" in files, (t.number, files)
    return live


def check_retry(study: Study, client: MlflowClient, victim: Victim, live: dict[int, Run], tmp: Path) -> str:
    """The cancelled task's trial: failed, retried once with the same params by another task, from its checkpoint.
    Returns how the worker ended (checkpointed on SIGTERM, or lost and found by its missed heartbeat)."""
    import torch

    trials = optuna.load_study(study_name=study.name, storage=study.storage).get_trials()
    (lost,) = [t for t in trials if t.user_attrs.get(TrialAttr.MLFLOW_RUN_ID) == victim.run.info.run_id
               and t.state == TrialState.FAIL]
    (retry,) = [t for t in counted(trials) if lost.number in t.system_attrs.get("retry_history", ())]
    assert retry.params == lost.params, "the retry is the same configuration"
    run = live[retry.number]
    assert run.data.tags[Tag.RESUMED_FROM_RUN] == victim.run.info.run_id
    assert run.data.tags[Tag.WORKER] != victim.run.data.tags[Tag.WORKER], "another task retried it"
    resumed = int(run.data.tags[Tag.RESUMED_FROM_EPOCH])
    assert resumed >= victim.epoch >= 1
    steps = sorted({m.step for m in client.get_metric_history(run.info.run_id, Metric.VAL_ACCURACY)})
    assert steps == list(range(resumed + 1, EPOCHS + 1)) and steps[0] > 1, steps
    dead = client.get_run(victim.run.info.run_id)
    assert dead.info.status in ("FAILED", "KILLED") and dead.data.tags[Tag.RETRIED_AS] == run.info.run_id
    path = client.download_artifacts(run.info.run_id, f"{Artifact.CHECKPOINTS}/last.pt", str(tmp / "download"))
    assert torch.load(path, weights_only=True)["epoch"] == EPOCHS
    return "checkpointed on SIGTERM" if dead.info.status == "KILLED" else "lost, retried after its missed heartbeat"


def check_nothing_running(postgres, study: Study) -> None:
    """Straight from PostgreSQL: no Optuna trial RUNNING or WAITING, no MLflow run RUNNING."""
    with psycopg.connect(postgres.url("optuna", driver="postgresql")) as conn:
        states = dict(conn.execute("SELECT t.state, count(*) FROM trials t JOIN studies s USING (study_id) "
                                   "WHERE s.study_name = %s GROUP BY t.state", (study.name,)).fetchall())
    assert states.get("COMPLETE") == TRIALS and not {"RUNNING", "WAITING"} & set(states), states
    with psycopg.connect(postgres.url("mlflow", driver="postgresql")) as conn:
        statuses = dict(conn.execute("SELECT r.status, count(*) FROM runs r JOIN experiments e USING "
                                     "(experiment_id) WHERE e.name = %s GROUP BY r.status", (study.name,)).fetchall())
    assert "RUNNING" not in statuses and statuses.get("FINISHED", 0) >= TRIALS + 1, statuses


@pytest.mark.services
@pytest.mark.slow
def test_worker_array_runs_the_study_and_a_cancelled_task_loses_no_trial(
    cluster: SlurmCluster, postgres, service_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's two sbatch lines, one task cancelled mid-trial: N trials, each once, none lost."""
    slurm = cluster
    started = time.monotonic()
    study = make_study(postgres, service_env, tmp_path)
    for key, value in service_env.items():  # this process reads the server as the workers do
        if key.startswith("MLFLOW_"):
            monkeypatch.setenv(key, value)
    client = MlflowClient(study.tracking_uri)
    submit = {"env": study.env, "cwd": study.folder}
    prep = slurm.sbatch(DEPLOY / "prepare.sbatch", *study.args, options=CPU_JOB, **submit)
    workers = slurm.sbatch(DEPLOY / "worker.sbatch", *study.args,
                           options=(*CPU_JOB, WORKER_ARRAY, f"--dependency=afterok:{prep}"), **submit)
    wait_for_prepare(slurm, prep, workers, study)
    prepared = time.monotonic()
    parent = check_prepared(study, client)
    victim = cancel_a_task_mid_trial(slurm, workers, study, client)
    check_tasks(slurm, workers, victim, study)
    finished = time.monotonic()
    live = check_study(study, client, parent)
    how = check_retry(study, client, victim, live, tmp_path)
    check_nothing_running(postgres, study)
    print(f"slurm-test: cluster up in {slurm.startup_seconds:.1f} s; prepare job {prepared - started:.0f} s; "
          f"{TRIALS} trials x {EPOCHS} epochs on {TASKS} array tasks, task {victim.task} cancelled at epoch "
          f"{victim.epoch} ({how}); study done {finished - started:.0f} s after submission, checked in "
          f"{time.monotonic() - started:.0f} s")


@pytest.mark.services
def test_a_failed_prepare_job_never_starts_the_workers(cluster: SlurmCluster, tmp_path: Path) -> None:
    """No storage configured: the prepare job fails with one line saying what to set, and the worker array, which
    depends on it, never starts (no GPU time spent) and says why."""
    slurm = cluster
    env = {k: v for k, v in os.environ.items() if k != "ALLCONV_STORAGE" and not k.startswith("MLFLOW_")}
    submit = {"env": env, "cwd": tmp_path}
    prep = slurm.sbatch(DEPLOY / "prepare.sbatch", options=CPU_JOB, **submit)
    workers = slurm.sbatch(DEPLOY / "worker.sbatch", options=(*CPU_JOB, WORKER_ARRAY, f"--dependency=afterok:{prep}"),
                           **submit)
    (job,) = slurm.wait(prep, timeout=60)
    assert job.state == "FAILED" and job.fields["ExitCode"] != "0:0", job
    (log,) = tmp_path.glob(f"allconv-prepare-{prep}.out")
    assert "ALLCONV_STORAGE: is not set: put the PostgreSQL URL in" in log.read_text(), log.read_text()
    deadline = time.monotonic() + 30
    while (pending := slurm.jobs(workers))[0].fields.get("Reason") != "DependencyNeverSatisfied":
        assert time.monotonic() < deadline, "\n".join(map(str, pending))
        time.sleep(0.5)
    assert [(j.state, j.task) for j in pending] == [("PENDING", f"0-{TASKS - 1}%2")]
    slurm.scancel(workers)
    assert not list(tmp_path.glob("allconv-worker-*")), "no worker task ran"
