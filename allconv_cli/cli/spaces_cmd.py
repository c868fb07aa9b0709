"""``allconv spaces``: list the search spaces of `allconv search --space` (yours and the shipped ones), print one, or
copy a shipped one into ./search_spaces to start from."""

from __future__ import annotations

import click

from allconv_cli.cli import main


@main.group("spaces", invoke_without_command=True)
@click.pass_context
def spaces_command(ctx: click.Context) -> None:
    """List the search spaces of `allconv search --space NAME`: yours in ./search_spaces/NAME.yaml (found first), then
    the shipped ones. `allconv spaces show NAME` prints one, `allconv spaces copy NAME` starts your own from one."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from allconv_cli import space_files, spaces

    table = Table(title="allconv search spaces (allconv search --space NAME)")
    for column in ("name", "where", "sampler", "trials", "description"):
        table.add_column(column, overflow="fold")
    notes = []
    for entry in space_files.named_spaces():
        where = "shipped (shadowed)" if entry.shadowed else entry.where
        try:
            space = spaces.load_path(entry.path)
        except spaces.SpaceError as exc:  # a broken file of the user's: listed, with the reason
            table.add_row(entry.name, where, "-", "-", Text(f"invalid: {exc}", style="red"))
            continue
        size = space.grid_size()
        table.add_row(entry.name, where, space.sampler, "any" if size is None else str(size), Text(space.description))
        if entry.shadowed:
            notes.append(f"note: {space_files.local_dir() / entry.path.name} shadows the shipped space {entry.name}: "
                         f"--space {entry.name} uses the local file")
    Console().print(table)
    for note in notes:
        click.echo(note)
    if not space_files.local_names():
        click.echo(f"Your own spaces go in ./{space_files.LOCAL_DIR}/NAME.yaml; `allconv spaces copy NAME` starts one "
                   "from a shipped space.")


@spaces_command.command("show")
@click.argument("name")
def spaces_show_command(name: str) -> None:
    """Print the search space NAME (./search_spaces/NAME.yaml, a shipped name, or a .yaml path), validated."""
    from allconv_cli import spaces

    space = spaces.load(name)
    click.echo(f"# {space.source}")
    click.echo(space.text.rstrip("\n"))


@spaces_command.command("copy")
@click.argument("name")
@click.option("--force", is_flag=True, help="Overwrite ./search_spaces/NAME.yaml if it exists.")
def spaces_copy_command(name: str, force: bool) -> None:
    """Write the shipped search space NAME to ./search_spaces/NAME.yaml, to edit; `--space NAME` then uses it."""
    from allconv_cli import space_files

    target = space_files.copy_shipped(name, force=force)
    click.echo(f"wrote {target} (the shipped {name}); edit it, then: allconv search --space {name} ...")
