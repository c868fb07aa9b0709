"""``allconv models``: the twelve networks, their exact parameter counts and the paper's figures."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import click

from allconv_cli.cli import main

if TYPE_CHECKING:
    from rich.console import Console


@main.command("models")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--summary", "summary_name", metavar="NAME",
              help="Print each layer of NAME: a registry name (allconv_c_allcnn) or the paper's (All-CNN-C).")
@click.option("--num-classes", type=click.IntRange(min=2), default=10, show_default=True)
@click.option("--bn/--no-bn", default=False, help="With --summary: BatchNorm after each conv.")
def models_command(fmt: str, summary_name: str | None, num_classes: int, bn: bool) -> None:
    """List the paper's 12 CIFAR networks (Tables 1-3), or one network's layers with --summary."""
    from rich.console import Console
    from rich.table import Table

    from allconv_cli import architectures

    console = Console()
    if summary_name:
        _print_summary(console, *architectures.parse_name(summary_name), num_classes, bn, fmt)
        return
    rows = [architectures.describe(base, branch, num_classes) for base, branch in architectures.ARCHITECTURES]
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=f"The All Convolutional Net: CIFAR networks ({num_classes} classes)")
    # Names and counts never wrap (a person copies them); the two paper columns' headers wrap when space is short.
    for column, justify, no_wrap in (("paper name", "left", True), ("registry name", "left", True),
                                     ("parameters", "right", True), ("paper params", "right", False),
                                     ("paper test error %", "right", False)):
        table.add_column(column, justify=justify, no_wrap=no_wrap)
    for row in rows:
        table.add_row(
            row["display_name"], row["name"], f"{row['params']:,}", row["paper_params"], f"{row['paper_error']:.2f}"
        )
        if row["branch"] == "allcnn" and row["base"] != "C":
            table.add_section()
    console.print(table)
    console.print("Paper errors: CIFAR-10 test error, no augmentation (Table 3); the lr was picked on the test set.")


def _print_summary(console: Console, base: str, branch: str, num_classes: int, bn: bool, fmt: str) -> None:
    from rich.table import Table

    from allconv_cli import models, paper

    rows = models.summary(base, branch, num_classes=num_classes, bn=bn)
    if fmt == "json":
        keys = ("layer", "module", "output_shape", "params")
        click.echo(json.dumps([dict(zip(keys, row, strict=True)) for row in rows], indent=2))
        return
    table = Table(title=f"{paper.TABLE3[(base, branch)].display_name} ({paper.registry_name(base, branch)})")
    for column in ("layer", "module", "output (C, H, W)", "params"):
        table.add_column(column, justify="right" if column == "params" else "left", no_wrap=column != "module")
    for name, text, shape, params in rows:
        table.add_row(name, text, " x ".join(map(str, shape)), f"{params:,}")
    table.add_section()
    table.add_row("total", "", "", f"{sum(r[3] for r in rows):,}")
    console.print(table)
