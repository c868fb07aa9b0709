"""The terminal view of a built :class:`~allconv_cli.report.Report`: rich tables sized to the terminal.

Every table is drawn only at a width where no cell is cut inside a word: rich wraps cells at spaces, and a table
whose narrowest layout (each column as wide as its longest word) is still wider than the terminal is printed as
one paragraph per row instead. Table 3 has three layouts: the wide one (``--wide``, 13 columns), the compact one
(both protocols in 12 columns, for 120-column terminals) and one table per protocol (80 columns). Output that is not
a terminal is laid out for 120 columns. rich is imported when a table is drawn.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from allconv_cli.paper import PROTOCOLS
from allconv_cli.report.render import (
    ATTEMPTS_TITLE,
    PROTOCOL_SHORT,
    STUDIES_TITLE,
    STUDY_HEADER,
    TABLE3_TITLE,
    VALIDATED_HEADER,
    VALIDATED_TITLE,
    ablation_cells,
    ablation_header,
    ablation_title,
    attempts_table,
    has_table3,
    legend,
    study_cells,
    table3_cells,
    table3_header,
    validated_rows,
)

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from allconv_cli.report import Report

_NUMBER = re.compile(r"^([-+]?[\d.,]+%?\*?|\d+/\d+|\d+ of \d+|-)$")  # a cell that reads as a number (or "-")
PIPED_WIDTH = 120  # output to a file or a pipe is laid out as a 120-column terminal shows it
WIDE_WIDTH = 160  # --wide: at least this, so the 13-column Table 3 is never squeezed


def report_console(wide: bool = False, **kwargs: Any) -> Console:
    """The console the report is printed on: the terminal's width, :data:`PIPED_WIDTH` when output is piped or
    captured, and at least :data:`WIDE_WIDTH` with ``wide`` (long lines then wrap in a narrower terminal)."""
    from rich.console import Console

    console = Console(**kwargs)
    if wide:
        return Console(width=max(WIDE_WIDTH, console.width if console.is_terminal else 0), **kwargs)
    return console if console.is_terminal else Console(width=PIPED_WIDTH, **kwargs)


def wide_console(**kwargs: Any) -> Console:
    """:func:`report_console` (the name ``reproduce_cmd`` calls until it moves to ``report_console``)."""
    return report_console(**kwargs)


def render_rich(report: Report, console: Console, wide: bool = False) -> None:
    """Table 3 and the reproduction's tables when there are results, then the search studies and ablations, then
    the notes; without any ``allconv reproduce`` result the studies come first and a note says how to fill Table 3.
    """
    if has_table3(report):
        _print_table3(report, console, wide)
        for line in legend(wide):
            console.print(line, style="dim", highlight=False)
        validated = validated_rows(report)
        if validated:
            _print(console, VALIDATED_TITLE, VALIDATED_HEADER, validated)
        header, rows = attempts_table(report)
        if rows:
            _print(console, ATTEMPTS_TITLE, header, rows)
    if report.studies:
        _print(console, STUDIES_TITLE, STUDY_HEADER, [study_cells(study) for study in report.studies])
    for ablation in report.ablations:
        _print(console, ablation_title(ablation), ablation_header(ablation),
               [ablation_cells(ablation, row) for row in ablation.rows])
    for note in report.notes:
        console.print(f"note: {note}", highlight=False)


def _print_table3(report: Report, console: Console, wide: bool) -> None:
    """The wide table (``--wide``), else the compact one where it fits, else one table per protocol that was run,
    else one paragraph per network."""
    if wide:
        console.print(_table3(report, PROTOCOLS, None, wide=True))
        return
    run = [p for p in PROTOCOLS if any(row.protocols[p] is not None for row in report.networks)]
    for group in ([PROTOCOLS], [(protocol,) for protocol in run]):
        tables = [_table3(report, protocols, console) for protocols in group]
        if all(table is not None for table in tables):
            for table in tables:
                console.print(table)
            return
    for protocol in run:
        _paragraphs(console, f"{TABLE3_TITLE}, {PROTOCOL_SHORT[protocol]}", table3_header((protocol,), wide=False),
                    [table3_cells(row, (protocol,), wide=False) for row in report.networks])


def _table3(report: Report, protocols: Sequence[str], console: Console | None, wide: bool = False) -> Table | None:
    title = TABLE3_TITLE if len(protocols) > 1 else f"{TABLE3_TITLE}, {PROTOCOL_SHORT[protocols[0]]}"
    rows = [table3_cells(row, protocols, wide=wide) for row in report.networks]
    sections = [row.branch == "allcnn" and row.base != "C" for row in report.networks]
    return _new_table(console, title, table3_header(protocols, wide=wide), rows, sections)


def _print(console: Console, title: str, header: list[str], rows: list[list[str]]) -> None:
    """A table where it fits without cutting a word, else one paragraph per row."""
    table = _new_table(console, title, header, rows)
    if table is not None:
        console.print(table)
    else:
        _paragraphs(console, title, header, rows)


def _new_table(console: Console | None, title: str, header: list[str], rows: list[list[str]],
               sections: Sequence[bool] = ()) -> Table | None:
    """The table, its columns sized by :func:`_widths` for ``console`` (None: as rich sizes them) and numbers
    right-aligned; None when it cannot fit without cutting a word."""
    from rich.table import Table

    widths = _widths(console.width, header, rows) if console is not None else [None] * len(header)
    if widths is None:
        return None
    table = Table(title=title, title_style="bold")
    for i, (name, width) in enumerate(zip(header, widths, strict=True)):
        numeric = all(_NUMBER.match(cells[i]) for cells in rows) and any(cells[i] != "-" for cells in rows)
        table.add_column(name, justify="right" if numeric else "left", width=width)
    for i, cells in enumerate(rows):
        table.add_row(*cells, end_section=i < len(sections) and sections[i])
    return table


def _widths(total: int, header: list[str], rows: list[list[str]]) -> list[int | None] | None:
    """Column widths within ``total`` characters with no word cut: every column at least its longest word, the
    room left shared in proportion to how much wider each column would like to be (rich's own shrinking cuts words
    when it must); None when the longest words alone do not fit. Natural widths (None) when everything fits."""
    from rich.cells import cell_len

    columns = list(zip(header, *rows, strict=True))
    low = [max(cell_len(word) for cell in column for word in cell.split() or [""]) for column in columns]
    high = [max(cell_len(line) for cell in column for line in cell.splitlines() or [""]) for column in columns]
    room = total - 3 * len(columns) - 1  # a border before each column and after the last, one space either side
    if sum(high) <= room:
        return [None] * len(columns)
    if sum(low) > room:
        return None
    want = [h - lo for h, lo in zip(high, low, strict=True)]
    spare = room - sum(low)
    return [lo + spare * w // sum(want) for lo, w in zip(low, want, strict=True)]


def _paragraphs(console: Console, title: str, header: list[str], rows: list[list[str]]) -> None:
    console.print(title, style="bold", highlight=False)
    for cells in rows:
        fields = "; ".join(f"{name} {cell}" for name, cell in zip(header[1:], cells[1:], strict=True))
        console.print(f"  {cells[0]}: {fields}", highlight=False)
