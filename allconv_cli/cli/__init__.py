"""The ``allconv`` command line.

Thin on purpose: each command parses options and calls into the library. Only click is imported at start-up;
torch, mlflow and optuna are imported inside the commands, so ``allconv --help`` is instant.
"""

from __future__ import annotations

import sys
from typing import Any

import click
from click.exceptions import NoArgsIsHelpError

from allconv_cli import __version__, runtime
from allconv_cli.errors import AllconvError


class AllconvGroup(click.Group):
    """Every user error ends as one line on stderr and exit code 2, never a traceback.

    That covers our own :class:`AllconvError` (raised deep in the library) and click's usage errors, whose default
    rendering spans several lines.
    """

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        runtime.configure()
        try:
            code = super().main(*args, **kwargs)
        except NoArgsIsHelpError as exc:  # bare `allconv` (or `allconv spaces`-like groups): the help, exit 0
            click.echo(exc.ctx.get_help() if exc.ctx else self.get_help(click.Context(self)))
            sys.exit(0)
        except click.UsageError as exc:
            command = exc.ctx.command_path if exc.ctx else "allconv"
            click.echo(f"Error: {exc.format_message()} (see '{command} --help')", err=True)
            sys.exit(2)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except AllconvError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("Aborted.", err=True)
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=AllconvGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="allconv")
def main() -> None:
    """Reproduce and beat 'Striving for Simplicity: The All Convolutional Net' (Springenberg et al., 2015)."""


# Commands register themselves on `main`; each imports only click at module level.
from allconv_cli.cli import (  # noqa: E402
    bench_cmd,
    models_cmd,
    report_cmd,
    reproduce_cmd,
    search_cmd,
    spaces_cmd,
    train_cmd,
    visualize_cmd,
)

__all__ = ["bench_cmd", "main", "models_cmd", "report_cmd", "reproduce_cmd", "search_cmd", "spaces_cmd", "train_cmd",
           "visualize_cmd"]
