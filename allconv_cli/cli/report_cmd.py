"""``allconv report``: the paper's Table 3 next to our MLflow results, search studies and ablations."""

from __future__ import annotations

from pathlib import Path

import click

from allconv_cli.cli import main


@main.command("report")
@click.option("--experiment", "experiments", multiple=True, metavar="NAME",
              help="MLflow experiment to read; repeat for several [default: every experiment in the store].")
@click.option("--format", "fmt", type=click.Choice(["table", "markdown", "csv", "json"]), default="table",
              show_default=True, help="csv holds Table 3 only; json holds everything, with a rerun command per row "
                                      "and full precision (table, markdown and csv show 4 significant digits).")
@click.option("--wide", is_flag=True, help="Table 3 with all 13 columns (printed parameter counts, long headers), "
                                           "at least 160 characters wide [default: a compact table that fits 120].")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE.png",
              help="Also write a bar chart of paper vs ours per network; an existing file needs --force.")
@click.option("--force", is_flag=True, help="Replace the --plot file if it exists (a symbolic link is never "
                                            "written through).")
def report_command(experiments: tuple[str, ...], fmt: str, wide: bool, plot_path: Path | None, force: bool) -> None:
    """Print Table 3 of the paper next to the `allconv reproduce` results found in MLflow.

    One row per network, in the paper's order: the paper's test error and parameter count, the 2020 PyTorch
    reproduction's error, and ours under each protocol that was run (paper: lr chosen on the test set, as the
    paper did; validated: lr chosen on a validation split), with the lr chosen, ours - paper in points and the
    number of diverged runs. Networks not run show as '-'. Also lists `allconv search` studies and the BN x dropout
    and SGD vs Adam ablations when the experiments hold them. Reads MLFLOW_TRACKING_URI (default sqlite:///mlflow.db).
    """
    from allconv_cli import report
    from allconv_cli.output_files import check_png

    if plot_path is not None:
        check_png(plot_path, "--plot", force)  # before MLflow is read: a bad name costs nothing
    result = report.build_report(list(experiments) or None)
    if fmt == "json":
        click.echo(report.render_json(result))
    elif fmt == "csv":
        click.echo(report.render_csv(result), nl=False)
    elif fmt == "markdown":
        click.echo(report.render_markdown(result), nl=False)
    else:
        report.render_rich(result, report.report_console(wide=wide), wide=wide)
    if plot_path is not None:
        report.write_bar_chart(result, plot_path, force=force)
        click.echo(f"wrote {plot_path}", err=True)
