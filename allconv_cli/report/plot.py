"""The Table 3 bar chart: paper, 2020 reproduction and ours per network, in one PNG.

matplotlib is imported when a chart is drawn, with the Agg backend (no display needed).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from allconv_cli.output_files import write_file
from allconv_cli.paper import PROTOCOLS

if TYPE_CHECKING:
    from allconv_cli.report import Report

SERIES = (  # (label, colour)
    ("paper (Springenberg et al. 2015)", "#4d4d4d"),
    ("2020 PyTorch reproduction", "#e6a07a"),
    ("ours, lr selected on the test set (as the paper)", "#3a7dc9"),
    ("ours, lr selected on validation (final run on all training images)", "#2e9e5b"),
)


def write_bar_chart(report: Report, path: str | Path, force: bool = False) -> None:
    """A grouped bar chart of test error per network: paper, 2020 reproduction, ours under each protocol.

    Readable on its own: values on the bars, "not run" where a network has no result, hatching where our runs do
    not use the paper's setting (fewer epochs, a subset, other data). The legend sits between the title and the
    axes, in two columns, inside the figure. ``path`` is written whole (:func:`~allconv_cli.output_files.write_file`:
    an existing file only with ``force``, never through a link).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rows = report.networks
    values: list[list[float | None]] = [
        [r.paper_error for r in rows],
        [r.error_2020 for r in rows],
        *[[r.protocols[p].ours_test_error if r.protocols[p] else None for r in rows] for p in PROTOCOLS],
    ]
    hatched = [[False] * len(rows), [False] * len(rows)] + [
        [bool(r.protocols[p] and not r.protocols[p].comparable) for r in rows] for p in PROTOCOLS
    ]
    present = [v for series in values for v in series if v is not None]
    top = max(present) * 1.18 if present else 30.0
    width = 0.2
    fig, ax = plt.subplots(figsize=(15, 7), dpi=110, layout="constrained")
    for s, ((_label, colour), series) in enumerate(zip(SERIES, values, strict=True)):
        offset = (s - 1.5) * width
        for i, value in enumerate(series):
            x = i + offset
            if value is None:
                ax.text(x, top * 0.01, "not run", rotation=90, ha="center", va="bottom", fontsize=7, color="#999999")
                continue
            ax.bar(x, value, width, color=colour, edgecolor="white" if not hatched[s][i] else "black",
                   hatch="///" if hatched[s][i] else None, linewidth=0.6)
            ax.text(x, value + top * 0.008, f"{value:.2f}", rotation=90, ha="center", va="bottom", fontsize=7)
    for boundary in (3.5, 7.5):
        ax.axvline(boundary, color="#cccccc", linewidth=0.8)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r.display_name for r in rows], rotation=25, ha="right", fontsize=9)
    ax.set_ylim(0, top)
    ax.set_ylabel("CIFAR-10 test error (%), lower is better")
    fig.suptitle("The All Convolutional Net, Table 3: paper vs the 2020 reproduction vs ours (no augmentation)")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    handles = [Patch(facecolor=c, label=label) for label, c in SERIES]
    if any(any(h) for h in hatched):
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="///",
                             label="hatched: not the paper's setting (fewer epochs / subset / other data)"))
    # above the axes (never over a bar, however high our errors are), and the constrained layout keeps it in the figure
    ax.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 1.0), fontsize=8, ncol=2, frameon=False)
    try:
        write_file(Path(path), lambda file: fig.savefig(file, format="png"), force)
    finally:
        plt.close(fig)
