"""User-facing errors.

Anything the user can fix (a bad option, missing data, a malformed file) is raised as :class:`AllconvError`.
The CLI turns it into one line on stderr and exit code 2, never a traceback, so library code can raise it deep
inside without knowing about click.
"""

from __future__ import annotations


class AllconvError(Exception):
    """An error caused by user input; the message names the bad value and the fix, on one line."""

    exit_code = 2


def first_line(exc: object, limit: int | None = 200) -> str:
    """An exception's first line, whitespace collapsed (its type name if it has no message), at most ``limit``
    characters: what a one-line error quotes of a library's multi-line message."""
    text = str(exc).strip().splitlines()
    line = " ".join(text[0].split()) if text else type(exc).__name__
    return line if limit is None else line[:limit]
