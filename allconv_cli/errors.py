"""User-facing errors.

Anything the user can fix (a bad option, missing data, a malformed file) is raised as :class:`AllconvError`.
The CLI turns it into one line on stderr and exit code 2, never a traceback, so library code can raise it deep
inside without knowing about click.
"""

from __future__ import annotations


class AllconvError(Exception):
    """An error caused by user input; the message names the bad value and the fix, on one line."""

    exit_code = 2
