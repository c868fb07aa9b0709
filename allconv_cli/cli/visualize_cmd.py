"""``allconv visualize``: what chosen units of a trained run respond to, as the paper's Section 4 shows it."""

from __future__ import annotations

from pathlib import Path

import click

from allconv_cli.cli import main


def _units(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...] | int:
    """``0,3,7`` (or ``5,`` for one channel) -> channel indices; a bare ``N`` -> a count."""
    try:
        if "," not in value:
            return int(value)
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r}: give channel indices such as 0,3,7 or a count such as 4") from None


@main.command("visualize")
@click.argument("run_id")
@click.option("--layer", metavar="NAME",
              help="conv or pool layer (conv1, pool1, ...) [default: the highest conv below the class scores].")
@click.option("--units", default="4", show_default=True, callback=_units, metavar="I,J,K | N",
              help="Channels of the layer: indices (0,3,7; one channel as 5,) or a count N, which shows the N "
                   "channels with the highest peak activation.")
@click.option("--top", type=click.IntRange(min=1), default=4, show_default=True,
              help="Top-activating images shown per unit.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE.png",
              help="PNG to write [default: visualize-<run id[:8]>-<layer>.png]; an existing file needs --force.")
@click.option("--force", is_flag=True, help="Replace the PNG if it exists (a symbolic link is never written through).")
@click.option("--split", type=click.Choice(["val", "test"]), default="val", show_default=True,
              help="Where the images come from: the run's validation split (test when it held out none).")
@click.option("--weights", type=click.Choice(["checkpoint", "best", "last"]), default="checkpoint", show_default=True,
              help="The run's checkpoint: checkpoint = best.pt, else last.pt; or exactly its best / last. Read as "
                   "weights only: no pickled model is loaded, so no code from the run's artifacts runs.")
@click.option("--data-dir", type=click.Path(file_okay=False),
              help="Where the run's data is now, if it moved [default: the run's own].")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
def visualize_command(run_id: str, layer: str | None, units: tuple[int, ...] | int, top: int, out: Path | None,
                      force: bool, split: str, weights: str, data_dir: str | None, device: str) -> None:
    """Plain backpropagation, the "deconvnet" and guided backpropagation, side by side, for the images that
    activate chosen units of RUN_ID's network most (the paper's Figures 1-3). Writes a PNG and logs it to the run."""
    from allconv_cli.output_files import check_png

    if out is not None:
        check_png(out, "--out", force)  # before torch and MLflow are imported: a bad name fails at once

    from allconv_cli.tracking.store import run_uri
    from allconv_cli.visualize import visualize_run

    result = visualize_run(run_id, layer=layer, units=units, top=top, out=out, split=split, weights=weights,
                           data_dir=data_dir, device=device, force=force)
    for note in result.notes:
        click.echo(f"Note: {note}", err=True)
    units_text = ",".join(str(u) for u in result.units)
    click.echo(f"Wrote {result.path} ({result.layer} units {units_text}, top {top} {result.split} images each, "
               f"weights {result.weights}) in {result.seconds:.1f} s")
    click.echo(f"Logged to the run as {run_uri(result.run_id, result.artifact)}")
