"""``allconv report`` against an MLflow store built by hand, with values chosen so every selection rule shows.

The store is written with ``MlflowClient`` directly (no training), using the tags and params that ``tracking`` and
``reproduce`` write, so the report's arithmetic can be checked to the digit.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import shlex
import struct
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from allconv_cli.cli import main
from allconv_cli.config import TrainConfig
from allconv_cli.paper import TABLE3
from allconv_cli.report import build_report
from allconv_cli.report.runs import RunRecord
from allconv_cli.report.table3 import deviations, select_run

pytestmark = pytest.mark.unit

EXPERIMENT = "allconv-reproduce"
SEARCH_EXPERIMENT = "allconv-search"

# (protocol, lr) -> (status, test error %, final val accuracy); network A/model.
A_MODEL = {
    ("paper", 0.25): ("diverged", None, None),
    ("paper", 0.1): ("finished", 14.0, None),
    ("paper", 0.05): ("finished", 12.0, None),
    ("paper", 0.01): ("finished", 13.0, None),
    # validated: the best *test* error (0.05) is NOT the best validation accuracy (0.1): 0.1 must be chosen
    ("validated", 0.25): ("finished", 20.0, 0.80),
    ("validated", 0.1): ("finished", 13.5, 0.90),
    ("validated", 0.05): ("finished", 11.0, 0.88),
    ("validated", 0.01): ("finished", 12.5, 0.85),
}
# C/allcnn: validated only, one diverged, one still running.
C_ALLCNN = {
    ("validated", 0.25): ("diverged", None, None),
    ("validated", 0.1): ("finished", 9.5, 0.905),
    ("validated", 0.05): ("finished", 9.0, 0.90),
    ("validated", 0.01): ("running", None, None),
}


def _config(base: str, branch: str, lr: float, protocol: str, **overrides: object) -> TrainConfig:
    return TrainConfig(model=base, branch=branch, lr=lr, val_size=0 if protocol == "paper" else 5000, **overrides)


def _run(client: MlflowClient, exp_id: str, cfg: TrainConfig, tags: dict[str, str],
         metrics: dict[str, float | None]) -> str:
    """One run with the params and tags that tracking.start_run/finish_run write."""
    all_tags = {
        "allconv.model": cfg.model, "allconv.branch": cfg.branch, "allconv.dataset": cfg.dataset,
        "allconv.network": f"allconv_{cfg.model.lower()}_{cfg.branch}", **tags,
    }
    run = client.create_run(exp_id, tags=all_tags)
    client.log_batch(
        run.info.run_id,
        metrics=[Metric(k, v, 0, 0) for k, v in metrics.items() if v is not None],
        params=[Param(k, v) for k, v in cfg.to_params().items()],
    )
    status = tags.get("allconv.status", "finished")
    if status != "running":
        client.set_terminated(run.info.run_id, "FINISHED" if status == "finished" else "FAILED")
    return run.info.run_id


def _reproduction(client: MlflowClient, exp_id: str, base: str, branch: str,
                  grid: dict[tuple[str, float], tuple[str, float | None, float | None]], **overrides: object) -> None:
    for protocol in ("paper", "validated"):
        lrs = [lr for (p, lr) in grid if p == protocol]
        if not lrs:
            continue
        study = f"reproduce-{base.lower()}-{branch}-{protocol}"
        common = {"allconv.kind": "reproduce", "allconv.protocol": protocol, "allconv.study_name": study}
        parent = client.create_run(exp_id, tags={
            **common, "allconv.role": "study", "allconv.space": "reproduce",
            "allconv.lrs": ",".join(str(lr) for lr in lrs),
        }).info.run_id
        for number, lr in enumerate(lrs):
            status, test_error, val = grid[(protocol, lr)]
            cfg = _config(base, branch, lr, protocol, **overrides)
            metrics = {"test_error": test_error, "final_val_accuracy": val, "best_val_accuracy": val}
            if test_error is not None:
                metrics["test_accuracy"] = 1 - test_error / 100
            _run(client, exp_id, cfg, {
                **common, "allconv.role": "trial", "allconv.trial_number": str(number), "allconv.status": status,
                "mlflow.parentRunId": parent,
            }, metrics)


def _search_study(client: MlflowClient, exp_id: str, name: str, space: str,
                  trials: list[tuple[dict[str, object], str, float | None, float | None]]) -> None:
    common = {"allconv.kind": "search", "allconv.study_name": name, "allconv.space": space}
    parent = client.create_run(exp_id, tags={**common, "allconv.role": "study", "allconv.network": "allconv_c_allcnn"})
    for number, (overrides, status, val, test_error) in enumerate(trials):
        cfg = TrainConfig(model="C", branch="allcnn", **overrides)
        _run(client, exp_id, cfg, {
            **common, "allconv.role": "trial", "allconv.trial_number": str(number), "allconv.status": status,
            "mlflow.parentRunId": parent.info.run_id,
        }, {  # best-over-epochs is the same everywhere: ranking must use the objective, the final val accuracy
            "best_val_accuracy": None if val is None else 0.99, "final_val_accuracy": val, "test_error": test_error})


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        client = MlflowClient(uri)
        exp_id = client.create_experiment(EXPERIMENT, artifact_location=str(root / "artifacts"))
        _reproduction(client, exp_id, "A", "model", A_MODEL)
        _reproduction(client, exp_id, "C", "allcnn", C_ALLCNN, epochs=2, subset=2000, test_size=1000)
        search_id = client.create_experiment(SEARCH_EXPERIMENT, artifact_location=str(root / "artifacts2"))
        _search_study(client, search_id, "bn-dropout-c", "bn-dropout", [
            ({"bn": False, "dropout_input": 0.2, "dropout_hidden": 0.5}, "finished", 0.70, 30.0),
            ({"bn": True, "dropout_input": 0.2, "dropout_hidden": 0.5}, "finished", 0.80, 21.0),
            ({"bn": True, "dropout_input": 0.0, "dropout_hidden": 0.0}, "finished", 0.75, 26.0),
            ({"bn": False, "dropout_input": 0.0, "dropout_hidden": 0.0}, "diverged", None, None),
        ])
        _search_study(client, search_id, "optimizer-c", "optimizer", [
            ({"optimizer": "sgd", "lr": 0.05}, "finished", 0.81, 20.0),
            ({"optimizer": "adam", "lr": 0.001}, "finished", 0.83, 18.5),
            ({"optimizer": "adam", "lr": 0.0001}, "finished", 0.78, 23.0),
        ])
        yield root


def _invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["report", *args])
    return result.exit_code, result.stdout, result.stderr


def test_json_values_match_mlflow(store: Path) -> None:
    code, out, _ = _invoke("--format", "json")
    assert code == 0
    data = json.loads(out)
    assert set(data["experiments"]) == {EXPERIMENT, SEARCH_EXPERIMENT}
    rows = {row["name"]: row for row in data["networks"]}
    assert [row["display_name"] for row in data["networks"]] == [e.display_name for e in TABLE3.values()]
    a = rows["allconv_a_model"]
    assert a["params"] == 839_242 and a["paper_params"] == "~0.9 M" and a["paper_error"] == 12.47
    assert a["error_2020"] == 19.27
    paper = a["protocols"]["paper"]
    assert paper["lr"] == 0.05 and paper["test_error"] == 12.0
    assert paper["diff"] == pytest.approx(12.0 - 12.47)
    assert (paper["diverged"], paper["finished"], paper["lrs_total"]) == (1, 3, 4)
    assert "test set" in paper["selected_by"] and paper["comparable"] is True
    validated = a["protocols"]["validated"]
    assert validated["lr"] == 0.1 and validated["test_error"] == 13.5, "validated must pick by validation accuracy"
    assert validated["val_accuracy"] == 0.90
    assert validated["diff"] == pytest.approx(13.5 - 12.47)
    assert validated["diverged"] == 0
    c = rows["allconv_c_allcnn"]
    assert c["protocols"]["paper"] is None
    cv = c["protocols"]["validated"]
    assert (cv["lr"], cv["test_error"], cv["diverged"], cv["running"]) == (0.1, 9.5, 1, 1)
    assert cv["comparable"] is False and {"epochs=2 (paper: 350)", "test_size=1000"} <= set(cv["deviations"])
    # networks never run are missing, not zero
    assert rows["allconv_b_allcnn"]["protocols"] == {"paper": None, "validated": None}


def test_rerun_command_rebuilds_the_selected_config(store: Path) -> None:
    from allconv_cli.cli.train_cmd import train_command

    data = json.loads(_invoke("--format", "json")[1])
    validated = next(r for r in data["networks"] if r["name"] == "allconv_c_allcnn")["protocols"]["validated"]
    args = shlex.split(validated["rerun"])
    assert args[:2] == ["allconv", "train"]
    ctx = train_command.make_context("train", args[2:])
    options = {k: v for k, v in ctx.params.items()
               if k not in ("resume_run_id", "experiment", "run_name", "checkpoint_every", "register", "as_json")}
    assert TrainConfig(**options) == _config("C", "allcnn", 0.1, "validated", epochs=2, subset=2000, test_size=1000)


def test_csv_and_markdown_and_table(store: Path) -> None:
    code, out, _ = _invoke("--format", "csv")
    assert code == 0
    rows = {row["network"]: row for row in csv.DictReader(io.StringIO(out))}
    assert len(rows) == 12
    a = rows["allconv_a_model"]
    assert float(a["paper_lr"]) == 0.05 and float(a["paper_test_error"]) == 12.0
    assert float(a["paper_diff"]) == pytest.approx(-0.47) and a["paper_diverged"] == "1"
    assert float(a["validated_lr"]) == 0.1 and float(a["validated_test_error"]) == 13.5
    assert float(a["validated_diff"]) == pytest.approx(1.03)
    assert rows["allconv_b_model"]["paper_test_error"] == "" and rows["allconv_b_model"]["validated_lr"] == ""
    assert rows["allconv_b_model"]["paper_error"] == "10.2"

    code, out, _ = _invoke("--format", "markdown")
    assert code == 0
    line = next(line for line in out.splitlines() if line.startswith("| Model A |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells == ["Model A", "839,242", "~0.9 M", "12.47", "19.27", "12.00", "0.05", "-0.47", "1/4",
                     "13.50", "0.1", "+1.03", "0/4"]
    b_line = next(line for line in out.splitlines() if line.startswith("| Model B |"))
    assert b_line.count("| - ") == 8
    assert "| 9.50* | 0.1 |" in out  # C/allcnn, flagged as not the paper's setting
    assert "## Ablation: BatchNorm x dropout" in out and "## Ablation: SGD vs Adam" in out

    code, out, _ = _invoke()
    assert code == 0
    line = next(line for line in out.splitlines() if "Model A" in line)
    for value in ("839,242", "12.47", "19.27", "12.00", "-0.47", "1/4", "13.50", "+1.03", "0/4"):
        assert value in line
    assert "Strided-CNN-B" in out and "test set" in out


def test_search_studies_and_ablations(store: Path) -> None:
    data = json.loads(_invoke("--format", "json", "--experiment", SEARCH_EXPERIMENT)[1])
    assert data["experiments"] == [SEARCH_EXPERIMENT]
    assert all(p is None for row in data["networks"] for p in row["protocols"].values())
    studies = {s["name"]: s for s in data["studies"]}
    assert set(studies) == {"bn-dropout-c", "optimizer-c"}  # reproduce studies are not search studies
    opt = studies["optimizer-c"]
    assert (opt["val_accuracy"], opt["test_error"]) == (0.83, 18.5)
    assert opt["best_params"] == {"lr": "0.001", "optimizer": "adam"}
    bn = studies["bn-dropout-c"]
    assert (bn["trials"], bn["finished"], bn["diverged"], bn["test_error"]) == (4, 3, 1, 21.0)
    ablations = {a["space"]: a for a in data["ablations"]}
    table = {(r["bn"], r["dropout_input"], r["dropout_hidden"]): r for r in ablations["bn-dropout"]["rows"]}
    assert table[("True", "0.2", "0.5")]["test_error"] == 21.0
    assert table[("False", "0.0", "0.0")]["diverged"] == 1 and table[("False", "0.0", "0.0")]["test_error"] is None
    rows = [(r["optimizer"], r["lr"], r["val_accuracy"]) for r in ablations["optimizer"]["rows"]]
    assert rows == [("adam", "0.0001", 0.78), ("adam", "0.001", 0.83), ("sgd", "0.05", 0.81)]


def test_select_run_validated_ignores_test_error() -> None:
    def record(run_id: str, val: float, test: float) -> RunRecord:
        return RunRecord(run_id, "e", "", 0, "FINISHED", {"allconv.status": "finished"}, {"lr": "0.1"},
                         {"final_val_accuracy": val, "test_error": test})

    runs = [record("best-test", 0.80, 5.0), record("best-val", 0.81, 40.0), record("middle", 0.79, 10.0)]
    assert select_run(runs, "validated").run_id == "best-val"
    assert select_run(runs, "paper").run_id == "best-test"
    diverged = RunRecord("nan", "e", "", 0, "FAILED", {"allconv.status": "diverged"}, {},
                         {"final_val_accuracy": 0.99, "test_error": 1.0})
    assert select_run([*runs, diverged], "validated").run_id == "best-val"


def test_deviations_from_the_papers_protocol() -> None:
    paper_run = TrainConfig(model="A", branch="model").to_params()
    assert deviations(paper_run) == ()
    assert deviations({**paper_run, "weight_decay": "0.0", "epochs": "2"}) == ("epochs=2 (paper: 350)",
                                                                               "weight_decay=0.0")
    assert deviations({"lr": "0.1"}) == ()  # what a run did not log is not judged


def test_a_built_report_is_filtered_at_build_and_immutable(store: Path) -> None:
    """What ``allconv reproduce`` prints: only its networks, no studies; and nobody can change it afterwards."""
    built = build_report([EXPERIMENT, SEARCH_EXPERIMENT], networks={("C", "allcnn")}, include_studies=False)
    assert [row.name for row in built.networks] == ["allconv_c_allcnn"]
    assert built.studies == () and built.ablations == ()
    assert built.notes and all(note.startswith("All-CNN-C") for note in built.notes)
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.networks = ()  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.networks[0].protocols["validated"].lr = 1.0  # type: ignore[misc, union-attr]


def test_unknown_and_empty_experiments(store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, err = _invoke("--experiment", "nope")
    assert code == 2
    assert err.count("\n") == 1 and "'nope'" in err and EXPERIMENT in err
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/empty.db")
    code, out, _ = _invoke("--format", "json")
    assert code == 0
    data = json.loads(out)
    assert len(data["networks"]) == 12
    assert all(p is None for row in data["networks"] for p in row["protocols"].values())
    assert data["notes"] and "no runs" in data["notes"][0]


def test_plot_is_a_png(store: Path, tmp_path: Path) -> None:
    path = tmp_path / "table3.png"
    code, _, err = _invoke("--format", "csv", "--plot", str(path))
    assert code == 0 and "wrote" in err
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", raw[16:24])
    assert width >= 1200 and height >= 500
    assert 20_000 < len(raw) < 2_000_000


def test_import_and_render_without_torch(tmp_path: Path) -> None:
    """The report is torch-free: importing it and drawing every view of a report (rows from real selections, param
    counts given) must not load torch. Only :func:`allconv_cli.report.table3.exact_params` builds the networks."""
    script = textwrap.dedent(f"""
        import sys
        from rich.console import Console
        import allconv_cli.report as report
        from allconv_cli.report.runs import RunRecord
        from allconv_cli.report.table3 import table3
        from allconv_cli.paper import TABLE3

        tags = {{"allconv.role": "trial", "allconv.kind": "reproduce", "allconv.study_name": "s",
                "allconv.protocol": "paper", "allconv.model": "A", "allconv.branch": "model",
                "allconv.status": "finished"}}
        runs = [RunRecord("r1", "e", "", 0, "FINISHED", tags, {{"lr": "0.1", "epochs": "2"}}, {{"test_error": 12.5}})]
        rows = tuple(table3(runs, dict.fromkeys(TABLE3, 1000)))
        built = report.Report("sqlite:///x.db", ("e",), rows, (), (), ("a note",))
        assert "12.50*" in report.render_markdown(built)
        assert "12.5" in report.render_csv(built) and "epochs=2" in report.render_json(built)
        report.render_rich(built, Console(file=sys.stderr, width=200))
        report.write_bar_chart(built, {str(tmp_path / "chart.png")!r})
        assert "torch" not in sys.modules, "the report imported torch"
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "chart.png").stat().st_size > 0
