"""``allconv report``: the paper's Table 3 next to what MLflow holds, plus search studies and the two ablations.

One pipeline: :func:`build_report` reads the runs (:mod:`.runs`), picks the Table 3 rows (:mod:`.table3`) and the
studies (:mod:`.studies`) into an immutable :class:`Report`, which :mod:`.render` and :mod:`.plot` only read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from allconv_cli.paper import PAPER, REPRODUCTION_2020
from allconv_cli.report.plot import write_bar_chart
from allconv_cli.report.render import render_csv, render_json, render_markdown
from allconv_cli.report.runs import RunRecord, load_runs
from allconv_cli.report.studies import Ablation, StudySummary, search_studies
from allconv_cli.report.table3 import NetworkRow, ProtocolResult, exact_params, table3
from allconv_cli.report.terminal import render_rich, report_console, wide_console
from allconv_cli.tracking import store
from allconv_cli.tracking.schema import Status

__all__ = [
    "Report",
    "build_report",
    "render_csv",
    "render_json",
    "render_markdown",
    "render_rich",
    "report_console",
    "wide_console",
    "write_bar_chart",
]


@dataclass(frozen=True)
class Report:
    """Everything ``allconv report`` shows; built once by :func:`build_report`, never changed afterwards."""

    tracking_uri: str  # as it may be shown: secrets replaced by ***
    experiments: tuple[str, ...]
    networks: tuple[NetworkRow, ...]
    studies: tuple[StudySummary, ...]
    ablations: tuple[Ablation, ...]
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for row, raw in zip(self.networks, data["networks"], strict=True):
            for protocol, result in row.protocols.items():
                if result is not None:
                    raw["protocols"][protocol].update(comparable=result.comparable, ours_from=result.ours_from,
                                                      ours_test_error=result.ours_test_error,
                                                      ours_diff=result.ours_diff)
        data["sources"] = {"paper": PAPER, "reproduction_2020": REPRODUCTION_2020}
        return data


def build_report(experiments: Sequence[str] | None = None, networks: Collection[tuple[str, str]] | None = None,
                 include_studies: bool = True) -> Report:
    """Read MLflow and assemble a report.

    ``experiments``: the MLflow experiments to read (default: all). ``networks``: the (base, branch) pairs whose
    Table 3 rows to include (default: all twelve). ``include_studies``: also the search studies and ablations.
    """
    runs, names = load_runs(experiments)
    rows = [row for row in table3(runs, exact_params()) if networks is None or (row.base, row.branch) in networks]
    studies, ablations = search_studies(runs) if include_studies else ([], [])
    uri = store.shown_uri()
    return Report(uri, tuple(names), tuple(rows), tuple(studies), tuple(ablations),
                  _notes(runs, names, rows, uri))


def _notes(runs: list[RunRecord], names: list[str], rows: list[NetworkRow], uri: str) -> tuple[str, ...]:
    """What the reader must know to trust the rows shown: missing runs, deviations, pending lrs, ignored studies."""
    notes = []
    if not runs:
        where = ", ".join(names) if names else "any experiment"
        notes.append(f"no runs in {where} of {uri}: run `allconv reproduce` first")
    elif not any(result for row in rows for result in row.protocols.values()):
        notes.append("Table 3 is empty: `allconv reproduce` fills it (see `allconv reproduce --help`)")
    for row in rows:
        for result in row.protocols.values():
            if result is None:
                continue
            label = f"{row.display_name} ({result.protocol})"
            if result.deviations:
                notes.append(f"{label}: not the paper's setting ({', '.join(result.deviations)})")
            notes += _run_notes(label, result)
            pending = result.lrs_total - result.finished - result.diverged - result.collapsed - result.failed
            if pending > 0:
                notes.append(f"{label}: {pending} of {result.lrs_total} lrs still running or not started; "
                             "the selection may change")
            if result.other_studies:
                notes.append(f"{label}: {result.other_studies} older reproduction(s) ignored, reporting "
                             f"{result.study_name!r}")
    return tuple(notes)


def _run_notes(label: str, result: ProtocolResult) -> list[str]:
    """Collapsed attempts per lr, dead class channels, and where the validated number comes from."""
    notes = []
    if result.collapsed_attempts:
        per_lr = ", ".join(
            f"lr {o.lr:g}: {o.collapsed_attempts}" + (" (every attempt)" if o.status == Status.COLLAPSED else
                                                      f" (then attempt {o.attempt} {o.status})")
            for o in result.per_lr if o.collapsed_attempts)
        notes.append(f"{label}: {result.collapsed_attempts} collapsed attempt(s), each restarted with a new seed "
                     f"while retries were left: {per_lr}")
    if result.dead_classes:
        notes.append(f"{label}: the selected run has dead class channels {result.dead_classes} (never a positive "
                     "score on validation after its last epoch)")
    final = result.final
    if result.protocol == "validated" and result.run_id is not None:
        if final is None:
            notes.append(f"{label}: no final run on all training images yet (`allconv reproduce` trains it once "
                         "every lr is done); ours is the selection run's test error")
        elif result.ours_from != "final":
            notes.append(f"{label}: the final run on all training images ended {final.status}; ours is the "
                         "selection run's test error")
        elif final.dead_classes:
            notes.append(f"{label}: the final run has dead class channels {final.dead_classes}")
    return notes
