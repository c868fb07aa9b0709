"""``allconv spaces``: list the search spaces of `allconv search --space`, print one."""

from __future__ import annotations

import click

from allconv_cli.cli import main


@main.group("spaces", invoke_without_command=True)
@click.pass_context
def spaces_command(ctx: click.Context) -> None:
    """List the shipped search spaces of `allconv search --space`, or print one with `allconv spaces show NAME`."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.console import Console
    from rich.table import Table

    from allconv_cli import spaces

    table = Table(title="allconv search spaces (allconv search --space NAME)")
    for column in ("name", "sampler", "trials", "description"):
        table.add_column(column)
    for name in spaces.shipped_names():
        space = spaces.load(name)
        size = space.grid_size()
        table.add_row(name, space.sampler, "any" if size is None else str(size), space.description)
    Console().print(table)


@spaces_command.command("show")
@click.argument("name")
def spaces_show_command(name: str) -> None:
    """Print the search space NAME (a shipped name or a .yaml path), validated."""
    from allconv_cli import spaces

    space = spaces.load(name)
    click.echo(f"# {space.source}")
    click.echo(space.text.rstrip("\n"))
