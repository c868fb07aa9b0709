"""The ``allconv`` command line.

Thin on purpose: each command parses options and calls into the library. Only click is imported at start-up;
torch, mlflow and optuna are imported inside the commands, so ``allconv --help`` is instant.
"""

from __future__ import annotations

import click

from allconv_cli import __version__
from allconv_cli.errors import AllconvError


class AllconvGroup(click.Group):
    """Turns :class:`AllconvError` into one line on stderr and exit code 2, never a traceback."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except AllconvError as exc:
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(exc.exit_code)


@click.group(cls=AllconvGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="allconv")
def main() -> None:
    """Reproduce and beat 'Striving for Simplicity: The All Convolutional Net' (Springenberg et al., 2015)."""


from allconv_cli.cli import models_cmd  # noqa: E402  (commands register themselves on `main`)

__all__ = ["main", "models_cmd"]
