"""``allconv models``: the twelve networks, their exact parameter counts and the paper's figures."""

from __future__ import annotations

import json

import click

from allconv_cli.cli import main


@main.command("models")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--summary", "summary_name", metavar="NAME", help="Print each layer of NAME (e.g. allconv_c_allcnn).")
@click.option("--num-classes", type=click.IntRange(min=2), default=10, show_default=True)
@click.option("--bn/--no-bn", default=False, help="With --summary: BatchNorm after each conv.")
def models_command(fmt: str, summary_name: str | None, num_classes: int, bn: bool) -> None:
    """List the paper's 12 CIFAR networks (Tables 1-3), or one network's layers with --summary."""
    from rich.console import Console
    from rich.table import Table

    from allconv_cli import models, paper

    console = Console()
    if summary_name:
        base, branch = models.parse_name(summary_name)
        rows = models.summary(base, branch, num_classes=num_classes, bn=bn)
        if fmt == "json":
            keys = ("layer", "module", "output_shape", "params")
            click.echo(json.dumps([dict(zip(keys, row, strict=True)) for row in rows], indent=2))
            return
        table = Table(title=f"{paper.TABLE3[(base, branch)].display_name} ({paper.registry_name(base, branch)})")
        for column in ("layer", "module", "output (C, H, W)", "params"):
            table.add_column(column, justify="right" if column == "params" else "left")
        for name, text, shape, params in rows:
            table.add_row(name, text, " x ".join(map(str, shape)), f"{params:,}")
        table.add_section()
        table.add_row("total", "", "", f"{sum(r[3] for r in rows):,}")
        console.print(table)
        return
    rows = [models.describe(base, branch, num_classes) for base, branch in models.ARCHITECTURES]
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=f"The All Convolutional Net: CIFAR networks ({num_classes} classes)")
    for column in ("paper name", "registry name", "parameters", "paper params", "paper test error %"):
        table.add_column(column, justify="right" if column not in ("paper name", "registry name") else "left")
    for row in rows:
        table.add_row(
            row["display_name"], row["name"], f"{row['params']:,}", row["paper_params"], f"{row['paper_error']:.2f}"
        )
        if row["branch"] == "allcnn" and row["base"] != "C":
            table.add_section()
    console.print(table)
    console.print("Paper errors: CIFAR-10 test error, no augmentation (Table 3); the lr was picked on the test set.")
