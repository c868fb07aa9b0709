"""The report on collapses, dead classes, bf16 and the validated protocol's final run, from a store built by hand.

Model B, validated protocol: lr 0.25 collapsed in all three attempts, lr 0.1 collapsed once and then finished
(selected by validation accuracy), lr 0.05 finished with two dead class channels; lr 0.1 was then retrained on all
training images (the final run, role=final, bf16) after one collapsed attempt. Model C, validated: no final run yet.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.tracking._tracking_service import utils as mlflow_uri

from allconv_cli.cli import main
from allconv_cli.config import TrainConfig
from allconv_cli.report.table3 import deviations

pytestmark = pytest.mark.unit

EXPERIMENT = "allconv-reproduce"
STUDY = "reproduce-validated-allconv_b_model-x"


class Store:
    def __init__(self, client: MlflowClient, exp_id: str) -> None:
        self.client, self.exp_id, self.clock = client, exp_id, 0

    def run(self, cfg: TrainConfig, tags: dict[str, str], metrics: dict[str, float]) -> str:
        """One run with what tracking.start_run / tracked_run / finish_run write; start times in creation order."""
        self.clock += 1000
        all_tags = {"allconv.model": cfg.model, "allconv.branch": cfg.branch, "allconv.dataset": cfg.dataset,
                    "allconv.network": cfg.registry_name, "allconv.precision": "fp32", **tags}
        run_id = self.client.create_run(self.exp_id, start_time=self.clock, tags=all_tags).info.run_id
        self.client.log_batch(run_id, metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()],
                              params=[Param(k, v) for k, v in cfg.to_params().items()])
        status = tags.get("allconv.status", "finished")
        self.client.set_terminated(run_id, "FINISHED" if status == "finished" else "FAILED")
        return run_id

    def attempts(self, cfg: TrainConfig, tags: dict[str, str], outcomes: list[tuple[str, dict[str, float], str]]) \
            -> list[str]:
        """Consecutive attempts of one run, linked as run_tracked links them; (status, metrics, dead classes)."""
        ids: list[str] = []
        for number, (status, metrics, dead) in enumerate(outcomes, start=1):
            extra = {"allconv.status": status, "allconv.attempt": str(number)}
            if ids:
                extra["allconv.collapse_retry_of"] = ids[-1]
            if dead:
                extra["allconv.dead_classes"] = dead
            run_id = self.run(cfg, {**tags, **extra}, metrics)
            if ids:
                self.client.set_tag(ids[-1], "allconv.collapse_retried_by", run_id)
            ids.append(run_id)
        return ids


def finished(val: float | None, test_error: float) -> dict[str, float]:
    out = {"test_error": test_error, "test_accuracy": 1 - test_error / 100}
    return out | ({"final_val_accuracy": val} if val is not None else {})


COLLAPSED = ("collapsed", {"alive_classes": 0.0}, "0,1,2,3,4,5,6,7,8,9")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setattr(mlflow_uri, "_tracking_uri", None)  # a URI an earlier test set globally would win over the env
        client = MlflowClient(uri)
        s = Store(client, client.create_experiment(EXPERIMENT, artifact_location=str(root / "artifacts")))
        ids: dict[str, str] = {}
        for base, study in (("B", STUDY), ("C", "reproduce-validated-allconv_c_model-x")):
            common = {"allconv.kind": "reproduce", "allconv.protocol": "validated", "allconv.study_name": study}
            parent = s.run(TrainConfig(model=base, branch="model"),
                           {**common, "allconv.role": "study", "allconv.lrs": "0.25,0.1,0.05"}, {})
            trial = {**common, "allconv.role": "trial", "mlflow.parentRunId": parent}
            grid = {
                0.25: [COLLAPSED, COLLAPSED, COLLAPSED],
                0.1: [COLLAPSED, ("finished", finished(0.85, 15.0), "")],
                0.05: [("finished", finished(0.80, 14.0), "3,7")],
            }
            for number, (lr, outcomes) in enumerate(grid.items()):
                cfg = TrainConfig(model=base, branch="model", lr=lr)
                attempt_ids = s.attempts(cfg, {**trial, "allconv.trial_number": str(number)}, outcomes)
                ids[f"{base}{lr}"] = attempt_ids[-1]
            if base == "B":  # the chosen lr retrained on all training images: one collapse, then finished in bf16
                final_tags = {"allconv.role": "final", "allconv.study_name": study, "mlflow.parentRunId": parent,
                              "allconv.best_trial": "1", "allconv.source_run": ids["B0.1"]}
                cfg = TrainConfig(model=base, branch="model", lr=0.1, val_size=0)
                final_ids = s.attempts(cfg, final_tags, [COLLAPSED, ("finished", finished(None, 12.0), "")])
                client.set_tag(final_ids[-1], "allconv.precision", "bf16")
                ids["final"] = final_ids[-1]
        yield ids


def invoke(*args: str) -> str:
    result = CliRunner().invoke(main, ["report", *args])
    assert result.exit_code == 0, result.output
    return result.stdout


def test_json_counts_collapsed_attempts_per_lr_and_reports_the_final_run(store: dict[str, str]) -> None:
    rows = {row["name"]: row for row in json.loads(invoke("--format", "json"))["networks"]}
    b = rows["allconv_b_model"]["protocols"]["validated"]
    assert b["run_id"] == store["B0.1"] and b["lr"] == 0.1, "selected on validation: the retried lr 0.1"
    assert b["test_error"] == 15.0 and b["val_accuracy"] == 0.85  # the selection run (validation split held out)
    assert (b["finished"], b["collapsed"], b["collapsed_attempts"], b["lrs_total"]) == (2, 1, 4, 3)
    per_lr = {o["lr"]: o for o in b["per_lr"]}
    assert [(per_lr[lr]["status"], per_lr[lr]["attempt"], per_lr[lr]["collapsed_attempts"]) for lr in
            (0.25, 0.1, 0.05)] == [("collapsed", 3, 3), ("finished", 2, 1), ("finished", 1, 0)]
    assert per_lr[0.05]["dead_classes"] == "3,7"
    final = b["final"]
    assert (final["run_id"], final["status"], final["test_error"], final["attempt"]) == (store["final"], "finished",
                                                                                       12.0, 2)
    assert final["collapsed_attempts"] == 1 and final["source_run"] == store["B0.1"]
    assert (b["ours_from"], b["ours_test_error"]) == ("final", 12.0)
    assert b["ours_diff"] == pytest.approx(12.0 - 10.20) and final["diff"] == pytest.approx(12.0 - 10.20)
    assert "precision=bf16 (paper: fp32)" in b["deviations"] and b["comparable"] is False
    c = rows["allconv_c_model"]["protocols"]["validated"]
    assert c["final"] is None and (c["ours_from"], c["ours_test_error"]) == ("selection", 15.0)
    notes = json.loads(invoke("--format", "json"))["notes"]
    assert "Model B (validated): 4 collapsed attempt(s), each restarted with a new seed while retries were left: " \
           "lr 0.25: 3 (every attempt), lr 0.1: 1 (then attempt 2 finished)" in notes
    assert any(n.startswith("Model C (validated): no final run on all training images yet") for n in notes)
    assert not any("still running" in n for n in notes), "collapsed lrs are counted, not pending"


def test_tables_show_the_selection_and_final_runs_and_the_attempts(store: dict[str, str]) -> None:
    out = invoke("--format", "markdown")
    line = next(line for line in out.splitlines() if line.startswith("| Model B |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[9:] == ["12.00*", "0.1", "+1.80", "0/3"]  # ours (validated) is the final run's error
    validated = out.split("## Validated protocol")[1].split("##")[0]
    b = next(line for line in validated.splitlines() if line.startswith("| Model B |"))
    assert [c.strip() for c in b.strip("|").split("|")] == ["Model B", "0.1", "85.00", "15.00", "12.00", "finished",
                                                            "+1.80", "2"]
    attempts = out.split("## Runs per lr")[1].split("##")[0]
    header = next(line for line in attempts.splitlines() if line.startswith("| network |"))
    assert [c.strip() for c in header.strip("|").split("|")] == ["network", "protocol", "lr 0.25", "lr 0.1",
                                                                 "lr 0.05", "final run"]
    b = next(line for line in attempts.splitlines() if line.startswith("| Model B |"))
    assert [c.strip() for c in b.strip("|").split("|")] == [
        "Model B", "validated", "collapsed x3", "finished (1 collapsed)", "finished, dead 3,7",
        "finished (1 collapsed)"]
    table = invoke()
    assert "Runs per lr" in table and "collapsed x3" in table and "selection run err %" in table


def test_csv_has_the_final_run_and_the_collapse_counts(store: dict[str, str]) -> None:
    rows = {row["network"]: row for row in csv.DictReader(io.StringIO(invoke("--format", "csv")))}
    b = rows["allconv_b_model"]
    assert float(b["validated_test_error"]) == 15.0 and float(b["validated_final_test_error"]) == 12.0
    assert float(b["validated_ours_test_error"]) == 12.0 and b["validated_ours_from"] == "final"
    assert (b["validated_collapsed"], b["validated_collapsed_attempts"]) == ("1", "4")
    assert b["validated_collapsed_attempts_per_lr"] == "0.25:3;0.1:1;0.05:0"
    assert b["validated_final_status"] == "finished" and b["validated_final_run_id"] == store["final"]
    assert rows["allconv_c_model"]["validated_final_test_error"] == ""


def test_precision_is_judged_only_when_recorded() -> None:
    params = TrainConfig(model="A", branch="model").to_params()
    assert deviations(params) == () and deviations(params, "fp32") == ()
    assert deviations(params, "bf16") == ("precision=bf16 (paper: fp32)",)
    assert deviations(params, "tf32") == ("precision=tf32 (paper: fp32)",)


def test_plot_draws_ours_from_the_final_run(store: dict[str, str], tmp_path: Path) -> None:
    from allconv_cli.report import build_report

    built = build_report([EXPERIMENT])
    row = next(r for r in built.networks if r.name == "allconv_b_model")
    assert row.protocols["validated"].ours_test_error == 12.0
    CliRunner().invoke(main, ["report", "--format", "csv", "--plot", str(tmp_path / "t.png")])
    assert (tmp_path / "t.png").stat().st_size > 10_000
