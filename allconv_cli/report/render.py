"""The four views of a built :class:`~allconv_cli.report.Report`: a rich terminal table, markdown, csv and json.

Rendering only reads the report, never MLflow; rich is imported when a table is drawn.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from allconv_cli.paper import PROTOCOLS
from allconv_cli.report.studies import Ablation, StudySummary
from allconv_cli.report.table3 import NetworkRow, ProtocolResult

if TYPE_CHECKING:
    from allconv_cli.report import Report

PROTOCOL_SHORT = {"paper": "test-sel.", "validated": "val-sel."}


def _number(value: float | None, digits: int = 2, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _fraction_as_percent(value: float | None) -> str:
    """0.8312 -> "83.12" (the column header carries the %)."""
    return "-" if value is None else f"{100 * value:.2f}"


def _lr(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def _ours(result: ProtocolResult | None) -> str:
    if result is None or result.test_error is None:
        return "-"
    return f"{result.test_error:.2f}" + ("" if result.comparable else "*")


def table3_header() -> list[str]:
    """Short headers (the legend under the table explains them), so 13 columns fit a terminal."""
    cols = ["network", "params", "paper params", "paper err %", "2020 err %"]
    for protocol in PROTOCOLS:
        cols += [f"ours {PROTOCOL_SHORT[protocol]} err %", "lr", "diff", "diverged"]
    return cols


def table3_cells(row: NetworkRow) -> list[str]:
    cells = [row.display_name, f"{row.params:,}", row.paper_params, f"{row.paper_error:.2f}", f"{row.error_2020:.2f}"]
    for protocol in PROTOCOLS:
        result = row.protocols[protocol]
        if result is None:
            cells += ["-", "-", "-", "-"]
        else:
            cells += [_ours(result), _lr(result.lr), _number(result.diff, signed=True),
                      f"{result.diverged}/{result.lrs_total}"]
    return cells


def _study_cells(study: StudySummary) -> list[str]:
    params = ", ".join(f"{k}={v}" for k, v in study.best_params.items()) or "-"
    return [study.name, study.space or "-", study.network or "-", f"{study.finished}/{study.trials}",
            _fraction_as_percent(study.val_accuracy), _number(study.test_error), _number(study.final_test_error),
            params]


STUDY_HEADER = ["study", "space", "network", "finished", "val acc %", "its test err %", "final retrain err %",
                "best params"]


def _ablation_header(ablation: Ablation) -> list[str]:
    return [*ablation.columns, "trials", "diverged", "val acc %", "its test err %"]


def _ablation_cells(ablation: Ablation, row: dict[str, Any]) -> list[str]:
    return [*(str(row[c]) for c in ablation.columns), str(row["trials"]), str(row["diverged"]),
            _fraction_as_percent(row["val_accuracy"]), _number(row["test_error"])]


def _legend() -> list[str]:
    return [
        "test-sel.: the paper's protocol, all 50,000 training images, the lr with the lowest TEST error "
        "(selection on the test set, optimistic).",
        "val-sel.: the lr with the best validation accuracy on a held-out split; its test error is the honest "
        "number. diff = ours - paper, in points; * = not the paper's setting (see notes).",
    ]


def wide_console(**kwargs: Any) -> Any:
    """A rich Console that, when output is piped or captured, does not squeeze the 13-column table into 80 columns."""
    import shutil

    from rich.console import Console

    console = Console(**kwargs)
    if not console.is_terminal:
        console = Console(width=max(shutil.get_terminal_size((160, 24)).columns, 160), **kwargs)
    return console


def render_rich(report: Report, console: Any) -> None:
    """The terminal view: Table 3, then search studies and ablations when there are any, then notes."""
    from rich.table import Table

    table = Table(title="Table 3: CIFAR-10 test error (%), paper vs this reproduction", title_style="bold")
    for i, name in enumerate(table3_header()):
        table.add_column(name, justify="left" if i in (0, 2) else "right", no_wrap=i == 0)
    for row in report.networks:
        table.add_row(*table3_cells(row))
        if row.branch == "allcnn" and row.base != "C":
            table.add_section()
    console.print(table)
    for line in _legend():
        console.print(line, style="dim", highlight=False)
    if report.studies:
        studies = Table(title="allconv search studies (best trial by validation accuracy)", title_style="bold")
        for name in STUDY_HEADER:
            studies.add_column(name, overflow="fold")
        for study in report.studies:
            studies.add_row(*_study_cells(study))
        console.print(studies)
    for ablation in report.ablations:
        table = Table(title=f"Ablation: {ablation.title} ({ablation.study})", title_style="bold")
        for name in _ablation_header(ablation):
            table.add_column(name)
        for row in ablation.rows:
            table.add_row(*_ablation_cells(ablation, row))
        console.print(table)
    for note in report.notes:
        console.print(f"note: {note}", highlight=False)


def _md_table(header: list[str], rows: Iterable[list[str]]) -> list[str]:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return [line(header), "|" + "|".join("---" for _ in header) + "|", *(line(r) for r in rows)]


def render_markdown(report: Report) -> str:
    lines = ["## Table 3: CIFAR-10 test error (%), paper vs this reproduction", ""]
    lines += _md_table(table3_header(), (table3_cells(row) for row in report.networks))
    lines += ["", *(f"- {line}" for line in _legend())]
    if report.studies:
        lines += ["", "## allconv search studies", ""]
        lines += _md_table(STUDY_HEADER, (_study_cells(s) for s in report.studies))
    for ablation in report.ablations:
        lines += ["", f"## Ablation: {ablation.title} ({ablation.study})", ""]
        lines += _md_table(_ablation_header(ablation), (_ablation_cells(ablation, r) for r in ablation.rows))
    if report.notes:
        lines += ["", "Notes:", "", *(f"- {note}" for note in report.notes)]
    return "\n".join(lines) + "\n"


CSV_FIELDS = ["network", "display_name", "params", "paper_params", "paper_error", "error_2020"] + [
    f"{protocol}_{key}"
    for protocol in PROTOCOLS
    for key in ("test_error", "lr", "diff", "diverged", "finished", "lrs_total", "val_accuracy", "epochs",
                "comparable", "run_id", "study")
]


def render_csv(report: Report) -> str:
    """Table 3 only, one row per network, missing values as empty cells (searches and ablations: use json)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in report.networks:
        record: dict[str, Any] = {
            "network": row.name, "display_name": row.display_name, "params": row.params,
            "paper_params": row.paper_params, "paper_error": row.paper_error, "error_2020": row.error_2020,
        }
        for protocol in PROTOCOLS:
            result = row.protocols[protocol]
            if result is None:
                continue
            values = {
                "test_error": result.test_error, "lr": result.lr, "diff": result.diff, "diverged": result.diverged,
                "finished": result.finished, "lrs_total": result.lrs_total, "val_accuracy": result.val_accuracy,
                "epochs": result.epochs, "comparable": result.comparable, "run_id": result.run_id,
                "study": result.study_name,
            }
            record.update({f"{protocol}_{k}": ("" if v is None else v) for k, v in values.items()})
        writer.writerow(record)
    return out.getvalue()


def render_json(report: Report) -> str:
    return json.dumps(report.to_dict(), indent=2)
