"""Files written where the user says (``visualize --out``, ``report --plot``): checked before any work starts, never
written over an existing file without ``--force``, never through a symbolic link, and whole or not at all.

The file is drawn into a temporary file beside it and renamed into place: a rename replaces a link itself instead
of following it, and a reader never sees half a PNG. Torch- and MLflow-free (the report imports it).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from allconv_cli.errors import AllconvError


def check_png(path: Path, option: str, force: bool = False) -> None:
    """One line naming the value and the fix when ``path`` cannot take a new PNG: no ``.png`` name, no such folder,
    a symbolic link, something that is not a plain file, or an existing file without ``force``."""
    if path.suffix.lower() != ".png":
        raise AllconvError(f"{option} {path}: the figure is a PNG, give a file name ending in .png "
                           f"(e.g. {path.with_suffix('.png')})")
    if not path.parent.is_dir():
        raise AllconvError(f"{option} {path}: folder {path.parent} does not exist, create it or choose another")
    if path.is_symlink():
        raise AllconvError(f"{option} {path} is a symbolic link: give the path of a plain file (a link is never "
                           "written through)")
    if path.exists():
        if not path.is_file():
            raise AllconvError(f"{option} {path} exists and is not a plain file: choose another name")
        if not force:
            raise AllconvError(f"{option} {path} already exists: choose another name, or pass --force to replace it")


def write_file(path: Path, write: Callable[[BinaryIO], None], force: bool = False) -> None:
    """Write ``path`` through ``write(binary file)``: into a temporary file in the same folder, then renamed over
    ``path``. Without ``force`` the name is first claimed exclusively, so a file that appeared since
    :func:`check_png` is not replaced either."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for any new file
    try:
        with os.fdopen(fd, "wb") as out:
            write(out)
        if not force:
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # O_EXCL never follows a link
            except FileExistsError:
                raise AllconvError(f"{path} already exists: choose another name, or pass --force to replace it") \
                    from None
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
