"""``allconv reproduce`` end to end on the fake dataset: real (tiny) training, real Optuna and MLflow stores.

One module-scoped reproduction (2 networks x 2 lrs, 1 epoch, validated protocol) plus one paper-protocol trial,
then the checks read what landed in MLflow and what ``allconv report`` makes of it, and rerun the command to see
that it resumes instead of training again.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from allconv_cli import reproduce
from allconv_cli.cli import main
from allconv_cli.errors import AllconvError

COMMON = ["--epochs", "1", "--dataset", "fake", "--subset", "200", "--val-size", "100", "--preprocess", "standardize",
          "--device", "cpu"]
VALIDATED = ["reproduce", "--models", "A", "--branches", "model,allcnn", "--lrs", "0.1,0.05", "--protocol",
             "validated", *COMMON]
PAPER = ["reproduce", "--models", "a", "--branches", "model", "--lrs", "0.1", "--protocol", "paper", *COMMON]


def _invoke(args: list[str]) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, args)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("reproduce")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
        mp.setenv("ALLCONV_CACHE_DIR", str(root / "cache"))
        mp.setenv("ALLCONV_FAKE_SIZES", "400,100")  # 400 training images (200 used + 100 validation), 100 test
        mp.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
        mp.delenv("ALLCONV_STORAGE", raising=False)
        code, out, err = _invoke(VALIDATED)
        assert code == 0, out + err
        code, out, err = _invoke(PAPER)
        assert code == 0, out + err
        yield root


def _runs(role: str) -> list:
    client = MlflowClient()
    exp = client.get_experiment_by_name(reproduce.DEFAULT_EXPERIMENT)
    assert exp is not None
    return [r for r in client.search_runs([exp.experiment_id], max_results=1000)
            if r.data.tags.get("allconv.role") == role]


@pytest.mark.e2e
def test_runs_carry_tags_params_and_results(workdir: Path) -> None:
    parents = _runs("study")
    trials = _runs("trial")
    assert len(parents) == 3 and len(trials) == 5
    for run in parents + trials:
        assert run.data.tags["allconv.kind"] == "reproduce"
        assert run.data.tags["allconv.protocol"] in ("validated", "paper")
    by_protocol = {p: [t for t in trials if t.data.tags["allconv.protocol"] == p] for p in ("validated", "paper")}
    assert sorted((t.data.params["branch"], t.data.params["lr"]) for t in by_protocol["validated"]) == [
        ("allcnn", "0.05"), ("allcnn", "0.1"), ("model", "0.05"), ("model", "0.1")]
    for t in trials:
        assert t.data.tags["allconv.status"] == "finished"
        assert t.data.tags["allconv.trial_state"] == "complete"  # paper protocol: objective is test accuracy
        assert t.data.params["epochs"] == "1" and t.data.params["optimizer"] == "sgd"
        assert t.data.params["weight_decay"] == "0.001" and t.data.params["augment"] == "none"
        assert "test_error" in t.data.metrics
        assert t.data.tags["mlflow.parentRunId"] in {p.info.run_id for p in parents}
    assert {t.data.params["val_size"] for t in by_protocol["validated"]} == {"100"}
    assert [t.data.params["val_size"] for t in by_protocol["paper"]] == ["0"]


@pytest.mark.e2e
def test_report_shows_the_rows(workdir: Path) -> None:
    code, out, _ = _invoke(["report", "--format", "json", "--experiment", reproduce.DEFAULT_EXPERIMENT])
    assert code == 0
    rows = {row["name"]: row for row in json.loads(out)["networks"]}
    trials = _runs("trial")
    for branch in ("model", "allcnn"):
        mine = [t for t in trials
                if t.data.params["branch"] == branch and t.data.tags["allconv.protocol"] == "validated"]
        best = max(mine, key=lambda t: (t.data.metrics["final_val_accuracy"], float(t.data.params["lr"])))
        result = rows[f"allconv_a_{branch}"]["protocols"]["validated"]
        assert result["run_id"] == best.info.run_id
        assert result["lr"] == float(best.data.params["lr"])
        assert result["test_error"] == pytest.approx(best.data.metrics["test_error"])
        paper_error = rows[f"allconv_a_{branch}"]["paper_error"]
        assert result["diff"] == pytest.approx(best.data.metrics["test_error"] - paper_error)
        assert (result["finished"], result["lrs_total"], result["diverged"]) == (2, 2, 0)
        assert result["comparable"] is False and "--lr" in result["rerun"]
    paper = rows["allconv_a_model"]["protocols"]["paper"]
    assert paper["lr"] == 0.1 and "test set" in paper["selected_by"]
    assert rows["allconv_a_allcnn"]["protocols"]["paper"] is None
    assert rows["allconv_c_allcnn"]["protocols"] == {"paper": None, "validated": None}

    code, out, _ = _invoke(["report"])
    assert code == 0
    assert next(line for line in out.splitlines() if "All-CNN-A" in line).count("*") == 1


@pytest.mark.e2e
def test_rerun_resumes_without_training(workdir: Path) -> None:
    before = len(_runs("trial"))
    code, out, err = _invoke(VALIDATED)
    assert code == 0, out + err
    assert len(_runs("trial")) == before
    assert "already done" in out
    assert len(_runs("study")) == 3  # the same parent runs


@pytest.mark.unit
@pytest.mark.parametrize(("option", "value", "words"), [
    ("--models", "A,D", ["'D'", "A, B, C"]),
    ("--branches", "allcnn,pool", ["'pool'", "model, strided, convpool, allcnn"]),
    ("--lrs", "0.1,fast", ["'fast'", "> 0"]),
    ("--lrs", "-0.1", ["'-0.1'", "> 0"]),
])
def test_bad_values_are_one_line_errors(option: str, value: str, words: list[str]) -> None:
    code, _, err = _invoke(["reproduce", option, value, "--dataset", "fake"])
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("Error: ")
    for word in words:
        assert word in err


@pytest.mark.unit
def test_plan_and_study_names() -> None:
    plan = reproduce.ReproducePlan(models=["C", "A"], branches=["allcnn", "model"], protocols=["paper"])
    assert plan.networks() == [("A", "model"), ("A", "allcnn"), ("C", "model"), ("C", "allcnn")]  # Table 3 order
    paper_cfg = reproduce.base_config(plan, "A", "model", "paper")
    assert paper_cfg["val_size"] == 0 and paper_cfg["epochs"] == 350 and paper_cfg["weight_decay"] == 0.001
    key = reproduce.study_key(paper_cfg, plan.lrs)
    assert key == reproduce.study_key({**paper_cfg, "device": "cuda", "data_dir": "/elsewhere"}, plan.lrs)
    assert key != reproduce.study_key({**paper_cfg, "epochs": 2}, plan.lrs)
    assert key != reproduce.study_key(paper_cfg, [0.1])
    with pytest.raises(AllconvError, match="val-size"):
        reproduce.base_config(reproduce.ReproducePlan(data={"val_size": 0}), "A", "model", "validated")
    assert reproduce.parse_lrs("0.25, 0.1,0.1") == [0.25, 0.1]


@pytest.mark.e2e
def test_validated_lr_is_retrained_on_all_training_images_once(workdir: Path) -> None:
    """After the grid, the lr the validation split chose is trained again on every training image (val_size=0, same
    epochs) as a child run tagged final; the report's "ours (validated)" is its test error. Reruns do not retrain."""
    finals = _runs("final")
    assert len(finals) == 2, "one final run per validated network, however often the command ran"
    code, out, _ = _invoke(["report", "--format", "json", "--experiment", reproduce.DEFAULT_EXPERIMENT])
    assert code == 0
    rows = {row["name"]: row for row in json.loads(out)["networks"]}
    parents = {p.data.tags["allconv.study_name"]: p.info.run_id for p in _runs("study")}
    for branch in ("model", "allcnn"):
        result = rows[f"allconv_a_{branch}"]["protocols"]["validated"]
        (final,) = [f for f in finals if f.data.params["branch"] == branch]
        params, tags = final.data.params, final.data.tags
        assert (params["val_size"], params["epochs"], float(params["lr"])) == ("0", "1", result["lr"])
        assert params["subset"] == "200" and params["seed"] == "0"
        assert tags["allconv.source_run"] == result["run_id"], "the final run retrains the selected run's config"
        assert tags["mlflow.parentRunId"] == parents[result["study_name"]]
        assert (tags["allconv.status"], tags["allconv.attempt"], tags["allconv.precision"]) == ("finished", "1", "fp32")
        assert result["final"]["run_id"] == final.info.run_id and result["final"]["status"] == "finished"
        assert result["final"]["test_error"] == pytest.approx(final.data.metrics["test_error"])
        assert result["ours_from"] == "final" and result["ours_test_error"] == result["final"]["test_error"]
        assert "alive_classes" in final.data.metrics
    assert rows["allconv_a_model"]["protocols"]["paper"]["final"] is None
    code, out, _ = _invoke(["report", "--format", "markdown"])
    assert "## Validated protocol" in out and "## Runs per lr" in out


@pytest.mark.unit
def test_final_run_retrains_the_reports_choice_and_retries_enter_the_study_key() -> None:
    """Ties in validation accuracy go to the higher lr, as in the report; a collapsed (pruned) lr is never chosen."""
    import optuna
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import TrialState, create_trial

    grid = CategoricalDistribution([0.25, 0.1, 0.05])
    study = optuna.create_study(direction="maximize")
    for lr, value, state in ((0.05, 0.6, TrialState.COMPLETE), (0.1, 0.6, TrialState.COMPLETE),
                             (0.25, None, TrialState.PRUNED)):
        study.add_trial(create_trial(params={"lr": lr}, distributions={"lr": grid}, value=value, state=state))
    assert reproduce.selected_trial(study).params["lr"] == 0.1
    assert reproduce.selected_trial(optuna.create_study(direction="maximize")) is None
    plan = reproduce.ReproducePlan(models=["A"], branches=["model"])
    default = reproduce.base_config(plan, "A", "model", "paper")
    once = reproduce.base_config(reproduce.ReproducePlan(collapse_retries=0), "A", "model", "paper")
    assert default["collapse_retries"] == 2 and once["collapse_retries"] == 0
    assert reproduce.study_key(default, plan.lrs) != reproduce.study_key(once, plan.lrs)
