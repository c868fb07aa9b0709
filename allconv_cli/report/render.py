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
from allconv_cli.report.table3 import LrOutcome, NetworkRow, ProtocolResult

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
    if result is None or result.ours_test_error is None:
        return "-"
    return f"{result.ours_test_error:.2f}" + ("" if result.comparable else "*")


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
            cells += [_ours(result), _lr(result.lr), _number(result.ours_diff, signed=True),
                      f"{result.diverged}/{result.lrs_total}"]
    return cells


VALIDATED_HEADER = ["network", "lr", "val acc %", "selection run err %", "final run err %", "final status",
                    "final diff", "final attempt"]


def _validated_rows(report: Report) -> list[list[str]]:
    """The validated protocol's two runs per network: the selection run (validation split held out) and the final
    run (that lr on all training images)."""
    rows = []
    for row in report.networks:
        result = row.protocols.get("validated")
        if result is None:
            continue
        final = result.final
        rows.append([row.display_name, _lr(result.lr), _fraction_as_percent(result.val_accuracy),
                     _number(result.test_error), _number(final.test_error) if final else "-",
                     final.status if final else "not run", _number(final.diff, signed=True) if final else "-",
                     str(final.attempt) if final else "-"])
    return rows


def _attempts_cell(outcome: LrOutcome | None) -> str:
    """One lr of a grid: its last attempt's status, with the collapsed attempts before it and any dead classes."""
    if outcome is None:
        return "-"
    text = outcome.status
    if outcome.status == "collapsed":
        text = f"collapsed x{outcome.collapsed_attempts}"
    elif outcome.collapsed_attempts:
        text += f" ({outcome.collapsed_attempts} collapsed)"
    if outcome.dead_classes and outcome.status != "collapsed":  # a partly dead head that still trained
        text += f", dead {outcome.dead_classes}"
    return text


def attempts_table(report: Report) -> tuple[list[str], list[list[str]]]:
    """Per network, protocol and lr: how its runs ended, collapsed attempts counted (and the final run's)."""
    results = [(row, result) for row in report.networks for result in row.protocols.values() if result is not None]
    lrs = sorted({o.lr for _, result in results for o in result.per_lr if o.lr is not None}, reverse=True)
    header = ["network", "protocol", *(f"lr {lr:g}" for lr in lrs), "final run"]
    rows = []
    for row, result in results:
        by_lr = {o.lr: o for o in result.per_lr}
        final = result.final
        final_cell = "-" if final is None else _attempts_cell(LrOutcome(
            final.lr, final.status, final.test_error, None, final.run_id, final.attempt, final.collapsed_attempts,
            final.dead_classes))
        rows.append([row.display_name, result.protocol, *(_attempts_cell(by_lr.get(lr)) for lr in lrs), final_cell])
    return header, rows


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
        "val-sel.: the lr with the best validation accuracy on a held-out split, retrained on all training images "
        "(the final run) and tested once: the honest number (the selection run's own test error when there is no "
        "final run yet). diff = ours - paper, in points; * = not the paper's setting (see notes).",
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
    validated = _validated_rows(report)
    if validated:
        console.print(_rich_table(VALIDATED_TITLE, VALIDATED_HEADER, validated))
    header, rows = attempts_table(report)
    if rows:
        console.print(_rich_table(ATTEMPTS_TITLE, header, rows))
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


VALIDATED_TITLE = ("Validated protocol: the selection run (validation split held out) and the final run (all "
                   "training images)")
ATTEMPTS_TITLE = "Runs per lr: last attempt's status (a collapsed run is restarted with a new seed, same data split)"


def _rich_table(title: str, header: list[str], rows: list[list[str]]) -> Any:
    from rich.table import Table

    table = Table(title=title, title_style="bold")
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i < 2 else "right", no_wrap=i == 0)
    for cells in rows:
        table.add_row(*cells)
    return table


def _md_table(header: list[str], rows: Iterable[list[str]]) -> list[str]:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return [line(header), "|" + "|".join("---" for _ in header) + "|", *(line(r) for r in rows)]


def render_markdown(report: Report) -> str:
    lines = ["## Table 3: CIFAR-10 test error (%), paper vs this reproduction", ""]
    lines += _md_table(table3_header(), (table3_cells(row) for row in report.networks))
    lines += ["", *(f"- {line}" for line in _legend())]
    validated = _validated_rows(report)
    if validated:
        lines += ["", f"## {VALIDATED_TITLE}", "", *_md_table(VALIDATED_HEADER, validated)]
    header, rows = attempts_table(report)
    if rows:
        lines += ["", f"## {ATTEMPTS_TITLE}", "", *_md_table(header, rows)]
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
                "comparable", "run_id", "study", "ours_test_error", "ours_diff", "ours_from", "collapsed",
                "collapsed_attempts", "collapsed_attempts_per_lr", "dead_classes", "final_test_error", "final_diff",
                "final_status", "final_attempt", "final_run_id")
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
                "study": result.study_name, "ours_test_error": result.ours_test_error, "ours_diff": result.ours_diff,
                "ours_from": result.ours_from, "collapsed": result.collapsed,
                "collapsed_attempts": result.collapsed_attempts,
                "collapsed_attempts_per_lr": ";".join(f"{o.lr:g}:{o.collapsed_attempts}" for o in result.per_lr
                                                      if o.lr is not None),
                "dead_classes": result.dead_classes,
            }
            final = result.final
            if final is not None:
                values |= {"final_test_error": final.test_error, "final_diff": final.diff, "final_status": final.status,
                           "final_attempt": final.attempt, "final_run_id": final.run_id}
            record.update({f"{protocol}_{k}": ("" if v is None else v) for k, v in values.items()})
        writer.writerow(record)
    return out.getvalue()


def render_json(report: Report) -> str:
    return json.dumps(report.to_dict(), indent=2)
