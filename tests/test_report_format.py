"""``allconv report`` as a person reads it: 4 significant digits, tables that fit 120 columns and never cut a word at
80, studies first when Table 3 is empty, the search's own trial count, and a ``--plot`` file that is checked first."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from rich.console import Console

from allconv_cli.cli import main
from allconv_cli.paper import TABLE3
from allconv_cli.report import Report, render_csv, render_json, render_markdown, render_rich
from allconv_cli.report.render import significant, study_cells, table3_cells
from allconv_cli.report.runs import RunRecord
from allconv_cli.report.studies import search_studies
from allconv_cli.report.table3 import table3
from allconv_cli.tracking.schema import Kind, Metric, Role, Status, Tag

pytestmark = pytest.mark.unit

NOISY = 10.510000000000002  # a test error as float arithmetic leaves it
DROPOUT = "0.06272349073169678"  # a sampled param as MLflow stores it


def _trial(run_id: str, study: str, status: str, params: dict[str, str], metrics: dict[str, float],
           **tags: str) -> RunRecord:
    base = {Tag.ROLE: Role.TRIAL, Tag.STUDY_NAME: study, Tag.STATUS: status, Tag.MODEL: "A", Tag.BRANCH: "model",
            Tag.NETWORK: "allconv_a_model"}
    return RunRecord(run_id, "e", "", 1, "FINISHED", {**base, **tags}, params, metrics)


def _search(target: str | None = "6") -> list[RunRecord]:
    """A search study as allconv search leaves it: 5 complete trials, 1 pruned; the parent holds its counts."""
    parent_tags = {Tag.ROLE: Role.STUDY, Tag.STUDY_NAME: "allconv_a_model-default", Tag.SPACE: "default"}
    if target is not None:
        parent_tags[Tag.TARGET_TRIALS] = target
    parent = RunRecord("parent", "e", "", 0, "FINISHED", parent_tags, {},
                       {Metric.N_COMPLETE: 5, Metric.N_PRUNED: 1, Metric.N_FAILED: 0})
    trials = [_trial(f"t{i}", "allconv_a_model-default", Status.FINISHED if i < 5 else Status.PRUNED,
                     {"dropout_hidden": DROPOUT if i == 1 else f"0.{i}", "epochs": "2"},
                     {Metric.FINAL_VAL_ACCURACY: 0.5 + i / 100 if i != 1 else 0.9, Metric.TEST_ERROR: NOISY})
              for i in range(6)]
    return [parent, *trials]


def _reproduction() -> list[RunRecord]:
    tags = {Tag.KIND: Kind.REPRODUCE, Tag.PROTOCOL: "paper"}
    return [_trial(f"r{i}", "reproduce-a", Status.FINISHED, {"lr": lr, "epochs": "2"},
                   {Metric.TEST_ERROR: NOISY + i}, **tags) for i, lr in enumerate(("0.1", "0.05"))]


def _report(runs: list[RunRecord]) -> Report:
    studies, ablations = search_studies(runs)
    rows = tuple(table3(runs, dict.fromkeys(TABLE3, 1_369_738)))
    notes = () if any(r.tag(Tag.KIND) == Kind.REPRODUCE for r in runs) else (
        "Table 3 is empty: `allconv reproduce` fills it (see `allconv reproduce --help`)",)
    return Report("sqlite:///x.db", ("e",), rows, tuple(studies), tuple(ablations), notes)


def _rich(report: Report, width: int, wide: bool = False) -> str:
    out = io.StringIO()
    render_rich(report, Console(file=out, width=width), wide=wide)
    return out.getvalue()


def test_four_significant_digits_for_people_full_precision_in_json() -> None:
    assert [significant(v) for v in (89.49000000000001, 0.06272349073169678, 1.096e-05, 12.0, 123456.7, 0.25)] == \
        ["89.49", "0.06272", "1.096e-05", "12", "123457", "0.25"]
    report = _report(_search() + _reproduction())
    csv_text, markdown, terminal = render_csv(report), render_markdown(report), _rich(report, 120)
    assert ",10.51," in csv_text and "10.510000000000002" not in csv_text
    for text in (markdown, terminal):
        assert "dropout_hidden=0.06272" in text and DROPOUT not in text
    data = json.loads(render_json(report))
    assert data["studies"][0]["best_params"]["dropout_hidden"] == DROPOUT
    assert data["networks"][0]["protocols"]["paper"]["test_error"] == NOISY


def _words(report: Report) -> set[str]:
    cells = [c for row in report.networks for c in table3_cells(row, wide=False)]
    cells += [c for study in report.studies for c in study_cells(study)]
    return {word for cell in cells for word in cell.split()}


@pytest.mark.parametrize("width", [120, 80])
def test_tables_fit_the_terminal_and_never_cut_a_word(width: int) -> None:
    report = _report(_search() + _reproduction())
    text = _rich(report, width)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= width
    for word in _words(report):
        assert re.search(rf"(^|[\s│┃(]){re.escape(word)}($|[\s│┃,;:)])", text, re.MULTILINE), f"{word!r} was cut"
    assert "allconv report --wide" in text  # how to get the 13-column table


def test_wide_table_has_every_column() -> None:
    text = _rich(_report(_reproduction()), 160, wide=True)
    header = next(line for line in text.splitlines() if "network" in line)
    assert "params" in header and "~1.4 M" in text and "allconv report --wide" not in text


def test_without_a_reproduction_the_studies_come_first_and_one_line_says_how_to_fill_table3() -> None:
    text = _rich(_report(_search()), 120)
    assert "Table 3: CIFAR-10" not in text
    assert text.lstrip().startswith("allconv search studies")
    assert [line for line in text.splitlines() if "Table 3" in line] == [
        "note: Table 3 is empty: `allconv reproduce` fills it (see `allconv reproduce --help`)"]
    assert "Table 3: CIFAR-10" not in render_markdown(_report(_search()))


def test_finished_counts_trials_as_the_search_does() -> None:
    """5 complete + 1 pruned of --trials 6: the search says "6 of 6 finished", so does the report."""
    (study,), _ = search_studies(_search())
    assert (study.done, study.target_trials, study.finished, study.pruned) == (6, 6, 5, 1)
    assert study_cells(study)[3] == "6 of 6"
    (old,), _ = search_studies(_search(target=None))  # a study from before the target was recorded
    assert study_cells(old)[3] == "6"


def test_plot_file_is_checked_before_anything_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    taken = tmp_path / "taken.png"
    taken.write_bytes(b"mine")
    target = tmp_path / "target.txt"
    target.write_text("keep me")
    (tmp_path / "link.png").symlink_to(target)
    cases = {
        "chart": "--plot chart: the figure is a PNG, give a file name ending in .png (e.g. chart.png)",
        str(taken): f"--plot {taken} already exists: choose another name, or pass --force to replace it",
        str(tmp_path / "link.png"): f"--plot {tmp_path / 'link.png'} is a symbolic link",
        str(tmp_path / "no" / "t.png"): f"folder {tmp_path / 'no'} does not exist",
    }
    for value, message in cases.items():
        for extra in ([], ["--force"]) if value != str(taken) else ([],):
            result = CliRunner().invoke(main, ["report", "--plot", value, *extra])
            assert result.exit_code == 2, result.output
            assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert taken.read_bytes() == b"mine" and target.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.png", "taken.png", "target.txt"]  # no store made
    result = CliRunner().invoke(main, ["report", "--plot", str(taken), "--force"])
    assert result.exit_code == 0, result.output
    assert taken.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_tie_goes_to_the_earlier_trial_as_in_the_search_summary() -> None:
    """Two trials with the same validation accuracy: the report names the lower trial number, the one Optuna's
    ``best_trial`` (and the search's own summary) names, whatever order MLflow lists the runs in."""
    parent = RunRecord("parent", "e", "", 0, "FINISHED", {Tag.ROLE: Role.STUDY, Tag.STUDY_NAME: "s"}, {}, {})
    tied = [_trial(f"t{n}", "s", Status.FINISHED, {"lr": lr}, {Metric.FINAL_VAL_ACCURACY: 0.1094},
                   **{Tag.TRIAL_NUMBER: str(n)}) for n, lr in ((1, "0.09402"), (0, "0.03432"))]
    for order in (tied, tied[::-1]):
        (study,), _ = search_studies([parent, *order])
        assert "lr=0.03432" in " ".join(study_cells(study)), study_cells(study)
