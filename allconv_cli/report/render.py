"""The cells of a built :class:`~allconv_cli.report.Report`, and three of its views: markdown, csv and json.

Rendering only reads the report, never MLflow. Numbers a person reads (terminal, markdown, csv) have at most 4
significant digits; json keeps MLflow's full precision. The terminal view is :mod:`.terminal`.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from allconv_cli.paper import PROTOCOLS
from allconv_cli.report.studies import Ablation, StudySummary
from allconv_cli.report.table3 import LrOutcome, NetworkRow, ProtocolResult
from allconv_cli.tracking.schema import Status

if TYPE_CHECKING:
    from allconv_cli.report import Report

PROTOCOL_SHORT = {"paper": "test-sel.", "validated": "val-sel."}


def significant(value: float, digits: int = 4) -> str:
    """``value`` to ``digits`` significant digits as a person reads it: 89.49000000000001 -> 89.49, 0.0627234 ->
    0.06272, 1.2e-05 stays 1.2e-05; a whole number has no decimals and a large one no exponent (12346, not
    1.235e+04)."""
    if value.is_integer() or abs(value) >= 10**digits:
        return f"{value:.0f}"
    return f"{value:.{digits}g}"


def param_text(raw: str) -> str:
    """A logged param as the terminal and csv show it: decimals to 4 significant digits, anything else as logged."""
    try:
        number = float(raw)
    except ValueError:
        return raw
    return significant(number) if any(c in raw for c in ".eE") and number == number else raw


def _number(value: float | None, digits: int = 2, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _fraction_as_percent(value: float | None) -> str:
    """0.8312 -> "83.12" (the column header carries the %)."""
    return "-" if value is None else f"{100 * value:.2f}"


def _lr(value: float | None) -> str:
    return "-" if value is None else significant(value)


def _ours(result: ProtocolResult | None) -> str:
    if result is None or result.ours_test_error is None:
        return "-"
    return f"{result.ours_test_error:.2f}" + ("" if result.comparable else "*")


def table3_header(protocols: Sequence[str] = PROTOCOLS, wide: bool = True) -> list[str]:
    """The wide table's 13 columns (markdown, ``--wide``), or the compact one's: no printed parameter counts and
    short headers, so both protocols fit a 120-column terminal (the legend explains them)."""
    if not wide:
        cols = ["network", "params", "paper", "2020"]
        for protocol in protocols:
            cols += [f"ours {PROTOCOL_SHORT[protocol]}", "lr", "diff", "div."]
        return cols
    cols = ["network", "params", "paper params", "paper err %", "2020 err %"]
    for protocol in protocols:
        cols += [f"ours {PROTOCOL_SHORT[protocol]} err %", "lr", "diff", "diverged"]
    return cols


def table3_cells(row: NetworkRow, protocols: Sequence[str] = PROTOCOLS, wide: bool = True) -> list[str]:
    cells = [row.display_name, f"{row.params:,}", *([row.paper_params] if wide else []), f"{row.paper_error:.2f}",
             f"{row.error_2020:.2f}"]
    for protocol in protocols:
        result = row.protocols[protocol]
        if result is None:
            cells += ["-", "-", "-", "-"]
        else:
            cells += [_ours(result), _lr(result.lr), _number(result.ours_diff, signed=True),
                      f"{result.diverged}/{result.lrs_total}"]
    return cells


def has_table3(report: Report) -> bool:
    """Whether any network has an ``allconv reproduce`` result: an empty Table 3 is not drawn."""
    return any(result is not None for row in report.networks for result in row.protocols.values())


VALIDATED_HEADER = ["network", "lr", "val acc %", "selection run err %", "final run err %", "final status",
                    "final diff", "final attempt"]


def validated_rows(report: Report) -> list[list[str]]:
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
    if outcome.status == Status.COLLAPSED:
        text = f"collapsed x{outcome.collapsed_attempts}"
    elif outcome.collapsed_attempts:
        text += f" ({outcome.collapsed_attempts} collapsed)"
    if outcome.dead_classes and outcome.status != Status.COLLAPSED:  # a partly dead head that still trained
        text += f", dead {outcome.dead_classes}"
    return text


def attempts_table(report: Report) -> tuple[list[str], list[list[str]]]:
    """Per network, protocol and lr: how its runs ended, collapsed attempts counted (and the final run's)."""
    results = [(row, result) for row in report.networks for result in row.protocols.values() if result is not None]
    lrs = sorted({o.lr for _, result in results for o in result.per_lr if o.lr is not None}, reverse=True)
    header = ["network", "protocol", *(f"lr {significant(lr)}" for lr in lrs), "final run"]
    rows = []
    for row, result in results:
        by_lr = {o.lr: o for o in result.per_lr}
        final = result.final
        final_cell = "-" if final is None else _attempts_cell(LrOutcome(
            final.lr, final.status, final.test_error, None, final.run_id, final.attempt, final.collapsed_attempts,
            final.dead_classes))
        rows.append([row.display_name, result.protocol, *(_attempts_cell(by_lr.get(lr)) for lr in lrs), final_cell])
    return header, rows


def study_cells(study: StudySummary) -> list[str]:
    """``finished`` as ``allconv search`` counts it: "6 of 6" (complete + pruned + failed of --trials)."""
    params = ", ".join(f"{k}={param_text(v)}" for k, v in study.best_params.items()) or "-"
    done = f"{study.done} of {study.target_trials}" if study.target_trials is not None else str(study.done)
    return [study.name, study.space or "-", study.network or "-", done, _fraction_as_percent(study.val_accuracy),
            _number(study.test_error), _number(study.final_test_error), params]


STUDY_HEADER = ["study", "space", "network", "finished", "val acc %", "its test err %", "final retrain err %",
                "best params"]


def ablation_header(ablation: Ablation) -> list[str]:
    return [*ablation.columns, "trials", "diverged", "val acc %", "its test err %"]


def ablation_cells(ablation: Ablation, row: dict[str, Any]) -> list[str]:
    return [*(param_text(str(row[c])) for c in ablation.columns), str(row["trials"]), str(row["diverged"]),
            _fraction_as_percent(row["val_accuracy"]), _number(row["test_error"])]


def legend(wide: bool = True) -> list[str]:
    """What the Table 3 columns mean, one short line each (each fits 120 columns); under the compact table also
    how to get the wide one."""
    return [
        *([] if wide else ["paper, 2020: their test error %; ours: our test error %; div.: diverged runs / lrs tried"]),
        "test-sel.: the paper's protocol, lr chosen on the test set (lowest TEST error: optimistic), all 50,000 "
        "training images",
        "val-sel.: lr chosen on a held-out validation split, retrained on all training images (the final run) and "
        "tested once",
        "  (the honest number; the selection run's own test error while there is no final run yet)",
        "diff = ours - paper, in points; * = not the paper's setting (see notes)"
        + ("" if wide else "; the wide table: allconv report --wide"),
    ]


def _md_table(header: list[str], rows: Iterable[list[str]]) -> list[str]:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return [line(header), "|" + "|".join("---" for _ in header) + "|", *(line(r) for r in rows)]


def render_markdown(report: Report) -> str:
    """Table 3 (the wide one) and the reproduction's tables when there are results, then the studies; else the
    studies first and the notes, which say how to fill Table 3."""
    lines: list[str] = []
    if has_table3(report):
        lines += [f"## {TABLE3_TITLE}", ""]
        lines += _md_table(table3_header(), (table3_cells(row) for row in report.networks))
        lines += ["", *(f"- {line}" for line in legend())]
        validated = validated_rows(report)
        if validated:
            lines += ["", f"## {VALIDATED_TITLE}", "", *_md_table(VALIDATED_HEADER, validated)]
        header, rows = attempts_table(report)
        if rows:
            lines += ["", f"## {ATTEMPTS_TITLE}", "", *_md_table(header, rows)]
    if report.studies:
        lines += ["", f"## {STUDIES_TITLE}", ""]
        lines += _md_table(STUDY_HEADER, (study_cells(s) for s in report.studies))
    for ablation in report.ablations:
        lines += ["", f"## {ablation_title(ablation)}", ""]
        lines += _md_table(ablation_header(ablation), (ablation_cells(ablation, r) for r in ablation.rows))
    if report.notes:
        lines += ["", "Notes:", "", *(f"- {note}" for note in report.notes)]
    return "\n".join(lines).lstrip("\n") + "\n"


TABLE3_TITLE = "Table 3: CIFAR-10 test error (%), paper vs this reproduction"
STUDIES_TITLE = "allconv search studies (best trial by validation accuracy)"
VALIDATED_TITLE = ("Validated protocol: the selection run (validation split held out) and the final run (all "
                   "training images)")
ATTEMPTS_TITLE = "Runs per lr: last attempt's status (a collapsed run is restarted with a new seed, same data split)"


def ablation_title(ablation: Ablation) -> str:
    return f"Ablation: {ablation.title} ({ablation.study})"


CSV_FIELDS = ["network", "display_name", "params", "paper_params", "paper_error", "error_2020"] + [
    f"{protocol}_{key}"
    for protocol in PROTOCOLS
    for key in ("test_error", "lr", "diff", "diverged", "finished", "lrs_total", "val_accuracy", "epochs",
                "comparable", "run_id", "study", "ours_test_error", "ours_diff", "ours_from", "collapsed",
                "collapsed_attempts", "collapsed_attempts_per_lr", "dead_classes", "final_test_error", "final_diff",
                "final_status", "final_attempt", "final_run_id")
]


def render_csv(report: Report) -> str:
    """Table 3 only, one row per network, missing values as empty cells, numbers to 4 significant digits
    (searches, ablations and full precision: use json)."""
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
                "collapsed_attempts_per_lr": ";".join(f"{significant(o.lr)}:{o.collapsed_attempts}"
                                                      for o in result.per_lr if o.lr is not None),
                "dead_classes": result.dead_classes,
            }
            final = result.final
            if final is not None:
                values |= {"final_test_error": final.test_error, "final_diff": final.diff, "final_status": final.status,
                           "final_attempt": final.attempt, "final_run_id": final.run_id}
            record.update({f"{protocol}_{k}": ("" if v is None else v) for k, v in values.items()})
        writer.writerow({k: significant(v) if isinstance(v, float) else v for k, v in record.items()})
    return out.getvalue()


def render_json(report: Report) -> str:
    return json.dumps(report.to_dict(), indent=2)
