"""Collapse handling: class channels alive per epoch, a dead head ends as ``collapsed``, a collapsed run is restarted
with a new seed on the same data split (``--collapse-retries``) in ``train`` and in search trials, and the
precision and dead-class tags.

The collapses are real: a net without BN and with ReLU on the class scores, trained at lr 0.2 on the fake data,
loses every class channel in its first epoch with seed 0 and keeps one alive with the second attempt's seed; one
initialised with weights of std 1e-20 is dead from the start, whatever the seed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import torch
from click.testing import CliRunner
from mlflow import MlflowClient
from mlflow.tracking._tracking_service import utils as mlflow_uri
from optuna.trial import TrialState

from allconv_cli.cli import main
from allconv_cli.config import TrainConfig
from allconv_cli.data import load_dataset
from allconv_cli.engine import attempt_seed, precision, train
from allconv_cli.evaluation import CollapseWatch, Evaluation, dead_from_range

CPU = torch.device("cpu")
# A with strided convs and no BN, fake data (10,000 images, the default fake size), 20 steps of 16 per epoch
NET = ["--model", "A", "--branch", "strided", "--dataset", "fake", "--subset", "320", "--val-size", "100",
       "--preprocess", "standardize", "--no-bn", "--batch-size", "16", "--device", "cpu"]
DEAD = ["--init", "gaussian", "--init-std", "1e-20"]  # every activation underflows to 0: dead whatever the seed
pytestmark = pytest.mark.usefixtures("flush_denormals")  # the DEAD nets' activations pass through subnormals


def tiny(**overrides: object) -> TrainConfig:
    base = dict(model="A", branch="strided", dataset="fake", subset=320, val_size=100, preprocess="standardize",
                bn=False, batch_size=16, epochs=2, lr=0.05, device="cpu")
    return TrainConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def data():
    return load_dataset(tiny().data_config()).to(CPU, channels_last=True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One working folder (MLflow and Optuna stores) for this module's CLI runs."""
    root = tmp_path_factory.mktemp("collapse")
    with pytest.MonkeyPatch.context() as mp:
        for key in [k for k in os.environ if k.startswith(("MLFLOW_", "ALLCONV_"))]:
            mp.delenv(key)
        mp.setenv("ALLCONV_CACHE_DIR", str(root / "cache"))
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.setattr(mlflow_uri, "_tracking_uri", None)  # a URI an earlier test set globally would win over the env
        mp.chdir(root)
        yield root


def cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def runs(folder: Path, experiment: str) -> list:
    client = MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    return sorted(client.search_runs([exp.experiment_id], max_results=1000), key=lambda r: r.info.start_time)


@pytest.mark.unit
def test_attempt_seeds_keep_the_first_and_differ_after() -> None:
    assert attempt_seed(7, 1) == 7 and attempt_seed(0, 1) == 0
    seeds = [attempt_seed(7, n) for n in range(2, 12)]
    assert len(set(seeds)) == 10 and 7 not in seeds and all(0 <= s < 2**32 for s in seeds)
    assert seeds == [attempt_seed(7, n) for n in range(2, 12)] and attempt_seed(8, 2) != attempt_seed(7, 2)
    assert precision(CPU, amp=True) == "fp32"
    assert precision(torch.device("cuda"), amp=True) == "bf16" and precision(torch.device("cuda"), False) == "tf32"


@pytest.mark.unit
def test_dead_classes_from_the_score_range() -> None:
    high, low = torch.tensor([0.5, 0.0, -1.0, 2.0]), torch.tensor([0.0, 0.0, -3.0, 2.0])
    assert dead_from_range(high, low, head_relu=True) == (1, 2)  # never positive: no gradient through the ReLU
    assert dead_from_range(high, low, head_relu=False) == (1, 3)  # the same score for every input
    assert TrainConfig().collapse_retries == 2


@pytest.mark.unit
def test_the_collapse_watch_counts_dead_epochs_in_a_row_and_decides() -> None:
    """The one rule: dead (constant output, or every class channel dead with the head's ReLU) for
    ``collapse_patience`` epochs in a row, or still dead after the last epoch; a live epoch resets the count."""

    class State:
        epoch, constant_epochs = 0, 0

    alive = Evaluation(2.0, 0.3, (3,), constant=False)
    head_dead = Evaluation(2.3, 0.1, tuple(range(10)), constant=False)
    constant = Evaluation(2.3, 0.1, (), constant=True)
    watch, state = CollapseWatch(tiny(epochs=10, collapse_patience=2), 10), State()
    verdicts = []
    for state.epoch, evaluation in enumerate([head_dead, alive, constant, constant, alive], start=1):
        verdicts.append(watch.observe(state, evaluation))
    assert verdicts[:3] == [None, None, None] and verdicts[4] is None and state.constant_epochs == 0
    assert "same for every input" in verdicts[3] and "2 epoch(s) in a row" in verdicts[3]
    assert "stopped after epoch 4" in verdicts[3] and watch.dead_classes == (3,)
    last = CollapseWatch(tiny(epochs=1, collapse_patience=5), 10)
    state = State()
    state.epoch = 1
    assert "every class score was <= 0" in last.observe(state, head_dead)
    assert "still dead after the last epoch (1)" in last.observe(state, head_dead)
    assert CollapseWatch(tiny(epochs=1, collapse_patience=0), 10).observe(state, head_dead) is None
    linear = CollapseWatch(tiny(epochs=1, head_relu=False, collapse_patience=1), 10)
    assert linear.observe(state, head_dead) is None, "without the head's ReLU, negative scores still pass gradient"


@pytest.mark.e2e
def test_alive_classes_per_epoch_and_a_partly_dead_head(data, tmp_path: Path) -> None:
    """lr 0.1 without BN: the run goes on, but most class channels die; the result names them."""
    result = train(tiny(lr=0.1), data, device=CPU, checkpoint_dir=tmp_path)
    assert result.status == "finished" and result.seed == 0
    alive = [h["alive_classes"] for h in result.history]
    assert len(alive) == 2 and all(0 < a < 10 for a in alive)
    assert len(result.dead_classes) == 10 - alive[-1] and set(result.dead_classes) <= set(range(10))


@pytest.mark.e2e
def test_a_dead_head_is_collapsed_by_the_end_of_a_short_run(data, tmp_path: Path) -> None:
    """Patience 5 cannot be met in 2 epochs, but a head still dead after the last epoch is a collapse; patience 0
    never stops. Without the head's ReLU the scores are constant instead (the bias), the other collapse."""
    dead = {"init": "gaussian", "init_std": 1e-20}
    short = train(tiny(**dead), data, device=CPU, checkpoint_dir=tmp_path / "a")
    assert short.status == "collapsed" and short.epochs_completed == 2 and short.test_accuracy is None
    assert "every class score was <= 0" in short.reason and "after the last epoch" in short.reason
    assert short.dead_classes == tuple(range(10)) and [h["alive_classes"] for h in short.history] == [0, 0]
    never = train(tiny(**dead, collapse_patience=0), data, device=CPU, checkpoint_dir=tmp_path / "b")
    assert never.status == "finished"
    linear = train(tiny(**dead, head_relu=False, epochs=1, collapse_patience=1), data, device=CPU,
                   checkpoint_dir=tmp_path / "c")
    assert linear.status == "collapsed" and "same for every input" in linear.reason


@pytest.mark.e2e
def test_train_restarts_a_collapsed_run_with_a_new_seed_on_the_same_split(folder: Path) -> None:
    code, out, err = cli("train", *NET, "--epochs", "2", "--lr", "0.2", "--collapse-patience", "1",
                         "--experiment", "retry", "--json")
    assert code == 0, out + err
    report = json.loads(out)
    attempts = report["attempts"]
    assert [(a["number"], a["status"]) for a in attempts] == [(1, "collapsed"), (2, "finished")]
    assert [a["seed"] for a in attempts] == [0, attempt_seed(0, 2)]
    assert report["run_id"] == attempts[1]["run_id"] and report["status"] == "finished"
    assert f"restarting as attempt 2 of 3 with seed {attempt_seed(0, 2)}" in " ".join(err.split())
    first, second = runs(folder, "retry")
    assert (first.info.run_id, second.info.run_id) == (attempts[0]["run_id"], attempts[1]["run_id"])
    tags1, tags2 = first.data.tags, second.data.tags
    assert (tags1["allconv.attempt"], tags2["allconv.attempt"]) == ("1", "2")
    assert (tags1["allconv.init_seed"], tags2["allconv.init_seed"]) == ("0", str(attempt_seed(0, 2)))
    assert tags1["allconv.collapse_retried_by"] == second.info.run_id
    assert tags2["allconv.collapse_retry_of"] == first.info.run_id and "allconv.collapse_retried_by" not in tags2
    assert tags1["allconv.data_hash"] == tags2["allconv.data_hash"], "a restart keeps the data split"
    assert first.data.params["seed"] == second.data.params["seed"] == "0"
    assert tags1["allconv.status"] == "collapsed" and first.info.status == "FAILED"
    assert tags1["allconv.dead_classes"] == "0,1,2,3,4,5,6,7,8,9" and first.data.metrics["alive_classes"] == 0
    assert tags1["allconv.precision"] == tags2["allconv.precision"] == "fp32"
    assert second.info.run_name == first.info.run_name + "-attempt2"
    alive = second.data.metrics["alive_classes"]
    assert 0 < alive < 10 and len(tags2["allconv.dead_classes"].split(",")) == 10 - alive


@pytest.mark.e2e
def test_every_attempt_collapsed_ends_collapsed_and_retries_zero_means_one_run(folder: Path) -> None:
    code, out, err = cli("train", *NET, *DEAD, "--epochs", "1", "--collapse-retries", "1", "--experiment", "dead",
                         "--json")
    assert code == 0, out + err
    report = json.loads(out)
    assert [a["status"] for a in report["attempts"]] == ["collapsed", "collapsed"]
    assert report["status"] == "collapsed" and "all 2 attempts collapsed" in report["reason"]
    assert len(runs(folder, "dead")) == 2
    code, out, err = cli("train", *NET, *DEAD, "--epochs", "1", "--collapse-retries", "0", "--experiment", "once",
                         "--json")
    assert code == 0 and [a["status"] for a in json.loads(out)["attempts"]] == ["collapsed"]
    assert len(runs(folder, "once")) == 1


@pytest.mark.e2e
def test_a_search_trial_is_retried_and_pruned_when_every_attempt_collapsed(folder: Path) -> None:
    (folder / "dead.yaml").write_text("description: dead from the start\nsampler: random\n"
                                      "fixed: {init: gaussian, init_std: 1.0e-20}\n")
    code, out, err = cli("search", *NET, "--epochs", "1", "--space", "dead.yaml", "--trials", "1",
                         "--collapse-retries", "1", "--study-name", "dead", "--experiment", "search")
    assert code == 0, out + err
    (trial,) = optuna.load_study(study_name="dead", storage=f"sqlite:///{folder / 'optuna.db'}").trials
    assert trial.state == TrialState.PRUNED
    assert trial.user_attrs["reason"].startswith("collapsed: ") and "all 2 attempts collapsed" in trial.user_attrs[
        "reason"]
    children = [r for r in runs(folder, "search") if r.data.tags.get("allconv.role") == "trial"]
    assert [r.data.tags["allconv.attempt"] for r in children] == ["1", "2"]
    assert {r.data.tags["allconv.trial_number"] for r in children} == {"0"}
    assert trial.user_attrs["mlflow_run_id"] == children[1].info.run_id, "the trial is its last attempt"
    assert [r.data.tags["allconv.trial_state"] for r in children] == ["restarted", "pruned"]
    code, out, _ = cli("report", "--format", "json", "--experiment", "search")
    (study,) = json.loads(out)["studies"]
    assert (study["trials"], study["collapsed_attempts"]) == (1, 1)
