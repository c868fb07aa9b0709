"""User-facing errors.

Anything the user can fix (a bad option, missing data, a malformed file) is raised as :class:`AllconvError`.
The CLI turns it into one line on stderr and exit code 2 (75 for a store that does not answer), never a
traceback, so library code can raise it deep inside without knowing about click.
"""

from __future__ import annotations


class AllconvError(Exception):
    """An error caused by user input; the message names the bad value and the fix, on one line."""

    exit_code = 2


class StoreUnavailable(AllconvError):
    """A store (MLflow's, or the Optuna storage) did not answer, at start or within the retry budget. Not the
    user's input: a search trial it stops is re-queued and does not count, and the process exits 75 (sysexits'
    EX_TEMPFAIL), not 2, so that Kubernetes, compose and our launcher start the worker again instead of treating
    a store restart as a user error that fails every retry the same way."""

    exit_code = 75


def first_line(exc: object) -> str:
    """An exception's first line, whitespace collapsed (its type name if it has no message): for one-line errors."""
    text = str(exc).strip().splitlines()
    return " ".join(text[0].split()) if text else type(exc).__name__
