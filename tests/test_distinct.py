"""Workers that never repeat each other, bad input caught before anything exists, and the small faults of a search.

Processes started together on one study (SQLite and PostgreSQL) train distinct configurations, each once; one
process with one seed samples the same trials every time; a space whose values no config accepts is refused when it
is loaded; a trial that fails on the user's input takes no place among ``--trials``; Ctrl-C with stdout in a broken
pipe still closes the study's parent run; no lock file, no empty database, no library chatter.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient
from optuna.trial import TrialState

from allconv_cli import spaces
from allconv_cli.cli import main
from allconv_cli.config import TrainConfig
from allconv_cli.errors import AllconvError
from allconv_cli.search.budget import count_trials
from allconv_cli.search.distinct import make_sampler, repeated
from allconv_cli.search.plan import plan_search
from allconv_cli.tracking.schema import TrialAttr

DUPLICATE_ATTR, SURPLUS_ATTR, USER_ERROR_ATTR = TrialAttr.DUPLICATE_OF, TrialAttr.SURPLUS, TrialAttr.USER_ERROR

ALLCONV = [sys.executable, "-m", "allconv_cli"]
TINY = ["--model", "A", "--branch", "model", "--dataset", "fake", "--subset", "10", "--val-size", "10",
        "--preprocess", "standardize", "--device", "cpu", "--pruner", "none"]
# 12 configurations for 9 trials: processes drawing at random collide often, so the check after sampling works too
SMALL_SPACE = """description: 4 lrs x 3 input dropouts
fixed: {batch_size: 10}
params:
  lr: {type: categorical, choices: [0.01, 0.02, 0.05, 0.1]}
  dropout_input: {type: categorical, choices: [0.0, 0.1, 0.2]}
"""
CHATTER = ("Creating initial MLflow database tables", "A new study created", "[I 20", "Traceback")
optuna.logging.set_verbosity(optuna.logging.WARNING)


def env_for(folder: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(ALLCONV_CACHE_DIR=str(folder / "cache"), ALLCONV_FAKE_SIZES="30,10", PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS="1", **extra)
    return env


# ---------------------------------------------------------------------------------------------------------------
# sampling: per-trial seeds, the grid, the check after sampling (no training)


def ask_values(study: optuna.Study, space: spaces.SearchSpace) -> optuna.Trial:
    trial = study.ask()
    space.sample(trial, TrainConfig(**space.fixed).to_dict())
    return trial


@pytest.mark.unit
@pytest.mark.parametrize("name", ["default", "paper"])
def test_processes_with_one_seed_draw_different_trials(name: str, tmp_path: Path) -> None:
    """Two processes (two Study objects, each with its own sampler, as `allconv search` builds them) asking in turn
    on one storage: with the old per-process seed both drew the same values."""
    space = spaces.load(name)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(study_name="s", storage=storage, direction="maximize")
    a, b = (optuna.load_study(study_name="s", storage=storage, sampler=make_sampler(space, 7)) for _ in range(2))
    for _ in range(2):
        ta, tb = ask_values(a, space), ask_values(b, space)  # both asked before either is told
        a.tell(ta, 0.5)
        b.tell(tb, 0.5)
    params = [t.params for t in a.get_trials()]
    assert len(params) == 4
    assert all(params[i] != params[j] for i in range(4) for j in range(i)), params


@pytest.mark.unit
def test_one_process_with_one_seed_samples_the_same_trials() -> None:
    """TPE past its 20 random start-up trials, values from a fixed function of the params: the same seed gives the
    same 25 trials, another seed other ones."""
    space = spaces.load("default")

    def run(seed: int) -> list[dict]:
        study = optuna.create_study(direction="maximize", sampler=make_sampler(space, seed))
        for _ in range(25):
            trial = ask_values(study, space)
            study.tell(trial, sum(v for v in trial.params.values() if isinstance(v, float)))
        return [t.params for t in study.trials]

    first = run(3)
    assert run(3) == first
    assert run(4) != first
    assert len({tuple(sorted(p.items())) for p in first}) == 25


@pytest.mark.unit
def test_grid_points_go_to_trial_numbers_and_free_ones_are_taken_again() -> None:
    space = spaces.load("optimizer")  # 8 points
    study = optuna.create_study(direction="maximize", sampler=make_sampler(space, 0))
    trials = [ask_values(study, space) for _ in range(3)]  # asked together, as by three processes
    assert len({tuple(t.params.values()) for t in trials}) == 3
    study.tell(trials[0], 0.5)
    trials[1].set_user_attr(USER_ERROR_ATTR, True)  # stopped by a user error: its point is free again
    study.tell(trials[1], state=TrialState.FAIL)
    study.tell(trials[2], state=TrialState.FAIL)  # failed and counted: its point stays taken
    more = [ask_values(study, space) for _ in range(6)]
    for t in more:
        study.tell(t, 0.5)
    counted = [tuple(t.params.values()) for t in study.trials if not t.user_attrs.get(USER_ERROR_ATTR)]
    assert len(counted) == len(set(counted)) == 8, "each point once among the trials that count"


def _trial(number: int, params: dict, state: TrialState = TrialState.RUNNING, **attrs: object) -> object:
    dist = {k: optuna.distributions.CategoricalDistribution([1, 2, 3]) for k in params}
    system = attrs.pop("system", {})
    trial = optuna.trial.create_trial(state=state, params=params, distributions=dist, user_attrs=attrs,
                                      system_attrs=system, value=0.5 if state == TrialState.COMPLETE else None)
    trial.number = number
    return trial


@pytest.mark.unit
def test_a_trial_never_trains_values_another_placed_trial_holds() -> None:
    """The rule after sampling: a trial yields to any other trial that holds its values (finished, running or
    waiting), whatever its number; of two trials sampled at once at least one sees the other, so equal values are
    never trained twice (both may yield: then both draw again)."""
    x, y = {"a": 1}, {"a": 2}
    assert repeated([_trial(0, x, TrialState.COMPLETE), _trial(1, x)], 1) == 0, "a finished trial has them"
    assert repeated([_trial(0, x), _trial(1, x)], 0) == 1, "a later trial sampled at the same moment has them too"
    assert repeated([_trial(0, x), _trial(1, x, **{DUPLICATE_ATTR: 0})], 0) is None, "it yielded: they are free"
    assert repeated([_trial(0, x, TrialState.FAIL, **{SURPLUS_ATTR: True}), _trial(1, x)], 1) is None
    assert repeated([_trial(0, x, TrialState.FAIL, **{USER_ERROR_ATTR: True}), _trial(1, x)], 1) is None
    assert repeated([_trial(0, y, TrialState.COMPLETE), _trial(1, x)], 1) is None
    retry = _trial(2, x, TrialState.WAITING, system={"retry_history": [0]})
    assert repeated([_trial(0, x, TrialState.FAIL), retry], 2) is None, "a retry repeats its trial on purpose"
    assert repeated([_trial(0, y), retry, _trial(3, x)], 3) == 2, "and holds its values"


@pytest.mark.unit
def test_repeats_and_user_errors_take_no_place_among_the_trials() -> None:
    x = {"a": 1}
    trials = [_trial(0, x, TrialState.COMPLETE), _trial(1, x, TrialState.FAIL, **{DUPLICATE_ATTR: 0}),
              _trial(2, {"a": 2}, TrialState.FAIL, **{USER_ERROR_ATTR: True}), _trial(3, {"a": 3}, TrialState.FAIL)]
    c = count_trials(trials)
    assert (c.finished, c.complete, c.failed) == (2, 1, 1)


# ---------------------------------------------------------------------------------------------------------------
# validation before anything is created


@pytest.mark.unit
@pytest.mark.parametrize(("text", "needle"), [
    ("params:\n  dropout_input: {type: categorical, choices: [1.5]}\n", "dropout_input=1.5: must be in [0, 1)"),
    ("params:\n  dropout_hidden: {type: float, low: 0.1, high: 1.0}\n", "params.dropout_hidden.high"),
    ("params:\n  lr_gamma: {type: float, low: 0.0, high: 0.5}\n", "lr_gamma=0.0"),
    ("fixed: {init_std: 0}\n", "fixed.init_std: init_std=0.0: must be > 0"),
    ("params:\n  lr: {depends_on: optimizer, cases: {sgdd: {type: float, low: 0.01, high: 0.1}}}\n",
     "cases.sgdd: optimizer='sgdd': choose one of"),
    ("params:\n  optimizer: {type: categorical, choices: [sgd, adam]}\n  momentum:\n    depends_on: optimizer\n"
     "    cases: {sgd: 0.9, adam: 1.2}\n", "params.momentum.cases.adam: momentum=1.2"),
])
def test_spaces_show_refuses_values_no_config_accepts(text: str, needle: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    result = CliRunner().invoke(main, ["spaces", "show", str(path)])
    assert result.exit_code == 2, result.output
    assert needle in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.unit
def test_sampled_values_are_checked_with_the_command_line_before_a_study(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ep.yaml").write_text("params:\n  epochs: {type: int, low: 2, high: 10}\n")
    with pytest.raises(AllconvError, match=r"the sampled epochs=2 .*milestones=\[5\]"):
        plan_search("ep.yaml", {"milestones": (5,)}, {"milestones"}, [], trials=3, storage_url=None,
                    study_name=None, experiment="e")
    (tmp_path / "small.yaml").write_text(SMALL_SPACE)
    settings, notes = plan_search("small.yaml", {}, {"trials"}, [], trials=20, storage_url=None, study_name=None,
                                  experiment="e")
    assert settings.trials == 12 and "has 12 distinct configurations" in notes[0]
    assert spaces.load("default").size({}) is None and spaces.load("optimizer").size({}) == 8
    dep = spaces.parse("params:\n  optimizer: {type: categorical, choices: [sgd, adam]}\n  momentum:\n"
                       "    depends_on: optimizer\n"
                       "    cases: {sgd: {type: categorical, choices: [0.5, 0.9]}, adam: 0.9}\n")
    assert dep.size({}) == 3
    assert not list(tmp_path.glob("*.db"))


# ---------------------------------------------------------------------------------------------------------------
# processes started together on one study (SQLite here, PostgreSQL below)


def start_together(folder: Path, storage: str, trials: int = 9) -> dict[str, subprocess.CompletedProcess[str]]:
    """Three `allconv search` processes with the same command, each as on its own host (own TMPDIR)."""
    (folder / "small.yaml").write_text(SMALL_SPACE)
    MlflowClient(f"sqlite:///{folder / 'mlflow.db'}").search_experiments()  # the store exists, as on a server
    cmd = [*ALLCONV, "search", *TINY, "--epochs", "1", "--space", "small.yaml", "--trials", str(trials),
           "--storage", storage, "--study-name", "together"]
    procs = {}
    for name in "abc":
        (folder / name).mkdir()
        procs[name] = subprocess.Popen(cmd, cwd=folder, env=env_for(folder, TMPDIR=str(folder / name)),
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        out[name] = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    return out


def check_distinct(folder: Path, storage: str, done: dict[str, subprocess.CompletedProcess[str]],
                   trials: int = 9) -> None:
    for name, run in done.items():
        assert run.returncode == 0, f"{name}: {run.stdout[-3000:]}{run.stderr[-3000:]}"
        assert not any(c in run.stdout + run.stderr for c in CHATTER), run.stderr
        assert not list((folder / name).glob("allconv-search-*")), "no lock file left"
    study = optuna.load_study(study_name="together", storage=storage)
    counted = [t for t in study.trials if DUPLICATE_ATTR not in t.user_attrs and not t.user_attrs.get(SURPLUS_ATTR)]
    assert len(counted) == trials and all(t.state == TrialState.COMPLETE for t in counted)
    configs = {tuple(sorted(t.params.items())) for t in counted}
    assert len(configs) == trials, "every configuration once"
    repeats = [t for t in study.trials if DUPLICATE_ATTR in t.user_attrs]
    assert all(t.state == TrialState.FAIL and "mlflow_run_id" not in t.user_attrs for t in repeats)
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("allconv").experiment_id],
                              "tags.`allconv.role` = 'trial'", max_results=100)
    assert sorted(r.info.run_id for r in runs) == sorted(t.user_attrs["mlflow_run_id"] for t in counted)
    assert {tuple(sorted((k, float(r.data.params[k])) for k in ("lr", "dropout_input"))) for r in runs} == configs
    workers = {t.user_attrs["worker"] for t in counted}
    print(f"{len(counted)} trials, {len(configs)} distinct configurations, {len(repeats)} repeats caught and not "
          f"trained, {len(workers)} processes trained")


@pytest.mark.e2e
def test_three_processes_started_together_on_sqlite_never_repeat_a_configuration(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    check_distinct(tmp_path, storage, start_together(tmp_path, storage))


@pytest.mark.services
def test_three_processes_started_together_on_postgres_never_repeat_a_configuration(postgres, tmp_path: Path) -> None:
    postgres.reset_database("optuna")
    storage = postgres.url("optuna")
    check_distinct(tmp_path, storage, start_together(tmp_path, storage))


def prepare_together(folder: Path, storage: str, n: int = 6) -> list[subprocess.CompletedProcess[str]]:
    """``n`` processes started at once on a new storage (and, for SQLite, a new folder: a new mlflow.db too)."""
    cmd = [*ALLCONV, "search", *TINY, "--epochs", "1", "--trials", "3", "--storage", storage, "--prepare"]
    procs = [subprocess.Popen(cmd, cwd=folder, env=env_for(folder), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(n)]
    outputs = [p.communicate(timeout=300) for p in procs]  # wait first: returncode is None until then
    return [subprocess.CompletedProcess(cmd, p.returncode, *out) for p, out in zip(procs, outputs, strict=True)]


def check_prepared(folder: Path, storage: str, done: list[subprocess.CompletedProcess[str]]) -> None:
    for run in done:
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        assert "Traceback" not in run.stderr, run.stderr
    (summary,) = optuna.get_all_study_summaries(storage)
    assert summary.n_trials == 0, "--prepare trains nothing"
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    assert "allconv.space_sha" in study.user_attrs and study.metric_names == ["val_accuracy"]
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("allconv").experiment_id])
    assert [r.info.run_id for r in runs] == [study.user_attrs["allconv.parent_run_id"]], "one parent run"


@pytest.mark.e2e
@pytest.mark.parametrize("round_", range(3))
def test_six_processes_started_at_once_on_a_new_sqlite_file_all_open_the_study(tmp_path: Path, round_: int) -> None:
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    check_prepared(tmp_path, storage, prepare_together(tmp_path, storage))


@pytest.mark.services
@pytest.mark.parametrize("round_", range(3))
def test_six_processes_started_at_once_on_a_new_postgres_database_all_open_the_study(postgres, tmp_path: Path,
                                                                                    round_: int) -> None:
    postgres.reset_database("optuna")
    storage = postgres.url("optuna")
    check_prepared(tmp_path, storage, prepare_together(tmp_path, storage))


# ---------------------------------------------------------------------------------------------------------------
# a trial's user error, a data error, Ctrl-C into a broken pipe


@pytest.mark.e2e
def test_user_error_in_a_trial_takes_no_place_and_stops_the_search(tmp_path: Path) -> None:
    """A subset the data cannot give is only found when the trial loads its data: one line, exit 2, the parent run
    closed; the trial does not count, so the same command fails the same way instead of saying 'nothing to run'."""
    (tmp_path / "big.yaml").write_text("params:\n  subset: {type: categorical, choices: [5000]}\n")
    cmd = [*ALLCONV, "search", *TINY, "--epochs", "1", "--space", "big.yaml", "--trials", "1"]
    for _ in range(2):
        run = subprocess.run(cmd, cwd=tmp_path, env=env_for(tmp_path), capture_output=True, text=True, timeout=300)
        assert run.returncode == 2, run.stdout + run.stderr
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: subset=5000 is out of range"), run.stderr
        assert not any(c in run.stdout + run.stderr for c in CHATTER), run.stdout + run.stderr
    study = optuna.load_study(study_name="allconv_a_model-big", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert [t.state for t in study.trials] == [TrialState.FAIL] * 2
    assert all(t.user_attrs[USER_ERROR_ATTR] for t in study.trials)
    assert count_trials(study.trials).finished == 0
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("allconv").experiment_id])
    assert [(r.data.tags["allconv.role"], r.info.status, r.data.tags["allconv.study_state"]) for r in runs] == [
        ("study", "FAILED", "failed")], "one parent run, closed; no trial run"


@pytest.mark.e2e
def test_data_error_leaves_no_database(tmp_path: Path) -> None:
    run = subprocess.run([*ALLCONV, "search", "--dataset", "cifar10", "--data-dir", str(tmp_path / "none"),
                          "--trials", "1"], cwd=tmp_path, env=env_for(tmp_path), capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert str(tmp_path / "none") in run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "no optuna.db, no mlflow.db, no mlruns"


@pytest.mark.e2e
def test_ctrl_c_with_stdout_in_a_broken_pipe_closes_the_parent_run(tmp_path: Path) -> None:
    """`allconv search ... | tee log` and Ctrl-C: tee is gone before the trial is checkpointed. Exit 130, no
    traceback, the trial failed as interrupted (to be resumed) and the parent run KILLED, not left RUNNING."""
    (tmp_path / "small.yaml").write_text(SMALL_SPACE)
    proc = subprocess.Popen([*ALLCONV, "search", *TINY, "--epochs", "200", "--space", "small.yaml", "--trials", "1"],
                            cwd=tmp_path, env=env_for(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    deadline = time.monotonic() + 240
    running = False
    while not running and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(1)
        try:
            study = optuna.load_study(study_name="allconv_a_model-small", storage=storage)
            trial = study.trials[0]
            run_id = trial.user_attrs["mlflow_run_id"]
            running = bool(MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_metric_history(run_id,
                                                                                                  "train_loss"))
        except Exception:  # not there yet
            continue
    assert running, "the trial never started"
    proc.stdout.close()  # the reader is gone: every later write to stdout is a broken pipe
    proc.send_signal(signal.SIGINT)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 130, err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    (trial,) = optuna.load_study(study_name="allconv_a_model-small", storage=storage).trials
    assert trial.state == TrialState.FAIL and trial.user_attrs["reason"] == "interrupted"
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = client.get_run(study.user_attrs["allconv.parent_run_id"])
    assert parent.info.status == "KILLED" and parent.data.tags["allconv.study_state"] == "interrupted"
